//! Files that appear whole or not at all: every writer of a file a user
//! keeps (exported weights, adapters, configs, logits, trimmed metrics) fills
//! a hidden temporary sibling, flushes it to disk and renames it over the
//! target, so a crash, a full disk or an error mid-write leaves the previous
//! file (or none), never a torn one; on failure the temporary is removed.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// A hidden sibling of `path` no other writer uses, with the same
/// extension (writers such as MLX's choose the format by it):
/// `.<stem>.tmp-<pid>-<n>.<extension>`.
pub fn temporary_sibling(path: &Path) -> PathBuf {
    let stem = path
        .file_stem()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "file".into());
    let extension = path
        .extension()
        .map(|e| format!(".{}", e.to_string_lossy()))
        .unwrap_or_default();
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    path.with_file_name(format!(".{stem}.tmp-{}-{n}{extension}", std::process::id()))
}

/// Writes `path` through `fill`, which writes the file at the path it is
/// given (a temporary sibling); the result is flushed to disk and renamed
/// into place. On any error the temporary is removed and `path` is left as
/// it was.
pub fn write_with<E>(
    path: &Path,
    fill: impl FnOnce(&Path) -> Result<(), E>,
) -> Result<(), AtomicWriteError<E>> {
    let temp = temporary_sibling(path);
    let result = fill(&temp).map_err(AtomicWriteError::Fill).and_then(|()| {
        finish(&temp, path).map_err(|source| AtomicWriteError::Io {
            path: path.to_path_buf(),
            source,
        })
    });
    if result.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    result
}

/// Writes `bytes` to `path` whole or not at all.
pub fn write_bytes(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let written = write_with(path, |temp| -> std::io::Result<()> {
        let mut file = std::fs::File::create(temp)?;
        file.write_all(bytes)
    });
    written.map_err(|error| match error {
        AtomicWriteError::Fill(source) => source,
        AtomicWriteError::Io { source, .. } => source,
    })
}

/// Flushes `temp` to disk, renames it to `path` and flushes the folder
/// (best effort: not every file system syncs folders).
fn finish(temp: &Path, path: &Path) -> std::io::Result<()> {
    std::fs::File::open(temp)?.sync_all()?;
    std::fs::rename(temp, path)?;
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        if let Ok(dir) = std::fs::File::open(parent) {
            let _ = dir.sync_all();
        }
    }
    Ok(())
}

/// Why an atomic write failed.
#[derive(Debug, thiserror::Error)]
pub enum AtomicWriteError<E> {
    /// The writer's own error.
    #[error("{0}")]
    Fill(E),
    /// Flushing or renaming the finished file.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file being written.
        path: PathBuf,
        /// What the file system said.
        source: std::io::Error,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_write_leaves_the_previous_file_and_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.json");
        write_bytes(&path, b"first").unwrap();
        let failed = write_with(&path, |temp| {
            std::fs::write(temp, b"half")?;
            Err::<(), _>(std::io::Error::other("disk full"))
        });
        assert!(matches!(failed, Err(AtomicWriteError::Fill(_))));
        assert_eq!(std::fs::read(&path).unwrap(), b"first");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["out.json"]);
        write_bytes(&path, b"second").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"second");
    }

    #[test]
    fn temporaries_are_hidden_distinct_siblings() {
        let a = temporary_sibling(Path::new("/x/model.safetensors"));
        let b = temporary_sibling(Path::new("/x/model.safetensors"));
        assert_ne!(a, b);
        assert_eq!(a.parent(), Some(Path::new("/x")));
        let name = a.file_name().unwrap().to_string_lossy().into_owned();
        assert!(
            name.starts_with(".model.tmp-") && name.ends_with(".safetensors"),
            "{name}"
        );
    }
}
