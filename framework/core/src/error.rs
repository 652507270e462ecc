//! The error type of the core crate. Every variant names what the user has to
//! look at: the file, the tensor or the key, and what was expected there.

use std::path::PathBuf;

/// Result alias used throughout the core.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong while resolving, mapping or loading a model.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// `config.json` (or another JSON file) is not valid JSON.
    #[error("{path}: invalid JSON: {source}")]
    Json {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: serde_json::Error,
    },

    /// A configuration key is missing or has an unusable value.
    #[error("{file}: key `{key}`: {message}")]
    Config {
        /// The file (or `config.json` when the config came from memory).
        file: String,
        /// The key, dotted for nested keys.
        key: String,
        /// What was expected and what was found.
        message: String,
    },

    /// No registered architecture accepts the config.
    #[error("{}", unknown_architecture_message(.model_type, .architectures, .closest, .known))]
    UnknownArchitecture {
        /// The config's `model_type`, if any.
        model_type: Option<String>,
        /// The config's `architectures`.
        architectures: Vec<String>,
        /// Registered names closest to the config's.
        closest: Vec<String>,
        /// Every registered architecture.
        known: Vec<String>,
    },

    /// More than one architecture claims the config with the same priority.
    #[error("the config is claimed by several architectures with equal priority: {}", .candidates.join("; "))]
    AmbiguousArchitecture {
        /// `name (priority N: reason)` for every tied candidate.
        candidates: Vec<String>,
    },

    /// An architecture with this name is already registered.
    #[error("an architecture named `{name}` is already registered (use register_or_replace to override it)")]
    DuplicateArchitecture {
        /// The name.
        name: String,
    },

    /// A plugin of another kind (quantizer, adapter) is already registered.
    #[error("a {kind} named `{name}` is already registered")]
    DuplicatePlugin {
        /// `quantizer` or `adapter`.
        kind: &'static str,
        /// The name.
        name: String,
    },

    /// The model directory holds no weights this crate can read.
    #[error("{dir}: no weights found: expected model.safetensors, model.safetensors.index.json, model*.safetensors, pytorch_model*.bin or model*.npz")]
    NoWeights {
        /// The directory.
        dir: PathBuf,
    },

    /// A safetensors file is malformed or truncated.
    #[error("{path}: not a valid safetensors file: {message}")]
    Safetensors {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },

    /// A PyTorch or NumPy weights archive cannot be read (or asks for
    /// something this crate refuses to do).
    #[error("{path}: cannot read the weights: {message}")]
    Archive {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },

    /// A sharded checkpoint's index does not agree with its shards.
    #[error("{path}: {message}")]
    ShardIndex {
        /// The index file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },

    /// A tensor has a dtype the loader does not convert.
    #[error("{path}: tensor `{tensor}` has dtype {dtype}; expected {expected}")]
    UnsupportedDtype {
        /// The file.
        path: PathBuf,
        /// The tensor.
        tensor: String,
        /// Its dtype.
        dtype: String,
        /// The dtypes that would do, e.g. `F32, F16 or BF16`.
        expected: String,
    },

    /// The checkpoint's tensors do not fit the model (see the mapping report).
    #[error("{0}")]
    Mapping(String),

    /// An argument to a library call is out of range.
    #[error("{0}")]
    InvalidArgument(String),

    /// MLX reported an error.
    #[error("MLX error while {context}: {source}")]
    Mlx {
        /// What the crate was doing.
        context: String,
        /// The MLX exception.
        #[source]
        source: mlx_rs::error::Exception,
    },
}

impl Error {
    /// Shorthand for a [`Error::Config`] about `config.json`.
    pub fn config(key: impl Into<String>, message: impl Into<String>) -> Self {
        Error::Config {
            file: "config.json".into(),
            key: key.into(),
            message: message.into(),
        }
    }
}

/// Attaches context to MLX results.
pub trait MlxContext<T> {
    /// Converts an MLX exception into [`Error::Mlx`] with `context`.
    fn context(self, context: impl FnOnce() -> String) -> Result<T>;
}

impl<T> MlxContext<T> for std::result::Result<T, mlx_rs::error::Exception> {
    fn context(self, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| Error::Mlx {
            context: context(),
            source,
        })
    }
}

impl From<mlx_rs::error::Exception> for Error {
    fn from(source: mlx_rs::error::Exception) -> Self {
        Error::Mlx {
            context: "running the model".into(),
            source,
        }
    }
}

fn unknown_architecture_message(
    model_type: &Option<String>,
    architectures: &[String],
    closest: &[String],
    known: &[String],
) -> String {
    let what = match model_type {
        Some(t) => format!("model_type `{t}`"),
        None => "a config without model_type".to_owned(),
    };
    let mut message = format!("no registered architecture accepts {what}");
    if !architectures.is_empty() {
        message.push_str(&format!(" (architectures: {})", architectures.join(", ")));
    }
    if !closest.is_empty() {
        message.push_str(&format!("; did you mean {}?", closest.join(" or ")));
    }
    message.push_str(&format!("; registered: {}", known.join(", ")));
    message
}
