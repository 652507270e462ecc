//! The key/value cache that lets a model decode one token at a time without
//! recomputing the prefix: one [`LayerKv`] per transformer block, each
//! holding keys and values as `[batch, kv_heads, seq, dim]`. A layer with a
//! sliding attention window keeps only the `window - 1` most recent
//! positions (all a later query can see besides itself), so its memory stays
//! bounded however long the generation runs. Keys and values may be stored
//! affine-quantized (MLX's group-wise format, as mlx-lm's `--kv-bits`),
//! cutting the cache's memory to about a quarter at 8 bits; they are
//! de-quantized for each step's attention.

use crate::error::{MlxContext, Result};
use crate::quantize::QuantSettings;
use mlx_rs::ops::indexing::IndexOp;
use mlx_rs::Array;

/// Keys or values of one layer, as stored.
#[derive(Debug, Clone)]
enum Stored {
    /// Plain arrays.
    Float(Array),
    /// Affine-quantized: packed codes, scales, biases.
    Quantized(Array, Array, Array),
}

impl Stored {
    fn quantize(array: &Array, settings: QuantSettings) -> Result<Self> {
        let (codes, scales, biases) =
            mlx_rs::ops::quantize(array, settings.group_size as i32, settings.bits as i32)
                .context(|| "quantizing the KV cache".into())?;
        Ok(Stored::Quantized(codes, scales, biases))
    }

    fn seq_len(&self) -> i32 {
        match self {
            Stored::Float(a) | Stored::Quantized(a, _, _) => a.shape()[2],
        }
    }

    fn nbytes(&self) -> usize {
        match self {
            Stored::Float(a) => a.nbytes(),
            Stored::Quantized(a, s, b) => a.nbytes() + s.nbytes() + b.nbytes(),
        }
    }

    fn append(self, new: Stored) -> Result<Stored> {
        let cat = |a: Array, b: Array| {
            mlx_rs::ops::concatenate(&[a, b], 2).context(|| "extending the KV cache".into())
        };
        Ok(match (self, new) {
            (Stored::Float(a), Stored::Float(b)) => Stored::Float(cat(a, b)?),
            (Stored::Quantized(a, s, b), Stored::Quantized(na, ns, nb)) => {
                Stored::Quantized(cat(a, na)?, cat(s, ns)?, cat(b, nb)?)
            }
            _ => {
                return Err(crate::error::Error::InvalidArgument(
                    "a KV cache layer cannot mix float and quantized storage".into(),
                ))
            }
        })
    }

    /// Only positions `start..`.
    fn tail(&self, start: i32) -> Stored {
        let cut = |a: &Array| a.index((.., .., start.., ..));
        match self {
            Stored::Float(a) => Stored::Float(cut(a)),
            Stored::Quantized(a, s, b) => Stored::Quantized(cut(a), cut(s), cut(b)),
        }
    }

    /// The stored positions as floats of `dtype`.
    fn to_float(&self, settings: Option<QuantSettings>, dtype: mlx_rs::Dtype) -> Result<Array> {
        match (self, settings) {
            (Stored::Float(a), _) => Ok(a.clone()),
            (Stored::Quantized(a, s, b), Some(q)) => {
                mlx_rs::ops::dequantize(a, s, b, q.group_size as i32, q.bits as i32)
                    .and_then(|x| x.as_dtype(dtype))
                    .context(|| "de-quantizing the KV cache".into())
            }
            (Stored::Quantized(..), None) => Err(crate::error::Error::InvalidArgument(
                "quantized KV cache without settings".into(),
            )),
        }
    }
}

/// The cache of one attention layer.
#[derive(Debug, Clone, Default)]
pub struct LayerKv {
    keys: Option<Stored>,
    values: Option<Stored>,
    /// Positions processed so far (what rotary embeddings count from).
    seen: i32,
    /// Keep at most this many positions (sliding-window layers).
    keep: Option<usize>,
    /// Store keys and values affine-quantized with these settings.
    quantized: Option<QuantSettings>,
    /// Valid positions at the start of a growing buffer (float layers that
    /// keep every position store keys and values in buffers of
    /// [`GROWTH_STEP`]-position steps, updated in place).
    filled: i32,
}

/// Positions a growing float cache buffer adds at a time (as mlx-lm's).
pub const GROWTH_STEP: i32 = 256;

/// `buffer` with `update` written at positions `start..` of axis 2. MLX
/// writes in place when nothing else holds `buffer`, which is why it is
/// taken by value.
fn write_positions(buffer: Array, update: &Array, start: i32) -> Result<Array> {
    let shape = update.shape();
    let starts = [0, 0, start, 0];
    let ends = [shape[0], shape[1], start + shape[2], shape[3]];
    let strides = [1, 1, 1, 1];
    let stream = mlx_rs::Stream::thread_local_or_default();
    // SAFETY: every handle is live for the call; `res` starts empty and is
    // filled on success, freed on failure.
    unsafe {
        let mut res = mlx_sys::mlx_array_new();
        let status = mlx_sys::mlx_slice_update(
            &mut res,
            buffer.as_ptr(),
            update.as_ptr(),
            starts.as_ptr(),
            starts.len(),
            ends.as_ptr(),
            ends.len(),
            strides.as_ptr(),
            strides.len(),
            stream.as_ptr(),
        );
        if status != 0 {
            mlx_sys::mlx_array_free(res);
            return Err(crate::error::Error::InvalidArgument(format!(
                "cannot write positions {start}.. of the KV cache (buffer {:?}, update {:?})",
                buffer.shape(),
                shape
            )));
        }
        Ok(Array::from_ptr(res))
    }
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

    /// Stores keys and values quantized with `settings` from now on.
    ///
    /// Fails when the settings are not MLX's (bits 2-8, groups 32/64/128) or
    /// positions are already stored in float.
    pub fn set_quantized(&mut self, settings: QuantSettings) -> Result<()> {
        settings.check()?;
        if self.keys.is_some() {
            return Err(crate::error::Error::InvalidArgument(
                "the KV cache can only be quantized before its first step".into(),
            ));
        }
        self.quantized = Some(settings);
        Ok(())
    }

    /// The quantization of stored keys and values, if any.
    pub fn quantization(&self) -> Option<QuantSettings> {
        self.quantized
    }

    /// Number of positions processed (the next position's index).
    pub fn offset(&self) -> i32 {
        self.seen
    }

    /// Number of positions whose keys are stored.
    pub fn stored(&self) -> usize {
        if self.quantized.is_none() && self.keep.is_none() {
            return self.filled as usize;
        }
        self.keys
            .as_ref()
            .map(|k| k.seq_len() as usize)
            .unwrap_or(0)
    }

    /// Bytes held by the stored keys and values.
    pub fn nbytes(&self) -> usize {
        [&self.keys, &self.values]
            .into_iter()
            .flatten()
            .map(Stored::nbytes)
            .sum()
    }

    /// Appends `keys` and `values` and returns every stored position plus
    /// the new ones, for this step's attention; a sliding layer then drops
    /// what no later query can see. A quantized cache returns the
    /// de-quantized positions, the new ones included.
    pub fn update(&mut self, keys: Array, values: Array) -> Result<(Array, Array)> {
        if self.quantized.is_none() && self.keep.is_none() {
            return self.update_in_place(keys, values);
        }
        let new = keys.shape()[2];
        let dtype = keys.dtype();
        let (new_keys, new_values) = match self.quantized {
            Some(q) => {
                let head_dim = keys.shape()[3] as usize;
                q.check_input(head_dim).map_err(|e| {
                    crate::error::Error::InvalidArgument(format!(
                        "KV cache quantization: head dimension {head_dim}: {e}"
                    ))
                })?;
                (Stored::quantize(&keys, q)?, Stored::quantize(&values, q)?)
            }
            None => (Stored::Float(keys), Stored::Float(values)),
        };
        let keys = match self.keys.take() {
            Some(old) => old.append(new_keys)?,
            None => new_keys,
        };
        let values = match self.values.take() {
            Some(old) => old.append(new_values)?,
            None => new_values,
        };
        self.seen += new;
        let total = keys.seq_len();
        let (kept_keys, kept_values) = match self.keep {
            Some(keep) if total as usize > keep => {
                let start = total - keep as i32;
                (keys.tail(start), values.tail(start))
            }
            _ => (keys.clone(), values.clone()),
        };
        self.keys = Some(kept_keys);
        self.values = Some(kept_values);
        Ok((
            keys.to_float(self.quantized, dtype)?,
            values.to_float(self.quantized, dtype)?,
        ))
    }
}

impl LayerKv {
    /// [`LayerKv::update`] for a float layer that keeps every position:
    /// writes the new positions into buffers that grow by [`GROWTH_STEP`]
    /// (instead of concatenating, which copied the whole cache every step)
    /// and returns views of the filled part.
    fn update_in_place(&mut self, keys: Array, values: Array) -> Result<(Array, Array)> {
        let new = keys.shape()[2];
        let end = self.filled + new;
        let grow = |stored: Option<Stored>, update: &Array| -> Result<Array> {
            let old = match stored {
                Some(Stored::Float(old)) => Some(old),
                Some(Stored::Quantized(..)) => {
                    return Err(crate::error::Error::InvalidArgument(
                        "a KV cache layer cannot mix float and quantized storage".into(),
                    ))
                }
                None => None,
            };
            let capacity = old.as_ref().map(|o| o.shape()[2]).unwrap_or(0);
            let buffer = if end <= capacity {
                old.ok_or_else(|| {
                    crate::error::Error::InvalidArgument("empty KV cache buffer".into())
                })?
            } else {
                let shape = update.shape();
                let steps = (end + GROWTH_STEP - 1) / GROWTH_STEP;
                let extra = steps * GROWTH_STEP - self.filled;
                let zeros = mlx_rs::ops::zeros_dtype(
                    &[shape[0], shape[1], extra, shape[3]],
                    update.dtype(),
                )
                .context(|| "growing the KV cache".into())?;
                match old {
                    Some(old) => {
                        let filled = old.index((.., .., ..self.filled, ..));
                        mlx_rs::ops::concatenate(&[filled, zeros], 2)
                            .context(|| "growing the KV cache".into())?
                    }
                    None => zeros,
                }
            };
            write_positions(buffer, update, self.filled)
        };
        let key_buffer = grow(self.keys.take(), &keys)?;
        let value_buffer = grow(self.values.take(), &values)?;
        let visible = |buffer: &Array| buffer.index((.., .., ..end, ..));
        let result = (visible(&key_buffer), visible(&value_buffer));
        self.keys = Some(Stored::Float(key_buffer));
        self.values = Some(Stored::Float(value_buffer));
        self.filled = end;
        self.seen += new;
        Ok(result)
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

    /// Stores every layer's keys and values quantized (see
    /// [`LayerKv::set_quantized`]).
    pub fn set_quantized(&mut self, settings: QuantSettings) -> Result<()> {
        self.layers
            .iter_mut()
            .try_for_each(|layer| layer.set_quantized(settings))
    }

    /// Positions processed (those of the first layer).
    pub fn offset(&self) -> i32 {
        self.layers.first().map(LayerKv::offset).unwrap_or(0)
    }

    /// Bytes held by every layer's keys and values.
    pub fn nbytes(&self) -> usize {
        self.layers.iter().map(LayerKv::nbytes).sum()
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
