//! Quantization: the [`Quantizer`] trait (turning a floating-point weight
//! into one of MLX's quantized layouts and back; implementations live in
//! the `quantizers/` crates and register themselves like architectures do),
//! the layouts' [`QuantMode`]s and their mode-aware operations ([`ops`]),
//! per-layer [`plan`]s, and [`apply`]ing a plan to a model.

pub mod apply;
pub mod ops;
pub mod plan;

pub use apply::{quantize_model, QuantizationReport};
pub use plan::{LayerAction, QuantPlan};

use crate::error::Result;
use mlx_rs::Array;
use serde::{Deserialize, Serialize};

/// How one weight is quantized.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuantSettings {
    /// Bits per weight.
    pub bits: u8,
    /// Consecutive input features sharing one scale (and bias).
    pub group_size: usize,
    /// How values are encoded (MLX's `mode`).
    #[serde(default)]
    pub mode: QuantMode,
}

/// How a quantized weight's values are encoded: MLX's `mode` argument and
/// the `mode` key of an MLX-format `quantization` block.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum QuantMode {
    /// Integers with a scale and a bias per group (`w = scale * q + bias`).
    #[default]
    Affine,
    /// OCP microscaling FP4 (E2M1 values, one power-of-two E8M0 scale per
    /// 32 values): 4 bits, group 32, no biases.
    Mxfp4,
    /// OCP microscaling FP8 (E4M3 values, E8M0 scale per 32): 8 bits,
    /// group 32, no biases.
    Mxfp8,
    /// NVIDIA's FP4 (E2M1 values, an FP8 E4M3 scale per 16): 4 bits,
    /// group 16, no biases.
    Nvfp4,
}

impl QuantMode {
    /// Every mode, for listings and errors.
    pub const ALL: [QuantMode; 4] = [
        QuantMode::Affine,
        QuantMode::Mxfp4,
        QuantMode::Mxfp8,
        QuantMode::Nvfp4,
    ];

    /// MLX's name of the mode.
    pub fn as_str(self) -> &'static str {
        match self {
            QuantMode::Affine => "affine",
            QuantMode::Mxfp4 => "mxfp4",
            QuantMode::Mxfp8 => "mxfp8",
            QuantMode::Nvfp4 => "nvfp4",
        }
    }

    /// Whether the layout stores biases beside the scales.
    pub fn has_biases(self) -> bool {
        self == QuantMode::Affine
    }

    /// The bits and group size a floating-point mode fixes (`None` for
    /// affine, which takes several).
    pub fn fixed(self) -> Option<(u8, usize)> {
        match self {
            QuantMode::Affine => None,
            QuantMode::Mxfp4 => Some((4, 32)),
            QuantMode::Mxfp8 => Some((8, 32)),
            QuantMode::Nvfp4 => Some((4, 16)),
        }
    }
}

impl std::fmt::Display for QuantMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for QuantMode {
    type Err = crate::error::Error;

    fn from_str(name: &str) -> Result<Self> {
        QuantMode::ALL
            .into_iter()
            .find(|m| m.as_str() == name)
            .ok_or_else(|| {
                crate::error::Error::InvalidArgument(format!(
                    "quantization mode {name:?}: expected one of affine, mxfp4, mxfp8, nvfp4"
                ))
            })
    }
}

/// Bit widths MLX's affine kernels support.
pub const AFFINE_BITS: &[u8] = &[2, 3, 4, 5, 6, 8];
/// Group sizes MLX's affine kernels support.
pub const AFFINE_GROUP_SIZES: &[usize] = &[32, 64, 128];

impl QuantSettings {
    /// Affine settings.
    pub fn affine(bits: u8, group_size: usize) -> Self {
        Self {
            bits,
            group_size,
            mode: QuantMode::Affine,
        }
    }

    /// The settings of a floating-point mode (its fixed bits and group
    /// size); affine's default 4 bits, group 64 for [`QuantMode::Affine`].
    pub fn of_mode(mode: QuantMode) -> Self {
        let (bits, group_size) = mode.fixed().unwrap_or((4, 64));
        Self {
            bits,
            group_size,
            mode,
        }
    }

    /// Checks the settings against MLX's kernels and a layer with
    /// `input` features.
    pub fn check_input(&self, input: usize) -> Result<()> {
        self.check()?;
        if input % self.group_size != 0 {
            return Err(crate::error::Error::InvalidArgument(format!(
                "{input} input features do not divide into groups of {}",
                self.group_size
            )));
        }
        Ok(())
    }

    /// Checks the bits and group size against MLX's kernels for the mode.
    pub fn check(&self) -> Result<()> {
        if let Some((bits, group_size)) = self.mode.fixed() {
            if (self.bits, self.group_size) != (bits, group_size) {
                return Err(crate::error::Error::InvalidArgument(format!(
                    "{} takes {bits} bits in groups of {group_size}, not {} bits in groups of {}",
                    self.mode, self.bits, self.group_size
                )));
            }
            return Ok(());
        }
        if !AFFINE_BITS.contains(&self.bits) {
            return Err(crate::error::Error::InvalidArgument(format!(
                "{} bits is not supported; expected one of {AFFINE_BITS:?}",
                self.bits
            )));
        }
        if !AFFINE_GROUP_SIZES.contains(&self.group_size) {
            return Err(crate::error::Error::InvalidArgument(format!(
                "group size {} is not supported; expected one of {AFFINE_GROUP_SIZES:?}",
                self.group_size
            )));
        }
        Ok(())
    }
}

/// A quantized weight in MLX's layout: packed `uint32` words plus per-group
/// scales and, for affine schemes, biases.
#[derive(Debug, Clone)]
pub struct QuantizedTensor {
    /// The packed values.
    pub packed: Array,
    /// One scale per group.
    pub scales: Array,
    /// One bias per group, for affine schemes.
    pub biases: Option<Array>,
    /// The settings used.
    pub settings: QuantSettings,
}

/// A quantization scheme.
pub trait Quantizer: Send + Sync {
    /// A short unique name, e.g. `affine`.
    fn name(&self) -> &'static str;
    /// One line about the scheme.
    fn description(&self) -> &'static str;
    /// The bit widths it supports.
    fn supported_bits(&self) -> &'static [u8];
    /// The group sizes it supports.
    fn supported_group_sizes(&self) -> &'static [usize];
    /// Quantizes a `[out, in]` weight.
    fn quantize(&self, weight: &Array, settings: QuantSettings) -> Result<QuantizedTensor>;
    /// Reconstructs a floating-point weight.
    fn dequantize(&self, tensor: &QuantizedTensor) -> Result<Array>;
}
