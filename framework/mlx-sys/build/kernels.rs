//! Compiles mlx-zoo's own CPU primitives (`native/kernels`) into a static
//! `libzookernels.a`. The kernel loops are compiled once for the baseline
//! ISA and, on x86_64, once more with AVX2 + FMA (chosen at run time); the
//! primitives themselves are compiled against the located MLX and mlx-c
//! headers like mlx-c is. Cached by a key over the sources, the headers'
//! location and the compiler.

use crate::cache::{self, Cache};
use crate::sources::MlxInstall;
use crate::tools;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// One translation unit: its file name and the extra flags it needs.
struct Unit {
    file: &'static str,
    flags: &'static [&'static str],
}

/// The units for `target_arch`.
fn units(target_arch: &str) -> Vec<Unit> {
    let mut units = vec![
        Unit {
            file: "kernels.cpp",
            flags: &[],
        },
        Unit {
            file: "simd_generic.cpp",
            flags: &[],
        },
        Unit {
            file: "gpu_info.cpp",
            flags: &[],
        },
    ];
    if target_arch == "x86_64" {
        units.push(Unit {
            file: "simd_avx2.cpp",
            flags: &["-mavx2", "-mfma"],
        });
    }
    units
}

/// Builds (or finds in the cache) the kernels; returns the directory
/// holding `libzookernels.a`.
pub fn build_kernels(
    cache: &Cache,
    mlx_c: &Path,
    mlx: &MlxInstall,
    native_dir: &Path,
    target_arch: &str,
) -> Result<PathBuf, String> {
    let (cxx, cxx_version) = tools::cxx_compiler_and_version()?;
    let source_dir = native_dir.join("kernels");
    let mut parts: Vec<Vec<u8>> = vec![
        cxx_version.into_bytes(),
        mlx.include_dir.to_string_lossy().as_bytes().to_vec(),
        mlx_c.to_string_lossy().as_bytes().to_vec(),
        target_arch.as_bytes().to_vec(),
    ];
    for unit in units(target_arch) {
        parts.push(unit.file.as_bytes().to_vec());
        parts.push(unit.flags.join(" ").into_bytes());
    }
    let mut names: Vec<_> = fs::read_dir(&source_dir)
        .map_err(|e| format!("{}: {e}", source_dir.display()))?
        .flatten()
        .map(|entry| entry.path())
        .collect();
    names.sort();
    for path in names.iter().chain([&native_dir.join("zoo_compat.hpp")]) {
        parts.push(path.to_string_lossy().as_bytes().to_vec());
        parts.push(fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?);
    }
    let borrowed: Vec<&[u8]> = parts.iter().map(Vec::as_slice).collect();
    let key = cache::digest(&borrowed);
    cache.get_or_fill(&format!("zoo-kernels-{key}"), |scratch| {
        compile(scratch, &cxx, mlx_c, mlx, native_dir, target_arch)
    })
}

fn compile(
    scratch: &Path,
    cxx: &str,
    mlx_c: &Path,
    mlx: &MlxInstall,
    native_dir: &Path,
    target_arch: &str,
) -> Result<(), String> {
    let source_dir = native_dir.join("kernels");
    let mut objects = Vec::new();
    for unit in units(target_arch) {
        let object = scratch.join(unit.file.replace(".cpp", ".o"));
        tools::run(
            Command::new(cxx)
                .args(["-std=c++20", "-O3", "-fPIC", "-fopenmp-simd", "-c"])
                .args(unit.flags)
                .arg("-isystem")
                .arg(&mlx.include_dir)
                .arg("-I")
                .arg(mlx_c)
                .arg("-include")
                .arg(native_dir.join("zoo_compat.hpp"))
                .arg(source_dir.join(unit.file))
                .arg("-o")
                .arg(&object),
            &format!("compiling {}", unit.file),
        )?;
        objects.push(object);
    }
    tools::run(
        Command::new("ar")
            .arg("crs")
            .arg(scratch.join("libzookernels.a"))
            .args(&objects),
        "archiving the kernels",
    )?;
    for object in objects {
        fs::remove_file(&object).map_err(|e| format!("{}: {e}", object.display()))?;
    }
    Ok(())
}
