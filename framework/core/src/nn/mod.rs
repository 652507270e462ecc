//! Building blocks shared by model families: linear layers, norms, rotary
//! embeddings with their scaling variants, grouped-query attention with a KV
//! cache, and the SwiGLU / GELU MLPs. A llama-like family is assembled from
//! these and needs little more than its config and mapping table.

mod attention;
mod layers;
mod mlp;
mod rope;

pub use attention::{Attention, AttentionConfig, AttentionMask};
pub use layers::{embedding, layer_norm, linear, rms_norm, Embedding, LayerNorm, Linear, RmsNorm};
pub use mlp::{Activation, GeluMlp, SwiGlu};
pub use rope::{Rope, RopeScaling};
