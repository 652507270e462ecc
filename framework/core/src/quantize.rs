//! The [`Quantizer`] trait: turning a floating-point weight into a compact
//! representation and back. Implementations live in the `quantizers/`
//! crates and register themselves like architectures do.

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
