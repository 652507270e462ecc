//! `MistralConfig` and `MixtralConfig`: the keys of transformers' configs
//! that shape the model, with transformers' defaults for absent keys.

use mlx_zoo_core::nn::{Activation, DecoderConfig, MoeConfig, Rope, RopeScaling};
use mlx_zoo_core::{Error, ModelConfig, ModelDims, Result};
use serde::{Deserialize, Serialize};

fn silu() -> Activation {
    Activation::Silu
}

/// The most experts a mixture-of-experts config may declare (real models
/// have up to a few hundred); more is a corrupt or hostile file.
const MAX_EXPERTS: usize = 4096;
/// A Mistral configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MistralConfig {
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
    #[serde(default = "defaults::num_hidden_layers")]
    pub num_hidden_layers: usize,
    /// Query heads.
    #[serde(default = "defaults::num_attention_heads")]
    pub num_attention_heads: usize,
    /// Key/value heads.
    #[serde(default = "defaults::num_key_value_heads")]
    pub num_key_value_heads: usize,
    /// Features per head; defaults to `hidden_size / num_attention_heads`.
    #[serde(default)]
    pub head_dim: Option<usize>,
    /// MLP activation.
    #[serde(default = "silu")]
    pub hidden_act: Activation,
    /// Context length.
    #[serde(default = "defaults::max_position_embeddings")]
    pub max_position_embeddings: usize,
    /// RMSNorm epsilon.
    #[serde(default = "defaults::rms_norm_eps_mistral")]
    pub rms_norm_eps: f32,
    /// RoPE base.
    #[serde(default = "defaults::rope_theta_mistral")]
    pub rope_theta: f32,
    /// RoPE scaling, if any.
    #[serde(default)]
    pub rope_scaling: Option<RopeScaling>,
    /// Attention window; `null` for full attention.
    #[serde(default = "defaults::sliding_window")]
    pub sliding_window: Option<usize>,
    /// Output projection shares the embedding matrix.
    #[serde(default)]
    pub tie_word_embeddings: bool,
}

/// A Mixtral configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MixtralConfig {
    /// Vocabulary size.
    #[serde(default = "defaults::vocab_size")]
    pub vocab_size: usize,
    /// Model width.
    #[serde(default = "defaults::hidden_size")]
    pub hidden_size: usize,
    /// Width of each expert's MLP.
    #[serde(default = "defaults::intermediate_size")]
    pub intermediate_size: usize,
    /// Decoder blocks.
    #[serde(default = "defaults::num_hidden_layers")]
    pub num_hidden_layers: usize,
    /// Query heads.
    #[serde(default = "defaults::num_attention_heads")]
    pub num_attention_heads: usize,
    /// Key/value heads.
    #[serde(default = "defaults::num_key_value_heads")]
    pub num_key_value_heads: usize,
    /// Features per head; defaults to `hidden_size / num_attention_heads`.
    #[serde(default)]
    pub head_dim: Option<usize>,
    /// MLP activation.
    #[serde(default = "silu")]
    pub hidden_act: Activation,
    /// Context length.
    #[serde(default = "defaults::max_position_embeddings")]
    pub max_position_embeddings: usize,
    /// RMSNorm epsilon.
    #[serde(default = "defaults::rms_norm_eps_mixtral")]
    pub rms_norm_eps: f32,
    /// RoPE base.
    #[serde(default = "defaults::rope_theta_mixtral")]
    pub rope_theta: f32,
    /// RoPE scaling, if any.
    #[serde(default)]
    pub rope_scaling: Option<RopeScaling>,
    /// Attention window; absent or `null` for full attention.
    #[serde(default)]
    pub sliding_window: Option<usize>,
    /// Number of experts.
    #[serde(default = "defaults::num_local_experts")]
    pub num_local_experts: usize,
    /// Experts run per token.
    #[serde(default = "defaults::num_experts_per_tok")]
    pub num_experts_per_tok: usize,
    /// Output projection shares the embedding matrix.
    #[serde(default)]
    pub tie_word_embeddings: bool,
}

mod defaults {
    pub fn vocab_size() -> usize {
        32000
    }
    pub fn hidden_size() -> usize {
        4096
    }
    pub fn intermediate_size() -> usize {
        14336
    }
    pub fn num_hidden_layers() -> usize {
        32
    }
    pub fn num_attention_heads() -> usize {
        32
    }
    pub fn num_key_value_heads() -> usize {
        8
    }
    pub fn max_position_embeddings() -> usize {
        4096 * 32
    }
    pub fn rms_norm_eps_mistral() -> f32 {
        1e-6
    }
    pub fn rms_norm_eps_mixtral() -> f32 {
        1e-5
    }
    pub fn rope_theta_mistral() -> f32 {
        10000.0
    }
    pub fn rope_theta_mixtral() -> f32 {
        1e6
    }
    pub fn sliding_window() -> Option<usize> {
        Some(4096)
    }
    pub fn num_local_experts() -> usize {
        8
    }
    pub fn num_experts_per_tok() -> usize {
        2
    }
}

/// Features per head: `head_dim`, else the width over the heads.
fn head_dim(explicit: Option<usize>, hidden: usize, heads: usize) -> usize {
    explicit.unwrap_or(hidden / heads.max(1))
}

/// `head_dim` when absent and exact.
fn resolved_head_dim(explicit: Option<usize>, hidden: usize, heads: usize) -> Option<usize> {
    explicit.or((heads > 0 && hidden % heads == 0).then(|| hidden / heads))
}

fn check_window(window: Option<usize>) -> Result<()> {
    if window == Some(0) {
        return Err(Error::config("sliding_window", "must be positive or null"));
    }
    Ok(())
}

/// The decoder of a Mistral-shaped config (no biases, one window for
/// every layer), with or without experts.
#[allow(clippy::too_many_arguments)]
fn mistral_decoder(
    dims: ModelDims,
    rope_theta: f32,
    rope_scaling: Option<&RopeScaling>,
    sliding_window: Option<usize>,
    rms_norm_eps: f32,
    activation: Activation,
    tie_word_embeddings: bool,
    moe: Option<MoeConfig>,
) -> Result<DecoderConfig> {
    Ok(DecoderConfig {
        rope: Rope::new(
            dims.head_dim,
            rope_theta,
            rope_scaling,
            dims.max_position_embeddings,
        )?,
        sliding_windows: vec![sliding_window; dims.num_layers],
        dims,
        rms_norm_eps,
        qkv_bias: false,
        o_bias: false,
        mlp_bias: false,
        activation,
        tie_word_embeddings,
        moe,
        options: Default::default(),
    })
}

impl MistralConfig {
    /// The decoder this config describes.
    pub fn decoder_config(&self) -> Result<DecoderConfig> {
        mistral_decoder(
            self.dims(),
            self.rope_theta,
            self.rope_scaling.as_ref(),
            self.sliding_window,
            self.rms_norm_eps,
            self.hidden_act,
            self.tie_word_embeddings,
            None,
        )
    }
}

impl ModelConfig for MistralConfig {
    fn resolve_defaults(&mut self) {
        self.head_dim =
            resolved_head_dim(self.head_dim, self.hidden_size, self.num_attention_heads);
    }

    fn validate(&self) -> Result<()> {
        self.dims().check(self.head_dim.is_some())?;
        check_window(self.sliding_window)
    }

    fn dims(&self) -> ModelDims {
        ModelDims {
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            num_layers: self.num_hidden_layers,
            num_heads: self.num_attention_heads,
            num_kv_heads: self.num_key_value_heads,
            head_dim: head_dim(self.head_dim, self.hidden_size, self.num_attention_heads),
            intermediate_size: self.intermediate_size,
            max_position_embeddings: self.max_position_embeddings,
        }
    }
}

impl MixtralConfig {
    /// The decoder this config describes: Mistral's, with experts.
    pub fn decoder_config(&self) -> Result<DecoderConfig> {
        mistral_decoder(
            self.dims(),
            self.rope_theta,
            self.rope_scaling.as_ref(),
            self.sliding_window,
            self.rms_norm_eps,
            self.hidden_act,
            self.tie_word_embeddings,
            Some(MoeConfig {
                experts: self.num_local_experts,
                top_k: self.num_experts_per_tok,
                normalize_top_k: true,
            }),
        )
    }
}

impl ModelConfig for MixtralConfig {
    fn resolve_defaults(&mut self) {
        self.head_dim =
            resolved_head_dim(self.head_dim, self.hidden_size, self.num_attention_heads);
    }

    fn validate(&self) -> Result<()> {
        self.dims().check(self.head_dim.is_some())?;
        check_window(self.sliding_window)?;
        if self.num_local_experts == 0 || self.num_local_experts > MAX_EXPERTS {
            return Err(Error::config(
                "num_local_experts",
                format!(
                    "{} must be between 1 and {MAX_EXPERTS}",
                    self.num_local_experts
                ),
            ));
        }
        if self.num_experts_per_tok == 0 || self.num_experts_per_tok > self.num_local_experts {
            return Err(Error::config(
                "num_experts_per_tok",
                format!(
                    "{} must be between 1 and num_local_experts ({})",
                    self.num_experts_per_tok, self.num_local_experts
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
            num_kv_heads: self.num_key_value_heads,
            head_dim: head_dim(self.head_dim, self.hidden_size, self.num_attention_heads),
            intermediate_size: self.intermediate_size,
            max_position_embeddings: self.max_position_embeddings,
        }
    }
}
