//! Qwen for mlx-zoo.
//!
//! * `qwen2` (Qwen2, Qwen1.5; reference: transformers' `modeling_qwen2.py`):
//!   the core's pre-norm decoder with biases on the q/k/v projections but
//!   not on the output projection, usually tied embeddings, and a sliding
//!   window only where `use_sliding_window` turns it on.
//! * `qwen` (the original Qwen, remote code `modeling_qwen.py`): see
//!   [`v1`].

#![warn(missing_docs)]

mod qwen2;
pub mod v1;

pub use qwen2::{Qwen2Architecture, Qwen2Config};
pub use v1::{QwenArchitecture, QwenConfig};

mlx_zoo_core::register_architecture!(Qwen2Architecture);
mlx_zoo_core::register_architecture!(QwenArchitecture);
