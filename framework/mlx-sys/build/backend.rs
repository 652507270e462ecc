//! Which MLX build this crate links: `MLX_ZOO_BACKEND=cpu` (the default, the
//! PyPI wheel `mlx-cpu`) or `MLX_ZOO_BACKEND=cuda` (the PyPI wheel
//! `mlx-cuda-13`, MLX's CUDA backend for NVIDIA GPUs). Both wheels carry the
//! same headers and C++ API; the CUDA one adds the GPU device, needs the
//! NVIDIA driver and CUDA 13 runtime libraries when a program starts, and
//! is linked through stubs of those libraries (see `cuda_stubs`), so that a
//! machine without CUDA (CI) still compiles and links it.

use std::env;

/// The MLX backend to build against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// MLX's CPU backend (`mlx-cpu`).
    Cpu,
    /// MLX's CUDA backend (`mlx-cuda-13`).
    Cuda,
}

impl Backend {
    /// Reads `MLX_ZOO_BACKEND` (`cpu` when unset or empty).
    pub fn from_env() -> Result<Self, String> {
        match env::var("MLX_ZOO_BACKEND").as_deref().map(str::trim) {
            Err(_) | Ok("") | Ok("cpu") => Ok(Backend::Cpu),
            Ok("cuda") => Ok(Backend::Cuda),
            Ok(other) => Err(format!(
                "MLX_ZOO_BACKEND={other} is not one of cpu, cuda \
                 (on macOS, point MLX_DIR at a Metal build of MLX instead)"
            )),
        }
    }

    /// The short name, exported to the crate as `MLX_SYS_BACKEND`.
    pub fn label(self) -> &'static str {
        match self {
            Backend::Cpu => "cpu",
            Backend::Cuda => "cuda",
        }
    }

    /// The PyPI distribution that ships this backend's `libmlx`.
    pub fn wheel(self) -> &'static str {
        match self {
            Backend::Cpu => "mlx-cpu",
            Backend::Cuda => "mlx-cuda-13",
        }
    }
}
