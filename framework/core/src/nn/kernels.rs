//! mlx-zoo's own CPU operations, reached through `mlx-sys`: softmax over the
//! last axis, attention built on it, SiLU and few-row matrix products, each a lazy MLX operation
//! with a vectorised kernel (AVX2 + FMA where the CPU has them) and its own
//! backward pass. MLX's element-wise kernels are scalar on x86 (`exp` costs
//! about 20 ns a value), which made attention's softmax and the MLP's SiLU a
//! large share of a training step; these run the same mathematics in one
//! pass. Matrix products of a few rows (token-by-token decoding) get a
//! multi-threaded kernel for float32 and 4/8-bit weights. On a GPU stream
//! these build MLX's own operations instead.

use crate::error::{Error, Result};
use mlx_rs::{Array, Stream};
use std::ffi::CStr;

/// Masks [`attention`] understands.
#[derive(Debug, Clone, Copy)]
pub enum AttentionKernelMask<'a> {
    /// Every query sees every key.
    None,
    /// Each query sees the keys up to its own position, queries aligned to
    /// the end of the keys (a cached prefix is visible to all).
    Causal,
    /// A boolean (true = may attend) or additive mask broadcastable to
    /// `[batch, heads, queries, keys]`.
    Array(&'a Array),
}

/// softmax over the last axis, computed in float32 (16-bit inputs are cast
/// there and back, like MLX's precise softmax).
pub fn softmax_last_axis(x: &Array) -> Result<Array> {
    let stream = Stream::thread_local_or_default();
    // SAFETY: `x` and the stream are live handles for the call.
    build("softmax", |res| unsafe {
        mlx_sys::zoo_softmax_last_axis(res, x.as_ptr(), stream.as_ptr())
    })
}

/// `x * sigmoid(x)`, computed in float32 as [`softmax_last_axis`] is.
pub fn silu(x: &Array) -> Result<Array> {
    let stream = Stream::thread_local_or_default();
    // SAFETY: as in `softmax_last_axis`.
    build("SiLU", |res| unsafe {
        mlx_sys::zoo_silu(res, x.as_ptr(), stream.as_ptr())
    })
}

/// `silu(gate) * up`: [`silu`]'s kernel on the CPU; on other devices one
/// element-wise kernel fused by MLX's compile instead of three launches.
pub fn swiglu(gate: &Array, up: &Array) -> Result<Array> {
    let stream = Stream::thread_local_or_default();
    // SAFETY: as in `softmax_last_axis`.
    build("SwiGLU", |res| unsafe {
        mlx_sys::zoo_swiglu(res, gate.as_ptr(), up.as_ptr(), stream.as_ptr())
    })
}

/// `softmax(scale * queries @ keys^T + mask) @ values` for
/// `[batch, heads, length, head_dim]` inputs whose query heads are a
/// multiple of the key/value heads: MLX's `scaled_dot_product_attention`
/// with [`softmax_last_axis`] on the CPU (the same composition MLX falls
/// back to there), MLX's fused kernel elsewhere. A single float32 query
/// without a mask (decoding; `Causal` with one query sees every key) runs
/// a one-pass kernel that reads keys and values in place, so a view into
/// the KV cache's buffer is not copied.
pub fn attention(
    queries: &Array,
    keys: &Array,
    values: &Array,
    scale: f32,
    mask: AttentionKernelMask<'_>,
) -> Result<Array> {
    let stream = Stream::thread_local_or_default();
    let (mode, mask): (&CStr, mlx_sys::mlx_array) = match mask {
        AttentionKernelMask::None => (
            c"",
            mlx_sys::mlx_array {
                ctx: std::ptr::null_mut(),
            },
        ),
        AttentionKernelMask::Causal => (
            c"causal",
            mlx_sys::mlx_array {
                ctx: std::ptr::null_mut(),
            },
        ),
        AttentionKernelMask::Array(mask) => (c"", mask.as_ptr()),
    };
    // SAFETY: every handle is live for the call; an empty mask handle means
    // "no mask" to the callee, which only reads it.
    build("attention", |res| unsafe {
        mlx_sys::zoo_attention(
            res,
            queries.as_ptr(),
            keys.as_ptr(),
            values.as_ptr(),
            scale,
            mode.as_ptr(),
            mask,
            stream.as_ptr(),
        )
    })
}

/// Input rows up to which [`matvec`] runs the project's own kernels.
pub const MATVEC_MAX_ROWS: usize = 4;

/// `x @ weight^T` for a float32 weight `[out, in]`, or for an
/// affine-quantized one in MLX's layout when `quantized` gives its scales,
/// biases, bits and group size. With 1 to [`MATVEC_MAX_ROWS`] float32 input
/// rows, a CPU stream, a float32 weight or 4/8-bit weight with float32
/// scales and biases, this runs the project's multi-threaded kernel (MLX's
/// quantized matmul is single-threaded on the CPU, and its float path pays
/// BLAS's set-up for one row); anything else runs MLX's own operation.
pub fn matvec(x: &Array, weight: &Array, quantized: Option<QuantizedWeight<'_>>) -> Result<Array> {
    let stream = Stream::thread_local_or_default();
    let empty = || mlx_sys::mlx_array {
        ctx: std::ptr::null_mut(),
    };
    let (scales, biases, bits, group) = match quantized {
        Some(q) => (
            q.scales.as_ptr(),
            q.biases.map(Array::as_ptr).unwrap_or_else(empty),
            q.bits,
            q.group_size,
        ),
        None => (empty(), empty(), 0, 0),
    };
    // SAFETY: every handle is live for the call; empty handles mean "absent"
    // to the callee, which only reads them.
    build("a matrix product", |res| unsafe {
        mlx_sys::zoo_matvec(
            res,
            x.as_ptr(),
            weight.as_ptr(),
            scales,
            biases,
            bits,
            group,
            stream.as_ptr(),
        )
    })
}

/// The quantization parameters of a weight passed to [`matvec`].
#[derive(Debug, Clone, Copy)]
pub struct QuantizedWeight<'a> {
    /// One scale per group and output.
    pub scales: &'a Array,
    /// One bias per group and output, when the format has them.
    pub biases: Option<&'a Array>,
    /// Bits per value.
    pub bits: i32,
    /// Inputs per group.
    pub group_size: i32,
}

/// The instruction set the kernels run with on this CPU (`"avx2+fma"` or
/// `"generic"`).
pub fn kernels_isa() -> &'static str {
    // SAFETY: the callee returns a pointer to a static C string.
    unsafe { CStr::from_ptr(mlx_sys::zoo_kernels_isa()) }
        .to_str()
        .unwrap_or("unknown")
}

/// Runs one of the C builders and wraps its result.
fn build(op: &str, call: impl FnOnce(*mut mlx_sys::mlx_array) -> i32) -> Result<Array> {
    // SAFETY: `res` starts as an empty handle that the builder fills on
    // success (and that is freed on failure); the error message is copied
    // before any other call on this thread.
    unsafe {
        let mut res = mlx_sys::mlx_array_new();
        if call(&mut res) == 0 {
            return Ok(Array::from_ptr(res));
        }
        mlx_sys::mlx_array_free(res);
        let message = CStr::from_ptr(mlx_sys::zoo_last_error())
            .to_string_lossy()
            .into_owned();
        Err(Error::Mlx {
            context: format!("building {op}"),
            source: mlx_rs::error::Exception::custom(message),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mlx_rs::error::Exception;
    use mlx_rs::fast::ScaledDotProductAttentionMask;
    use mlx_rs::transforms::value_and_grad_with_argnums;
    use mlx_rs::Dtype;

    type Outputs = std::result::Result<Vec<Array>, Exception>;

    fn normal(shape: &[i32], seed: u64) -> Array {
        let key = mlx_rs::random::key(seed).unwrap();
        mlx_rs::random::normal::<f32>(shape, None, None, &key).unwrap()
    }

    fn ours(result: Result<Array>) -> std::result::Result<Array, Exception> {
        result.map_err(|e| Exception::custom(e.to_string()))
    }

    fn max_diff(a: &Array, b: &Array) -> f32 {
        a.subtract(b)
            .unwrap()
            .abs()
            .unwrap()
            .max(None)
            .unwrap()
            .item_exact::<f32>()
    }

    /// Values and input gradients of `f` and `g` (each returning a scalar
    /// to differentiate and the output) agree within `tolerance`.
    fn assert_same_values_and_gradients(
        f: impl FnMut(&[Array]) -> Outputs,
        g: impl FnMut(&[Array]) -> Outputs,
        inputs: &[Array],
        argnums: &[i32],
        tolerance: f32,
    ) {
        let mut f = value_and_grad_with_argnums(f, argnums);
        let mut g = value_and_grad_with_argnums(g, argnums);
        let (vf, gf) = f(inputs).unwrap();
        let (vg, gg) = g(inputs).unwrap();
        let diff = max_diff(&vf[1], &vg[1]);
        assert!(diff <= tolerance, "outputs differ by {diff}");
        for (index, (a, b)) in gf.iter().zip(&gg).enumerate() {
            let diff = max_diff(a, b);
            assert!(diff <= tolerance, "gradient {index} differs by {diff}");
        }
    }

    /// A weighted sum, so every output's gradient differs.
    fn weighted(out: Array, weights: &Array) -> Outputs {
        Ok(vec![out.multiply(weights)?.sum(None)?, out])
    }

    #[test]
    fn softmax_equals_mlx_in_values_and_gradients() {
        // Large, small and masked-out (lowest float) scores in one row set.
        let x = normal(&[3, 5, 77], 1)
            .multiply(Array::from_f32(30.0))
            .unwrap();
        let lowest = Array::from_f32(f32::MIN);
        let keep = normal(&[3, 5, 77], 2).gt(Array::from_f32(-1.0)).unwrap();
        let x = mlx_rs::ops::select(&keep, &x, &lowest).unwrap();
        let weights = normal(&[3, 5, 77], 3);
        let w = weights.clone();
        assert_same_values_and_gradients(
            |a| weighted(mlx_rs::ops::softmax_axis(&a[0], -1, true)?, &weights),
            |a| weighted(ours(softmax_last_axis(&a[0]))?, &w),
            &[x],
            &[0],
            1e-6,
        );
    }

    #[test]
    fn softmax_of_a_transposed_view_and_of_bfloat16() {
        let x = normal(&[6, 40], 4);
        let view = x.transpose().unwrap();
        let expected = mlx_rs::ops::softmax_axis(&view, -1, true).unwrap();
        assert!(max_diff(&softmax_last_axis(&view).unwrap(), &expected) < 1e-6);

        let half = x.as_dtype(Dtype::Bfloat16).unwrap();
        let got = softmax_last_axis(&half).unwrap();
        assert_eq!(got.dtype(), Dtype::Bfloat16);
        let expected = mlx_rs::ops::softmax_axis(&half, -1, true).unwrap();
        let diff = max_diff(
            &got.as_dtype(Dtype::Float32).unwrap(),
            &expected.as_dtype(Dtype::Float32).unwrap(),
        );
        assert!(diff <= 4e-3, "bfloat16 softmax differs by {diff}");
    }

    #[test]
    fn softmax_keeps_nan_and_infinity_visible() {
        let x = Array::from_slice(&[0.0f32, f32::NAN, 1.0, 2.0, f32::INFINITY, 0.0], &[2, 3]);
        let y = softmax_last_axis(&x).unwrap();
        let values = y.as_slice::<f32>().to_vec();
        assert!(values.iter().all(|v| v.is_nan()), "{values:?}");
    }

    #[test]
    fn silu_equals_mlx_in_values_and_gradients() {
        let x = normal(&[4, 9, 130], 5)
            .multiply(Array::from_f32(12.0))
            .unwrap();
        let weights = normal(&[4, 9, 130], 6);
        let w = weights.clone();
        assert_same_values_and_gradients(
            |a| weighted(mlx_rs::nn::silu(&a[0])?, &weights),
            |a| weighted(ours(silu(&a[0]))?, &w),
            &[x],
            &[0],
            2e-5,
        );
        let extremes = Array::from_slice(&[-200.0f32, -90.0, -20.0, 0.0, 20.0, 90.0, 200.0], &[7]);
        let expected = mlx_rs::nn::silu(&extremes).unwrap();
        assert!(max_diff(&silu(&extremes).unwrap(), &expected) < 1e-5);
    }

    #[test]
    fn swiglu_equals_silu_times_up_in_values_and_gradients() {
        let gate = normal(&[3, 7, 64], 11)
            .multiply(Array::from_f32(8.0))
            .unwrap();
        let up = normal(&[3, 7, 64], 12);
        let weights = normal(&[3, 7, 64], 13);
        let w = weights.clone();
        assert_same_values_and_gradients(
            |a| weighted(mlx_rs::nn::silu(&a[0])?.multiply(&a[1])?, &weights),
            |a| weighted(ours(swiglu(&a[0], &a[1]))?, &w),
            &[gate, up],
            &[0, 1],
            2e-5,
        );
    }

    /// Our attention against MLX's for one mask, with grouped heads and a
    /// cached prefix (more keys than queries).
    fn check_attention(mask: AttentionKernelMask<'_>) {
        let reference = || match mask {
            AttentionKernelMask::None => None,
            AttentionKernelMask::Causal => Some(ScaledDotProductAttentionMask::Causal),
            AttentionKernelMask::Array(m) => Some(ScaledDotProductAttentionMask::Array(m)),
        };
        let (q, k, v) = (
            normal(&[2, 6, 5, 16], 7),
            normal(&[2, 2, 9, 16], 8),
            normal(&[2, 2, 9, 16], 9),
        );
        let weights = normal(&[2, 6, 5, 16], 10);
        let w = weights.clone();
        assert_same_values_and_gradients(
            |a| {
                let out = mlx_rs::fast::scaled_dot_product_attention(
                    &a[0],
                    &a[1],
                    &a[2],
                    0.25,
                    reference(),
                    None,
                )?;
                weighted(out, &weights)
            },
            |a| weighted(ours(attention(&a[0], &a[1], &a[2], 0.25, mask))?, &w),
            &[q, k, v],
            &[0, 1, 2],
            2e-5,
        );
    }

    #[test]
    fn attention_equals_mlx_for_every_mask() {
        check_attention(AttentionKernelMask::None);
        check_attention(AttentionKernelMask::Causal);
        let allowed = normal(&[5, 9], 11).gt(Array::from_f32(0.0)).unwrap();
        check_attention(AttentionKernelMask::Array(&allowed));
        // Per-head additive mask: [batch, heads, queries, keys].
        let additive = normal(&[2, 6, 5, 9], 12);
        check_attention(AttentionKernelMask::Array(&additive));
    }

    /// One query position (decoding) takes the single-query kernel: equal
    /// to MLX's attention in values and gradients, for keys and values that
    /// are dense, a view into a longer buffer (the KV cache's case) or
    /// transposed (innermost stride not 1), with and without the causal
    /// flag (one query aligned to the end sees every key).
    #[test]
    fn single_query_attention_equals_mlx() {
        use mlx_rs::ops::indexing::IndexOp;
        let q = normal(&[2, 6, 1, 16], 30);
        let dense = (normal(&[2, 2, 9, 16], 31), normal(&[2, 2, 9, 16], 32));
        let buffer = (normal(&[2, 2, 20, 16], 33), normal(&[2, 2, 20, 16], 34));
        let views = (
            buffer.0.index((.., .., ..9, ..)),
            buffer.1.index((.., .., ..9, ..)),
        );
        let transposed = (
            normal(&[2, 2, 16, 9], 35).swap_axes(-1, -2).unwrap(),
            normal(&[2, 2, 16, 9], 36).swap_axes(-1, -2).unwrap(),
        );
        let weights = normal(&[2, 6, 1, 16], 37);
        for (keys, values) in [dense, views, transposed] {
            for causal in [false, true] {
                let ours_mask = if causal {
                    AttentionKernelMask::Causal
                } else {
                    AttentionKernelMask::None
                };
                let reference = || causal.then_some(ScaledDotProductAttentionMask::Causal);
                let w = weights.clone();
                let v = weights.clone();
                assert_same_values_and_gradients(
                    |a| {
                        let out = mlx_rs::fast::scaled_dot_product_attention(
                            &a[0],
                            &a[1],
                            &a[2],
                            0.25,
                            reference(),
                            None,
                        )?;
                        weighted(out, &w)
                    },
                    |a| weighted(ours(attention(&a[0], &a[1], &a[2], 0.25, ours_mask))?, &v),
                    &[q.clone(), keys.clone(), values.clone()],
                    &[0, 1, 2],
                    2e-5,
                );
            }
        }
    }

    #[test]
    fn attention_rejects_mismatched_heads() {
        let q = normal(&[1, 3, 2, 4], 13);
        let kv = normal(&[1, 2, 2, 4], 14);
        let err = attention(&q, &kv, &kv, 1.0, AttentionKernelMask::None).unwrap_err();
        assert!(
            err.to_string().contains("multiple of the key/value heads"),
            "{err}"
        );
    }

    #[test]
    fn float_matvec_equals_matmul_in_values_and_gradients() {
        for rows in [1, 2, 4] {
            let x = normal(&[rows, 1, 200], 15);
            let w = normal(&[67, 200], 16);
            let weights = normal(&[rows, 1, 67], 17);
            let v = weights.clone();
            assert_same_values_and_gradients(
                |a| weighted(mlx_rs::ops::matmul(&a[0], a[1].t())?, &weights),
                |a| weighted(ours(matvec(&a[0], &a[1], None))?, &v),
                &[x, w],
                &[0, 1],
                2e-4,
            );
        }
    }

    #[test]
    fn quantized_matvec_equals_mlx_in_values_and_input_gradients() {
        for (bits, group) in [(4, 32), (4, 64), (4, 128), (8, 32), (8, 64)] {
            for rows in [1, 3] {
                let w = normal(&[96, 256], 18);
                let (packed, scales, biases) = mlx_rs::ops::quantize(&w, group, bits).unwrap();
                let x = normal(&[rows, 256], 19);
                let weights = normal(&[rows, 96], 20);
                let v = weights.clone();
                let (p, s, b) = (packed.clone(), scales.clone(), biases.clone());
                assert_same_values_and_gradients(
                    |a| {
                        let out = mlx_rs::ops::quantized_matmul(
                            &a[0], &packed, &scales, &biases, true, group, bits,
                        )?;
                        weighted(out, &weights)
                    },
                    |a| {
                        let q = QuantizedWeight {
                            scales: &s,
                            biases: Some(&b),
                            bits,
                            group_size: group,
                        };
                        weighted(ours(matvec(&a[0], &p, Some(q)))?, &v)
                    },
                    &[x],
                    &[0],
                    2e-4,
                );
            }
        }
    }

    #[test]
    fn matvec_outside_its_kernels_is_mlx() {
        // Five rows (beyond the kernels) and 3-bit weights take MLX's path.
        let w = normal(&[32, 64], 21);
        let x = normal(&[5, 64], 22);
        let expected = mlx_rs::ops::matmul(&x, w.t()).unwrap();
        assert!(max_diff(&matvec(&x, &w, None).unwrap(), &expected) < 1e-5);
        let (packed, scales, biases) = mlx_rs::ops::quantize(&w, 32, 3).unwrap();
        let q = QuantizedWeight {
            scales: &scales,
            biases: Some(&biases),
            bits: 3,
            group_size: 32,
        };
        let x = normal(&[1, 64], 23);
        let expected =
            mlx_rs::ops::quantized_matmul(&x, &packed, &scales, &biases, true, 32, 3).unwrap();
        assert!(max_diff(&matvec(&x, &packed, Some(q)).unwrap(), &expected) < 1e-5);
    }

    #[test]
    fn the_kernels_report_their_instruction_set() {
        let isa = kernels_isa();
        assert!(isa == "avx2+fma" || isa == "generic", "{isa}");
        if std::env::var("ZOO_KERNELS_ISA").as_deref() == Ok("generic") {
            assert_eq!(isa, "generic");
        }
    }
}
