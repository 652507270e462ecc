//! MLX's affine group-wise quantization as a quantizer plugin.
//!
//! Each row of a `[out, in]` weight (or of each matrix of an
//! `[experts, out, in]` stack) is cut into groups of `group_size`
//! inputs; a group stores `bits`-bit integers `q` with one `scale` and one
//! `bias` so that `w ≈ scale * q + bias`. The integers are packed into
//! `uint32` words. This is the layout MLX's quantized kernels and mlx-lm's
//! checkpoints use, so a model quantized here loads in mlx-lm and the other
//! way round. Bits 2, 3, 4, 5, 6, 8; group sizes 32, 64, 128.

#![warn(missing_docs)]

use mlx_rs::Array;
use mlx_zoo_core::error::MlxContext;
use mlx_zoo_core::quantize::{
    QuantMode, QuantSettings, QuantizedTensor, AFFINE_BITS, AFFINE_GROUP_SIZES,
};
use mlx_zoo_core::{Error, Quantizer, Result};

/// The affine quantizer.
#[derive(Debug, Clone, Copy, Default)]
pub struct AffineQuantizer;

impl Quantizer for AffineQuantizer {
    fn name(&self) -> &'static str {
        "affine"
    }

    fn description(&self) -> &'static str {
        "MLX affine group-wise: w = scale * q + bias per group, 2-8 bits (mlx-lm compatible)"
    }

    fn supported_bits(&self) -> &'static [u8] {
        AFFINE_BITS
    }

    fn supported_group_sizes(&self) -> &'static [usize] {
        AFFINE_GROUP_SIZES
    }

    fn quantize(&self, weight: &Array, settings: QuantSettings) -> Result<QuantizedTensor> {
        let shape = weight.shape();
        if shape.len() < 2 {
            return Err(Error::InvalidArgument(format!(
                "affine quantization takes a [..., out, in] weight, got shape {shape:?}"
            )));
        }
        if settings.mode != QuantMode::Affine {
            return Err(Error::InvalidArgument(format!(
                "the affine quantizer does not write {} (the mxfp quantizer does)",
                settings.mode
            )));
        }
        settings.check_input(shape[shape.len() - 1] as usize)?;
        let (packed, scales, biases) =
            mlx_rs::ops::quantize(weight, settings.group_size as i32, settings.bits as i32)
                .context(|| format!("quantizing a {shape:?} weight to {} bits", settings.bits))?;
        Ok(QuantizedTensor {
            packed,
            scales,
            biases: Some(biases),
            settings,
        })
    }

    fn dequantize(&self, tensor: &QuantizedTensor) -> Result<Array> {
        mlx_rs::ops::dequantize(
            &tensor.packed,
            &tensor.scales,
            tensor.biases.as_ref(),
            tensor.settings.group_size as i32,
            tensor.settings.bits as i32,
        )
        .context(|| "de-quantizing a weight".into())
    }
}

mlx_zoo_core::register_quantizer!(AffineQuantizer);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_follow_the_layout_and_error_falls_with_bits() {
        let key = mlx_rs::random::key(3).unwrap();
        let w = mlx_rs::random::normal::<f32>(&[8, 128], None, None, &key).unwrap();
        for group_size in [32usize, 64, 128] {
            let mut previous = f32::INFINITY;
            for bits in [2u8, 3, 4, 5, 6, 8] {
                let settings = QuantSettings::affine(bits, group_size);
                let q = AffineQuantizer.quantize(&w, settings).unwrap();
                assert_eq!(q.packed.shape(), &[8, 128 * bits as i32 / 32]);
                assert_eq!(q.scales.shape(), &[8, 128 / group_size as i32]);
                let back = AffineQuantizer.dequantize(&q).unwrap();
                let error = w
                    .as_slice::<f32>()
                    .iter()
                    .zip(back.as_slice::<f32>())
                    .map(|(a, b)| (a - b).abs())
                    .fold(0.0f32, f32::max);
                assert!(error < previous, "{bits} bits, group {group_size}: {error}");
                previous = error;
            }
        }
    }

    #[test]
    fn unsupported_settings_are_refused() {
        let w = mlx_rs::ops::zeros::<f32>(&[4, 64]).unwrap();
        let q = |bits, group_size| {
            AffineQuantizer.quantize(&w, QuantSettings::affine(bits, group_size))
        };
        assert!(q(7, 32).unwrap_err().to_string().contains("7 bits"));
        assert!(q(4, 48).unwrap_err().to_string().contains("group size 48"));
        assert!(q(4, 128)
            .unwrap_err()
            .to_string()
            .contains("64 input features"));
    }
}
