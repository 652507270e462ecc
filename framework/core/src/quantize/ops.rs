//! MLX's quantized operations for every [`QuantMode`]: quantize,
//! de-quantize, the quantized matrix product and its expert-gathering form.
//! mlx-rs's wrappers only know the affine mode; these call mlx-c with the
//! mode's name, so the floating-point layouts (`mxfp4`, `mxfp8`, `nvfp4`:
//! scales only, no biases) run through the same kernels mlx-lm uses.

use super::{QuantMode, QuantSettings};
use crate::error::{Error, Result};
use mlx_rs::{Array, Stream};
use std::ffi::CString;

/// An absent optional array for mlx-c.
fn none() -> mlx_sys::mlx_array {
    mlx_sys::mlx_array {
        ctx: std::ptr::null_mut(),
    }
}

fn some_int(value: i32) -> mlx_sys::mlx_optional_int {
    mlx_sys::mlx_optional_int {
        value,
        has_value: true,
    }
}

fn mode_name(mode: QuantMode) -> CString {
    CString::new(mode.as_str()).expect("mode names have no NUL")
}

/// Fails unless `biases` is present exactly when the mode has them.
fn check_biases(settings: QuantSettings, biases: Option<&Array>) -> Result<()> {
    match (settings.mode.has_biases(), biases.is_some()) {
        (true, false) => Err(Error::InvalidArgument(format!(
            "{} quantization needs biases beside the scales",
            settings.mode
        ))),
        (false, true) => Err(Error::InvalidArgument(format!(
            "{} quantization has no biases, but biases were given",
            settings.mode
        ))),
        _ => Ok(()),
    }
}

/// Wraps an mlx-c call that fills one array; a failure carries MLX's message.
fn one(op: &str, call: impl FnOnce(*mut mlx_sys::mlx_array) -> i32) -> Result<Array> {
    // SAFETY: `res` starts empty; the callee fills it on success and it is
    // freed on failure.
    unsafe {
        let mut res = mlx_sys::mlx_array_new();
        match crate::mlx_error::capture(|| call(&mut res)) {
            Ok(()) => Ok(Array::from_ptr(res)),
            Err(message) => {
                mlx_sys::mlx_array_free(res);
                Err(Error::InvalidArgument(format!(
                    "MLX refused {op}: {message}"
                )))
            }
        }
    }
}

/// Quantizes `weight` (`[..., out, in]`): packed values, scales, and
/// biases for the affine mode.
pub fn quantize(weight: &Array, settings: QuantSettings) -> Result<(Array, Array, Option<Array>)> {
    settings.check()?;
    if settings.mode == QuantMode::Affine {
        let (packed, scales, biases) =
            mlx_rs::ops::quantize(weight, settings.group_size as i32, settings.bits as i32)?;
        return Ok((packed, scales, Some(biases)));
    }
    let stream = Stream::thread_local_or_default();
    let mode = mode_name(settings.mode);
    // SAFETY: every handle is live for the call; the vector is freed after
    // its arrays are copied out.
    let parts = unsafe {
        let mut res = mlx_sys::mlx_vector_array_new();
        let status = mlx_sys::mlx_quantize(
            &mut res,
            weight.as_ptr(),
            some_int(settings.group_size as i32),
            some_int(settings.bits as i32),
            mode.as_ptr(),
            none(),
            stream.as_ptr(),
        );
        let size = mlx_sys::mlx_vector_array_size(res);
        let parts: Vec<Array> = (0..size)
            .map(|i| {
                let mut a = mlx_sys::mlx_array_new();
                mlx_sys::mlx_vector_array_get(&mut a, res, i);
                Array::from_ptr(a)
            })
            .collect();
        mlx_sys::mlx_vector_array_free(res);
        if status != 0 {
            return Err(Error::InvalidArgument(format!(
                "MLX could not quantize a {:?} weight as {}",
                weight.shape(),
                settings.mode
            )));
        }
        parts
    };
    let mut parts = parts.into_iter();
    match (parts.next(), parts.next()) {
        (Some(packed), Some(scales)) => Ok((packed, scales, None)),
        _ => Err(Error::InvalidArgument(format!(
            "MLX's {} quantization returned too few arrays",
            settings.mode
        ))),
    }
}

/// The floating-point weight back from its quantized layout.
pub fn dequantize(
    packed: &Array,
    scales: &Array,
    biases: Option<&Array>,
    settings: QuantSettings,
) -> Result<Array> {
    check_biases(settings, biases)?;
    if settings.mode == QuantMode::Affine {
        return Ok(mlx_rs::ops::dequantize(
            packed,
            scales,
            biases,
            settings.group_size as i32,
            settings.bits as i32,
        )?);
    }
    let stream = Stream::thread_local_or_default();
    let mode = mode_name(settings.mode);
    // SAFETY: every handle is live for the call; absent arrays are empty
    // handles, which mlx-c reads as "none".
    one("de-quantizing", |res| unsafe {
        mlx_sys::mlx_dequantize(
            res,
            packed.as_ptr(),
            scales.as_ptr(),
            none(),
            some_int(settings.group_size as i32),
            some_int(settings.bits as i32),
            mode.as_ptr(),
            none(),
            mlx_sys::mlx_optional_dtype {
                value: mlx_sys::mlx_dtype__MLX_FLOAT32,
                has_value: false,
            },
            stream.as_ptr(),
        )
    })
}

/// `x @ dequantize(w).T` (or without the transpose) in one kernel.
pub fn quantized_matmul(
    x: &Array,
    packed: &Array,
    scales: &Array,
    biases: Option<&Array>,
    transpose: bool,
    settings: QuantSettings,
) -> Result<Array> {
    check_biases(settings, biases)?;
    let stream = Stream::thread_local_or_default();
    let mode = mode_name(settings.mode);
    // SAFETY: as in `dequantize`.
    one("a quantized matrix product", |res| unsafe {
        mlx_sys::mlx_quantized_matmul(
            res,
            x.as_ptr(),
            packed.as_ptr(),
            scales.as_ptr(),
            biases.map(Array::as_ptr).unwrap_or_else(none),
            transpose,
            some_int(settings.group_size as i32),
            some_int(settings.bits as i32),
            mode.as_ptr(),
            stream.as_ptr(),
        )
    })
}

/// The quantized product with experts chosen per row (`rhs_indices`), as
/// MLX's `gather_qmm`.
#[allow(clippy::too_many_arguments)]
pub fn gather_qmm(
    x: &Array,
    packed: &Array,
    scales: &Array,
    biases: Option<&Array>,
    rhs_indices: &Array,
    transpose: bool,
    settings: QuantSettings,
    sorted_indices: bool,
) -> Result<Array> {
    check_biases(settings, biases)?;
    let stream = Stream::thread_local_or_default();
    let mode = mode_name(settings.mode);
    // SAFETY: as in `dequantize`.
    one("a gathered quantized matrix product", |res| unsafe {
        mlx_sys::mlx_gather_qmm(
            res,
            x.as_ptr(),
            packed.as_ptr(),
            scales.as_ptr(),
            biases.map(Array::as_ptr).unwrap_or_else(none),
            none(),
            rhs_indices.as_ptr(),
            transpose,
            some_int(settings.group_size as i32),
            some_int(settings.bits as i32),
            mode.as_ptr(),
            sorted_indices,
            stream.as_ptr(),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn max_diff(a: &Array, b: &Array) -> f32 {
        a.subtract(b)
            .unwrap()
            .abs()
            .unwrap()
            .max(None)
            .unwrap()
            .item_cast::<f32>()
    }

    #[test]
    fn every_mode_round_trips_and_its_product_equals_the_dequantized_one() {
        let key = mlx_rs::random::key(7).unwrap();
        let w = mlx_rs::random::normal::<f32>(&[48, 64], None, None, &key).unwrap();
        let x = mlx_rs::random::normal::<f32>(&[3, 64], None, None, &key).unwrap();
        for mode in QuantMode::ALL {
            let settings = QuantSettings::of_mode(mode);
            let (packed, scales, biases) = quantize(&w, settings).unwrap();
            assert_eq!(biases.is_some(), mode.has_biases(), "{mode}");
            assert_eq!(
                scales.shape(),
                &[48, 64 / settings.group_size as i32],
                "{mode}"
            );
            let back = dequantize(&packed, &scales, biases.as_ref(), settings).unwrap();
            // 4-bit floats keep about one significant digit; 8-bit two.
            let bound = if settings.bits == 8 { 0.3 } else { 1.0 };
            assert!(
                max_diff(&back, &w) < bound,
                "{mode}: {}",
                max_diff(&back, &w)
            );
            let fused =
                quantized_matmul(&x, &packed, &scales, biases.as_ref(), true, settings).unwrap();
            let plain = mlx_rs::ops::matmul(&x, back.t()).unwrap();
            assert!(max_diff(&fused, &plain) < 1e-4, "{mode}");
        }
    }

    #[test]
    fn a_mode_with_the_wrong_bits_or_biases_is_refused() {
        let bad = QuantSettings {
            bits: 4,
            group_size: 64,
            mode: QuantMode::Mxfp4,
        };
        let w = mlx_rs::ops::zeros::<f32>(&[4, 64]).unwrap();
        let error = quantize(&w, bad).unwrap_err().to_string();
        assert!(
            error.contains("mxfp4 takes 4 bits in groups of 32"),
            "{error}"
        );
        let settings = QuantSettings::of_mode(QuantMode::Nvfp4);
        let (packed, scales, _) = quantize(&w, settings).unwrap();
        let error = dequantize(&packed, &scales, Some(&scales), settings)
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("nvfp4 quantization has no biases"),
            "{error}"
        );
        assert_eq!("mxfp8".parse::<QuantMode>().unwrap(), QuantMode::Mxfp8);
        assert!("fp4".parse::<QuantMode>().is_err());
    }
}
