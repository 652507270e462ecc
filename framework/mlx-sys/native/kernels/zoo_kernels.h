/* mlx-zoo's own MLX operations for the CPU, as a C API in mlx-c's style.
 *
 * Each function builds a lazy MLX array like mlx-c's operations do: it
 * returns 0 and sets `*res`, or returns 1 and leaves a message for
 * zoo_last_error(). On a non-CPU stream, or for a dtype the kernels do not
 * cover, the functions build MLX's own composition instead, so callers need
 * not check. */
#ifndef ZOO_KERNELS_H
#define ZOO_KERNELS_H

#include "mlx/c/array.h"
#include "mlx/c/stream.h"

#ifdef __cplusplus
extern "C" {
#endif

/* softmax over the last axis (float32 kernel; other floating types are
 * computed in float32 and cast back, like MLX's precise softmax). */
int zoo_softmax_last_axis(mlx_array* res, const mlx_array x, const mlx_stream s);

/* softmax(scale * queries @ keys^T + mask) @ values over
 * [batch, heads, length, head_dim] arrays with grouped key/value heads, as
 * MLX's fast::scaled_dot_product_attention: `mask_mode` "" or "causal"
 * (queries aligned to the end of the keys), `mask` an empty array or a
 * boolean (true = attend) or additive mask. A single float32 query without
 * a mask (decoding) runs a one-pass kernel that reads the keys and values
 * in place, views included. On a non-CPU stream this is MLX's own fused
 * attention. */
int zoo_attention(
    mlx_array* res,
    const mlx_array queries,
    const mlx_array keys,
    const mlx_array values,
    float scale,
    const char* mask_mode,
    const mlx_array mask,
    const mlx_stream s);

/* x @ w^T for an input of 1 to 4 rows: w float32 [n, k], or (with
 * `scales` and `biases`) MLX's affine-quantized layout with `bits` 4 or 8
 * and `group_size` inputs per scale; multi-threaded kernels. Anything else
 * (more rows, other dtypes or bit widths, an empty `biases`) is MLX's
 * matmul / quantized_matmul. */
int zoo_matvec(
    mlx_array* res,
    const mlx_array x,
    const mlx_array w,
    const mlx_array scales,
    const mlx_array biases,
    int bits,
    int group_size,
    const mlx_stream s);

/* x * sigmoid(x), element-wise (float32 kernel; other floating types as
 * above). */
int zoo_silu(mlx_array* res, const mlx_array x, const mlx_stream s);

/* silu(gate) * up, element-wise: on the CPU with zoo_silu's kernel, on
 * other devices as one kernel fused by MLX's compile. */
int zoo_swiglu(
    mlx_array* res,
    const mlx_array gate,
    const mlx_array up,
    const mlx_stream s);

/* The GPU MLX computes on, when this MLX build has one and it is usable
 * (CUDA or Metal): returns the number of GPUs (0 without one) and, for
 * the first, copies its name (NUL-terminated, cut to `name_len`) and sets
 * its total memory in bytes (0 when the backend does not say). */
int zoo_gpu_info(char* name, size_t name_len, size_t* total_memory);

/* The message of the calling thread's last failure. */
const char* zoo_last_error(void);

/* The instruction set the kernels run with: "avx2+fma" or "generic". */
const char* zoo_kernels_isa(void);

#ifdef __cplusplus
}
#endif

#endif
