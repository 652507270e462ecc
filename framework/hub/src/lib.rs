//! Hugging Face hub access for mlx-zoo: turns `org/name[@revision]` into a
//! local directory holding only the files a model needs, in the standard hub
//! cache (`$HF_HOME/hub`, shared with Python's `huggingface_hub`).
//!
//! Downloads are resumable `.part` files in the cache's `blobs/`, retried
//! with back-off, with progress bars, laid out as `huggingface_hub` lays them
//! out (blobs named by hash, snapshot entries linking to them); this crate
//! adds the choice of files ([`FilePlan`]), a size and SHA-256 check of every
//! download against the hub's listing (a corrupt copy is removed, never
//! served), the offline mode, a fallback to the cache when the hub is
//! unreachable, errors that say what to do (`HF_TOKEN` for gated
//! repositories, ...), and distrust of the server (see `transfer`): names it
//! sends must be hashes before they become paths, the token stays on the
//! endpoint's origin, bodies are bounded and reads time out, and nothing in
//! the cache is followed through a planted symbolic link.
//!
//! ```no_run
//! use mlx_zoo_hub::{Hub, HubOptions, RepoId};
//! let hub = Hub::new(HubOptions::from_env())?;
//! let snapshot = hub.fetch(&RepoId::parse("Qwen/Qwen2-0.5B")?)?;
//! println!("{}", snapshot.dir.display());
//! # Ok::<(), mlx_zoo_hub::HubError>(())
//! ```

#![warn(missing_docs)]

mod error;
mod files;
mod options;
mod repo_id;
mod transfer;

pub use error::HubError;
pub use files::{shards_of_index, FilePlan, SIDE_FILES};
pub use options::{HubOptions, DEFAULT_ENDPOINT};
pub use repo_id::RepoId;

use hf_hub::Repo;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Deserialize;
use std::io::Read;
use std::path::{Path, PathBuf};
use transfer::{blob_name, is_safe_relative_path, read_body, Failure, Transfer};

/// A repository revision available on disk.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// The repository and revision asked for.
    pub repo: RepoId,
    /// The commit the files belong to.
    pub commit: String,
    /// `snapshots/<commit>` in the hub cache: load the model from here.
    pub dir: PathBuf,
    /// The files fetched or found, relative to `dir`.
    pub files: Vec<String>,
    /// Bytes downloaded by this call (0 when everything was cached).
    pub downloaded_bytes: u64,
    /// Where the files came from.
    pub source: SnapshotSource,
}

/// How a [`Snapshot`] was obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotSource {
    /// Listed by the hub; missing files downloaded.
    Hub,
    /// From the cache only, because the client is offline.
    Offline,
    /// From the cache because the hub could not be reached.
    CacheAfterConnectionError,
}

/// The hub's answer to `GET /api/models/{repo}/revision/{revision}?blobs=true`.
#[derive(Debug, Deserialize)]
struct Listing {
    sha: String,
    siblings: Vec<Sibling>,
}

/// One file of a [`Listing`].
#[derive(Debug, Deserialize)]
struct Sibling {
    rfilename: String,
    #[serde(default)]
    size: Option<u64>,
    #[serde(default, rename = "blobId")]
    blob_id: Option<String>,
    #[serde(default)]
    lfs: Option<Lfs>,
}

impl Sibling {
    /// The name of its blob in the cache: the SHA-256 of large files, the git
    /// blob id of others (the `ETag` the hub answers with).
    fn etag(&self) -> Option<&str> {
        self.lfs
            .as_ref()
            .map(|lfs| lfs.sha256.as_str())
            .or(self.blob_id.as_deref())
    }

    /// Its size in bytes, if listed.
    fn size(&self) -> Option<u64> {
        self.lfs.as_ref().map(|lfs| lfs.size).or(self.size)
    }
}

/// Large-file-storage details of a [`Sibling`].
#[derive(Debug, Deserialize)]
struct Lfs {
    sha256: String,
    size: u64,
}

/// A client for one hub endpoint and cache.
pub struct Hub {
    options: HubOptions,
    transfer: Transfer,
}

/// A repository listing larger than this is refused.
const LISTING_SIZE_LIMIT: u64 = 64 << 20;

/// Bodies of unlisted size are refused past this many bytes.
const UNLISTED_SIZE_LIMIT: u64 = 1 << 40;

impl Hub {
    /// A client with these settings (no network traffic yet).
    pub fn new(options: HubOptions) -> Result<Self, HubError> {
        let transfer = Transfer::new(&options.endpoint, options.token.clone(), options.timeout);
        Ok(Self { options, transfer })
    }

    /// The settings in use.
    pub fn options(&self) -> &HubOptions {
        &self.options
    }

    /// Makes the files `id` needs available: lists the repository, downloads
    /// what the cache lacks and checks each download against the listing.
    ///
    /// Offline, this is [`Hub::cached`]. When the hub cannot be reached and
    /// the cache holds a complete snapshot, that snapshot is used (with a
    /// warning), as `huggingface_hub` does.
    pub fn fetch(&self, id: &RepoId) -> Result<Snapshot, HubError> {
        if self.options.offline {
            return self.cached_because(id, "HF_HUB_OFFLINE is set", SnapshotSource::Offline);
        }
        let listing = match self.listing(id) {
            Ok(listing) => listing,
            Err(error) if error.is_connection() => {
                return match self.cached_because(
                    id,
                    "the hub could not be reached",
                    SnapshotSource::CacheAfterConnectionError,
                ) {
                    Ok(snapshot) => {
                        tracing::warn!("{error}; using the cached snapshot {}", snapshot.commit);
                        Ok(snapshot)
                    }
                    Err(HubError::NotCached { .. }) => Err(error),
                    Err(other) => Err(other),
                };
            }
            Err(error) => return Err(error),
        };
        let names: Vec<String> = listing
            .siblings
            .iter()
            .map(|s| s.rfilename.clone())
            .collect();
        let plan = FilePlan::from_listing(&id.repo, &names)?;
        let dir = self.repo_dir(id).join("snapshots").join(&listing.sha);
        let mut files = plan.files.clone();
        let mut downloaded_bytes = 0;
        if let Some(index) = &plan.index {
            downloaded_bytes += self.fetch_file(id, &listing, &dir, index)?;
            let shards = shards_of_index(&dir.join(index))?;
            if let Some(missing) = shards.iter().find(|s| !names.contains(s)) {
                return Err(HubError::FileNotFound {
                    repo: id.repo.clone(),
                    revision: id.revision().to_string(),
                    file: format!("{missing} (listed by {index})"),
                    endpoint: self.options.endpoint.clone(),
                });
            }
            files.push(index.clone());
            files.extend(shards);
        }
        for file in &files {
            if Some(file) != plan.index.as_ref() {
                downloaded_bytes += self.fetch_file(id, &listing, &dir, file)?;
            }
        }
        if !id.is_commit() {
            self.write_ref(id, &listing.sha)?;
        }
        Ok(Snapshot {
            repo: id.clone(),
            commit: listing.sha,
            dir,
            files,
            downloaded_bytes,
            source: SnapshotSource::Hub,
        })
    }

    /// The snapshot of `id` in the cache, without any network traffic;
    /// fails naming what is missing.
    pub fn cached(&self, id: &RepoId) -> Result<Snapshot, HubError> {
        self.cached_because(id, "the cache was asked", SnapshotSource::Offline)
    }

    fn cached_because(
        &self,
        id: &RepoId,
        why: &str,
        source: SnapshotSource,
    ) -> Result<Snapshot, HubError> {
        let not_cached = |missing: Vec<String>| HubError::NotCached {
            repo: id.repo.clone(),
            revision: id.revision().to_string(),
            cache: self.options.cache_dir.clone(),
            why: why.to_string(),
            missing,
        };
        let repo_dir = self.repo_dir(id);
        let commit = if id.is_commit() {
            id.revision().to_string()
        } else {
            let reference = repo_dir.join("refs").join(id.revision());
            match std::fs::read_to_string(&reference) {
                // A ref names the snapshot folder: anything but a commit
                // hash (a planted `../..`) is not trusted.
                Ok(commit) if repo_id::is_commit_hash(commit.trim()) => commit.trim().to_string(),
                Ok(_) => {
                    return Err(not_cached(vec![format!(
                        "a valid ref ({} does not hold a commit hash)",
                        reference.display()
                    )]))
                }
                Err(_) => return Err(not_cached(vec!["every file (never downloaded)".into()])),
            }
        };
        let dir = repo_dir.join("snapshots").join(&commit);
        self.refuse_links(id, &dir)?;
        let present: Vec<String> = match std::fs::read_dir(&dir) {
            Ok(entries) => entries
                .filter_map(|entry| entry.ok())
                .filter(|entry| entry.path().is_file() && self.entry_inside(id, &entry.path()))
                .filter_map(|entry| entry.file_name().into_string().ok())
                .collect(),
            Err(_) => return Err(not_cached(vec!["every file (never downloaded)".into()])),
        };
        let plan = FilePlan::from_listing(&id.repo, &present)
            .map_err(|_| not_cached(vec!["config.json or the weights".into()]))?;
        let mut files = plan.files;
        if let Some(index) = plan.index {
            let shards = shards_of_index(&dir.join(&index))?;
            let missing: Vec<String> = shards
                .iter()
                .filter(|s| !present.contains(s))
                .cloned()
                .collect();
            if !missing.is_empty() {
                return Err(not_cached(missing));
            }
            files.push(index);
            files.extend(shards);
        }
        Ok(Snapshot {
            repo: id.clone(),
            commit,
            dir,
            files,
            downloaded_bytes: 0,
            source,
        })
    }

    /// `<cache>/models--org--name`.
    fn repo_dir(&self, id: &RepoId) -> PathBuf {
        self.options
            .cache_dir
            .join(Repo::model(id.repo.clone()).folder_name())
    }

    fn listing(&self, id: &RepoId) -> Result<Listing, HubError> {
        let url = format!(
            "{}/api/models/{}/revision/{}?blobs=true",
            self.options.endpoint,
            id.repo,
            id.revision()
        );
        tracing::debug!("GET {url}");
        let answer = self
            .transfer
            .get(&url, 0)
            .map_err(|failure| self.failure(id, None, &url, failure))?;
        let mut body = Vec::new();
        read_body(answer.response, LISTING_SIZE_LIMIT, &mut body, &mut |_| {})
            .map_err(|failure| self.failure(id, None, &url, failure))?;
        let listing: Listing = serde_json::from_slice(&body).map_err(|e| HubError::Protocol {
            url: url.clone(),
            message: format!("the repository listing is not the expected JSON: {e}"),
        })?;
        if !repo_id::is_commit_hash(&listing.sha) {
            return Err(HubError::Protocol {
                url,
                message: format!("`sha` is not a commit hash: {:?}", listing.sha),
            });
        }
        if let Some(bad) = listing
            .siblings
            .iter()
            .find(|s| !is_safe_relative_path(&s.rfilename))
        {
            return Err(HubError::Protocol {
                url,
                message: format!(
                    "the listing names a file outside the repository: {:?}",
                    bad.rfilename
                ),
            });
        }
        Ok(listing)
    }

    /// Downloads `file` into `dir` unless it is there and intact; returns the
    /// bytes downloaded.
    fn fetch_file(
        &self,
        id: &RepoId,
        listing: &Listing,
        dir: &Path,
        file: &str,
    ) -> Result<u64, HubError> {
        let expected = listing.siblings.iter().find(|s| s.rfilename == file);
        let pointer = dir.join(file);
        self.refuse_links(id, pointer.parent().unwrap_or(dir))?;
        if !self.entry_inside(id, &pointer) {
            tracing::warn!(
                "{} links outside the cache's blobs; replacing the link",
                pointer.display()
            );
            let _ = std::fs::remove_file(&pointer);
        }
        if pointer.is_file() {
            match verify(&pointer, expected, false) {
                Ok(()) => return Ok(0),
                Err(reason) => {
                    tracing::warn!(
                        "cached {file} of {} is damaged ({reason}); downloading it again",
                        id.repo
                    );
                    self.remove_cached(id, &pointer);
                }
            }
        }
        let url = format!(
            "{}/{}/resolve/{}/{file}",
            self.options.endpoint, id.repo, listing.sha
        );
        let mut attempt = 0;
        loop {
            tracing::debug!("GET {url}");
            match self.download(id, listing, expected, file, &url, &pointer) {
                Ok(size) => {
                    tracing::info!("downloaded {file} of {} ({size} bytes)", id.repo);
                    return Ok(size);
                }
                Err(error) if !error.is_connection() => return Err(error),
                Err(error) if attempt == self.options.retries => {
                    return Err(match error {
                        HubError::Connection { url, message } if attempt > 0 => {
                            HubError::Connection {
                                url,
                                message: format!("{message} (gave up after {attempt} retries)"),
                            }
                        }
                        other => other,
                    });
                }
                Err(error) => {
                    attempt += 1;
                    tracing::warn!("{error}; retrying ({attempt}/{})", self.options.retries);
                    std::thread::sleep(std::time::Duration::from_millis(
                        (200u64 << attempt.min(5)).min(5_000),
                    ));
                }
            }
        }
    }

    /// One attempt at `file`: resumes `blobs/<hash>.part` where the listing
    /// names the blob, checks what the server says against the listing,
    /// verifies the result, moves it to `blobs/<hash>` and links the
    /// snapshot entry to it. Returns the file's size.
    fn download(
        &self,
        id: &RepoId,
        listing: &Listing,
        expected: Option<&Sibling>,
        file: &str,
        url: &str,
        pointer: &Path,
    ) -> Result<u64, HubError> {
        let blobs = self.repo_dir(id).join("blobs");
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| HubError::Io { path, source }
        };
        std::fs::create_dir_all(&blobs).map_err(io(&blobs))?;
        self.refuse_links(id, &blobs)?;
        let listed_blob = expected.and_then(Sibling::etag).and_then(blob_name);
        let listed_size = expected.and_then(Sibling::size);
        let part = blobs.join(match &listed_blob {
            Some(blob) => format!("{blob}.part"),
            None => format!(".unlisted-{}.part", std::process::id()),
        });
        let mut offset = match (&listed_blob, std::fs::symlink_metadata(&part)) {
            (Some(_), Ok(meta))
                if meta.is_file() && listed_size.is_some_and(|s| meta.len() < s) =>
            {
                meta.len()
            }
            (_, Ok(_)) => {
                // Nothing to resume (complete, too long, unlisted or not a
                // plain file): start over.
                std::fs::remove_file(&part).map_err(io(&part))?;
                0
            }
            (_, Err(_)) => 0,
        };
        let answer = self
            .transfer
            .get(url, offset)
            .map_err(|failure| self.failure(id, Some(file), url, failure))?;
        let protocol = |message: String| HubError::Protocol {
            url: url.to_string(),
            message,
        };
        if let Some(commit) = &answer.commit {
            if *commit != listing.sha {
                return Err(HubError::RevisionMoved {
                    repo: id.repo.clone(),
                    revision: id.revision().to_string(),
                    expected: listing.sha.clone(),
                    found: format!("{commit:?}"),
                });
            }
        }
        let blob = match answer.etag.as_deref().map(|etag| (etag, blob_name(etag))) {
            Some((_, Some(blob))) => blob,
            Some((etag, None)) => {
                return Err(protocol(format!(
                    "the ETag of {file} is not a blob hash: {etag:?}"
                )))
            }
            None => return Err(protocol(format!("no ETag for {file}"))),
        };
        if listed_blob.as_ref().is_some_and(|listed| *listed != blob) {
            return Err(protocol(format!(
                "the ETag of {file} ({blob}) is not the blob the listing names ({})",
                listed_blob.unwrap_or_default()
            )));
        }
        match answer.response.status() {
            206 if offset > 0 => {
                let start = answer
                    .response
                    .header("content-range")
                    .and_then(|r| r.strip_prefix("bytes "))
                    .and_then(|r| r.split('-').next())
                    .and_then(|s| s.trim().parse::<u64>().ok());
                if start != Some(offset) {
                    return Err(protocol(format!(
                        "asked for {file} from byte {offset}, got {:?}",
                        answer.response.header("content-range")
                    )));
                }
            }
            200 => offset = 0,
            status => {
                return Err(protocol(format!("HTTP {status} for {file}")));
            }
        }
        let limit = listed_size.map_or(UNLISTED_SIZE_LIMIT, |size| size - offset.min(size));
        let mut sink = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .append(offset > 0)
            .truncate(offset == 0)
            .open(&part)
            .map_err(io(&part))?;
        let bar = self.progress_bar(file, listed_size, offset);
        let read = read_body(answer.response, limit, &mut sink, &mut |n| bar.inc(n));
        bar.finish_and_clear();
        match read {
            Ok(_) => {}
            Err(Failure::Write(source)) => return Err(HubError::Io { path: part, source }),
            Err(failure) => {
                if matches!(failure, Failure::Protocol(_)) {
                    let _ = std::fs::remove_file(&part);
                }
                return Err(self.failure(id, Some(file), url, failure));
            }
        }
        sink.sync_all().map_err(io(&part))?;
        drop(sink);
        if let Err(reason) = verify(&part, expected, true) {
            let _ = std::fs::remove_file(&part);
            return Err(HubError::Integrity {
                repo: id.repo.clone(),
                file: file.to_string(),
                reason,
            });
        }
        let blob_path = blobs.join(&blob);
        std::fs::rename(&part, &blob_path).map_err(io(&blob_path))?;
        self.link(pointer, file, &blob)?;
        std::fs::metadata(&blob_path)
            .map(|m| m.len())
            .map_err(io(&blob_path))
    }

    /// `snapshots/<commit>/<file>` -> `../../blobs/<blob>` (relative, as
    /// `huggingface_hub` links; a copy where links are not supported).
    fn link(&self, pointer: &Path, file: &str, blob: &str) -> Result<(), HubError> {
        let io = |source| HubError::Io {
            path: pointer.to_path_buf(),
            source,
        };
        if let Some(parent) = pointer.parent() {
            std::fs::create_dir_all(parent).map_err(io)?;
        }
        if std::fs::symlink_metadata(pointer).is_ok() {
            std::fs::remove_file(pointer).map_err(io)?;
        }
        let depth = file.matches('/').count();
        let target = format!("{}../../blobs/{blob}", "../".repeat(depth));
        #[cfg(unix)]
        std::os::unix::fs::symlink(&target, pointer).map_err(io)?;
        #[cfg(not(unix))]
        std::fs::copy(pointer.parent().unwrap_or(pointer).join(&target), pointer).map_err(io)?;
        Ok(())
    }

    /// Refuses `path` when it, or a folder between the repository's folder
    /// in the cache and it, is a symbolic link: a planted link would send
    /// writes and deletions outside the cache.
    fn refuse_links(&self, id: &RepoId, path: &Path) -> Result<(), HubError> {
        let root = self.repo_dir(id);
        let Ok(inside) = path.strip_prefix(&root) else {
            return Ok(());
        };
        let mut current = root.clone();
        let check = |current: &Path| match std::fs::symlink_metadata(current) {
            Ok(meta) if meta.file_type().is_symlink() => Err(HubError::Io {
                path: current.to_path_buf(),
                source: std::io::Error::other(
                    "a symbolic link inside the hub cache; refusing to follow it (remove it)",
                ),
            }),
            _ => Ok(()),
        };
        check(&current)?;
        for part in inside.components() {
            current.push(part);
            check(&current)?;
        }
        Ok(())
    }

    /// Whether the snapshot entry `pointer` (if there) is a plain file or a
    /// link into this repository's `blobs/`: a link planted elsewhere would
    /// make a load read outside the cache.
    fn entry_inside(&self, id: &RepoId, pointer: &Path) -> bool {
        match std::fs::symlink_metadata(pointer) {
            Ok(meta) if meta.file_type().is_symlink() => {
                let blobs = self.repo_dir(id).join("blobs");
                match (
                    std::fs::canonicalize(pointer),
                    std::fs::canonicalize(&blobs),
                ) {
                    (Ok(target), Ok(blobs)) => target.parent() == Some(blobs.as_path()),
                    // A dangling link reads nothing; it is replaced.
                    _ => false,
                }
            }
            _ => true,
        }
    }

    /// Removes a snapshot entry and, when it links to a blob of this
    /// repository, that blob (a link pointing anywhere else is only
    /// unlinked).
    fn remove_cached(&self, id: &RepoId, pointer: &Path) {
        if let Ok(target) = std::fs::read_link(pointer) {
            let name = target.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if blob_name(name).as_deref() == Some(name) {
                let blob = self.repo_dir(id).join("blobs").join(name);
                if std::fs::symlink_metadata(&blob).is_ok_and(|m| m.is_file()) {
                    let _ = std::fs::remove_file(blob);
                }
            }
        }
        let _ = std::fs::remove_file(pointer);
    }

    fn progress_bar(&self, file: &str, size: Option<u64>, done: u64) -> ProgressBar {
        if !self.options.progress {
            return ProgressBar::hidden();
        }
        let bar = ProgressBar::new(size.unwrap_or(0));
        if let Ok(style) = ProgressStyle::with_template(
            "{msg:>28} [{wide_bar}] {bytes}/{total_bytes} {bytes_per_sec} ({eta})",
        ) {
            bar.set_style(style.progress_chars("=> "));
        }
        bar.set_message(file.to_string());
        bar.set_position(done);
        bar
    }

    /// Points `refs/<revision>` at `commit` (temp file + rename).
    fn write_ref(&self, id: &RepoId, commit: &str) -> Result<(), HubError> {
        let path = self.repo_dir(id).join("refs").join(id.revision());
        self.refuse_links(id, path.parent().unwrap_or(&path))?;
        let io = |source| HubError::Io {
            path: path.clone(),
            source,
        };
        if std::fs::read_to_string(&path).is_ok_and(|c| c.trim() == commit) {
            return Ok(());
        }
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(io)?;
        }
        let temp = path.with_extension("tmp");
        std::fs::write(&temp, commit).map_err(io)?;
        std::fs::rename(&temp, &path).map_err(io)
    }

    fn failure(&self, id: &RepoId, file: Option<&str>, url: &str, failure: Failure) -> HubError {
        match failure {
            Failure::Connection(message) => HubError::Connection {
                url: url.to_string(),
                message,
            },
            Failure::Status(response) => self.request_error(
                id,
                file,
                url,
                ureq::Error::Status(response.status(), *response),
            ),
            Failure::Protocol(message) => HubError::Protocol {
                url: url.to_string(),
                message,
            },
            Failure::Write(source) => HubError::Io {
                path: self.repo_dir(id),
                source,
            },
        }
    }

    fn request_error(
        &self,
        id: &RepoId,
        file: Option<&str>,
        url: &str,
        error: ureq::Error,
    ) -> HubError {
        let response = match error {
            ureq::Error::Status(_, response) => response,
            ureq::Error::Transport(transport) => {
                return HubError::Connection {
                    url: url.to_string(),
                    message: transport.to_string(),
                }
            }
        };
        let status = response.status();
        let code = response
            .header("x-error-code")
            .unwrap_or_default()
            .to_string();
        let mut message = response
            .header("x-error-message")
            .unwrap_or_default()
            .to_string();
        if message.is_empty() {
            let mut body = String::new();
            let _ = response.into_reader().take(4096).read_to_string(&mut body);
            message = serde_json::from_str::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
                .unwrap_or_else(|| body.trim().chars().take(300).collect());
        }
        let endpoint = self.options.endpoint.clone();
        let token_sent = self.options.token.is_some();
        match (status, code.as_str()) {
            (401, _) | (403, "GatedRepo") => HubError::Unauthorized {
                repo: id.repo.clone(),
                status,
                gated: code == "GatedRepo",
                token_sent,
                message,
            },
            (404, "RevisionNotFound") => HubError::RevisionNotFound {
                repo: id.repo.clone(),
                revision: id.revision().to_string(),
                endpoint,
            },
            (404, "EntryNotFound") => HubError::FileNotFound {
                repo: id.repo.clone(),
                revision: id.revision().to_string(),
                file: file.unwrap_or_default().to_string(),
                endpoint,
            },
            (404, code) if code == "RepoNotFound" || file.is_none() => HubError::RepoNotFound {
                repo: id.repo.clone(),
                endpoint,
                token_sent,
            },
            (404, _) => HubError::FileNotFound {
                repo: id.repo.clone(),
                revision: id.revision().to_string(),
                file: file.unwrap_or_default().to_string(),
                endpoint,
            },
            _ => HubError::Http {
                url: url.to_string(),
                status,
                message,
            },
        }
    }
}

/// Checks a file against the size and (for large files, when `hash` is set)
/// the SHA-256 the hub listed.
fn verify(path: &Path, expected: Option<&Sibling>, hash: bool) -> Result<(), String> {
    let Some(expected) = expected else {
        return Ok(());
    };
    let size = std::fs::metadata(path)
        .map_err(|e| format!("cannot read it: {e}"))?
        .len();
    if let Some(want) = expected.size() {
        if size != want {
            return Err(format!("{size} bytes, the hub lists {want}"));
        }
    }
    if let (true, Some(lfs)) = (hash, &expected.lfs) {
        let found = sha256_file(path).map_err(|e| format!("cannot read it: {e}"))?;
        if !found.eq_ignore_ascii_case(&lfs.sha256) {
            return Err(format!("SHA-256 {found}, the hub lists {}", lfs.sha256));
        }
    }
    Ok(())
}

fn sha256_file(path: &Path) -> std::io::Result<String> {
    use sha2::{Digest, Sha256};
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buffer)?;
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}
