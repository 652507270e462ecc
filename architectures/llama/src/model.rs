//! The LLaMA network is the shared pre-norm decoder of the core
//! ([`Decoder`]) configured from a [`LlamaConfig`]: RMSNorm, GQA with
//! rotary embeddings, SwiGLU, optional biases, optional tied embeddings.

use crate::LlamaConfig;
use mlx_zoo_core::nn::{Decoder, DecoderConfig, Rope};
use mlx_zoo_core::{ModelConfig, Result};

/// A LLaMA causal language model.
pub type Llama = Decoder;

/// The decoder settings of a LLaMA config.
pub fn decoder_config(config: &LlamaConfig) -> Result<DecoderConfig> {
    let dims = config.dims();
    Ok(DecoderConfig {
        rope: Rope::new(
            dims.head_dim,
            config.rope_theta,
            config.rope_scaling.as_ref(),
            config.max_position_embeddings,
        )?,
        sliding_windows: vec![None; dims.num_layers],
        dims,
        rms_norm_eps: config.rms_norm_eps,
        qkv_bias: config.attention_bias,
        o_bias: config.attention_bias,
        mlp_bias: config.mlp_bias,
        activation: config.hidden_act,
        tie_word_embeddings: config.tie_word_embeddings,
        moe: None,
        options: Default::default(),
    })
}
