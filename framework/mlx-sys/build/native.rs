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
    let mlx_cmake_dir = if mlx.cuda {
        minimal_mlx_config(&build.join("mlx-cmake"), mlx)?
    } else {
        mlx.cmake_dir.clone()
    };
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
            .arg(format!("-DMLX_DIR={}", mlx_cmake_dir.display()))
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

/// Writes a CMake package for `mlx` that only names its library and
/// headers. The CUDA wheel's own `MLXConfig.cmake` calls
/// `find_dependency(CUDAToolkit)` and `find_dependency(CUDNN)`, which fail on
/// a machine without the CUDA toolkit; mlx-c is a static library of C
/// wrappers and needs neither to compile.
fn minimal_mlx_config(dir: &Path, mlx: &MlxInstall) -> Result<PathBuf, String> {
    fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let library = mlx.library();
    let config = format!(
        "# Written by mlx-sys's build script: MLX {version} without its CUDA\n\
         # toolkit dependencies (not needed to compile mlx-c).\n\
         if(NOT TARGET mlx)\n\
         \x20 add_library(mlx SHARED IMPORTED)\n\
         \x20 set_target_properties(mlx PROPERTIES\n\
         \x20   IMPORTED_LOCATION \"{library}\"\n\
         \x20   IMPORTED_NO_SONAME TRUE\n\
         \x20   INTERFACE_INCLUDE_DIRECTORIES \"{include}\"\n\
         \x20   INTERFACE_COMPILE_FEATURES cxx_std_20)\n\
         endif()\n\
         set(MLX_FOUND TRUE)\n\
         set(MLX_INCLUDE_DIRS \"{include}\")\n\
         set(MLX_LIBRARY_DIRS \"{lib_dir}\")\n\
         set(MLX_LIBRARY \"{library}\")\n\
         set(MLX_LIBRARIES mlx)\n\
         set(MLX_CXX_FLAGS \"\")\n\
         set(MLX_BUILD_METAL OFF)\n\
         set(MLX_BUILD_ACCELERATE OFF)\n",
        version = crate::sources::MLX_VERSION,
        library = library.display(),
        include = mlx.include_dir.display(),
        lib_dir = mlx.lib_dir.display(),
    );
    let file = dir.join("MLXConfig.cmake");
    fs::write(&file, config).map_err(|e| format!("{}: {e}", file.display()))?;
    Ok(dir.to_path_buf())
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
