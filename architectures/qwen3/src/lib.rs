//! Qwen3 and Qwen3-MoE for mlx-zoo (reference: transformers'
//! `modeling_qwen3.py` and `modeling_qwen3_moe.py`): the core's pre-norm
//! decoder with an RMSNorm over each query and key head before the rotary
//! embedding, a head width of its own (`head_dim`), and for Qwen3-MoE a
//! softmax router over experts (top-k, renormalised when `norm_topk_prob`).
//! Everything else is configuration of the shared decoder; this crate is the
//! config and the weight-name table.

#![warn(missing_docs)]

use mlx_zoo_core::mapping::{MappingTable, Rule, TensorMeta, WeightMapper};
use mlx_zoo_core::nn::{
    decoder_rules, Activation, Decoder, DecoderConfig, DecoderOptions, MoeConfig, Rope, RopeScaling,
};
use mlx_zoo_core::{Architecture, CausalLm, Error, ModelConfig, ModelDims, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// A Qwen3 or Qwen3-MoE configuration, with transformers' Qwen3 defaults
/// for absent keys (the expert keys only matter to Qwen3-MoE).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Qwen3Config {
    /// Vocabulary size.
    #[serde(default = "d::vocab_size")]
    pub vocab_size: usize,
    /// Model width.
    #[serde(default = "d::hidden_size")]
    pub hidden_size: usize,
    /// Dense MLP width.
    #[serde(default = "d::intermediate_size")]
    pub intermediate_size: usize,
    /// Decoder blocks.
    #[serde(default = "d::layers")]
    pub num_hidden_layers: usize,
    /// Query heads.
    #[serde(default = "d::heads")]
    pub num_attention_heads: usize,
    /// Key/value heads; defaults to `num_attention_heads`.
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    /// Features per head (Qwen3 sets it apart from `hidden_size / heads`).
    #[serde(default = "d::head_dim")]
    pub head_dim: usize,
    /// MLP activation.
    #[serde(default = "d::silu")]
    pub hidden_act: Activation,
    /// Context length.
    #[serde(default = "d::max_position_embeddings")]
    pub max_position_embeddings: usize,
    /// RMSNorm epsilon (also of the per-head q/k norms).
    #[serde(default = "d::rms_norm_eps")]
    pub rms_norm_eps: f32,
    /// RoPE base.
    #[serde(default = "d::rope_theta")]
    pub rope_theta: f32,
    /// RoPE scaling, if any (YaRN in long-context releases).
    #[serde(default)]
    pub rope_scaling: Option<RopeScaling>,
    /// Output projection shares the embedding matrix.
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Biases on q/k/v/o.
    #[serde(default)]
    pub attention_bias: bool,
    /// Whether any layer uses the sliding window.
    #[serde(default)]
    pub use_sliding_window: bool,
    /// The window, when used.
    #[serde(default)]
    pub sliding_window: Option<usize>,
    /// Without `layer_types`, layers from this index on slide.
    #[serde(default = "d::max_window_layers")]
    pub max_window_layers: usize,
    /// Per-layer attention kinds (`full_attention` / `sliding_attention`).
    #[serde(default)]
    pub layer_types: Option<Vec<String>>,
    /// Experts (Qwen3-MoE; transformers 5.x writes `num_local_experts`).
    #[serde(default, alias = "num_local_experts")]
    pub num_experts: Option<usize>,
    /// Experts run per token.
    #[serde(default = "d::top_k")]
    pub num_experts_per_tok: usize,
    /// Width of each expert's MLP.
    #[serde(default)]
    pub moe_intermediate_size: Option<usize>,
    /// Renormalise the kept router probabilities to sum to one.
    #[serde(default)]
    pub norm_topk_prob: bool,
    /// Every this many layers is sparse (only 1 is supported).
    #[serde(default = "d::one")]
    pub decoder_sparse_step: usize,
    /// Layers with a dense MLP instead of experts (only none is supported).
    #[serde(default)]
    pub mlp_only_layers: Vec<usize>,
}

mod d {
    use mlx_zoo_core::nn::Activation;
    pub fn vocab_size() -> usize {
        151936
    }
    pub fn hidden_size() -> usize {
        4096
    }
    pub fn intermediate_size() -> usize {
        22016
    }
    pub fn layers() -> usize {
        32
    }
    pub fn heads() -> usize {
        32
    }
    pub fn head_dim() -> usize {
        128
    }
    pub fn silu() -> Activation {
        Activation::Silu
    }
    pub fn max_position_embeddings() -> usize {
        32768
    }
    pub fn rms_norm_eps() -> f32 {
        1e-6
    }
    pub fn rope_theta() -> f32 {
        10000.0
    }
    pub fn top_k() -> usize {
        8
    }
    pub fn max_window_layers() -> usize {
        28
    }
    pub fn one() -> usize {
        1
    }
}

impl Qwen3Config {
    /// The experts' settings and width, when the config has experts.
    fn moe(&self) -> Result<Option<(MoeConfig, usize)>> {
        let Some(experts) = self.num_experts.filter(|&n| n > 0) else {
            return Ok(None);
        };
        if self.decoder_sparse_step != 1 || !self.mlp_only_layers.is_empty() {
            return Err(Error::config(
                "decoder_sparse_step",
                "only every layer sparse is supported (decoder_sparse_step 1, no mlp_only_layers)",
            ));
        }
        let width = self.moe_intermediate_size.ok_or_else(|| {
            Error::config("moe_intermediate_size", "is required with num_experts")
        })?;
        let top_k = self.num_experts_per_tok;
        let moe = MoeConfig {
            experts,
            top_k,
            normalize_top_k: self.norm_topk_prob,
        };
        Ok(Some((moe, width)))
    }

    /// The sliding window of each layer (only with `use_sliding_window`).
    fn layer_windows(&self) -> Vec<Option<usize>> {
        (0..self.num_hidden_layers)
            .map(|i| {
                let window = self.sliding_window.filter(|_| self.use_sliding_window)?;
                let types = self.layer_types.as_ref();
                let sliding = match types {
                    Some(t) => t.get(i).is_some_and(|t| t == "sliding_attention"),
                    None => i >= self.max_window_layers,
                };
                sliding.then_some(window)
            })
            .collect()
    }

    /// The shared decoder's settings.
    pub fn decoder_config(&self) -> Result<DecoderConfig> {
        let mut dims = self.dims();
        let moe = self.moe()?.map(|(moe, width)| {
            dims.intermediate_size = width;
            moe
        });
        Ok(DecoderConfig {
            rope: Rope::new(
                dims.head_dim,
                self.rope_theta,
                self.rope_scaling.as_ref(),
                self.max_position_embeddings,
            )?,
            sliding_windows: self.layer_windows(),
            dims,
            rms_norm_eps: self.rms_norm_eps,
            qkv_bias: self.attention_bias,
            o_bias: self.attention_bias,
            mlp_bias: false,
            activation: self.hidden_act,
            tie_word_embeddings: self.tie_word_embeddings,
            moe,
            options: DecoderOptions {
                qk_norm: true,
                ..Default::default()
            },
        })
    }
}

impl ModelConfig for Qwen3Config {
    fn resolve_defaults(&mut self) {
        self.num_key_value_heads
            .get_or_insert(self.num_attention_heads);
    }

    fn validate(&self) -> Result<()> {
        self.dims().check(false)?;
        self.moe()?;
        match &self.layer_types {
            Some(t) if t.len() != self.num_hidden_layers => Err(Error::config(
                "layer_types",
                format!(
                    "has {} entries for {} layers",
                    t.len(),
                    self.num_hidden_layers
                ),
            )),
            _ => Ok(()),
        }
    }

    fn dims(&self) -> ModelDims {
        ModelDims {
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            num_layers: self.num_hidden_layers,
            num_heads: self.num_attention_heads,
            num_kv_heads: self.num_key_value_heads.unwrap_or(self.num_attention_heads),
            head_dim: self.head_dim,
            intermediate_size: self.intermediate_size,
            max_position_embeddings: self.max_position_embeddings,
        }
    }
}

/// Qwen3 (dense).
#[derive(Debug, Clone, Copy, Default)]
pub struct Qwen3Architecture;

/// Qwen3-MoE.
#[derive(Debug, Clone, Copy, Default)]
pub struct Qwen3MoeArchitecture;

/// The expert projections, as Hugging Face and the decoder name them.
const EXPERT_PROJECTIONS: [&str; 3] = ["gate_proj", "up_proj", "down_proj"];

/// Hugging Face's `mlp.gate` / `mlp.experts.E.*` (or mlx-lm's stacked
/// `mlp.switch_mlp.*`) onto the decoder's `block_sparse_moe.*`.
fn expert_rules(experts: usize) -> Vec<Rule> {
    let moe = "model.layers.{L}.block_sparse_moe";
    let mut rules = vec![Rule::rename(
        "model.layers.{L}.mlp.gate.weight",
        &format!("{moe}.gate.weight"),
    )];
    for p in EXPERT_PROJECTIONS {
        let to = format!("{moe}.switch_mlp.{p}.weight");
        rules.push(Rule::stack(
            &format!("model.layers.{{L}}.mlp.experts.{{E}}.{p}.weight"),
            &to,
            experts,
        ));
        rules.push(Rule::rename(
            &format!("model.layers.{{L}}.mlp.switch_mlp.{p}.weight"),
            &to,
        ));
    }
    rules
}

macro_rules! qwen3_architecture {
    ($arch:ty, $name:literal, $model_type:literal, $class:literal, $description:literal) => {
        impl Architecture for $arch {
            type Config = Qwen3Config;
            fn name(&self) -> &'static str {
                $name
            }
            fn description(&self) -> &'static str {
                $description
            }
            fn model_types(&self) -> &'static [&'static str] {
                &[$model_type]
            }
            fn hf_architectures(&self) -> &'static [&'static str] {
                &[$class]
            }
            fn weight_mapper(
                &self,
                config: &Qwen3Config,
                _: &BTreeMap<String, TensorMeta>,
            ) -> Box<dyn WeightMapper> {
                let mut rules = config.num_experts.map(expert_rules).unwrap_or_default();
                rules.extend(decoder_rules(config.tie_word_embeddings));
                Box::new(MappingTable::from_rules(rules))
            }
            fn build(&self, config: &Qwen3Config) -> Result<Box<dyn CausalLm>> {
                Ok(Box::new(Decoder::new(&config.decoder_config()?)?))
            }
            fn default_adapter_targets(&self) -> &'static [&'static str] {
                &["q_proj", "v_proj"]
            }
            fn never_quantize(&self) -> &'static [&'static str] {
                &["model.layers.*.block_sparse_moe.gate"]
            }
        }
    };
}

qwen3_architecture!(
    Qwen3Architecture,
    "qwen3",
    "qwen3",
    "Qwen3ForCausalLM",
    "Qwen3: GQA decoder with per-head q/k RMSNorm, head_dim apart from the width, YaRN"
);
qwen3_architecture!(
    Qwen3MoeArchitecture,
    "qwen3_moe",
    "qwen3_moe",
    "Qwen3MoeForCausalLM",
    "Qwen3-MoE: Qwen3 attention with a softmax-routed top-k mixture of experts"
);

mlx_zoo_core::register_architecture!(Qwen3Architecture);
mlx_zoo_core::register_architecture!(Qwen3MoeArchitecture);
