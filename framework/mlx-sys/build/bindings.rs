//! Generates the Rust bindings of the mlx-c headers with bindgen, configured
//! as upstream mlx-sys configures it so that mlx-rs sees the same items. The
//! generated file is cached beside the compiled library's key.

use crate::cache::{self, Cache};
use crate::native::BuiltMlxC;
use std::fs;
use std::path::{Path, PathBuf};

/// Writes `$OUT_DIR/bindings.rs`. `prelude` is force-included before the
/// mlx-c headers.
pub fn generate(
    cache: &Cache,
    mlx_c: &Path,
    built: &BuiltMlxC,
    prelude: &Path,
    out_dir: &Path,
) -> Result<(), String> {
    let prelude_text = fs::read(prelude).map_err(|e| format!("{}: {e}", prelude.display()))?;
    let key = cache::digest(&[built.key.as_bytes(), &prelude_text]);
    let entry = cache.get_or_fill(&format!("bindings-{key}"), |scratch| {
        let bindings = headers(mlx_c)?
            .iter()
            .fold(
                bindgen::Builder::default()
                    .rust_target(
                        "1.73.0"
                            .parse()
                            .map_err(|e| format!("bindgen rust target: {e}"))?,
                    )
                    .clang_arg("-include")
                    .clang_arg(prelude.to_string_lossy())
                    .clang_arg(format!("-I{}", mlx_c.display()))
                    .blocklist_function("malloc")
                    .blocklist_function("realloc"),
                |builder, header| builder.header(header.to_string_lossy()),
            )
            .generate()
            .map_err(|e| format!("bindgen could not parse the mlx-c headers: {e}"))?;
        bindings
            .write_to_file(scratch.join("bindings.rs"))
            .map_err(|e| format!("cannot write the bindings: {e}"))
    })?;
    fs::copy(entry.join("bindings.rs"), out_dir.join("bindings.rs"))
        .map_err(|e| format!("cannot copy the bindings into OUT_DIR: {e}"))?;
    Ok(())
}

/// The public headers, `mlx/c/*.h`, in a stable order.
fn headers(mlx_c: &Path) -> Result<Vec<PathBuf>, String> {
    let dir = mlx_c.join("mlx").join("c");
    let mut headers: Vec<PathBuf> = fs::read_dir(&dir)
        .map_err(|e| format!("cannot list {}: {e}", dir.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|ext| ext == "h"))
        .collect();
    headers.sort();
    Ok(headers)
}
