//! Building blocks shared by model families: linear layers, norms, rotary
//! embeddings with their scaling variants, grouped-query attention with a KV
//! cache, the SwiGLU / GELU MLPs, and gradient checkpointing of a block. A
//! llama-like family is assembled from these and needs little more than its
//! config and mapping table.

mod attention;
mod decoder;
mod kernels;
mod layers;
mod linear;
mod mask;
mod mlp;
mod moe;
mod recompute;
mod rope;

pub use attention::{Attention, AttentionConfig, AttentionMask};
pub use decoder::{
    check_packable, decoder_rules, output_rules, Decoder, DecoderBlock, DecoderConfig,
    DecoderOptions, DecoderStack, MoeConfig,
};
pub use kernels::{
    attention, kernels_isa, matvec, silu, softmax_last_axis, swiglu, AttentionKernelMask,
    QuantizedWeight, MATVEC_MAX_ROWS,
};
pub use layers::{layer_norm, offset_rms_norm, rms_norm, LayerNorm, RmsNorm};
pub use linear::{
    dequantize_rows, embedding, expert_linear, linear, set_dequantize_rows, Embedding, Linear,
};
pub use mask::{causal_mask, causal_mask_stored, segment_mask};
pub use mlp::{Activation, GeluMlp, SwiGlu};
pub use moe::{SparseMoe, SwitchGlu};
pub use recompute::checkpointed;
pub use rope::{Rope, RopeScaling};
