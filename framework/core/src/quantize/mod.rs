//! Quantization: the [`Quantizer`] trait (turning a floating-point weight
//! into MLX's affine layout and back; implementations live in the
//! `quantizers/` crates and register themselves like architectures do),
//! per-layer [`plan`]s, and [`apply`]ing a plan to a model.

pub mod apply;
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
}

/// Bit widths MLX's affine kernels support.
pub const AFFINE_BITS: &[u8] = &[2, 3, 4, 5, 6, 8];
/// Group sizes MLX's affine kernels support.
pub const AFFINE_GROUP_SIZES: &[usize] = &[32, 64, 128];

impl QuantSettings {
    /// Checks the settings against MLX's affine kernels and a layer with
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

    /// Checks the bits and group size against MLX's affine kernels.
    pub fn check(&self) -> Result<()> {
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
