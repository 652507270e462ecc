//! Stages `libmlx` for linking and running.
//!
//! On Linux a copy of the library is patched with patchelf so that:
//! * its SONAME is its own absolute path. Whatever links it records that path
//!   as a dependency, so every binary, test and example finds the library
//!   with no rpath and no `LD_LIBRARY_PATH` (a dependency's
//!   `rustc-link-arg` would not reach them);
//! * its BLAS and LAPACK dependencies point at OpenBLAS when that is
//!   installed. The PyPI wheel bundles the slow reference BLAS (about 3
//!   GFLOP/s for a 1024x1024 float32 matmul on a 2-core machine, against
//!   about 67 with OpenBLAS); `MLX_ZOO_BLAS=bundled` keeps it;
//! * its rpath is absolute, so the libraries it bundles still resolve.
//!
//! A CUDA build gets a second copy for linking only (`link/libmlx.so`): the
//! same library whose rpath reaches link-time stubs of the CUDA libraries
//! (`cuda_stubs`), and whose SONAME is still the path of the run-time copy,
//! so what links against it loads the real thing.
//!
//! On macOS the library is linked where it is (untested).

use crate::cache::{self, Cache};
use crate::cuda_stubs;
use crate::sources::MlxInstall;
use crate::tools;
use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The BLAS that the staged library is linked against.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Blas {
    /// The system OpenBLAS (`libopenblas.so.0`).
    OpenBlas,
    /// Whatever the MLX build brought with it.
    Bundled,
}

impl Blas {
    /// A short name, exported to the crate as `MLX_SYS_BLAS`.
    pub fn label(self) -> &'static str {
        match self {
            Blas::OpenBlas => "openblas",
            Blas::Bundled => "bundled",
        }
    }
}

/// The staged library.
pub struct Staged {
    /// Directory to add to the link search path.
    pub dir: PathBuf,
    /// The library file itself.
    pub library: PathBuf,
    /// The BLAS it was bound to.
    pub blas: Blas,
    /// Dependencies (CUDA's) that neither the library's rpath nor the
    /// system's loader cache can find on this machine: they must be on
    /// `LD_LIBRARY_PATH` when a program runs.
    pub unresolved: Vec<String>,
}

const OPENBLAS: &str = "libopenblas.so.0";

/// Stages the library of `mlx` for `target_os`.
pub fn stage_libmlx(cache: &Cache, mlx: &MlxInstall, target_os: &str) -> Result<Staged, String> {
    let original = mlx.library();
    if !original.is_file() {
        return Err(format!("MLX library not found: {}", original.display()));
    }
    if target_os != "linux" {
        return Ok(Staged {
            dir: mlx.lib_dir.clone(),
            library: original,
            blas: Blas::Bundled,
            unresolved: Vec::new(),
        });
    }
    let blas = choose_blas()?;
    let meta = fs::metadata(&original).map_err(|e| format!("{}: {e}", original.display()))?;
    let modified = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let key = cache::digest(&[
        original.to_string_lossy().as_bytes(),
        &meta.len().to_le_bytes(),
        &modified.to_le_bytes(),
        blas.label().as_bytes(),
        &[u8::from(mlx.cuda)],
    ]);
    let name = format!("libmlx-{key}");
    let final_dir = cache.entry(&name);
    let entry = cache.get_or_fill(&name, |scratch| {
        patch_copy(&original, scratch, &final_dir.join("libmlx.so"), blas)?;
        if mlx.cuda {
            link_copy(scratch, &final_dir)?;
        }
        Ok(())
    })?;
    let library = entry.join("libmlx.so");
    let (dir, unresolved) = if mlx.cuda {
        (entry.join("link"), unresolved_dependencies(&library)?)
    } else {
        (entry, Vec::new())
    };
    Ok(Staged {
        library,
        dir,
        blas,
        unresolved,
    })
}

/// Makes `scratch/link/libmlx.so`: the run-time copy with an rpath to the
/// CUDA stubs in `scratch/stubs` (addressed by their final place under
/// `final_dir`).
fn link_copy(scratch: &Path, final_dir: &Path) -> Result<(), String> {
    let runtime = scratch.join("libmlx.so");
    let stubs = cuda_stubs::write_stubs(&runtime, &scratch.join("stubs"))?;
    let link_dir = scratch.join("link");
    fs::create_dir_all(&link_dir).map_err(|e| format!("{}: {e}", link_dir.display()))?;
    let copy = link_dir.join("libmlx.so");
    fs::copy(&runtime, &copy).map_err(|e| format!("cannot copy {}: {e}", runtime.display()))?;
    let rpath = patchelf(
        &["--print-rpath".as_ref(), copy.as_os_str()],
        "reading libmlx's rpath",
    )?;
    let stub_dir = final_dir.join("stubs");
    let rpath = format!("{}:{}", stub_dir.display(), rpath.trim());
    patchelf(
        &[
            "--force-rpath".as_ref(),
            "--set-rpath".as_ref(),
            rpath.as_ref(),
            copy.as_os_str(),
        ],
        "pointing the link copy of libmlx at the CUDA stubs",
    )?;
    println!(
        "cargo:warning=CUDA build of MLX: linking through stubs of {}",
        stubs.join(", ")
    );
    Ok(())
}

/// The dependencies of `library` that neither its rpath nor the loader
/// cache resolves here.
fn unresolved_dependencies(library: &Path) -> Result<Vec<String>, String> {
    let needed = patchelf(
        &["--print-needed".as_ref(), library.as_os_str()],
        "reading libmlx's dependencies",
    )?;
    let rpath = patchelf(
        &["--print-rpath".as_ref(), library.as_os_str()],
        "reading libmlx's rpath",
    )?;
    let cache = Command::new("ldconfig")
        .arg("-p")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let search: Vec<&str> = rpath.trim().split(':').filter(|d| !d.is_empty()).collect();
    Ok(needed
        .lines()
        .map(str::trim)
        .filter(|lib| !lib.is_empty())
        .filter(|lib| {
            !search.iter().any(|dir| Path::new(dir).join(lib).exists())
                && !cache.contains(&format!("{lib} "))
        })
        .map(str::to_owned)
        .collect())
}

fn choose_blas() -> Result<Blas, String> {
    match env::var("MLX_ZOO_BLAS").as_deref() {
        Ok("bundled") => Ok(Blas::Bundled),
        Ok("openblas") if openblas_installed() => Ok(Blas::OpenBlas),
        Ok("openblas") => Err(format!(
            "MLX_ZOO_BLAS=openblas but {OPENBLAS} is not installed (apt-get install libopenblas-dev)"
        )),
        Ok("auto") | Err(_) => Ok(if openblas_installed() {
            Blas::OpenBlas
        } else {
            println!(
                "cargo:warning=OpenBLAS not found: MLX will use its bundled reference BLAS, \
                 about 20x slower for matmuls. Install libopenblas-dev and rebuild mlx-sys."
            );
            Blas::Bundled
        }),
        Ok(other) => Err(format!(
            "MLX_ZOO_BLAS={other} is not one of auto, openblas, bundled"
        )),
    }
}

fn openblas_installed() -> bool {
    Command::new("ldconfig")
        .arg("-p")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains(OPENBLAS))
        .unwrap_or(false)
        || [
            "/usr/lib/x86_64-linux-gnu",
            "/usr/lib/aarch64-linux-gnu",
            "/usr/lib64",
            "/usr/lib",
            "/usr/local/lib",
        ]
        .iter()
        .any(|dir| Path::new(dir).join(OPENBLAS).exists())
}

fn patchelf(args: &[&std::ffi::OsStr], what: &str) -> Result<String, String> {
    tools::run(Command::new("patchelf").args(args), what)
}

fn patch_copy(
    original: &Path,
    scratch: &Path,
    final_path: &Path,
    blas: Blas,
) -> Result<(), String> {
    let copy = scratch.join("libmlx.so");
    fs::copy(original, &copy).map_err(|e| format!("cannot copy {}: {e}", original.display()))?;
    let copy_os = copy.as_os_str();

    // Keep the libraries the original finds through `$ORIGIN` reachable.
    let origin = original
        .parent()
        .ok_or("the MLX library has no parent directory")?
        .to_string_lossy()
        .into_owned();
    let rpath = patchelf(
        &["--print-rpath".as_ref(), copy_os],
        "reading libmlx's rpath",
    )?;
    let rpath = rpath.trim().replace("$ORIGIN", &origin);
    let rpath = if rpath.is_empty() {
        origin
    } else {
        format!("{origin}:{rpath}")
    };
    patchelf(
        &["--set-rpath".as_ref(), rpath.as_ref(), copy_os],
        "setting libmlx's rpath",
    )?;
    patchelf(
        &["--set-soname".as_ref(), final_path.as_os_str(), copy_os],
        "setting libmlx's soname",
    )?;

    if blas == Blas::OpenBlas {
        let needed = patchelf(
            &["--print-needed".as_ref(), copy_os],
            "reading libmlx's dependencies",
        )?;
        let blas_libs: Vec<&str> = needed
            .lines()
            .map(str::trim)
            .filter(|lib| {
                lib.starts_with("libblas")
                    || lib.starts_with("liblapack")
                    || lib.starts_with("libcblas")
            })
            .collect();
        for (i, lib) in blas_libs.iter().enumerate() {
            if i == 0 {
                patchelf(
                    &[
                        "--replace-needed".as_ref(),
                        lib.as_ref(),
                        OPENBLAS.as_ref(),
                        copy_os,
                    ],
                    "binding libmlx to OpenBLAS",
                )?;
            } else {
                patchelf(
                    &["--remove-needed".as_ref(), lib.as_ref(), copy_os],
                    "binding libmlx to OpenBLAS",
                )?;
            }
        }
    }
    Ok(())
}
