//! Rotary position embeddings (RoPE) and the scaling variants checkpoints
//! ask for through `rope_scaling`: linear position interpolation, dynamic
//! NTK (with transformers' semantics: the base grows once the sequence passes
//! `max_position_embeddings`), Llama 3's frequency-band rescaling, Phi-3's
//! LongRoPE and YaRN (Qwen3, DeepSeek and others). Partial
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
    /// YaRN: inverse frequencies blended between interpolated (divided by
    /// `factor`) and original along a ramp over the rotary dimensions set
    /// by `beta_fast` / `beta_slow` rotations within the original context,
    /// with cos/sin scaled by an attention factor (transformers'
    /// `_compute_yarn_parameters`).
    Yarn {
        /// The context extension factor; when absent,
        /// `max_position_embeddings / original_max_position_embeddings`.
        #[serde(default)]
        factor: Option<f32>,
        /// The context the model was trained with; defaults to
        /// `max_position_embeddings`.
        #[serde(default)]
        original_max_position_embeddings: Option<usize>,
        /// Explicit cos/sin scale; defaults to `0.1 ln(factor) + 1` (or
        /// the ratio of two such terms with `mscale` and `mscale_all_dim`).
        #[serde(default)]
        attention_factor: Option<f32>,
        /// Rotations marking the fully extrapolated end of the ramp (32).
        #[serde(default)]
        beta_fast: Option<f32>,
        /// Rotations marking the fully interpolated end of the ramp (1).
        #[serde(default)]
        beta_slow: Option<f32>,
        /// DeepSeek's attention-factor numerator scale.
        #[serde(default)]
        mscale: Option<f32>,
        /// DeepSeek's attention-factor denominator scale.
        #[serde(default)]
        mscale_all_dim: Option<f32>,
        /// Round the ramp's ends outwards to whole dimensions (default true).
        #[serde(default)]
        truncate: Option<bool>,
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
    /// Scale of the rotated features' cos/sin (YaRN's attention factor).
    rotated_scale: Option<f32>,
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
            rotated_scale: None,
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
            Some(RopeScaling::Yarn {
                factor,
                original_max_position_embeddings,
                attention_factor,
                beta_fast,
                beta_slow,
                mscale,
                mscale_all_dim,
                truncate,
            }) => {
                let original = original_max_position_embeddings.unwrap_or(max_position_embeddings);
                let factor = factor.unwrap_or(max_position_embeddings as f32 / original as f32);
                if factor.is_nan() || factor <= 0.0 || original == 0 {
                    return Err(Error::config(
                        "rope_scaling",
                        format!(
                            "yarn needs a positive factor and original context, got factor \
                             {factor} and original_max_position_embeddings {original}"
                        ),
                    ));
                }
                let yarn = YarnSettings {
                    factor,
                    original: original as f32,
                    beta_fast: beta_fast.unwrap_or(32.0),
                    beta_slow: beta_slow.unwrap_or(1.0),
                    truncate: truncate.unwrap_or(true),
                };
                let periods = yarn_periods(dims, theta, &yarn);
                rope.freqs = Some(Array::from_slice(&periods, &[periods.len() as i32]));
                let scale = attention_factor.unwrap_or_else(|| match (mscale, mscale_all_dim) {
                    (Some(m), Some(all)) if *m != 0.0 && *all != 0.0 => {
                        yarn_mscale(factor, *m) / yarn_mscale(factor, *all)
                    }
                    _ => yarn_mscale(factor, 1.0),
                });
                rope.rotated_scale = (scale != 1.0).then_some(scale);
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

    /// A rotary embedding over the first `dims` features of each head with
    /// explicit periods (`dims / 2` of them, each 1 / inverse frequency) and
    /// a scale of the rotated features' cos/sin (1 for none): how a plugin
    /// brings a scaling [`RopeScaling`] does not name. It computes its
    /// periods from its own config and builds the rope here.
    pub fn from_periods(dims: usize, periods: &[f32], rotated_scale: f32) -> Result<Self> {
        if periods.len() * 2 != dims || periods.iter().any(|p| !(p.is_finite() && *p > 0.0)) {
            return Err(Error::InvalidArgument(format!(
                "rotary periods: expected {} positive finite values (rotary dims / 2), got {:?}",
                dims / 2,
                periods
            )));
        }
        let mut rope = Self::new(dims, 10000.0, None, 0)?;
        rope.freqs = Some(Array::from_slice(periods, &[periods.len() as i32]));
        rope.rotated_scale = (rotated_scale != 1.0).then_some(rotated_scale);
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
            let rotated = mlx_rs::fast::rope(
                x,
                self.dims,
                self.traditional,
                None,
                self.scale,
                offset,
                freqs,
            )
            .context(context)?;
            return match self.rotated_scale {
                Some(scale) => scale_rotated(&rotated, self.dims, scale),
                None => Ok(rotated),
            };
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

/// YaRN's settings, defaults filled in.
struct YarnSettings {
    factor: f32,
    original: f32,
    beta_fast: f32,
    beta_slow: f32,
    truncate: bool,
}

/// YaRN's attention-factor term `0.1 m ln(scale) + 1` (1 when not scaling up).
fn yarn_mscale(scale: f32, m: f32) -> f32 {
    if scale <= 1.0 {
        1.0
    } else {
        0.1 * m * scale.ln() + 1.0
    }
}

/// YaRN's periods (1 / inverse frequency) of the `dims / 2` rotated pairs,
/// from transformers' formulas, computed in float64 (transformers uses
/// float32: the periods may differ in their last bit).
fn yarn_periods(dims: usize, theta: f32, yarn: &YarnSettings) -> Vec<f32> {
    let (dim, base) = (dims as f64, theta as f64);
    // The rotary dimension that turns `rotations` times over the original
    // context.
    let correction = |rotations: f64| {
        dim * (yarn.original as f64 / (rotations * 2.0 * std::f64::consts::PI)).ln()
            / (2.0 * base.ln())
    };
    let (mut low, mut high) = (
        correction(yarn.beta_fast as f64),
        correction(yarn.beta_slow as f64),
    );
    if yarn.truncate {
        low = low.floor();
        high = high.ceil();
    }
    let (low, mut high) = (low.max(0.0), high.min(dim - 1.0));
    if low == high {
        high += 0.001;
    }
    (0..dims / 2)
        .map(|i| {
            let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
            let extrapolation = 1.0 - ramp;
            let period = base.powf((2 * i) as f64 / dim);
            let inv = (1.0 / (yarn.factor as f64 * period)) * (1.0 - extrapolation)
                + (1.0 / period) * extrapolation;
            (1.0 / inv) as f32
        })
        .collect()
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
    fn a_plugin_rope_from_periods_rotates_as_the_core_one() {
        let x = mlx_rs::random::normal::<f32>(&[1, 2, 5, 8], None, None, None).unwrap();
        let core = Rope::new(8, 500.0, None, 64).unwrap();
        let periods: Vec<f32> = (0..4).map(|i| 500f32.powf((2 * i) as f32 / 8.0)).collect();
        let plugin = Rope::from_periods(8, &periods, 1.0).unwrap();
        let (a, b) = (core.apply(&x, 3).unwrap(), plugin.apply(&x, 3).unwrap());
        let diff = a.subtract(&b).unwrap().abs().unwrap().max(None).unwrap();
        assert!(diff.item_cast::<f32>() < 1e-5);
        let scaled = Rope::from_periods(8, &periods, 2.0)
            .unwrap()
            .apply(&x, 3)
            .unwrap();
        let twice = a.multiply(Array::from_f32(2.0)).unwrap();
        let diff = scaled
            .subtract(&twice)
            .unwrap()
            .abs()
            .unwrap()
            .max(None)
            .unwrap();
        assert!(diff.item_cast::<f32>() < 1e-5);
        assert!(Rope::from_periods(8, &periods[..3], 1.0).is_err());
        assert!(Rope::from_periods(8, &[1.0, 0.0, 2.0, 3.0], 1.0).is_err());
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
