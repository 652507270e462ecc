//! The core of mlx-zoo: the traits a model family, a quantizer or an adapter
//! implements, the registry that finds them, checkpoint loading with
//! declarative weight mapping, and MLX building blocks shared by families.
//!
//! The core knows no model family. Families live in their own crates and
//! register themselves with [`register_architecture!`]; the `mlx-zoo` facade
//! crate links the built-in ones. A typical embedding:
//!
//! ```no_run
//! use mlx_zoo_core::{loader, Registry};
//! # fn main() -> mlx_zoo_core::Result<()> {
//! let registry = Registry::from_inventory()?;
//! let mut loaded = loader::load(&registry, "path/to/model".as_ref(), &Default::default())?;
//! let tokens = mlx_rs::Array::from_slice(&[1i32, 2, 3], &[1, 3]);
//! let logits = loaded.model.forward(&tokens, None)?;
//! # Ok(()) }
//! ```

#![warn(missing_docs)]

pub mod adapter;
pub mod architecture;
pub mod atomic;
pub mod cache;
pub mod checkpoint;
pub mod config;
pub mod error;
pub mod export;
pub mod generate;
pub mod gguf;
pub mod gguf_tokenizer;
pub mod loader;
pub mod mapping;
pub mod mlx_error;
pub mod model;
pub mod module_pattern;
pub mod nn;
pub mod pickle;
pub mod prequantized;
pub mod quantize;
pub mod registry;
pub mod runtime;
pub mod stored_dtype;
pub mod tokenizer;

pub use adapter::Adapter;
pub use architecture::{Architecture, Detection, ModelConfig};
pub use cache::KvCache;
pub use config::HfConfig;
pub use error::{Error, Result};
pub use mapping::{MappingReport, WeightMapper};
pub use model::{CausalLm, ModelDims};
pub use quantize::Quantizer;
pub use registry::Registry;

/// Re-exported so plugin crates register without depending on it directly.
pub use inventory;
/// Re-exported so plugin crates use the same MLX bindings as the core.
pub use mlx_rs;

#[cfg(test)]
mod layering_tests;
