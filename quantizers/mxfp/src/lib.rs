//! MLX's floating-point quantization modes as a quantizer plugin: `mxfp4`
//! and `mxfp8` (the OCP microscaling formats: E2M1 or E4M3 values sharing a
//! power-of-two E8M0 scale per 32) and `nvfp4` (E2M1 values with an E4M3
//! scale per 16). The layouts store packed `uint32` values and `uint8`
//! scales, no biases; they are what `mlx_lm.convert --q-mode` writes, and
//! MLX's kernels (CPU, Metal, CUDA) run them. The mode comes with the
//! settings ([`QuantSettings::mode`]); bits and group size are the mode's.

#![warn(missing_docs)]

use mlx_rs::Array;
use mlx_zoo_core::quantize::{ops, QuantMode, QuantSettings, QuantizedTensor};
use mlx_zoo_core::{Error, Quantizer, Result};

/// The floating-point-mode quantizer (`mxfp4`, `mxfp8`, `nvfp4`).
#[derive(Debug, Clone, Copy, Default)]
pub struct MxfpQuantizer;

impl Quantizer for MxfpQuantizer {
    fn name(&self) -> &'static str {
        "mxfp"
    }

    fn description(&self) -> &'static str {
        "MLX floating-point modes: mxfp4 / mxfp8 (E8M0 scale per 32), nvfp4 (E4M3 scale per 16); no biases (mlx-lm --q-mode)"
    }

    fn supported_bits(&self) -> &'static [u8] {
        &[4, 8]
    }

    fn supported_group_sizes(&self) -> &'static [usize] {
        &[16, 32]
    }

    fn quantize(&self, weight: &Array, settings: QuantSettings) -> Result<QuantizedTensor> {
        let shape = weight.shape();
        if settings.mode == QuantMode::Affine {
            return Err(Error::InvalidArgument(
                "the mxfp quantizer writes mxfp4, mxfp8 or nvfp4, not affine (use the affine quantizer)"
                    .into(),
            ));
        }
        if shape.len() < 2 {
            return Err(Error::InvalidArgument(format!(
                "{} quantization takes a [..., out, in] weight, got shape {shape:?}",
                settings.mode
            )));
        }
        settings.check_input(shape[shape.len() - 1] as usize)?;
        let (packed, scales, _) = ops::quantize(weight, settings)?;
        Ok(QuantizedTensor {
            packed,
            scales,
            biases: None,
            settings,
        })
    }

    fn dequantize(&self, tensor: &QuantizedTensor) -> Result<Array> {
        ops::dequantize(
            &tensor.packed,
            &tensor.scales,
            tensor.biases.as_ref(),
            tensor.settings,
        )
    }
}

mlx_zoo_core::register_quantizer!(MxfpQuantizer);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_mode_writes_scales_only_and_reads_back() {
        let key = mlx_rs::random::key(5).unwrap();
        let w = mlx_rs::random::normal::<f32>(&[8, 64], None, None, &key).unwrap();
        for mode in [QuantMode::Mxfp4, QuantMode::Mxfp8, QuantMode::Nvfp4] {
            let settings = QuantSettings::of_mode(mode);
            let q = MxfpQuantizer.quantize(&w, settings).unwrap();
            assert!(q.biases.is_none());
            assert_eq!(q.scales.dtype(), mlx_rs::Dtype::Uint8, "{mode}");
            assert_eq!(q.packed.shape(), &[8, 64 * settings.bits as i32 / 32]);
            let back = MxfpQuantizer.dequantize(&q).unwrap();
            assert_eq!(back.shape(), w.shape());
        }
        let affine = MxfpQuantizer.quantize(&w, QuantSettings::affine(4, 64));
        assert!(affine.unwrap_err().to_string().contains("not affine"));
    }
}
