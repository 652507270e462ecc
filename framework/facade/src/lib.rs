//! The mlx-zoo facade: the core API plus every built-in plugin, linked.
//!
//! Plugins register themselves through `inventory`, but a crate that nothing
//! references can be left out by the linker, taking its registration with
//! it. This crate references each built-in plugin crate, so a binary that
//! depends on `mlx-zoo` and calls [`registry()`] sees them all. A binary that
//! adds a third-party plugin must reference it the same way
//! (`use my_family_plugin as _;`).

#![warn(missing_docs)]

pub use mlx_zoo_core::*;

/// MLX's affine group-wise quantizer.
pub use mlx_zoo_affine as affine;
/// Data-parallel groups and collectives on MLX's distributed layer.
pub use mlx_zoo_distributed as distributed;
pub use mlx_zoo_gemma as gemma;
/// The Hugging Face hub client: repo ids to cached local directories.
pub use mlx_zoo_hub as hub;
/// The LLaMA family.
pub use mlx_zoo_llama as llama;
/// LoRA and DoRA adapters.
pub use mlx_zoo_lora as lora;
/// The Mistral and Mixtral families.
pub use mlx_zoo_mistral as mistral;
/// MLX's floating-point quantization modes (mxfp4, mxfp8, nvfp4).
pub use mlx_zoo_mxfp as mxfp;
/// The Phi and Phi-3 families.
pub use mlx_zoo_phi as phi;
/// The Qwen2 and original Qwen families.
pub use mlx_zoo_qwen as qwen;
pub use mlx_zoo_qwen3 as qwen3;
/// Training: data, losses, optimizers, the trainer.
pub use mlx_zoo_train as train;

/// A registry holding every plugin linked into this binary: the built-in
/// ones and any third-party crate the binary references.
pub fn registry() -> Result<Registry> {
    Registry::from_inventory()
}
