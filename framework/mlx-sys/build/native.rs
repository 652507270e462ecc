//! Compiles mlx-c into a static `libmlxc.a` against the located MLX, with
//! CMake (`MLX_C_USE_SYSTEM_MLX=ON`). mlx-c is a thin C wrapper, so it is
//! always built in Release; the result is cached by a key over everything
//! that changes it (sources, MLX, compiler, compatibility header).

use crate::cache::{self, Cache};
use crate::sources::MlxInstall;
use crate::tools;
use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A compiled mlx-c.
pub struct BuiltMlxC {
    /// Directory holding `libmlxc.a`.
    pub lib_dir: PathBuf,
    /// The cache key, reused to cache the bindings beside the library.
    pub key: String,
}

/// Builds (or finds in the cache) mlx-c for `mlx`.
pub fn build_mlx_c(
    cache: &Cache,
    mlx_c: &Path,
    mlx: &MlxInstall,
    native_dir: &Path,
) -> Result<BuiltMlxC, String> {
    let (cxx, cxx_version) = tools::cxx_compiler_and_version()?;
    let compat = native_dir.join("zoo_compat.hpp");
    let compat_text = fs::read(&compat).map_err(|e| format!("{}: {e}", compat.display()))?;
    let mlx_c_text = fs::read(mlx_c.join("CMakeLists.txt"))
        .map_err(|e| format!("{}: {e}", mlx_c.join("CMakeLists.txt").display()))?;
    let key = cache::digest(&[
        mlx_c.to_string_lossy().as_bytes(),
        &mlx_c_text,
        mlx.library().to_string_lossy().as_bytes(),
        cxx_version.as_bytes(),
        &compat_text,
    ]);
    let entry = cache.get_or_fill(&format!("mlx-c-build-{key}"), |scratch| {
        compile(scratch, mlx_c, mlx, &cxx, &compat)
    })?;
    Ok(BuiltMlxC {
        lib_dir: entry,
        key,
    })
}

fn compile(
    scratch: &Path,
    mlx_c: &Path,
    mlx: &MlxInstall,
    cxx: &str,
    compat: &Path,
) -> Result<(), String> {
    let build = scratch.join("build");
    let jobs = env::var("NUM_JOBS").unwrap_or_else(|_| "2".to_owned());
    tools::run(
        Command::new("cmake")
            .arg("-S")
            .arg(mlx_c)
            .arg("-B")
            .arg(&build)
            .arg("-DCMAKE_BUILD_TYPE=Release")
            .arg(format!("-DCMAKE_CXX_COMPILER={cxx}"))
            .arg("-DCMAKE_POSITION_INDEPENDENT_CODE=ON")
            .arg("-DBUILD_SHARED_LIBS=OFF")
            .arg("-DMLX_C_BUILD_EXAMPLES=OFF")
            .arg("-DMLX_C_USE_SYSTEM_MLX=ON")
            .arg(format!("-DMLX_DIR={}", mlx.cmake_dir.display()))
            .arg(format!(
                "-DCMAKE_CXX_FLAGS=-isystem {} -include {}",
                mlx.include_dir.display(),
                compat.display()
            )),
        "configuring mlx-c with cmake",
    )?;
    tools::run(
        Command::new("cmake").arg("--build").arg(&build).args([
            "--target",
            "mlxc",
            "--parallel",
            &jobs,
        ]),
        "compiling mlx-c",
    )?;
    let library = find_file(&build, "libmlxc.a").ok_or_else(|| {
        format!(
            "the mlx-c build left no libmlxc.a under {}",
            build.display()
        )
    })?;
    fs::copy(&library, scratch.join("libmlxc.a")).map_err(|e| e.to_string())?;
    fs::remove_dir_all(&build).map_err(|e| e.to_string())?;
    Ok(())
}

fn find_file(dir: &Path, name: &str) -> Option<PathBuf> {
    for entry in fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        if path.is_dir() {
            if let Some(found) = find_file(&path, name) {
                return Some(found);
            }
        } else if entry.file_name() == name {
            return Some(path);
        }
    }
    None
}
