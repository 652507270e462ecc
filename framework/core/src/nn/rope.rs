//! Rotary position embeddings (RoPE) and the scaling variants checkpoints
//! ask for through `rope_scaling`: linear position interpolation, dynamic
//! NTK (with transformers' semantics: the base grows once the sequence passes
//! `max_position_embeddings`) and Llama 3's frequency-band rescaling. Partial
//! rotary is a matter of rotating fewer dimensions than the head has.

use crate::error::{Error, MlxContext, Result};
use mlx_rs::Array;
use serde::{Deserialize, Serialize};

/// A `rope_scaling` entry, keyed by `rope_type` (or the older `type`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "rope_type", rename_all = "lowercase")]
#[non_exhaustive]
pub enum RopeScaling {
    /// Positions divided by `factor`.
    Linear {
        /// The interpolation factor.
        factor: f32,
    },
    /// Dynamic NTK-aware scaling of the base.
    Dynamic {
        /// The scaling factor.
        factor: f32,
    },
    /// Llama 3.x's per-band frequency rescaling.
    Llama3 {
        /// Scaling of the low-frequency band.
        factor: f32,
        /// Lower bound of the smoothed band, as a wavelength divisor.
        low_freq_factor: f32,
        /// Upper bound of the smoothed band, as a wavelength divisor.
        high_freq_factor: f32,
        /// The context length the model was trained with.
        original_max_position_embeddings: usize,
    },
    /// Phi-3's LongRoPE ("su" in early configs): per-frequency divisors,
    /// `short_factor` within the original context and `long_factor` past
    /// it, with cos/sin scaled by an attention factor.
    #[serde(alias = "su")]
    Longrope {
        /// Divisors of the inverse frequencies within the original context.
        short_factor: Vec<f32>,
        /// Divisors past the original context.
        long_factor: Vec<f32>,
        /// The original context; families fill it from the config's
        /// top-level key when the scaling block lacks it.
        #[serde(default)]
        original_max_position_embeddings: Option<usize>,
        /// Explicit scaling factor; defaults to
        /// `max_position_embeddings / original_max_position_embeddings`.
        #[serde(default)]
        factor: Option<f32>,
        /// Explicit cos/sin scale; defaults to
        /// `sqrt(1 + ln(factor) / ln(original))` when `factor > 1`.
        #[serde(default)]
        attention_factor: Option<f32>,
    },
}

/// LongRoPE's two period tables and when to switch.
#[derive(Debug, Clone)]
struct LongRope {
    short: Array,
    long: Array,
    original: usize,
    attention_factor: f32,
}

/// A configured rotary embedding.
#[derive(Debug, Clone)]
pub struct Rope {
    dims: i32,
    base: f32,
    scale: f32,
    traditional: bool,
    /// Explicit periods (1 / inverse frequency) when the base alone does not
    /// describe them (Llama 3).
    freqs: Option<Array>,
    /// `(factor, max_position_embeddings)` for dynamic NTK.
    dynamic: Option<(f32, usize)>,
    longrope: Option<LongRope>,
}

impl Rope {
    /// A rotary embedding over the first `dims` features of each head.
    pub fn new(
        dims: usize,
        theta: f32,
        scaling: Option<&RopeScaling>,
        max_position_embeddings: usize,
    ) -> Result<Self> {
        if dims == 0 || dims % 2 != 0 {
            return Err(Error::InvalidArgument(format!(
                "rotary dimensions must be even and positive, got {dims}"
            )));
        }
        let mut rope = Self {
            dims: dims as i32,
            base: theta,
            scale: 1.0,
            traditional: false,
            freqs: None,
            dynamic: None,
            longrope: None,
        };
        match scaling {
            None => {}
            Some(RopeScaling::Linear { factor }) => rope.scale = 1.0 / factor,
            Some(RopeScaling::Dynamic { factor }) => {
                rope.dynamic = Some((*factor, max_position_embeddings))
            }
            Some(RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            }) => {
                let periods = llama3_periods(
                    dims,
                    theta,
                    *factor,
                    *low_freq_factor,
                    *high_freq_factor,
                    *original_max_position_embeddings as f32,
                );
                rope.freqs = Some(Array::from_slice(&periods, &[periods.len() as i32]));
            }
            Some(RopeScaling::Longrope {
                short_factor,
                long_factor,
                original_max_position_embeddings,
                factor,
                attention_factor,
            }) => {
                let original = original_max_position_embeddings.unwrap_or(max_position_embeddings);
                for (key, factors) in [("short_factor", short_factor), ("long_factor", long_factor)]
                {
                    if factors.len() != dims / 2 {
                        return Err(Error::config(
                            format!("rope_scaling.{key}"),
                            format!(
                                "has {} entries, expected {} (rotary dims / 2)",
                                factors.len(),
                                dims / 2
                            ),
                        ));
                    }
                }
                let factor = factor.unwrap_or(max_position_embeddings as f32 / original as f32);
                let attention_factor = attention_factor.unwrap_or(if factor <= 1.0 {
                    1.0
                } else {
                    (1.0 + factor.ln() / (original as f32).ln()).sqrt()
                });
                let table = |factors: &[f32]| {
                    let periods: Vec<f32> = factors
                        .iter()
                        .enumerate()
                        .map(|(i, f)| f * theta.powf((2 * i) as f32 / dims as f32))
                        .collect();
                    Array::from_slice(&periods, &[periods.len() as i32])
                };
                rope.longrope = Some(LongRope {
                    short: table(short_factor),
                    long: table(long_factor),
                    original,
                    attention_factor,
                });
            }
        }
        Ok(rope)
    }

    /// Uses the interleaved ("traditional") pairing instead of halves.
    pub fn traditional(mut self, traditional: bool) -> Self {
        self.traditional = traditional;
        self
    }

    /// Number of rotated features per head.
    pub fn dims(&self) -> usize {
        self.dims as usize
    }

    /// The sequence length past which the rotation of earlier positions
    /// changes (LongRoPE switches every position to its long factors), so a
    /// KV cache filled below it must be rebuilt, as transformers does.
    pub fn rotation_changes_after(&self) -> Option<usize> {
        self.longrope.as_ref().map(|l| l.original)
    }

    /// The sequence length up to which a position's rotation does not
    /// depend on the sequence's length (LongRoPE switches factors past it,
    /// dynamic NTK scales the base past it); `None`: any length. Rows that
    /// pack several sequences must stay within it to rotate each sequence
    /// as it would be alone (RoPE itself only sees relative positions).
    pub fn length_independent_up_to(&self) -> Option<usize> {
        match (&self.longrope, self.dynamic) {
            (Some(long), _) => Some(long.original),
            (None, Some((_, max_positions))) => Some(max_positions),
            (None, None) => None,
        }
    }

    /// Rotates `x` of shape `[batch, heads, seq, head_dim]` whose first
    /// position is `offset`.
    pub fn apply(&self, x: &Array, offset: i32) -> Result<Array> {
        let context = || "applying rotary embeddings".to_owned();
        if let Some(long) = &self.longrope {
            let seq_len = offset as usize + x.shape()[2] as usize;
            let periods = if seq_len > long.original {
                &long.long
            } else {
                &long.short
            };
            let rotated = mlx_rs::fast::rope(
                x,
                self.dims,
                self.traditional,
                None,
                self.scale,
                offset,
                periods,
            )
            .context(context)?;
            return scale_rotated(&rotated, self.dims, long.attention_factor);
        }
        if let Some(freqs) = &self.freqs {
            return mlx_rs::fast::rope(
                x,
                self.dims,
                self.traditional,
                None,
                self.scale,
                offset,
                freqs,
            )
            .context(context);
        }
        let base = match self.dynamic {
            Some((factor, max_positions)) => {
                let seq_len = offset as usize + x.shape()[2] as usize;
                dynamic_ntk_base(
                    self.base,
                    factor,
                    max_positions,
                    seq_len,
                    self.dims as usize,
                )
            }
            None => self.base,
        };
        mlx_rs::fast::rope(
            x,
            self.dims,
            self.traditional,
            base,
            self.scale,
            offset,
            None,
        )
        .context(context)
    }
}

/// Multiplies the first `dims` features (the rotated ones) by `factor`,
/// which is what scaling cos and sin by it amounts to.
fn scale_rotated(x: &Array, dims: i32, factor: f32) -> Result<Array> {
    if factor == 1.0 {
        return Ok(x.clone());
    }
    let context = || "scaling rotary features".to_owned();
    let head_dim = x.shape()[x.ndim() - 1];
    let factor = Array::from_f32(factor)
        .as_dtype(x.dtype())
        .context(context)?;
    if dims == head_dim {
        return x.multiply(&factor).context(context);
    }
    let parts = mlx_rs::ops::split_at_indices(x, &[dims], -1).context(context)?;
    let scaled = parts[0].multiply(&factor).context(context)?;
    mlx_rs::ops::concatenate(&[scaled, parts[1].clone()], -1).context(context)
}

/// transformers' dynamic NTK base for a sequence of `seq_len` positions.
fn dynamic_ntk_base(
    base: f32,
    factor: f32,
    max_positions: usize,
    seq_len: usize,
    dims: usize,
) -> f32 {
    if seq_len <= max_positions {
        return base;
    }
    let ratio = factor as f64 * seq_len as f64 / max_positions as f64 - (factor as f64 - 1.0);
    (base as f64 * ratio.powf(dims as f64 / (dims as f64 - 2.0))) as f32
}

/// Llama 3's rescaled periods (1 / inverse frequency), one per rotated pair.
fn llama3_periods(
    dims: usize,
    theta: f32,
    factor: f32,
    low_freq_factor: f32,
    high_freq_factor: f32,
    original_context: f32,
) -> Vec<f32> {
    let low_freq_wavelen = original_context / low_freq_factor;
    let high_freq_wavelen = original_context / high_freq_factor;
    (0..dims / 2)
        .map(|i| {
            let inv_freq = 1.0 / theta.powf((2 * i) as f32 / dims as f32);
            let wavelen = 2.0 * std::f32::consts::PI / inv_freq;
            let scaled = if wavelen < high_freq_wavelen {
                inv_freq
            } else if wavelen > low_freq_wavelen {
                inv_freq / factor
            } else {
                let smooth = (original_context / wavelen - low_freq_factor)
                    / (high_freq_factor - low_freq_factor);
                (1.0 - smooth) * inv_freq / factor + smooth * inv_freq
            };
            1.0 / scaled
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dynamic_base_grows_only_past_the_context() {
        assert_eq!(dynamic_ntk_base(10000.0, 2.0, 32, 32, 16), 10000.0);
        let grown = dynamic_ntk_base(10000.0, 2.0, 32, 48, 16);
        let expected = 10000.0 * (2.0f64 * 48.0 / 32.0 - 1.0).powf(16.0 / 14.0);
        assert!(
            (grown as f64 - expected).abs() < 1e-2,
            "{grown} vs {expected}"
        );
    }

    #[test]
    fn llama3_keeps_high_frequencies_and_scales_low_ones() {
        let periods = llama3_periods(16, 500000.0, 8.0, 1.0, 4.0, 32.0);
        let plain: Vec<f32> = (0..8)
            .map(|i| 500000f32.powf((2 * i) as f32 / 16.0))
            .collect();
        assert_eq!(periods[0], plain[0]);
        assert!((periods[7] / plain[7] - 8.0).abs() < 1e-4);
    }

    #[test]
    fn odd_rotary_dims_are_rejected() {
        assert!(Rope::new(7, 10000.0, None, 128).is_err());
    }
}
