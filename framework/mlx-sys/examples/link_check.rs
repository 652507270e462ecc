//! Links against the staged MLX and calls into mlx-c and mlx-zoo's native
//! kernels: built for each backend in CI (`MLX_ZOO_BACKEND=cuda` links the
//! CUDA build through its stubs on a machine without CUDA), and run where
//! the backend's runtime exists, it prints what the build holds.
//!
//! ```sh
//! MLX_ZOO_BACKEND=cuda CARGO_TARGET_DIR=target/cuda cargo run -p mlx-sys --example link_check
//! ```

fn main() {
    println!("backend  {}", mlx_sys::BACKEND);
    println!(
        "MLX      {} (mlx-c {})",
        mlx_sys::MLX_VERSION,
        mlx_sys::MLX_C_VERSION
    );
    println!("library  {}", mlx_sys::LINKED_LIBMLX);
    let mut name = [0 as std::os::raw::c_char; 128];
    let mut memory = 0usize;
    // SAFETY: the buffer and out-parameter outlive the call, which writes at
    // most `name.len()` bytes, NUL-terminated.
    let count = unsafe { mlx_sys::zoo_gpu_info(name.as_mut_ptr(), name.len(), &mut memory) };
    // SAFETY: zoo_gpu_info NUL-terminates the buffer.
    let name = unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) }.to_string_lossy();
    if count > 0 {
        println!("GPU      {name}, {memory} bytes ({count} in all)");
    } else {
        println!("GPU      none");
    }
}
