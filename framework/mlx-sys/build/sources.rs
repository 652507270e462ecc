//! Where the two native inputs come from.
//!
//! * mlx-c: the sources shipped inside the crates.io package `mlx-sys` 0.7.0
//!   (`src/mlx-c`). Cargo itself downloads that package on a throwaway
//!   manifest; the `.crate` is checked against its pinned SHA-256 before it is
//!   unpacked. `MLX_C_DIR` points at an mlx-c checkout instead.
//! * MLX: the PyPI wheel `mlx-cpu==0.32.2` (or `mlx-cuda-13==0.32.2` with
//!   `MLX_ZOO_BACKEND=cuda`), which ships `libmlx.so`, headers and a CMake
//!   package, downloaded with pip and unpacked (not installed). For CUDA an
//!   `mlx-cuda-13` already installed in the Python environment is preferred:
//!   the NVIDIA runtime wheels it depends on sit beside it, where its rpath
//!   finds them. `MLX_DIR` points at another MLX install prefix instead (a
//!   Metal build on macOS, a CUDA build on Linux).

use crate::backend::Backend;
use crate::cache::{self, Cache};
use crate::tools;
use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The MLX C API version whose bindings mlx-rs 0.33 expects.
pub const MLX_C_VERSION: &str = "0.7.0";
/// The MLX release mlx-c 0.7.0 pins. 0.32.3 changed `gather_qmm`'s signature.
pub const MLX_VERSION: &str = "0.32.2";
/// SHA-256 of `mlx-sys-0.7.0.crate` as recorded in the crates.io index.
const MLX_SYS_CRATE_SHA256: &str =
    "da965f83ce211b80f9b681d9bbd6fa625fe6bb2e659ba7bc55dd95eea8d3b028";

/// A located MLX install.
pub struct MlxInstall {
    /// Directory holding `libmlx.so` / `libmlx.dylib`.
    pub lib_dir: PathBuf,
    /// The header root (`include/`, holding `mlx/mlx.h`).
    pub include_dir: PathBuf,
    /// The CMake package directory (holding `MLXConfig.cmake`).
    pub cmake_dir: PathBuf,
    /// Whether this MLX was built with its CUDA backend (its library needs
    /// `libcuda.so.1`).
    pub cuda: bool,
}

impl MlxInstall {
    fn from_prefix(prefix: &Path) -> Result<Self, String> {
        let mut install = Self {
            lib_dir: prefix.join("lib"),
            include_dir: prefix.join("include"),
            cmake_dir: prefix.join("share").join("cmake").join("MLX"),
            cuda: false,
        };
        let config = install.cmake_dir.join("MLXConfig.cmake");
        if !config.is_file() {
            return Err(format!(
                "{} is not an MLX install prefix: expected {}",
                prefix.display(),
                config.display()
            ));
        }
        if !install.include_dir.join("mlx").join("mlx.h").is_file() {
            return Err(format!(
                "{} has no MLX headers: expected {}",
                prefix.display(),
                install.include_dir.join("mlx/mlx.h").display()
            ));
        }
        install.cuda = install.include_dir.join("mlx/backend/cuda").is_dir()
            && needs_libcuda(&install.library());
        Ok(install)
    }

    /// The shared library file.
    pub fn library(&self) -> PathBuf {
        let dylib = self.lib_dir.join("libmlx.dylib");
        if dylib.is_file() {
            dylib
        } else {
            self.lib_dir.join("libmlx.so")
        }
    }
}

/// Whether the shared library at `library` depends on the CUDA driver.
fn needs_libcuda(library: &Path) -> bool {
    Command::new("patchelf")
        .arg("--print-needed")
        .arg(library)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("libcuda.so"))
        .unwrap_or(false)
}

/// Finds MLX: `$MLX_DIR` when set; for CUDA an installed `mlx-cuda-13`;
/// else the cached wheel of `backend` (downloading it on first use).
pub fn mlx_install(cache: &Cache, backend: Backend) -> Result<MlxInstall, String> {
    if let Some(dir) = env::var_os("MLX_DIR") {
        let dir = PathBuf::from(dir);
        // Accept the CMake package directory as well as the prefix.
        let prefix = if dir.join("MLXConfig.cmake").is_file() {
            dir.ancestors().nth(3).map(Path::to_path_buf).unwrap_or(dir)
        } else {
            dir
        };
        return MlxInstall::from_prefix(&prefix).map_err(|e| format!("MLX_DIR: {e}"));
    }
    if backend == Backend::Cuda {
        if let Some(prefix) = installed_wheel(backend.wheel()) {
            return MlxInstall::from_prefix(&prefix);
        }
    }
    let wheel = backend.wheel();
    let entry = cache.get_or_fill(&format!("{wheel}-{MLX_VERSION}"), |scratch| {
        download_wheel(scratch, wheel)
    })?;
    let install = MlxInstall::from_prefix(&entry.join("mlx"))?;
    if backend == Backend::Cuda && !install.cuda {
        return Err(format!(
            "the {wheel} wheel in {} does not hold a CUDA build of MLX",
            entry.display()
        ));
    }
    Ok(install)
}

/// The `mlx` prefix of `distribution` ==[`MLX_VERSION`] when it is installed
/// in the Python environment of [`tools::python`].
fn installed_wheel(distribution: &str) -> Option<PathBuf> {
    let script = format!(
        "import importlib.metadata as m\n\
         d = m.distribution('{distribution}')\n\
         print(d.version)\n\
         print(d.locate_file('mlx'))\n"
    );
    let output = Command::new(tools::python())
        .args(["-c", &script])
        .output()
        .ok()?;
    if !output.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let mut lines = text.lines();
    let version = lines.next()?.trim();
    let prefix = PathBuf::from(lines.next()?.trim());
    if version != MLX_VERSION {
        println!(
            "cargo:warning={distribution} {version} is installed, but mlx-zoo needs \
             {MLX_VERSION}; using the {MLX_VERSION} wheel from PyPI instead"
        );
        return None;
    }
    prefix
        .join("share/cmake/MLX/MLXConfig.cmake")
        .is_file()
        .then_some(prefix)
}

fn download_wheel(scratch: &Path, wheel_name: &str) -> Result<(), String> {
    let python = tools::python();
    if !tools::runs(&python, &["-m", "pip", "--version"]) {
        return Err(format!(
            "MLX {MLX_VERSION} is fetched from PyPI with pip, but `{python} -m pip` does not run.\n\
             Install python3 and pip (apt-get install python3-pip), or set MLX_DIR to an MLX install."
        ));
    }
    let download = scratch.join("download");
    let mut pip = Command::new(&python);
    pip.args(["-m", "pip", "download", "--no-deps", "--only-binary=:all:"])
        .arg("--dest")
        .arg(&download);
    // The CUDA wheel is tagged manylinux_2_35 and pure `py3`: name the
    // platform so that an older host glibc or another Python still gets it
    // (it is unpacked here, never imported).
    if wheel_name != "mlx-cpu" {
        let arch = env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_else(|_| "x86_64".into());
        pip.arg(format!("--platform=manylinux_2_35_{arch}"));
    }
    tools::run(
        pip.arg(format!("{wheel_name}=={MLX_VERSION}")),
        &format!("downloading the {wheel_name} {MLX_VERSION} wheel with pip"),
    )?;
    let wheel = fs::read_dir(&download)
        .map_err(|e| format!("cannot list {}: {e}", download.display()))?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|ext| ext == "whl"))
        .ok_or_else(|| format!("pip left no wheel in {}", download.display()))?;
    // A wheel is a zip archive; Python's zipfile module unpacks it.
    tools::run(
        Command::new(&python)
            .args(["-m", "zipfile", "-e"])
            .arg(&wheel)
            .arg(scratch),
        &format!("unpacking the {wheel_name} wheel"),
    )?;
    fs::remove_dir_all(&download).map_err(|e| format!("cannot clean up: {e}"))?;
    if !scratch.join("mlx/lib").is_dir() {
        return Err(format!("{} has no mlx/lib directory", wheel.display()));
    }
    Ok(())
}

/// Finds the mlx-c sources: `$MLX_C_DIR` when set, else the cached copy
/// (fetched on first use).
pub fn mlx_c_sources(cache: &Cache) -> Result<PathBuf, String> {
    if let Some(dir) = env::var_os("MLX_C_DIR") {
        let dir = PathBuf::from(dir);
        if !dir.join("mlx/c/mlx.h").is_file() {
            return Err(format!(
                "MLX_C_DIR={} is not an mlx-c source tree (no mlx/c/mlx.h)",
                dir.display()
            ));
        }
        return Ok(dir);
    }
    cache.get_or_fill(&format!("mlx-c-{MLX_C_VERSION}"), fetch_mlx_c)
}

fn fetch_mlx_c(scratch: &Path) -> Result<(), String> {
    let crate_file = match find_crate_file() {
        Some(file) => file,
        None => {
            cargo_fetch(scratch)?;
            find_crate_file().ok_or_else(|| {
                "cargo fetched mlx-sys 0.7.0 but its .crate is not in the registry cache".to_owned()
            })?
        }
    };
    let sha = cache::sha256_file(&crate_file)?;
    if sha != MLX_SYS_CRATE_SHA256 {
        return Err(format!(
            "{} has SHA-256 {sha}, expected {MLX_SYS_CRATE_SHA256}",
            crate_file.display()
        ));
    }
    let unpack = scratch.join("unpack");
    fs::create_dir_all(&unpack).map_err(|e| format!("{}: {e}", unpack.display()))?;
    tools::run(
        Command::new("tar")
            .arg("-xzf")
            .arg(&crate_file)
            .arg("-C")
            .arg(&unpack)
            .arg(format!("mlx-sys-{MLX_C_VERSION}/src/mlx-c")),
        "unpacking mlx-sys-0.7.0.crate",
    )?;
    let sources = unpack.join(format!("mlx-sys-{MLX_C_VERSION}/src/mlx-c"));
    for entry in fs::read_dir(&sources).map_err(|e| format!("{}: {e}", sources.display()))? {
        let entry = entry.map_err(|e| e.to_string())?;
        fs::rename(entry.path(), scratch.join(entry.file_name()))
            .map_err(|e| format!("cannot move {}: {e}", entry.path().display()))?;
    }
    fs::remove_dir_all(&unpack).map_err(|e| e.to_string())?;
    Ok(())
}

/// Runs cargo on a throwaway manifest that depends on the real mlx-sys 0.7.0,
/// so that cargo downloads (and checksums) its `.crate` into its own cache.
fn cargo_fetch(scratch: &Path) -> Result<(), String> {
    let project = scratch.join("fetch-project");
    fs::create_dir_all(project.join("src")).map_err(|e| e.to_string())?;
    fs::write(
        project.join("Cargo.toml"),
        format!(
            "[package]\nname = \"mlx-c-fetch\"\nversion = \"0.0.0\"\nedition = \"2021\"\n\n\
             [dependencies]\nmlx-sys = {{ version = \"={MLX_C_VERSION}\", default-features = false }}\n\n\
             [workspace]\n"
        ),
    )
    .map_err(|e| e.to_string())?;
    fs::write(project.join("src/lib.rs"), "").map_err(|e| e.to_string())?;
    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let result = tools::run(
        Command::new(cargo)
            .arg("fetch")
            .arg("--manifest-path")
            .arg(project.join("Cargo.toml"))
            .env_remove("CARGO_TARGET_DIR"),
        "fetching the mlx-c sources (crates.io package mlx-sys 0.7.0) with cargo",
    );
    let _ = fs::remove_dir_all(&project);
    result.map(drop)
}

fn cargo_home() -> Option<PathBuf> {
    env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
}

fn find_crate_file() -> Option<PathBuf> {
    let registry_cache = cargo_home()?.join("registry").join("cache");
    let name = format!("mlx-sys-{MLX_C_VERSION}.crate");
    fs::read_dir(registry_cache)
        .ok()?
        .flatten()
        .map(|index| index.path().join(&name))
        .find(|file| file.is_file())
}
