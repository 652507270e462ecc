//! Qwen2 / Qwen1.5: config, decoder settings and mapping.

use mlx_zoo_core::mapping::{MappingTable, TensorMeta, WeightMapper};
use mlx_zoo_core::nn::{decoder_rules, Activation, Decoder, DecoderConfig, Rope, RopeScaling};
use mlx_zoo_core::{Architecture, CausalLm, Error, ModelConfig, ModelDims, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// A Qwen2 configuration, with transformers' defaults for absent keys.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Qwen2Config {
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
    #[serde(default = "defaults::max_position_embeddings")]
    pub max_position_embeddings: usize,
    /// RMSNorm epsilon.
    #[serde(default = "defaults::rms_norm_eps")]
    pub rms_norm_eps: f32,
    /// RoPE base.
    #[serde(default = "defaults::rope_theta")]
    pub rope_theta: f32,
    /// RoPE scaling, if any.
    #[serde(default)]
    pub rope_scaling: Option<RopeScaling>,
    /// Output projection shares the embedding matrix.
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Whether any layer uses the sliding window.
    #[serde(default)]
    pub use_sliding_window: bool,
    /// The window, when used.
    #[serde(default = "defaults::sliding_window")]
    pub sliding_window: Option<usize>,
    /// Layers below this index attend fully even with the window on.
    #[serde(default = "defaults::max_window_layers")]
    pub max_window_layers: usize,
    /// Explicit per-layer attention kinds (`full_attention` or
    /// `sliding_attention`), written by transformers 5.x.
    #[serde(default)]
    pub layer_types: Option<Vec<String>>,
}

mod defaults {
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
    pub fn num_layers() -> usize {
        32
    }
    pub fn num_heads() -> usize {
        32
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
    pub fn sliding_window() -> Option<usize> {
        Some(4096)
    }
    pub fn max_window_layers() -> usize {
        28
    }
}

impl Qwen2Config {
    fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// The sliding window of each layer: only with `use_sliding_window`, and
    /// then per `layer_types` or for layers at or past `max_window_layers`.
    pub fn layer_windows(&self) -> Vec<Option<usize>> {
        (0..self.num_hidden_layers)
            .map(|i| {
                let window = self.sliding_window.filter(|_| self.use_sliding_window)?;
                let sliding = match &self.layer_types {
                    Some(types) => types.get(i).is_some_and(|t| t == "sliding_attention"),
                    None => i >= self.max_window_layers,
                };
                sliding.then_some(window)
            })
            .collect()
    }
}

impl ModelConfig for Qwen2Config {
    fn resolve_defaults(&mut self) {
        self.num_key_value_heads = Some(self.kv_heads());
    }

    fn validate(&self) -> Result<()> {
        self.dims().check(false)?;
        if let Some(types) = &self.layer_types {
            if types.len() != self.num_hidden_layers {
                return Err(Error::config(
                    "layer_types",
                    format!(
                        "has {} entries for {} layers",
                        types.len(),
                        self.num_hidden_layers
                    ),
                ));
            }
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
            head_dim: self.hidden_size / self.num_attention_heads.max(1),
            intermediate_size: self.intermediate_size,
            max_position_embeddings: self.max_position_embeddings,
        }
    }
}

/// The Qwen2 family (also Qwen1.5, which shares the architecture).
#[derive(Debug, Clone, Copy, Default)]
pub struct Qwen2Architecture;

impl Architecture for Qwen2Architecture {
    type Config = Qwen2Config;

    fn name(&self) -> &'static str {
        "qwen2"
    }

    fn description(&self) -> &'static str {
        "Qwen2 / Qwen1.5: decoder with q/k/v biases, tied embeddings, optional sliding window"
    }

    fn model_types(&self) -> &'static [&'static str] {
        &["qwen2"]
    }

    fn hf_architectures(&self) -> &'static [&'static str] {
        &["Qwen2ForCausalLM"]
    }

    fn weight_mapper(
        &self,
        config: &Qwen2Config,
        _checkpoint: &BTreeMap<String, TensorMeta>,
    ) -> Box<dyn WeightMapper> {
        Box::new(MappingTable::from_rules(decoder_rules(
            config.tie_word_embeddings,
        )))
    }

    fn build(&self, config: &Qwen2Config) -> Result<Box<dyn CausalLm>> {
        let dims = config.dims();
        let decoder = DecoderConfig {
            rope: Rope::new(
                dims.head_dim,
                config.rope_theta,
                config.rope_scaling.as_ref(),
                config.max_position_embeddings,
            )?,
            sliding_windows: config.layer_windows(),
            dims,
            rms_norm_eps: config.rms_norm_eps,
            qkv_bias: true,
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
