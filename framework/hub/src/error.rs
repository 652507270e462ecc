//! What can go wrong between a repo id and a directory of files, each error
//! naming the repository, revision, file or URL and what the user can do.

use std::path::PathBuf;

/// Errors of the hub client.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    /// The text is neither an existing directory nor a valid repo id.
    #[error("`{id}` is not a Hugging Face repo id (org/name[@revision]): {reason}")]
    InvalidRepoId {
        /// What the user typed.
        id: String,
        /// Why it is not a repo id.
        reason: String,
    },
    /// The repository holds nothing mlx-zoo can load.
    #[error("{repo} is not a model mlx-zoo can load: {reason}; its files: {}", files.join(", "))]
    NotAModel {
        /// The repository.
        repo: String,
        /// What is missing.
        reason: String,
        /// The files it has.
        files: Vec<String>,
    },
    /// HTTP 404 for the repository.
    #[error("repository {repo} not found on {endpoint}{}", if *token_sent { " (a token was sent)" } else { "; if it is private, set HF_TOKEN" })]
    RepoNotFound {
        /// The repository.
        repo: String,
        /// The hub asked.
        endpoint: String,
        /// Whether an access token went with the request.
        token_sent: bool,
    },
    /// HTTP 404 for the revision.
    #[error("revision `{revision}` of {repo} not found on {endpoint}")]
    RevisionNotFound {
        /// The repository.
        repo: String,
        /// The branch, tag or commit asked for.
        revision: String,
        /// The hub asked.
        endpoint: String,
    },
    /// HTTP 404 for one file of an existing repository.
    #[error("{file} not found in {repo}@{revision} on {endpoint}")]
    FileNotFound {
        /// The repository.
        repo: String,
        /// The revision.
        revision: String,
        /// The file.
        file: String,
        /// The hub asked.
        endpoint: String,
    },
    /// HTTP 401, or 403 for a gated repository.
    #[error("{repo} needs authentication (HTTP {status}{}): {}{}",
        if *gated { ", gated repository" } else { "" },
        if *token_sent {
            "the token sent (HF_TOKEN or the cached token file) was refused; check that it is valid and that your account was granted access"
        } else {
            "set HF_TOKEN to an access token with read permission (https://huggingface.co/settings/tokens), or run `huggingface-cli login`"
        },
        if message.is_empty() { String::new() } else { format!(". The hub said: {message}") })]
    Unauthorized {
        /// The repository.
        repo: String,
        /// 401 or 403.
        status: u16,
        /// Whether the hub reported a gated repository.
        gated: bool,
        /// Whether an access token went with the request.
        token_sent: bool,
        /// The hub's own message, if any.
        message: String,
    },
    /// Any other HTTP error status.
    #[error("HTTP {status} from {url}{}", if message.is_empty() { String::new() } else { format!(": {message}") })]
    Http {
        /// The URL requested.
        url: String,
        /// The status code.
        status: u16,
        /// The hub's message, if any.
        message: String,
    },
    /// The server could not be reached or the connection broke.
    #[error("could not download from {url}: {message}; the partial download is kept and resumes on the next run (HF_ENDPOINT selects a mirror, HF_HUB_OFFLINE=1 uses the cache only)")]
    Connection {
        /// The URL requested.
        url: String,
        /// What failed.
        message: String,
    },
    /// The server's answer is not the hub protocol.
    #[error("unexpected answer from {url}: {message} (is HF_ENDPOINT a Hugging Face hub?)")]
    Protocol {
        /// The URL requested.
        url: String,
        /// What was wrong.
        message: String,
    },
    /// Offline (or the hub unreachable) and the cache lacks files.
    #[error("{repo}@{revision} is not in the cache {} ({why}); missing: {}", cache.display(), missing.join(", "))]
    NotCached {
        /// The repository.
        repo: String,
        /// The revision.
        revision: String,
        /// The hub cache directory looked in.
        cache: PathBuf,
        /// Why the cache was the only option.
        why: String,
        /// What is missing.
        missing: Vec<String>,
    },
    /// A downloaded file does not match the size or hash the hub listed.
    #[error("{file} of {repo} is corrupt after download ({reason}); the bad copy was removed, run again to download it afresh")]
    Integrity {
        /// The repository.
        repo: String,
        /// The file.
        file: String,
        /// Expected against found.
        reason: String,
    },
    /// The hub moved the revision while files were downloading.
    #[error("{repo}@{revision} changed during the download (commit {expected}, then {found}); run again")]
    RevisionMoved {
        /// The repository.
        repo: String,
        /// The revision.
        revision: String,
        /// The commit the listing named.
        expected: String,
        /// The commit a file came from.
        found: String,
    },
    /// A weight index that cannot be read.
    #[error("{}: not a valid weight index: {reason}", path.display())]
    BadIndex {
        /// The index file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A file-system error in the cache.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

impl HubError {
    /// Whether the error means the network or server was unreachable (as
    /// opposed to an answer that refused the request).
    pub fn is_connection(&self) -> bool {
        matches!(self, HubError::Connection { .. })
    }
}
