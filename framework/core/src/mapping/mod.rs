//! Weight mapping: how a checkpoint's tensor names become a model's
//! parameters, and back. A family states its quirks as a [`MappingTable`] of
//! declarative [`Rule`]s (rename with layer placeholders, drop, split a fused
//! tensor, stack experts, tie, permute); the engine plans the mapping from
//! names and shapes alone and produces a [`MappingReport`].

mod pattern;
mod report;
mod rules;
mod table;

pub use pattern::{Captures, Pattern};
pub use report::{Dropped, MappingReport, Renamed, ShapeMismatch, Tied, Transformed};
pub use rules::{Rule, TensorTransform, Transform};
pub use table::{MappingPlan, MappingTable, Op};

use crate::error::Result;
use mlx_rs::Array;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Name-independent facts about a checkpoint tensor, read from file headers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorMeta {
    /// The shape.
    pub shape: Vec<i64>,
    /// The dtype as the file spells it (`F32`, `BF16`, ...).
    pub dtype: String,
}

/// Maps checkpoint tensors to model parameters and back.
///
/// [`MappingTable`] is the implementation every built-in family uses; the
/// trait exists so that a family with needs no table can express still plugs
/// into the loader.
pub trait WeightMapper: Send + Sync + std::fmt::Debug {
    /// Plans the mapping of `checkpoint` onto parameters with the `expected`
    /// shapes, looking at names and shapes only.
    fn plan(
        &self,
        checkpoint: &BTreeMap<String, TensorMeta>,
        expected: &BTreeMap<String, Vec<i64>>,
    ) -> MappingPlan;

    /// Turns model parameters back into checkpoint-named tensors.
    fn export(&self, params: &BTreeMap<String, Array>) -> Result<BTreeMap<String, Array>>;
}

#[cfg(test)]
mod tests;
