//! Build script of the Linux-capable `mlx-sys`.
//!
//! It gathers the two native inputs (the mlx-c 0.7.0 sources and a prebuilt
//! MLX 0.32.2), compiles mlx-c against that MLX, stages `libmlx` so that every
//! binary finds it without `LD_LIBRARY_PATH` (and runs its matmuls on OpenBLAS
//! when that is installed), compiles mlx-zoo's own CPU primitives, and
//! generates the Rust bindings. Each step caches
//! its result outside `target/`, so `cargo clean` does not fetch or compile
//! the native side twice. The steps live in one module each.

mod backend;
mod bindings;
mod cache;
mod cuda_stubs;
mod kernels;
mod native;
mod sources;
mod stage;
mod tools;

use std::env;
use std::path::PathBuf;

/// Environment variables that change what this script produces.
const WATCHED_ENV: &[&str] = &[
    "MLX_DIR",
    "MLX_C_DIR",
    "MLX_ZOO_BACKEND",
    "MLX_ZOO_CACHE",
    "MLX_ZOO_BLAS",
    "PYTHON",
    "LIBCLANG_PATH",
    "CXX",
];

fn main() {
    for var in WATCHED_ENV {
        println!("cargo:rerun-if-env-changed={var}");
    }
    println!("cargo:rerun-if-changed=build");
    println!("cargo:rerun-if-changed=native");

    if let Err(message) = run() {
        eprintln!("\nerror: mlx-sys could not prepare MLX\n\n{message}\n");
        std::process::exit(1);
    }
}

fn run() -> Result<(), String> {
    let out_dir = PathBuf::from(env::var("OUT_DIR").map_err(|e| format!("OUT_DIR: {e}"))?);
    let manifest_dir = PathBuf::from(
        env::var("CARGO_MANIFEST_DIR").map_err(|e| format!("CARGO_MANIFEST_DIR: {e}"))?,
    );
    let target_os = env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();

    tools::require(&tools::needed(&target_os))?;
    let backend = backend::Backend::from_env()?;
    let cache = cache::Cache::open()?;
    let mlx = sources::mlx_install(&cache, backend)?;
    let mlx_c = sources::mlx_c_sources(&cache)?;

    let built = native::build_mlx_c(&cache, &mlx_c, &mlx, &manifest_dir.join("native"))?;
    let kernels = kernels::build_kernels(
        &cache,
        &mlx_c,
        &mlx,
        &manifest_dir.join("native"),
        &env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default(),
    )?;
    let prelude = manifest_dir.join("native").join("bindgen_prelude.h");
    bindings::generate(&cache, &mlx_c, &built, &prelude, &out_dir)?;
    let staged = stage::stage_libmlx(&cache, &mlx, &target_os)?;
    if !staged.unresolved.is_empty() {
        println!(
            "cargo:warning=MLX's CUDA build needs {} at run time, which this machine does not \
             have where libmlx looks: install the NVIDIA driver and the CUDA 13 wheels \
             (pip install mlx-cuda-13=={}) or put their lib folders on LD_LIBRARY_PATH",
            staged.unresolved.join(", "),
            sources::MLX_VERSION
        );
    }

    println!("cargo:rustc-link-search=native={}", built.lib_dir.display());
    println!("cargo:rustc-link-search=native={}", staged.dir.display());
    println!("cargo:rustc-link-search=native={}", kernels.display());
    println!("cargo:rustc-link-lib=static=zookernels");
    println!("cargo:rustc-link-lib=static=mlxc");
    println!("cargo:rustc-link-lib=dylib=mlx");
    if target_os == "macos" {
        println!("cargo:rustc-link-lib=dylib=c++");
    } else {
        println!("cargo:rustc-link-lib=dylib=stdc++");
    }
    println!(
        "cargo:rustc-env=MLX_SYS_LIBMLX={}",
        staged.library.display()
    );
    println!("cargo:rustc-env=MLX_SYS_BLAS={}", staged.blas.label());
    let built_backend = if mlx.cuda {
        "cuda"
    } else if target_os == "macos" {
        "metal"
    } else {
        backend.label()
    };
    println!("cargo:rustc-env=MLX_SYS_BACKEND={built_backend}");
    println!(
        "cargo:rustc-env=MLX_SYS_MLX_VERSION={}",
        sources::MLX_VERSION
    );
    println!(
        "cargo:rustc-env=MLX_SYS_MLX_C_VERSION={}",
        sources::MLX_C_VERSION
    );
    // Read by direct dependents as DEP_MLX_*.
    println!("cargo:metadata=libdir={}", staged.dir.display());
    println!("cargo:metadata=include={}", mlx.include_dir.display());
    Ok(())
}
