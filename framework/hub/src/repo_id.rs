//! Hugging Face repository ids as users type them: `org/name`, `name`, each
//! optionally followed by `@revision` (a branch, tag or commit).

use crate::HubError;
use std::fmt;

/// A model repository on the hub and the revision to fetch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepoId {
    /// `org/name` (or a bare legacy `name`).
    pub repo: String,
    /// Branch, tag or commit; `None` means `main`.
    pub revision: Option<String>,
}

/// Longest repo id the hub accepts (`org/name` together).
const MAX_LEN: usize = 96;

impl RepoId {
    /// Parses `org/name[@revision]`.
    ///
    /// Names follow the hub's rules: ASCII letters, digits, `-`, `_` and `.`,
    /// not starting or ending with `-` or `.`, no `--` or `..`, at most one
    /// `/`. Anything else (a path like `./model` or `a/b/c`) is an error, so a
    /// mistyped local directory is not sent to the network.
    pub fn parse(text: &str) -> Result<Self, HubError> {
        let invalid = |reason: &str| HubError::InvalidRepoId {
            id: text.to_string(),
            reason: reason.to_string(),
        };
        let (repo, revision) = match text.split_once('@') {
            Some((_, "")) => return Err(invalid("the revision after `@` is empty")),
            Some((repo, revision)) => (repo, Some(revision.to_string())),
            None => (text, None),
        };
        if repo.is_empty() {
            return Err(invalid("it is empty"));
        }
        if repo.len() > MAX_LEN {
            return Err(invalid("it is longer than 96 characters"));
        }
        let parts: Vec<&str> = repo.split('/').collect();
        if parts.len() > 2 {
            return Err(invalid("expected `org/name`, found more than one `/`"));
        }
        for part in &parts {
            if part.is_empty() {
                return Err(invalid("a part around `/` is empty"));
            }
            if let Some(c) = part
                .chars()
                .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
            {
                return Err(invalid(&format!("`{c}` is not allowed in a repo name")));
            }
            if part.starts_with(['-', '.']) || part.ends_with(['-', '.']) {
                return Err(invalid("a name may not start or end with `-` or `.`"));
            }
            if part.contains("--") || part.contains("..") {
                return Err(invalid("a name may not contain `--` or `..`"));
            }
        }
        if let Some(revision) = &revision {
            check_revision(revision).map_err(|reason| invalid(&reason))?;
        }
        Ok(Self {
            repo: repo.to_string(),
            revision,
        })
    }

    /// The revision to fetch: the one given, or `main`.
    pub fn revision(&self) -> &str {
        self.revision.as_deref().unwrap_or("main")
    }

    /// Whether the revision names a commit (40 hexadecimal digits).
    pub fn is_commit(&self) -> bool {
        is_commit_hash(self.revision())
    }
}

/// Whether `text` is a full git commit hash.
/// A revision becomes a path under the cache (`refs/<revision>`), so only
/// what a branch, tag or commit name needs is allowed: no `.`/`..`
/// components, no empty ones, no leading `/`, no backslash, whitespace or
/// control characters (`org/x@../../y` reached outside the cache).
fn check_revision(revision: &str) -> Result<(), String> {
    if revision.len() > 256 {
        return Err("the revision is longer than 256 characters".into());
    }
    if let Some(c) = revision.chars().find(|c| {
        c.is_control() || c.is_whitespace() || matches!(c, '\\' | ':' | '~' | '^' | '?' | '*' | '[')
    }) {
        return Err(format!(
            "`{}` is not allowed in a revision",
            c.escape_default()
        ));
    }
    if revision
        .split('/')
        .any(|part| part.is_empty() || part == "." || part == "..")
    {
        return Err("a revision may not have empty, `.` or `..` parts around `/`".into());
    }
    Ok(())
}

pub(crate) fn is_commit_hash(text: &str) -> bool {
    text.len() == 40 && text.bytes().all(|b| b.is_ascii_hexdigit())
}

impl fmt::Display for RepoId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.revision {
            Some(revision) => write!(f, "{}@{revision}", self.repo),
            None => f.write_str(&self.repo),
        }
    }
}

impl std::str::FromStr for RepoId {
    type Err = HubError;

    fn from_str(text: &str) -> Result<Self, HubError> {
        Self::parse(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_org_name_and_revision() {
        let id = RepoId::parse("mlx-community/Llama-3.2-1B-Instruct-4bit@v1.0").unwrap();
        assert_eq!(id.repo, "mlx-community/Llama-3.2-1B-Instruct-4bit");
        assert_eq!(id.revision(), "v1.0");
        assert!(!id.is_commit());
        let bare = RepoId::parse("gpt2").unwrap();
        assert_eq!((bare.repo.as_str(), bare.revision()), ("gpt2", "main"));
        let hash = "0123456789abcdef".repeat(3)[..40].to_string();
        let commit = RepoId::parse(&format!("a/b@{hash}")).unwrap();
        assert!(commit.is_commit());
        assert_eq!(commit.to_string(), format!("a/b@{}", commit.revision()));
    }

    #[test]
    fn refuses_paths_and_malformed_names() {
        for (text, needle) in [
            ("./model", "start or end"),
            ("a/b/c", "more than one `/`"),
            ("org/", "empty"),
            ("org/name@", "revision"),
            ("org/x@../../y", "`..` parts"),
            ("org/x@/etc", "empty"),
            ("org/x@a\\b", "not allowed in a revision"),
            ("org/x@refs/pr/../../z", "`..` parts"),
            ("org/na me", "` ` is not allowed"),
            ("org/-name", "start or end"),
            ("org/na--me", "`--`"),
            ("", "empty"),
        ] {
            let error = RepoId::parse(text).unwrap_err().to_string();
            assert!(error.contains(needle), "{text:?}: {error}");
        }
    }
}
