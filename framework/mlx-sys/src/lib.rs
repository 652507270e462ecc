//! Raw bindings to the MLX C API (mlx-c 0.7.0) for mlx-rs 0.33, built on
//! Linux as well as macOS.
//!
//! This crate replaces crates.io's `mlx-sys` 0.7.0 through the workspace's
//! `[patch.crates-io]`. Its build script compiles mlx-c against a prebuilt MLX
//! 0.32.2 (the PyPI wheel `mlx-cpu`, or `MLX_DIR`) and generates the same
//! bindings, so mlx-rs compiles unchanged. See this crate's README for the
//! build inputs and the environment variables that steer them.
#![allow(non_upper_case_globals)]
#![allow(non_camel_case_types)]
#![allow(non_snake_case)]
#![allow(missing_docs)]
#![allow(clippy::all)]

include!(concat!(env!("OUT_DIR"), "/bindings.rs"));

/// Path of the MLX shared library this crate was linked against.
pub const LINKED_LIBMLX: &str = env!("MLX_SYS_LIBMLX");
/// The BLAS the linked library was bound to at build time: `openblas` or
/// `bundled` (whatever that MLX build brought, the slow reference BLAS for
/// the PyPI wheel).
pub const LINKED_BLAS: &str = env!("MLX_SYS_BLAS");
/// The MLX backend the linked library was built with: `cpu`, `cuda`
/// (`MLX_ZOO_BACKEND=cuda`) or `metal` (an `MLX_DIR` build on macOS).
pub const BACKEND: &str = env!("MLX_SYS_BACKEND");
/// The MLX release this crate was built against.
pub const MLX_VERSION: &str = env!("MLX_SYS_MLX_VERSION");
/// The mlx-c release whose bindings this crate exposes.
pub const MLX_C_VERSION: &str = env!("MLX_SYS_MLX_C_VERSION");

/// mlx-rs seeds its default random state from macOS's
/// `mach_approximate_time`, which other platforms lack. This provides it
/// from the monotonic clock, in nanoseconds.
#[cfg(not(target_vendor = "apple"))]
#[no_mangle]
pub extern "C" fn mach_approximate_time() -> u64 {
    use std::time::{SystemTime, UNIX_EPOCH};
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// The breadth MLX's evaluation order keeps before it falls back to depth
/// first, unless `MLX_BFS_MAX_WIDTH` is already set. MLX's default (20)
/// orders the work of two independent graphs one after the other, so two
/// CPU streams meant to run concurrently (mlx-zoo's trainer evaluates the
/// shards of a batch that way) take turns instead; 4096 interleaves them.
/// Measured on a 24M-parameter llama: the same peak memory, and single
/// streams run as before.
pub const DEFAULT_BFS_MAX_WIDTH: &str = "4096";

/// Sets [`DEFAULT_BFS_MAX_WIDTH`], [`DEFAULT_ENABLE_TF32`] and
/// [`DEFAULT_CUDA_GRAPH_CACHE_SIZE`] before `main`
/// (MLX reads the variables once, at the first evaluation, which may come
/// before any of our code).
#[cfg(target_os = "linux")]
#[used]
#[link_section = ".init_array"]
static SET_MLX_DEFAULTS: extern "C" fn() = set_mlx_defaults;

#[cfg(target_os = "linux")]
extern "C" fn set_mlx_defaults() {
    if std::env::var_os("MLX_BFS_MAX_WIDTH").is_none() {
        std::env::set_var("MLX_BFS_MAX_WIDTH", DEFAULT_BFS_MAX_WIDTH);
    }
    if std::env::var_os("MLX_ENABLE_TF32").is_none() {
        std::env::set_var("MLX_ENABLE_TF32", DEFAULT_ENABLE_TF32);
    }
    if std::env::var_os("MLX_CUDA_GRAPH_CACHE_SIZE").is_none() {
        std::env::set_var("MLX_CUDA_GRAPH_CACHE_SIZE", DEFAULT_CUDA_GRAPH_CACHE_SIZE);
    }
}

/// How many instantiated CUDA graphs MLX's CUDA backend keeps for reuse,
/// unless `MLX_CUDA_GRAPH_CACHE_SIZE` is already set. MLX records each run
/// of (by default) 20 kernels as a CUDA graph and caches 100 of them; a
/// training step of a 16-layer model records well over 100, so with the
/// default every step instantiated its graphs anew. Other backends ignore
/// the variable.
pub const DEFAULT_CUDA_GRAPH_CACHE_SIZE: &str = "1000";

/// Whether MLX's CUDA backend may run float32 matmuls on TF32 tensor cores
/// (10-bit mantissas), unless `MLX_ENABLE_TF32` is already set. MLX enables
/// it by default, which moved float32 logits of the test fixtures by up to
/// 2e-2 from transformers' (measured on an H200); mlx-zoo keeps float32
/// exact, as PyTorch does for matmuls. bfloat16 and float16 are unaffected.
pub const DEFAULT_ENABLE_TF32: &str = "0";

// mlx-zoo's own CPU primitives (`native/kernels`): fused softmax, attention,
// SiLU and few-row matrix products with vectorised kernels, as lazy MLX operations. Each returns 0 and sets
// `res`, or 1 with a message for [`zoo_last_error`]; on a non-CPU stream,
// or for 16-bit floats, they build MLX's own composition (or compute in
// float32 and cast back), so callers need not check.
extern "C" {
    /// softmax over the last axis of `x`.
    pub fn zoo_softmax_last_axis(res: *mut mlx_array, x: mlx_array, s: mlx_stream) -> i32;
    /// `softmax(scale * q @ k^T + mask) @ v` like MLX's
    /// `fast::scaled_dot_product_attention`; `mask_mode` is `""` or
    /// `"causal"`, `mask` an empty array or a boolean/additive mask.
    pub fn zoo_attention(
        res: *mut mlx_array,
        queries: mlx_array,
        keys: mlx_array,
        values: mlx_array,
        scale: f32,
        mask_mode: *const std::os::raw::c_char,
        mask: mlx_array,
        s: mlx_stream,
    ) -> i32;
    /// `x @ w^T` for 1-4 input rows with a float32 or affine-quantized
    /// (4/8-bit, float32 scales and biases) weight; empty `scales` means a
    /// float weight. Other cases fall back to MLX's own operations.
    pub fn zoo_matvec(
        res: *mut mlx_array,
        x: mlx_array,
        w: mlx_array,
        scales: mlx_array,
        biases: mlx_array,
        bits: i32,
        group_size: i32,
        s: mlx_stream,
    ) -> i32;
    /// `x * sigmoid(x)`.
    pub fn zoo_silu(res: *mut mlx_array, x: mlx_array, s: mlx_stream) -> i32;
    /// `silu(gate) * up` (one fused kernel off the CPU).
    pub fn zoo_swiglu(res: *mut mlx_array, gate: mlx_array, up: mlx_array, s: mlx_stream) -> i32;
    /// The number of GPUs the linked MLX can use (0 without a GPU
    /// backend); for the first, its name into `name` (NUL-terminated, at
    /// most `name_len` bytes) and its total memory in bytes (0 when the
    /// backend does not say).
    pub fn zoo_gpu_info(
        name: *mut std::os::raw::c_char,
        name_len: usize,
        total_memory: *mut usize,
    ) -> i32;
    /// The calling thread's last failure message (valid until the next call).
    pub fn zoo_last_error() -> *const std::os::raw::c_char;
    /// The instruction set the kernels use: `"avx2+fma"` or `"generic"`.
    pub fn zoo_kernels_isa() -> *const std::os::raw::c_char;
}
