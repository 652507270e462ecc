//! Training errors, each naming the file, line, key or step at fault.

use std::path::PathBuf;

/// Errors of data loading and training.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// A data file line that is not a usable record.
    #[error("{}:{line}: {reason}", path.display())]
    BadRecord {
        /// The JSONL file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong and what was expected.
        reason: String,
    },
    /// No usable data.
    #[error("{}: {reason}", path.display())]
    NoData {
        /// The file or directory.
        path: PathBuf,
        /// What is missing.
        reason: String,
    },
    /// A setting out of range.
    #[error("invalid training setting: {0}")]
    InvalidSetting(String),
    /// The loss stopped being finite.
    #[error("the loss became {loss} at step {step}; stopped without applying that update{}", last_checkpoint.as_ref().map(|p| format!(" (last good checkpoint: {})", p.display())).unwrap_or_default())]
    NonFiniteLoss {
        /// The optimizer step.
        step: usize,
        /// The loss value.
        loss: f32,
        /// The newest checkpoint written before, if any.
        last_checkpoint: Option<PathBuf>,
    },
    /// A checkpoint that does not fit the model or run.
    #[error("{}: {reason}", path.display())]
    BadCheckpoint {
        /// The checkpoint directory or file.
        path: PathBuf,
        /// What does not fit.
        reason: String,
    },
    /// A file-system error.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// An error of the model or MLX.
    #[error(transparent)]
    Model(#[from] mlx_zoo_core::Error),
    /// A data-parallel run's communication failed (a rank gone, a broken
    /// connection).
    #[error("data-parallel training: {0}")]
    Distributed(#[from] mlx_zoo_distributed::DistributedError),
    /// An MLX error raised inside a transform.
    #[error("MLX: {0}")]
    Mlx(#[from] mlx_rs::error::Exception),
}

/// Shorthand for results of this crate.
pub type Result<T, E = TrainError> = std::result::Result<T, E>;

impl TrainError {
    /// An I/O error on `path`.
    pub fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> TrainError {
        let path = path.into();
        move |source| TrainError::Io { path, source }
    }
}
