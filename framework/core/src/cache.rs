//! The key/value cache that lets a model decode one token at a time without
//! recomputing the prefix: one [`LayerKv`] per transformer block, each
//! holding keys and values as `[batch, kv_heads, seq, dim]`. A layer with a
//! sliding attention window keeps only the `window - 1` most recent
//! positions (all a later query can see besides itself), so its memory stays
//! bounded however long the generation runs.

use crate::error::{MlxContext, Result};
use mlx_rs::Array;

/// The cache of one attention layer.
#[derive(Debug, Clone, Default)]
pub struct LayerKv {
    keys: Option<Array>,
    values: Option<Array>,
    /// Positions processed so far (what rotary embeddings count from).
    seen: i32,
    /// Keep at most this many positions (sliding-window layers).
    keep: Option<usize>,
}

impl LayerKv {
    /// A cache that keeps every position.
    pub fn new() -> Self {
        Self::default()
    }

    /// A cache for a layer attending to the last `window` positions.
    pub fn sliding(window: usize) -> Self {
        Self {
            keep: Some(window.saturating_sub(1)),
            ..Self::default()
        }
    }

    /// Number of positions processed (the next position's index).
    pub fn offset(&self) -> i32 {
        self.seen
    }

    /// Number of positions whose keys are stored.
    pub fn stored(&self) -> usize {
        self.keys
            .as_ref()
            .map(|k| k.shape()[2] as usize)
            .unwrap_or(0)
    }

    /// Appends `keys` and `values` and returns every stored position plus
    /// the new ones, for this step's attention; a sliding layer then drops
    /// what no later query can see.
    pub fn update(&mut self, keys: Array, values: Array) -> Result<(Array, Array)> {
        let ctx = || "extending the KV cache".to_owned();
        let new = keys.shape()[2];
        let keys = match self.keys.take() {
            Some(old) => mlx_rs::ops::concatenate(&[old, keys], 2).context(ctx)?,
            None => keys,
        };
        let values = match self.values.take() {
            Some(old) => mlx_rs::ops::concatenate(&[old, values], 2).context(ctx)?,
            None => values,
        };
        self.seen += new;
        let total = keys.shape()[2];
        let (kept_keys, kept_values) = match self.keep {
            Some(keep) if total as usize > keep => {
                use mlx_rs::ops::indexing::IndexOp;
                let start = total - keep as i32;
                (
                    keys.index((.., .., start.., ..)),
                    values.index((.., .., start.., ..)),
                )
            }
            _ => (keys.clone(), values.clone()),
        };
        self.keys = Some(kept_keys);
        self.values = Some(kept_values);
        Ok((keys, values))
    }
}

/// A whole model's cache.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    layers: Vec<LayerKv>,
}

impl KvCache {
    /// An empty cache for `num_layers` blocks that keep every position.
    pub fn new(num_layers: usize) -> Self {
        Self {
            layers: vec![LayerKv::new(); num_layers],
        }
    }

    /// An empty cache with one entry per layer: `Some(window)` for a
    /// sliding-window layer, `None` for full attention.
    pub fn with_windows(windows: &[Option<usize>]) -> Self {
        Self {
            layers: windows
                .iter()
                .map(|w| w.map(LayerKv::sliding).unwrap_or_default())
                .collect(),
        }
    }

    /// Positions processed (those of the first layer).
    pub fn offset(&self) -> i32 {
        self.layers.first().map(LayerKv::offset).unwrap_or(0)
    }

    /// The cache of every layer, in order.
    pub fn layers(&self) -> &[LayerKv] {
        &self.layers
    }

    /// The cache of every layer, mutably, in order.
    pub fn layers_mut(&mut self) -> &mut [LayerKv] {
        &mut self.layers
    }

    /// Number of layers.
    pub fn len(&self) -> usize {
        self.layers.len()
    }

    /// Whether the cache has no layers.
    pub fn is_empty(&self) -> bool {
        self.layers.is_empty()
    }
}
