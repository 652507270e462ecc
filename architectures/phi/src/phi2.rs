//! Phi-1/1.5/2 (`model_type` `phi`).
//!
//! Each block normalises its input once with a LayerNorm and feeds the
//! result to attention and the MLP in parallel:
//! `h = LN(x); x = x + dense(attn(h)) + fc2(gelu_new(fc1(h)))`. Attention has
//! biases everywhere, rotates only the first `partial_rotary_factor` of each
//! head, and can normalise queries and keys per head (`qk_layernorm`). The
//! output head has a bias. The older "phi-msft" checkpoints
//! (`transformer.h.N.mixer.Wqkv`, `lm_head.linear`, ...) are mapped too.

use mlx_rs::macros::ModuleParameters;
use mlx_rs::module::Module;
use mlx_rs::Array;
use mlx_zoo_core::cache::LayerKv;
use mlx_zoo_core::error::MlxContext;
use mlx_zoo_core::mapping::{MappingTable, Rule, TensorMeta, WeightMapper};
use mlx_zoo_core::model::LinearVisitor;
use mlx_zoo_core::nn::{
    causal_mask, check_packable, checkpointed, embedding, layer_norm, linear, segment_mask,
    Activation, Attention, AttentionConfig, AttentionMask, Embedding, GeluMlp, LayerNorm, Linear,
    Rope, RopeScaling,
};
use mlx_zoo_core::{Architecture, CausalLm, Error, KvCache, ModelConfig, ModelDims, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// A Phi configuration, with transformers' defaults for absent keys.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PhiConfig {
    /// Vocabulary size.
    #[serde(default = "defaults::vocab_size")]
    pub vocab_size: usize,
    /// Model width.
    #[serde(default = "defaults::hidden_size")]
    pub hidden_size: usize,
    /// MLP width.
    #[serde(default = "defaults::intermediate_size")]
    pub intermediate_size: usize,
    /// Blocks.
    #[serde(default = "defaults::num_layers")]
    pub num_hidden_layers: usize,
    /// Query heads.
    #[serde(default = "defaults::num_heads")]
    pub num_attention_heads: usize,
    /// Key/value heads; defaults to `num_attention_heads`.
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    /// MLP activation.
    #[serde(default = "defaults::gelu_new")]
    pub hidden_act: Activation,
    /// Context length.
    #[serde(default = "defaults::max_position_embeddings")]
    pub max_position_embeddings: usize,
    /// LayerNorm epsilon.
    #[serde(default = "defaults::layer_norm_eps")]
    pub layer_norm_eps: f32,
    /// RoPE base.
    #[serde(default = "defaults::rope_theta")]
    pub rope_theta: f32,
    /// RoPE scaling, if any.
    #[serde(default)]
    pub rope_scaling: Option<RopeScaling>,
    /// Fraction of each head's features that is rotated.
    #[serde(default = "defaults::partial_rotary_factor")]
    pub partial_rotary_factor: f32,
    /// Per-head LayerNorm of queries and keys.
    #[serde(default)]
    pub qk_layernorm: bool,
    /// Output projection shares the embedding matrix.
    #[serde(default)]
    pub tie_word_embeddings: bool,
}

mod defaults {
    use mlx_zoo_core::nn::Activation;
    pub fn vocab_size() -> usize {
        51200
    }
    pub fn hidden_size() -> usize {
        2048
    }
    pub fn intermediate_size() -> usize {
        8192
    }
    pub fn num_layers() -> usize {
        24
    }
    pub fn num_heads() -> usize {
        32
    }
    pub fn gelu_new() -> Activation {
        Activation::GeluNew
    }
    pub fn max_position_embeddings() -> usize {
        2048
    }
    pub fn layer_norm_eps() -> f32 {
        1e-5
    }
    pub fn rope_theta() -> f32 {
        10000.0
    }
    pub fn partial_rotary_factor() -> f32 {
        0.5
    }
}

impl PhiConfig {
    fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads.max(1)
    }

    /// Rotated features per head.
    pub fn rotary_dims(&self) -> usize {
        (self.head_dim() as f32 * self.partial_rotary_factor) as usize
    }
}

impl ModelConfig for PhiConfig {
    fn resolve_defaults(&mut self) {
        self.num_key_value_heads = Some(self.kv_heads());
    }

    fn validate(&self) -> Result<()> {
        self.dims().check(false)?;
        let rotary = self.rotary_dims();
        if rotary == 0 || rotary % 2 != 0 {
            return Err(Error::config(
                "partial_rotary_factor",
                format!(
                    "{} of head_dim {} gives {rotary} rotary dims; expected an even, positive number",
                    self.partial_rotary_factor,
                    self.head_dim()
                ),
            ));
        }
        Ok(())
    }

    fn dims(&self) -> ModelDims {
        ModelDims {
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            num_layers: self.num_hidden_layers,
            num_heads: self.num_attention_heads,
            num_kv_heads: self.kv_heads(),
            head_dim: self.head_dim(),
            intermediate_size: self.intermediate_size,
            max_position_embeddings: self.max_position_embeddings,
        }
    }
}

/// One parallel block.
#[derive(Debug, Clone, ModuleParameters)]
pub struct PhiBlock {
    /// The shared input norm.
    #[param]
    pub input_layernorm: LayerNorm,
    /// Attention (`o_proj` is the checkpoint's `dense`).
    #[param]
    pub self_attn: Attention,
    /// MLP.
    #[param]
    pub mlp: GeluMlp,
}

impl PhiBlock {
    /// `x + attn(norm(x)) + mlp(norm(x))`.
    pub fn forward(
        &mut self,
        x: &Array,
        mask: &AttentionMask,
        cache: Option<&mut LayerKv>,
    ) -> Result<Array> {
        let h = self
            .input_layernorm
            .forward(x)
            .context(|| "running a phi block".to_owned())?;
        let attended = self.self_attn.forward(&h, mask, cache)?;
        let fed = self.mlp.forward(&h)?;
        Ok(x + attended + fed)
    }
}

/// The stack under `model.`.
#[derive(Debug, ModuleParameters)]
pub struct PhiStack {
    /// Token embeddings.
    #[param]
    pub embed_tokens: Embedding,
    /// Blocks.
    #[param]
    pub layers: Vec<PhiBlock>,
    /// Final norm.
    #[param]
    pub final_layernorm: LayerNorm,
}

/// A Phi causal language model.
#[derive(Debug, ModuleParameters)]
pub struct Phi {
    /// The stack.
    #[param]
    pub model: PhiStack,
    /// Output projection (with bias).
    #[param]
    pub lm_head: Linear,
    dims: ModelDims,
    packable_up_to: Option<usize>,
    gradient_checkpointing: bool,
}

impl Phi {
    /// Builds the model with zero placeholders for weights.
    pub fn new(config: &PhiConfig) -> Result<Self> {
        let dims = config.dims();
        let rope = Rope::new(
            config.rotary_dims(),
            config.rope_theta,
            config.rope_scaling.as_ref(),
            config.max_position_embeddings,
        )?;
        let layers = (0..dims.num_layers)
            .map(|_| {
                Ok(PhiBlock {
                    input_layernorm: layer_norm(dims.hidden_size, config.layer_norm_eps)?,
                    self_attn: Attention::new(AttentionConfig {
                        hidden_size: dims.hidden_size,
                        num_heads: dims.num_heads,
                        num_kv_heads: dims.num_kv_heads,
                        head_dim: dims.head_dim,
                        qkv_bias: true,
                        o_bias: true,
                        rope: rope.clone(),
                        qk_layernorm: config.qk_layernorm.then_some(config.layer_norm_eps),
                        qk_norm: None,
                    })?,
                    mlp: GeluMlp::new(dims.hidden_size, dims.intermediate_size, config.hidden_act)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            model: PhiStack {
                embed_tokens: embedding(dims.vocab_size, dims.hidden_size)?,
                layers,
                final_layernorm: layer_norm(dims.hidden_size, config.layer_norm_eps)?,
            },
            lm_head: linear(dims.hidden_size, dims.vocab_size, true)?,
            dims,
            packable_up_to: rope.length_independent_up_to(),
            gradient_checkpointing: false,
        })
    }
}

impl Phi {
    /// The forward pass: continuing `cache`, or over packed rows when
    /// `segments` numbers their sequences.
    fn run(
        &mut self,
        tokens: &Array,
        mut cache: Option<&mut KvCache>,
        segments: Option<&Array>,
    ) -> Result<Array> {
        let ctx = || "running the phi model".to_owned();
        let offset = cache.as_ref().map(|c| c.offset()).unwrap_or(0) as usize;
        let mask = match segments {
            Some(segments) => segment_mask(segments, None)?,
            None => causal_mask(tokens.shape()[1] as usize, offset, None)?,
        };
        let checkpoint = self.gradient_checkpointing && cache.is_none();
        let random = checkpoint && self.draws_random()?;
        let mut x = self.model.embed_tokens.embed(tokens)?;
        for (i, layer) in self.model.layers.iter_mut().enumerate() {
            x = if checkpoint {
                let mask = mask.clone();
                checkpointed(layer, &[x], random, move |block, inputs| {
                    Ok(vec![block.forward(&inputs[0], &mask, None)?])
                })?
                .remove(0)
            } else {
                let layer_cache = cache.as_deref_mut().and_then(|c| c.layers_mut().get_mut(i));
                layer.forward(&x, &mask, layer_cache)?
            };
        }
        let x = self.model.final_layernorm.forward(&x).context(ctx)?;
        self.lm_head.forward(&x)
    }
}

impl CausalLm for Phi {
    fn forward(&mut self, tokens: &Array, cache: Option<&mut KvCache>) -> Result<Array> {
        self.run(tokens, cache, None)
    }

    fn forward_packed(&mut self, tokens: &Array, segments: &Array) -> Result<Array> {
        check_packable(tokens, segments, self.packable_up_to)?;
        self.run(tokens, None, Some(segments))
    }

    fn dims(&self) -> ModelDims {
        self.dims.clone()
    }

    fn set_gradient_checkpointing(&mut self, enabled: bool) -> Result<()> {
        self.gradient_checkpointing = enabled;
        Ok(())
    }

    fn gradient_checkpointing(&self) -> bool {
        self.gradient_checkpointing
    }

    fn visit_linears(&mut self, visit: &mut LinearVisitor<'_>) -> Result<()> {
        for (i, layer) in self.model.layers.iter_mut().enumerate() {
            let prefix = format!("model.layers.{i}");
            layer
                .self_attn
                .visit_linears(&format!("{prefix}.self_attn"), visit)?;
            layer.mlp.visit_linears(&format!("{prefix}.mlp"), visit)?;
        }
        visit("model.embed_tokens", &mut self.model.embed_tokens)?;
        visit("lm_head", &mut self.lm_head)
    }
}

/// Whether the checkpoint uses the older phi-msft names.
fn is_msft_layout(checkpoint: &BTreeMap<String, TensorMeta>) -> bool {
    checkpoint.keys().any(|k| k.starts_with("transformer."))
}

/// Per-layer parameters that keep their Hugging Face name.
const KEPT: &[&str] = &[
    "input_layernorm.weight",
    "input_layernorm.bias",
    "self_attn.q_proj.weight",
    "self_attn.q_proj.bias",
    "self_attn.k_proj.weight",
    "self_attn.k_proj.bias",
    "self_attn.v_proj.weight",
    "self_attn.v_proj.bias",
    "self_attn.q_layernorm.weight",
    "self_attn.q_layernorm.bias",
    "self_attn.k_layernorm.weight",
    "self_attn.k_layernorm.bias",
    "mlp.fc1.weight",
    "mlp.fc1.bias",
    "mlp.fc2.weight",
    "mlp.fc2.bias",
];

fn hf_table() -> MappingTable {
    let mut rules = vec![
        Rule::drop(
            "model.layers.{L}.self_attn.rotary_emb.inv_freq",
            "recomputed from the config",
        ),
        Rule::keep("model.embed_tokens.weight"),
        Rule::keep("model.final_layernorm.weight"),
        Rule::keep("model.final_layernorm.bias"),
        Rule::keep("lm_head.weight"),
        Rule::keep("lm_head.bias"),
        Rule::rename(
            "model.layers.{L}.self_attn.dense.weight",
            "model.layers.{L}.self_attn.o_proj.weight",
        ),
        Rule::rename(
            "model.layers.{L}.self_attn.dense.bias",
            "model.layers.{L}.self_attn.o_proj.bias",
        ),
    ];
    rules.extend(
        KEPT.iter()
            .map(|p| Rule::keep(&format!("model.layers.{{L}}.{p}"))),
    );
    MappingTable::from_rules(rules)
}

fn msft_table(config: &PhiConfig) -> MappingTable {
    let d = config.dims();
    let (q, kv) = (d.num_heads * d.head_dim, d.num_kv_heads * d.head_dim);
    let layer = |msft: &str, hf: &str| {
        Rule::rename(
            &format!("transformer.h.{{L}}.{msft}"),
            &format!("model.layers.{{L}}.{hf}"),
        )
    };
    let split = |suffix: &str| {
        Rule::split(
            &format!("transformer.h.{{L}}.mixer.Wqkv.{suffix}"),
            &[
                (&format!("model.layers.{{L}}.self_attn.q_proj.{suffix}"), q),
                (&format!("model.layers.{{L}}.self_attn.k_proj.{suffix}"), kv),
                (&format!("model.layers.{{L}}.self_attn.v_proj.{suffix}"), kv),
            ],
            0,
        )
    };
    let mut rules = vec![
        Rule::drop(
            "transformer.h.{L}.mixer.rotary_emb.inv_freq",
            "recomputed from the config",
        ),
        Rule::rename("transformer.embd.wte.weight", "model.embed_tokens.weight"),
        Rule::rename("lm_head.ln.weight", "model.final_layernorm.weight"),
        Rule::rename("lm_head.ln.bias", "model.final_layernorm.bias"),
        Rule::rename("lm_head.linear.weight", "lm_head.weight"),
        Rule::rename("lm_head.linear.bias", "lm_head.bias"),
        split("weight"),
        split("bias"),
    ];
    for suffix in ["weight", "bias"] {
        rules.push(layer(
            &format!("ln.{suffix}"),
            &format!("input_layernorm.{suffix}"),
        ));
        rules.push(layer(
            &format!("mixer.out_proj.{suffix}"),
            &format!("self_attn.o_proj.{suffix}"),
        ));
        for fc in ["fc1", "fc2"] {
            rules.push(layer(
                &format!("mlp.{fc}.{suffix}"),
                &format!("mlp.{fc}.{suffix}"),
            ));
        }
    }
    MappingTable::from_rules(rules)
}

/// The Phi family.
#[derive(Debug, Clone, Copy, Default)]
pub struct PhiArchitecture;

impl Architecture for PhiArchitecture {
    type Config = PhiConfig;

    fn name(&self) -> &'static str {
        "phi"
    }

    fn description(&self) -> &'static str {
        "Phi-1/1.5/2: parallel attention+MLP, LayerNorm, GELU, partial rotary, optional QK norm"
    }

    fn model_types(&self) -> &'static [&'static str] {
        &["phi", "phi-msft"]
    }

    fn hf_architectures(&self) -> &'static [&'static str] {
        &["PhiForCausalLM"]
    }

    fn weight_mapper(
        &self,
        config: &PhiConfig,
        checkpoint: &BTreeMap<String, TensorMeta>,
    ) -> Box<dyn WeightMapper> {
        Box::new(if is_msft_layout(checkpoint) {
            msft_table(config)
        } else {
            hf_table()
        })
    }

    fn build(&self, config: &PhiConfig) -> Result<Box<dyn CausalLm>> {
        if config.tie_word_embeddings {
            return Err(Error::config(
                "tie_word_embeddings",
                "Phi's output head has a bias and is never tied; expected false",
            ));
        }
        Ok(Box::new(Phi::new(config)?))
    }

    fn default_adapter_targets(&self) -> &'static [&'static str] {
        &["q_proj", "v_proj"]
    }
}
