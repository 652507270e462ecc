//! Where the hub is and where its files go, read from the same environment
//! variables as Python's `huggingface_hub`: `HF_ENDPOINT`, `HF_HOME`,
//! `HF_HUB_CACHE`, `HF_TOKEN`, `HF_HUB_OFFLINE`, `HF_HUB_DISABLE_PROGRESS_BARS`,
//! `HF_HUB_DOWNLOAD_TIMEOUT`.

use std::path::PathBuf;
use std::time::Duration;

/// The public hub.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// Settings of a [`crate::Hub`].
#[derive(Debug, Clone)]
pub struct HubOptions {
    /// Base URL of the hub or mirror, without a trailing `/`.
    pub endpoint: String,
    /// The hub cache (`$HF_HOME/hub`): `models--org--name/{refs,blobs,snapshots}`.
    pub cache_dir: PathBuf,
    /// Access token sent as `Authorization: Bearer`.
    pub token: Option<String>,
    /// Use the cache only, never the network.
    pub offline: bool,
    /// Draw progress bars on standard error (when it is a terminal).
    pub progress: bool,
    /// How many times a broken download resumes before giving up.
    pub retries: usize,
    /// How long a connection may take to open, and a read may wait for the
    /// next bytes, before the attempt counts as broken (a stalled server).
    pub timeout: Duration,
}

/// `huggingface_hub`'s default `HF_HUB_DOWNLOAD_TIMEOUT`, in seconds.
pub const DEFAULT_TIMEOUT_SECONDS: u64 = 10;

impl HubOptions {
    /// Settings from the environment, with the defaults of `huggingface_hub`.
    pub fn from_env() -> Self {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        let home = var("HF_HOME").map(PathBuf::from).unwrap_or_else(|| {
            var("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .or_else(|| var("HOME").map(|home| PathBuf::from(home).join(".cache")))
                .unwrap_or_else(|| PathBuf::from(".cache"))
                .join("huggingface")
        });
        let cache_dir = var("HF_HUB_CACHE")
            .map(PathBuf::from)
            .unwrap_or_else(|| home.join("hub"));
        let token = var("HF_TOKEN")
            .or_else(|| var("HUGGING_FACE_HUB_TOKEN"))
            .or_else(|| {
                let file = var("HF_TOKEN_PATH")
                    .map(PathBuf::from)
                    .unwrap_or_else(|| home.join("token"));
                std::fs::read_to_string(file)
                    .ok()
                    .map(|t| t.trim().to_string())
                    .filter(|t| !t.is_empty())
            });
        Self {
            endpoint: var("HF_ENDPOINT")
                .unwrap_or_else(|| DEFAULT_ENDPOINT.to_string())
                .trim_end_matches('/')
                .to_string(),
            cache_dir,
            token: token.map(|t| t.trim().to_string()),
            offline: var("HF_HUB_OFFLINE").is_some_and(|v| is_true(&v)),
            progress: !var("HF_HUB_DISABLE_PROGRESS_BARS").is_some_and(|v| is_true(&v)),
            retries: 3,
            timeout: var("HF_HUB_DOWNLOAD_TIMEOUT")
                .and_then(|v| v.trim().parse::<f64>().ok())
                .filter(|s| s.is_finite() && *s > 0.0)
                .map(|s| Duration::from_secs_f64(s.min(86_400.0)))
                .unwrap_or(Duration::from_secs(DEFAULT_TIMEOUT_SECONDS)),
        }
    }

    /// Settings for a given endpoint and cache, with no token, online, no
    /// progress bars (for embedding and tests).
    pub fn new(endpoint: impl Into<String>, cache_dir: impl Into<PathBuf>) -> Self {
        Self {
            endpoint: endpoint.into().trim_end_matches('/').to_string(),
            cache_dir: cache_dir.into(),
            token: None,
            offline: false,
            progress: false,
            retries: 3,
            timeout: Duration::from_secs(DEFAULT_TIMEOUT_SECONDS),
        }
    }
}

/// `huggingface_hub`'s reading of boolean variables.
fn is_true(value: &str) -> bool {
    matches!(
        value.trim().to_ascii_uppercase().as_str(),
        "1" | "ON" | "YES" | "TRUE"
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn booleans_read_like_huggingface_hub() {
        for yes in ["1", "true", "ON", "yes "] {
            assert!(super::is_true(yes), "{yes}");
        }
        for no in ["0", "false", "off", "", "2"] {
            assert!(!super::is_true(no), "{no}");
        }
    }
}
