//! Phi for mlx-zoo.
//!
//! * `phi` (Phi-1, Phi-1.5, Phi-2; reference: transformers'
//!   `modeling_phi.py`): see [`phi2`]. Also reads the older "phi-msft"
//!   checkpoint layout (`transformer.h.N.mixer.Wqkv`, ...).
//! * `phi3` (Phi-3; reference: `modeling_phi3.py`): the core's pre-norm
//!   decoder; the checkpoint's fused `qkv_proj` and `gate_up_proj` are split
//!   by sizes that respect grouped-query attention, and LongRoPE
//!   (`rope_scaling` of type `longrope`/`su`) and partial rotary are
//!   supported.

#![warn(missing_docs)]

pub mod phi2;
mod phi3;

pub use phi2::{PhiArchitecture, PhiConfig};
pub use phi3::{Phi3Architecture, Phi3Config};

mlx_zoo_core::register_architecture!(PhiArchitecture);
mlx_zoo_core::register_architecture!(Phi3Architecture);
