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
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
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

impl AdapterSettings {
    /// The factor applied to the low-rank update: `alpha / rank`, or
    /// `alpha / sqrt(rank)` with rsLoRA.
    pub fn scale(&self) -> f32 {
        if self.rslora {
            self.alpha / (self.rank as f32).sqrt()
        } else {
            self.alpha / self.rank as f32
        }
    }
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
    /// The parameters added to a linear layer whose float weight is
    /// `base_weight` (`[out, in]`), with their initial values.
    fn init(&self, base_weight: &Array, settings: &AdapterSettings) -> Result<AdapterParams>;
    /// Whether [`forward`](Self::forward) needs the base weight (DoRA's
    /// norm does; LoRA does not, which spares de-quantizing it).
    fn uses_base_weight(&self) -> bool {
        false
    }
    /// The adapted output (before the layer's bias), given the layer input
    /// `x`, the base layer's output without bias and, when
    /// [`uses_base_weight`](Self::uses_base_weight), its float weight.
    fn forward(
        &self,
        x: &Array,
        base_output: &Array,
        base_weight: Option<&Array>,
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
