//! MODEL, ADAPTER and tokenizer arguments: a local directory, or a Hugging
//! Face repo id (`org/name[@revision]`) whose needed files are fetched into
//! the hub cache first (HF_HOME, HF_ENDPOINT, HF_TOKEN, HF_HUB_OFFLINE as in
//! Python's `huggingface_hub`).

use anyhow::{Context, Result};
use mlx_zoo::hub::{Hub, HubOptions, RepoId, SnapshotSource};
use std::path::{Path, PathBuf};

/// The local directory for `arg`: itself when it exists, else the hub
/// snapshot of the repo id it names.
pub fn local_dir(arg: &Path, quiet: bool) -> Result<PathBuf> {
    if arg.exists() {
        return Ok(arg.to_path_buf());
    }
    let text = arg.to_string_lossy();
    let id = RepoId::parse(&text)
        .with_context(|| format!("{}: no such file or directory", arg.display()))?;
    let mut options = HubOptions::from_env();
    options.progress &= !quiet;
    let endpoint = options.endpoint.clone();
    let hub = Hub::new(options)?;
    let snapshot = hub
        .fetch(&id)
        .with_context(|| format!("fetching {id} from {endpoint}"))?;
    if !quiet {
        let how = match snapshot.source {
            SnapshotSource::Hub if snapshot.downloaded_bytes == 0 => {
                "up to date in the cache".to_string()
            }
            SnapshotSource::Hub => format!(
                "downloaded {}",
                crate::commands::bytes(snapshot.downloaded_bytes as usize)
            ),
            SnapshotSource::Offline => "from the cache (offline)".to_string(),
            SnapshotSource::CacheAfterConnectionError => {
                "from the cache (hub unreachable)".to_string()
            }
        };
        eprintln!(
            "{id}: commit {}, {} files, {how}\n  {}",
            &snapshot.commit[..snapshot.commit.len().min(12)],
            snapshot.files.len(),
            snapshot.dir.display()
        );
    }
    Ok(snapshot.dir)
}

/// [`local_dir`] for an optional argument.
pub fn local_dir_opt(arg: &mut Option<PathBuf>, quiet: bool) -> Result<()> {
    if let Some(path) = arg {
        *path = local_dir(path, quiet)?;
    }
    Ok(())
}
