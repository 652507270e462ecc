//! Phi-3: config, decoder settings and mapping.

use mlx_zoo_core::mapping::{MappingTable, Rule, TensorMeta, WeightMapper};
use mlx_zoo_core::nn::{decoder_rules, Activation, Decoder, DecoderConfig, Rope, RopeScaling};
use mlx_zoo_core::{Architecture, CausalLm, Error, ModelConfig, ModelDims, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// A Phi-3 configuration, with transformers' defaults for absent keys.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Phi3Config {
    /// Vocabulary size.
    #[serde(default = "defaults::vocab_size")]
    pub vocab_size: usize,
    /// Model width.
    #[serde(default = "defaults::hidden_size")]
    pub hidden_size: usize,
    /// MLP width.
    #[serde(default = "defaults::intermediate_size")]
    pub intermediate_size: usize,
    /// Decoder blocks.
    #[serde(default = "defaults::num_layers")]
    pub num_hidden_layers: usize,
    /// Query heads.
    #[serde(default = "defaults::num_heads")]
    pub num_attention_heads: usize,
    /// Key/value heads; defaults to `num_attention_heads`.
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    /// MLP activation.
    #[serde(default = "defaults::silu")]
    pub hidden_act: Activation,
    /// Context length.
    #[serde(default = "defaults::context")]
    pub max_position_embeddings: usize,
    /// The context the model was pre-trained with (LongRoPE switches factors
    /// past it). This top-level key wins over the one in `rope_scaling`.
    #[serde(default = "defaults::context")]
    pub original_max_position_embeddings: usize,
    /// RMSNorm epsilon.
    #[serde(default = "defaults::rms_norm_eps")]
    pub rms_norm_eps: f32,
    /// RoPE base.
    #[serde(default = "defaults::rope_theta")]
    pub rope_theta: f32,
    /// RoPE scaling, if any.
    #[serde(default)]
    pub rope_scaling: Option<RopeScaling>,
    /// Fraction of each head's features that is rotated.
    #[serde(default = "defaults::partial_rotary_factor")]
    pub partial_rotary_factor: f32,
    /// Attention window, if any.
    #[serde(default)]
    pub sliding_window: Option<usize>,
    /// Output projection shares the embedding matrix.
    #[serde(default)]
    pub tie_word_embeddings: bool,
}

mod defaults {
    use mlx_zoo_core::nn::Activation;
    pub fn vocab_size() -> usize {
        32064
    }
    pub fn hidden_size() -> usize {
        3072
    }
    pub fn intermediate_size() -> usize {
        8192
    }
    pub fn num_layers() -> usize {
        32
    }
    pub fn num_heads() -> usize {
        32
    }
    pub fn silu() -> Activation {
        Activation::Silu
    }
    pub fn context() -> usize {
        4096
    }
    pub fn rms_norm_eps() -> f32 {
        1e-5
    }
    pub fn rope_theta() -> f32 {
        10000.0
    }
    pub fn partial_rotary_factor() -> f32 {
        1.0
    }
}

impl Phi3Config {
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

    /// The rope scaling with the top-level original context filled in.
    fn effective_rope_scaling(&self) -> Option<RopeScaling> {
        let mut scaling = self.rope_scaling.clone()?;
        if let RopeScaling::Longrope {
            original_max_position_embeddings,
            ..
        } = &mut scaling
        {
            *original_max_position_embeddings = Some(self.original_max_position_embeddings);
        }
        Some(scaling)
    }
}

impl ModelConfig for Phi3Config {
    fn resolve_defaults(&mut self) {
        self.num_key_value_heads = Some(self.kv_heads());
        self.rope_scaling = self.effective_rope_scaling();
    }

    fn validate(&self) -> Result<()> {
        self.dims().check(false)?;
        if !(self.partial_rotary_factor > 0.0 && self.partial_rotary_factor <= 1.0)
            || self.rotary_dims() % 2 != 0
        {
            return Err(Error::config(
                "partial_rotary_factor",
                format!(
                    "{} must be in (0, 1] and give an even number of rotary dims (got {})",
                    self.partial_rotary_factor,
                    self.rotary_dims()
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

/// The Phi-3 family.
#[derive(Debug, Clone, Copy, Default)]
pub struct Phi3Architecture;

impl Architecture for Phi3Architecture {
    type Config = Phi3Config;

    fn name(&self) -> &'static str {
        "phi3"
    }

    fn description(&self) -> &'static str {
        "Phi-3: decoder with fused qkv/gate_up (split at load), LongRoPE, partial rotary"
    }

    fn model_types(&self) -> &'static [&'static str] {
        &["phi3"]
    }

    fn hf_architectures(&self) -> &'static [&'static str] {
        &["Phi3ForCausalLM"]
    }

    fn weight_mapper(
        &self,
        config: &Phi3Config,
        _checkpoint: &BTreeMap<String, TensorMeta>,
    ) -> Box<dyn WeightMapper> {
        let d = config.dims();
        let (q, kv) = (d.num_heads * d.head_dim, d.num_kv_heads * d.head_dim);
        let mut rules = vec![
            Rule::split(
                "model.layers.{L}.self_attn.qkv_proj.weight",
                &[
                    ("model.layers.{L}.self_attn.q_proj.weight", q),
                    ("model.layers.{L}.self_attn.k_proj.weight", kv),
                    ("model.layers.{L}.self_attn.v_proj.weight", kv),
                ],
                0,
            ),
            Rule::split(
                "model.layers.{L}.mlp.gate_up_proj.weight",
                &[
                    ("model.layers.{L}.mlp.gate_proj.weight", d.intermediate_size),
                    ("model.layers.{L}.mlp.up_proj.weight", d.intermediate_size),
                ],
                0,
            ),
        ];
        rules.extend(decoder_rules(config.tie_word_embeddings));
        Box::new(MappingTable::from_rules(rules))
    }

    fn build(&self, config: &Phi3Config) -> Result<Box<dyn CausalLm>> {
        let dims = config.dims();
        let decoder = DecoderConfig {
            rope: Rope::new(
                config.rotary_dims(),
                config.rope_theta,
                config.rope_scaling.as_ref(),
                config.max_position_embeddings,
            )?,
            sliding_windows: vec![config.sliding_window; dims.num_layers],
            dims,
            rms_norm_eps: config.rms_norm_eps,
            qkv_bias: false,
            o_bias: false,
            mlp_bias: false,
            activation: config.hidden_act,
            tie_word_embeddings: config.tie_word_embeddings,
            moe: None,
            options: Default::default(),
        };
        Ok(Box::new(Decoder::new(&decoder)?))
    }

    fn default_adapter_targets(&self) -> &'static [&'static str] {
        &["q_proj", "v_proj"]
    }
}
