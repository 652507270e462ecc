//! The key/value cache that lets a model decode one token at a time without
//! recomputing the prefix: one [`LayerKv`] per transformer block, each
//! holding the keys and values seen so far as `[batch, kv_heads, seq, dim]`.

use crate::error::{MlxContext, Result};
use mlx_rs::Array;

/// The cache of one attention layer.
#[derive(Debug, Clone, Default)]
pub struct LayerKv {
    keys: Option<Array>,
    values: Option<Array>,
}

impl LayerKv {
    /// Number of positions cached.
    pub fn offset(&self) -> i32 {
        self.keys.as_ref().map(|k| k.shape()[2]).unwrap_or(0)
    }

    /// Appends `keys` and `values` and returns everything cached so far.
    pub fn update(&mut self, keys: Array, values: Array) -> Result<(Array, Array)> {
        let ctx = || "extending the KV cache".to_owned();
        let keys = match self.keys.take() {
            Some(old) => mlx_rs::ops::concatenate(&[old, keys], 2).context(ctx)?,
            None => keys,
        };
        let values = match self.values.take() {
            Some(old) => mlx_rs::ops::concatenate(&[old, values], 2).context(ctx)?,
            None => values,
        };
        self.keys = Some(keys.clone());
        self.values = Some(values.clone());
        Ok((keys, values))
    }
}

/// A whole model's cache.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    layers: Vec<LayerKv>,
}

impl KvCache {
    /// An empty cache for `num_layers` blocks.
    pub fn new(num_layers: usize) -> Self {
        Self {
            layers: vec![LayerKv::default(); num_layers],
        }
    }

    /// Positions cached (those of the first layer).
    pub fn offset(&self) -> i32 {
        self.layers.first().map(LayerKv::offset).unwrap_or(0)
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
