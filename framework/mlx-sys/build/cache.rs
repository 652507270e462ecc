//! The cache that survives `cargo clean`: `$MLX_ZOO_CACHE`, else
//! `$XDG_CACHE_HOME/mlx-zoo`, else `~/.cache/mlx-zoo`. Entries are directories
//! that appear whole or not at all: each is produced in a scratch directory
//! and renamed into place, so an interrupted or concurrent build never leaves
//! a half-written entry behind.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};

/// The cache root.
pub struct Cache {
    root: PathBuf,
}

impl Cache {
    /// Locates (and creates) the cache root.
    pub fn open() -> Result<Self, String> {
        let root = if let Some(dir) = env::var_os("MLX_ZOO_CACHE") {
            PathBuf::from(dir)
        } else if let Some(dir) = env::var_os("XDG_CACHE_HOME") {
            PathBuf::from(dir).join("mlx-zoo")
        } else if let Some(home) = env::var_os("HOME") {
            PathBuf::from(home).join(".cache").join("mlx-zoo")
        } else {
            return Err("no cache directory: set MLX_ZOO_CACHE (or HOME)".into());
        };
        fs::create_dir_all(&root)
            .map_err(|e| format!("cannot create the cache directory {}: {e}", root.display()))?;
        Ok(Self { root })
    }

    /// Path of the entry `name`, whether or not it exists yet.
    pub fn entry(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    /// Returns the entry `name`, producing it with `fill` first if it is
    /// missing. `fill` receives an empty scratch directory; on success that
    /// directory becomes the entry.
    pub fn get_or_fill(
        &self,
        name: &str,
        fill: impl FnOnce(&Path) -> Result<(), String>,
    ) -> Result<PathBuf, String> {
        let entry = self.entry(name);
        if entry.is_dir() {
            return Ok(entry);
        }
        let scratch = self
            .root
            .join(format!(".tmp-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&scratch);
        fs::create_dir_all(&scratch)
            .map_err(|e| format!("cannot create {}: {e}", scratch.display()))?;
        if let Err(message) = fill(&scratch) {
            let _ = fs::remove_dir_all(&scratch);
            return Err(message);
        }
        if let Err(e) = fs::rename(&scratch, &entry) {
            // Another build may have finished the same entry first.
            let _ = fs::remove_dir_all(&scratch);
            if !entry.is_dir() {
                return Err(format!("cannot move {} into place: {e}", entry.display()));
            }
        }
        Ok(entry)
    }
}

/// A short, stable hex digest of `parts`, used to key cache entries.
pub fn digest(parts: &[&[u8]]) -> String {
    use sha2::{Digest, Sha256};
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update((part.len() as u64).to_le_bytes());
        hasher.update(part);
    }
    let hash = hasher.finalize();
    hash.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

/// The SHA-256 of a file, as lowercase hex.
pub fn sha256_file(path: &Path) -> Result<String, String> {
    use sha2::{Digest, Sha256};
    let bytes = fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    Ok(Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}
