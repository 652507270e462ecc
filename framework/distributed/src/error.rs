//! The errors of the distributed layer: each names the backend, the
//! environment variable or the file to look at.

use std::path::PathBuf;

/// Everything that can go wrong joining or using a process group.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DistributedError {
    /// The MLX build has no such backend (MPI without a loadable `libmpi`,
    /// NCCL in a CPU build, JACCL off macOS).
    #[error("the {backend} backend is not available in this build of MLX{hint}")]
    Unavailable {
        /// The backend asked for.
        backend: String,
        /// What would make it available.
        hint: String,
    },

    /// The launcher's environment lacks what the backend needs.
    #[error("the {backend} backend needs {variable}: {problem} (start the ranks with `zoo launch`, `mlx.launch` or `mpirun`)")]
    Environment {
        /// The backend.
        backend: String,
        /// The environment variable.
        variable: String,
        /// What is wrong with it.
        problem: String,
    },

    /// A hostfile cannot be used.
    #[error("{path}: {problem}")]
    Hostfile {
        /// The file.
        path: PathBuf,
        /// What was expected and what was found.
        problem: String,
    },

    /// MLX could not join the group.
    #[error("joining the {backend} group failed: {message}")]
    Init {
        /// The backend.
        backend: String,
        /// MLX's message.
        message: String,
    },

    /// A collective could not be built (shapes, ranks) or failed.
    #[error("{op}: {message}")]
    Op {
        /// The operation, e.g. `all_sum`.
        op: String,
        /// MLX's message or what was wrong.
        message: String,
    },

    /// A backend name that is not one of MLX's.
    #[error("unknown distributed backend `{0}`: expected any, ring, mpi, nccl or jaccl")]
    UnknownBackend(String),
}

/// Result alias of this crate.
pub type Result<T, E = DistributedError> = std::result::Result<T, E>;
