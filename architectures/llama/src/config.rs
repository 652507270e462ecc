//! `LlamaConfig`: the keys of transformers' `LlamaConfig` that shape the
//! model, with transformers' defaults for absent keys.

use mlx_zoo_core::nn::{Activation, RopeScaling};
use mlx_zoo_core::{Error, ModelConfig, ModelDims, Result};
use serde::{Deserialize, Serialize};

/// A LLaMA configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    /// Vocabulary size.
    #[serde(default = "defaults::vocab_size")]
    pub vocab_size: usize,
    /// Model width.
    #[serde(default = "defaults::hidden_size")]
    pub hidden_size: usize,
    /// MLP width.
    #[serde(default = "defaults::intermediate_size")]
    pub intermediate_size: usize,
    /// Number of decoder blocks.
    #[serde(default = "defaults::num_hidden_layers")]
    pub num_hidden_layers: usize,
    /// Query heads.
    #[serde(default = "defaults::num_attention_heads")]
    pub num_attention_heads: usize,
    /// Key/value heads; defaults to `num_attention_heads` (no GQA).
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    /// Features per head; defaults to `hidden_size / num_attention_heads`.
    #[serde(default)]
    pub head_dim: Option<usize>,
    /// MLP activation.
    #[serde(default = "defaults::hidden_act")]
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
    /// Bias on q/k/v/o projections.
    #[serde(default)]
    pub attention_bias: bool,
    /// Bias on the MLP projections.
    #[serde(default)]
    pub mlp_bias: bool,
    /// Output projection shares the embedding matrix.
    #[serde(default)]
    pub tie_word_embeddings: bool,
}

mod defaults {
    use mlx_zoo_core::nn::Activation;
    pub fn vocab_size() -> usize {
        32000
    }
    pub fn hidden_size() -> usize {
        4096
    }
    pub fn intermediate_size() -> usize {
        11008
    }
    pub fn num_hidden_layers() -> usize {
        32
    }
    pub fn num_attention_heads() -> usize {
        32
    }
    pub fn hidden_act() -> Activation {
        Activation::Silu
    }
    pub fn max_position_embeddings() -> usize {
        2048
    }
    pub fn rms_norm_eps() -> f32 {
        1e-6
    }
    pub fn rope_theta() -> f32 {
        10000.0
    }
}

impl LlamaConfig {
    /// Key/value heads.
    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// Features per head.
    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }
}

impl ModelConfig for LlamaConfig {
    fn resolve_defaults(&mut self) {
        self.num_key_value_heads = Some(self.kv_heads());
        if self.head_dim.is_none()
            && self.num_attention_heads > 0
            && self.hidden_size % self.num_attention_heads == 0
        {
            self.head_dim = Some(self.hidden_size / self.num_attention_heads);
        }
    }

    fn validate(&self) -> Result<()> {
        self.dims().check(self.head_dim.is_some())?;
        if self.head_dim() % 2 != 0 {
            return Err(Error::config(
                "head_dim",
                format!("{} must be even for rotary embeddings", self.head_dim()),
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
