//! Hugging Face hub access for mlx-zoo: turns `org/name[@revision]` into a
//! local directory holding only the files a model needs, in the standard hub
//! cache (`$HF_HOME/hub`, shared with Python's `huggingface_hub`).
//!
//! Downloads go through [`hf_hub`]'s blocking client (resumable `.part`
//! files, retries with back-off, progress bars); this crate adds the choice
//! of files ([`FilePlan`]), a size and SHA-256 check of every download
//! against the hub's listing (a corrupt copy is removed, never served), the
//! offline mode, a fallback to the cache when the hub is unreachable, and
//! errors that say what to do (`HF_TOKEN` for gated repositories, ...).
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

pub use error::HubError;
pub use files::{shards_of_index, FilePlan, SIDE_FILES};
pub use options::{HubOptions, DEFAULT_ENDPOINT};
pub use repo_id::RepoId;

use hf_hub::api::sync::{Api, ApiBuilder, ApiError, ApiRepo};
use hf_hub::{Repo, RepoType};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Deserialize;
use std::io::Read;
use std::path::{Path, PathBuf};

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
    api: Api,
}

impl Hub {
    /// A client with these settings (no network traffic yet).
    pub fn new(options: HubOptions) -> Result<Self, HubError> {
        // `ApiBuilder::new` would look up the home directory (and panic
        // without one); the cache directory is already decided.
        let api = ApiBuilder::from_cache(hf_hub::Cache::new(options.cache_dir.clone()))
            .with_endpoint(options.endpoint.clone())
            .with_token(options.token.clone())
            // Retries are ours (`fetch_file`): hf-hub 0.4's own loop reports
            // failure even when its last attempt succeeds.
            .with_retries(0)
            .with_progress(false)
            .with_user_agent("mlx-zoo", env!("CARGO_PKG_VERSION"))
            .build()
            .map_err(|e| HubError::Protocol {
                url: options.endpoint.clone(),
                message: format!("cannot set up the HTTP client: {e}"),
            })?;
        Ok(Self { options, api })
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
        let repo = self.api.repo(Repo::with_revision(
            id.repo.clone(),
            RepoType::Model,
            listing.sha.clone(),
        ));
        let dir = self.repo_dir(id).join("snapshots").join(&listing.sha);
        let mut files = plan.files.clone();
        let mut downloaded_bytes = 0;
        if let Some(index) = &plan.index {
            downloaded_bytes += self.fetch_file(&repo, id, &listing, &dir, index)?;
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
                downloaded_bytes += self.fetch_file(&repo, id, &listing, &dir, file)?;
            }
        }
        // hf-hub records the commit it was given as a ref of its own name;
        // the cache keeps refs for branches and tags only, as Python's does.
        let _ = std::fs::remove_file(self.repo_dir(id).join("refs").join(&listing.sha));
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
        let present: Vec<String> = match std::fs::read_dir(&dir) {
            Ok(entries) => entries
                .filter_map(|entry| entry.ok())
                .filter(|entry| entry.path().is_file())
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
        let repo = self.api.repo(Repo::with_revision(
            id.repo.clone(),
            RepoType::Model,
            id.revision().to_string(),
        ));
        let request = repo.info_request().query("blobs", "true");
        let url = request.url().to_string();
        tracing::debug!("GET {url}");
        let response = request
            .call()
            .map_err(|e| self.request_error(id, None, &url, e))?;
        let listing: Listing = response.into_json().map_err(|e| HubError::Protocol {
            url: url.clone(),
            message: format!("the repository listing is not the expected JSON: {e}"),
        })?;
        if !repo_id::is_commit_hash(&listing.sha) {
            return Err(HubError::Protocol {
                url,
                message: format!("`sha` is not a commit hash: {:?}", listing.sha),
            });
        }
        Ok(listing)
    }

    /// Downloads `file` into `dir` unless it is there and intact; returns the
    /// bytes downloaded.
    fn fetch_file(
        &self,
        repo: &ApiRepo,
        id: &RepoId,
        listing: &Listing,
        dir: &Path,
        file: &str,
    ) -> Result<u64, HubError> {
        let expected = listing.siblings.iter().find(|s| s.rfilename == file);
        let pointer = dir.join(file);
        if pointer.is_file() {
            match verify(&pointer, expected, false) {
                Ok(()) => return Ok(0),
                Err(reason) => {
                    tracing::warn!(
                        "cached {file} of {} is damaged ({reason}); downloading it again",
                        id.repo
                    );
                    remove_cached(&pointer);
                }
            }
        }
        let url = repo.url(file);
        let mut attempt = 0;
        let path = loop {
            self.discard_unresumable_part(id, expected);
            let bar = if self.options.progress {
                ProgressBar::new(0)
            } else {
                ProgressBar::hidden()
            };
            tracing::debug!("GET {url}");
            match repo.download_with_progress(file, Bar(bar)) {
                Ok(path) => break path,
                Err(error) => {
                    let error = self.api_error(id, Some(file), &url, error);
                    if !error.is_connection() {
                        return Err(error);
                    }
                    if attempt == self.options.retries {
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
                    attempt += 1;
                    tracing::warn!("{error}; retrying ({attempt}/{})", self.options.retries);
                    std::thread::sleep(std::time::Duration::from_millis(
                        (200u64 << attempt.min(5)).min(5_000),
                    ));
                }
            }
        };
        if path != pointer {
            let found = path
                .parent()
                .and_then(Path::file_name)
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            return Err(HubError::RevisionMoved {
                repo: id.repo.clone(),
                revision: id.revision().to_string(),
                expected: listing.sha.clone(),
                found,
            });
        }
        if let Err(reason) = verify(&pointer, expected, true) {
            remove_cached(&pointer);
            return Err(HubError::Integrity {
                repo: id.repo.clone(),
                file: file.to_string(),
                reason,
            });
        }
        let size = std::fs::metadata(&pointer).map(|m| m.len()).unwrap_or(0);
        tracing::info!("downloaded {file} of {} ({size} bytes)", id.repo);
        Ok(size)
    }

    /// Deletes a partial download that cannot be resumed (as large as the
    /// file or larger: a byte range starting at its end is not satisfiable).
    fn discard_unresumable_part(&self, id: &RepoId, expected: Option<&Sibling>) {
        let Some(expected) = expected else { return };
        let (Some(etag), Some(size)) = (expected.etag(), expected.size()) else {
            return;
        };
        let part = self.repo_dir(id).join("blobs").join(format!("{etag}.part"));
        if std::fs::metadata(&part).is_ok_and(|m| m.len() >= size) {
            tracing::debug!("discarding {}: nothing left to resume", part.display());
            let _ = std::fs::remove_file(&part);
        }
    }

    /// Points `refs/<revision>` at `commit` (temp file + rename).
    fn write_ref(&self, id: &RepoId, commit: &str) -> Result<(), HubError> {
        let path = self.repo_dir(id).join("refs").join(id.revision());
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

    fn api_error(&self, id: &RepoId, file: Option<&str>, url: &str, error: ApiError) -> HubError {
        match error {
            ApiError::RequestError(error) => self.request_error(id, file, url, *error),
            ApiError::IoError(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                HubError::Connection {
                    url: url.to_string(),
                    message: "the connection closed before the whole file arrived".into(),
                }
            }
            ApiError::IoError(e) => HubError::Io {
                path: self.repo_dir(id),
                source: e,
            },
            ApiError::LockAcquisition(path) => HubError::Io {
                path,
                source: std::io::Error::other("another process is downloading this file"),
            },
            ApiError::InvalidResume => HubError::Integrity {
                repo: id.repo.clone(),
                file: file.unwrap_or_default().to_string(),
                reason: format!(
                    "a partial download in {} is larger than the file; delete the `.part` files there",
                    self.repo_dir(id).join("blobs").display()
                ),
            },
            other => HubError::Protocol {
                url: url.to_string(),
                message: other.to_string(),
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

/// Removes a snapshot entry and the blob it links to.
fn remove_cached(pointer: &Path) {
    if let Ok(blob) = std::fs::canonicalize(pointer) {
        let _ = std::fs::remove_file(blob);
    }
    let _ = std::fs::remove_file(pointer);
}

/// A progress bar in the style of `huggingface_hub`'s.
struct Bar(ProgressBar);

impl hf_hub::api::Progress for Bar {
    fn init(&mut self, size: usize, filename: &str) {
        if let Ok(style) = ProgressStyle::with_template(
            "{msg:>28} [{wide_bar}] {bytes}/{total_bytes} {bytes_per_sec} ({eta})",
        ) {
            self.0.set_style(style.progress_chars("=> "));
        }
        self.0.set_length(size as u64);
        // hf-hub calls `init` again when it resumes, then reports the bytes
        // already on disk through `update`.
        self.0.set_position(0);
        self.0.set_message(filename.to_string());
    }

    fn update(&mut self, size: usize) {
        self.0.inc(size as u64);
    }

    fn finish(&mut self) {
        self.0.finish();
    }
}
