//! The [`Adapter`] trait: a parameter-efficient change to a linear layer
//! (LoRA, DoRA, ...). An adapter declares the parameters it adds to a layer
//! of a given size, computes the adapted output from the base layer's, and
//! merges itself into the base weight for `fuse`. Implementations live in the
//! `adapters/` crates and register themselves like architectures do.

use crate::error::Result;
use mlx_rs::Array;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The settings shared by adapters of the LoRA family.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdapterSettings {
    /// Rank of the low-rank update.
    pub rank: usize,
    /// Scaling numerator (`alpha / rank`, or `alpha / sqrt(rank)` with rsLoRA).
    pub alpha: f32,
    /// Dropout on the adapter's input during training.
    pub dropout: f32,
    /// Use rsLoRA's `alpha / sqrt(rank)` scale.
    pub rslora: bool,
}

/// The parameters an adapter added to one layer, by local name
/// (`lora_a`, `lora_b`, `magnitude`).
pub type AdapterParams = BTreeMap<String, Array>;

/// A kind of adapter.
pub trait Adapter: Send + Sync {
    /// A short unique name, e.g. `lora`.
    fn name(&self) -> &'static str;
    /// One line about the method.
    fn description(&self) -> &'static str;
    /// The parameters added to a linear layer of `input` -> `output`
    /// features, with their shapes and initial values.
    fn init(
        &self,
        input: usize,
        output: usize,
        settings: &AdapterSettings,
    ) -> Result<AdapterParams>;
    /// The adapted output, given the layer input `x`, the base layer's output
    /// and its (de-quantized) weight.
    fn forward(
        &self,
        x: &Array,
        base_output: &Array,
        base_weight: &Array,
        params: &AdapterParams,
        settings: &AdapterSettings,
    ) -> Result<Array>;
    /// The base weight with the adapter merged in.
    fn merge(
        &self,
        base_weight: &Array,
        params: &AdapterParams,
        settings: &AdapterSettings,
    ) -> Result<Array>;
}
