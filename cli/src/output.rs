//! Output folders that appear complete or not at all. `zoo convert`,
//! `fuse` and `convert-adapter` write into a hidden staging folder beside
//! `--out`, flush it to the disk, and only then give it the final name; an
//! existing non-empty `--out` is refused unless `--force`, which replaces it
//! whole (no stale shard or index of the previous output survives). A
//! failure or a crash leaves the previous output as it was.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

/// A staging folder that becomes `final_path` on [`StagedOutput::commit`]
/// and is removed if dropped before.
pub struct StagedOutput {
    final_path: PathBuf,
    staging: PathBuf,
    committed: bool,
}

impl StagedOutput {
    /// Checks `out` and creates the staging folder beside it.
    pub fn begin(out: &Path, force: bool) -> Result<Self> {
        if out.exists() {
            if !out.is_dir() {
                bail!("--out {} exists and is not a folder", out.display());
            }
            let empty = std::fs::read_dir(out)
                .with_context(|| format!("reading {}", out.display()))?
                .next()
                .is_none();
            if !empty && !force {
                bail!(
                    "--out {} is not empty; pass --force to replace it",
                    out.display()
                );
            }
        }
        let staging = sibling(out, "zoo-tmp")?;
        if staging.exists() {
            std::fs::remove_dir_all(&staging)
                .with_context(|| format!("removing the stale {}", staging.display()))?;
        }
        std::fs::create_dir_all(&staging)
            .with_context(|| format!("creating {}", staging.display()))?;
        Ok(Self {
            final_path: out.to_path_buf(),
            staging,
            committed: false,
        })
    }

    /// Where to write.
    pub fn path(&self) -> &Path {
        &self.staging
    }

    /// Flushes the staged files and gives the folder its final name,
    /// replacing what was there.
    pub fn commit(mut self) -> Result<()> {
        for entry in std::fs::read_dir(&self.staging)
            .with_context(|| format!("reading {}", self.staging.display()))?
        {
            let path = entry?.path();
            if path.is_file() {
                sync(&path)?;
            }
        }
        sync(&self.staging)?;
        let old = sibling(&self.final_path, "zoo-old")?;
        let replacing = self.final_path.exists();
        if replacing {
            if old.exists() {
                std::fs::remove_dir_all(&old)
                    .with_context(|| format!("removing the stale {}", old.display()))?;
            }
            std::fs::rename(&self.final_path, &old)
                .with_context(|| format!("moving {} aside", self.final_path.display()))?;
        }
        if let Err(e) = std::fs::rename(&self.staging, &self.final_path) {
            if replacing {
                let _ = std::fs::rename(&old, &self.final_path);
            }
            return Err(e).with_context(|| format!("renaming into {}", self.final_path.display()));
        }
        self.committed = true;
        if let Some(parent) = self.final_path.parent() {
            let parent = if parent.as_os_str().is_empty() {
                Path::new(".")
            } else {
                parent
            };
            sync(parent)?;
        }
        if replacing {
            std::fs::remove_dir_all(&old)
                .with_context(|| format!("removing the replaced {}", old.display()))?;
        }
        Ok(())
    }
}

impl Drop for StagedOutput {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.staging);
        }
    }
}

/// `.<name>.<tag>` beside `path` (a fixed name, so a crashed run's
/// leftovers are found and removed by the next).
fn sibling(path: &Path, tag: &str) -> Result<PathBuf> {
    let name = path
        .file_name()
        .with_context(|| format!("--out {} has no folder name", path.display()))?;
    Ok(path.with_file_name(format!(".{}.{tag}", name.to_string_lossy())))
}

fn sync(path: &Path) -> Result<()> {
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("flushing {} to the disk", path.display()))
}
