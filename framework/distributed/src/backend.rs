//! MLX's communication backends, which one a launcher started this process
//! for (read from the environment the launchers set), and what each needs
//! there before MLX is asked to join: a missing variable is named here, not
//! left to a hang or a bare failure inside MLX.

use crate::error::{DistributedError, Result};
use std::ffi::CString;

/// One of MLX's distributed backends, or [`Backend::Any`] to take the one
/// the environment names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Backend {
    /// Whichever backend the launcher's environment names; a group of one
    /// process when it names none.
    Any,
    /// MLX's ring over TCP sockets: `MLX_RANK` and `MLX_HOSTFILE` (a JSON
    /// list of each rank's `ip:port` addresses).
    Ring,
    /// MPI (`mpirun`), through a `libmpi` MLX loads at run time.
    Mpi,
    /// NCCL on NVIDIA GPUs: `MLX_RANK`, `MLX_WORLD_SIZE`, `NCCL_HOST_IP`,
    /// `NCCL_PORT`.
    Nccl,
    /// JACCL, RDMA over Thunderbolt (macOS): `MLX_RANK`,
    /// `MLX_JACCL_COORDINATOR`, `MLX_IBV_DEVICES`.
    Jaccl,
}

impl Backend {
    /// The concrete backends, in the order [`Backend::detect`] looks for
    /// them.
    pub const CONCRETE: [Backend; 4] = [Backend::Jaccl, Backend::Nccl, Backend::Ring, Backend::Mpi];

    /// MLX's name of the backend.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Any => "any",
            Backend::Ring => "ring",
            Backend::Mpi => "mpi",
            Backend::Nccl => "nccl",
            Backend::Jaccl => "jaccl",
        }
    }

    /// Whether this build of MLX has the backend (for MPI: whether a
    /// `libmpi` can be loaded).
    pub fn is_available(self) -> bool {
        let name = CString::new(self.name()).expect("backend names have no NUL");
        // SAFETY: a query with a live C string.
        unsafe { mlx_sys::mlx_distributed_is_available(name.as_ptr()) }
    }

    /// Whether the backend computes its collectives on the GPU's stream
    /// (NCCL) rather than on the CPU.
    pub fn on_gpu(self) -> bool {
        self == Backend::Nccl
    }

    /// The backend the launcher's environment names: JACCL's coordinator,
    /// NCCL's host, the ring's hostfile, or an MPI launcher's rank
    /// variables; `None` for a process started on its own.
    pub fn detect() -> Option<Backend> {
        Self::detect_in(&|name| std::env::var(name).ok())
    }

    /// [`Backend::detect`] over any environment (for tests).
    pub fn detect_in(env: &dyn Fn(&str) -> Option<String>) -> Option<Backend> {
        let set = |name: &str| env(name).is_some_and(|v| !v.is_empty());
        if set("MLX_JACCL_COORDINATOR") {
            Some(Backend::Jaccl)
        } else if set("NCCL_HOST_IP") {
            Some(Backend::Nccl)
        } else if set("MLX_HOSTFILE") {
            Some(Backend::Ring)
        } else if MPI_RANK_VARIABLES.iter().any(|v| set(v)) {
            Some(Backend::Mpi)
        } else {
            None
        }
    }

    /// Checks that the environment holds what the backend needs, naming
    /// the first variable that is missing or malformed. Returns the rank
    /// the environment gives (MPI's launcher variables, when set).
    pub fn check_environment(self, env: &dyn Fn(&str) -> Option<String>) -> Result<Option<usize>> {
        let problem = |variable: &str, problem: String| DistributedError::Environment {
            backend: self.name().into(),
            variable: variable.into(),
            problem,
        };
        let required = |variable: &str| -> Result<String> {
            env(variable)
                .filter(|v| !v.is_empty())
                .ok_or_else(|| problem(variable, "it is not set".into()))
        };
        let number = |variable: &str| -> Result<usize> {
            let text = required(variable)?;
            text.trim()
                .parse::<usize>()
                .map_err(|_| problem(variable, format!("expected a rank number, found `{text}`")))
        };
        match self {
            Backend::Any => Ok(None),
            Backend::Ring => {
                let rank = number("MLX_RANK")?;
                let path = required("MLX_HOSTFILE")?;
                let hosts = crate::hostfile::RingHostfile::read(path.as_ref())?;
                if rank >= hosts.size() {
                    return Err(problem(
                        "MLX_RANK",
                        format!("rank {rank}, but {path} lists {} ranks", hosts.size()),
                    ));
                }
                Ok(Some(rank))
            }
            Backend::Nccl => {
                let rank = number("MLX_RANK")?;
                let size = number("MLX_WORLD_SIZE")?;
                if rank >= size {
                    return Err(problem(
                        "MLX_RANK",
                        format!("rank {rank} of a world of {size}"),
                    ));
                }
                required("NCCL_HOST_IP")?;
                number("NCCL_PORT")?;
                Ok(Some(rank))
            }
            Backend::Jaccl => {
                let rank = number("MLX_RANK")?;
                required("MLX_JACCL_COORDINATOR")?;
                required("MLX_IBV_DEVICES")?;
                Ok(Some(rank))
            }
            Backend::Mpi => Ok(MPI_RANK_VARIABLES
                .iter()
                .find_map(|v| env(v)?.trim().parse().ok())),
        }
    }
}

/// The rank variables of the common MPI launchers (Open MPI, MPICH/Hydra
/// and PMIx).
const MPI_RANK_VARIABLES: [&str; 3] = ["OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK"];

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Backend {
    type Err = DistributedError;

    fn from_str(text: &str) -> Result<Self> {
        match text.trim().to_ascii_lowercase().as_str() {
            "any" => Ok(Backend::Any),
            "ring" => Ok(Backend::Ring),
            "mpi" => Ok(Backend::Mpi),
            "nccl" => Ok(Backend::Nccl),
            "jaccl" => Ok(Backend::Jaccl),
            _ => Err(DistributedError::UnknownBackend(text.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |name| map.get(name).cloned()
    }

    #[test]
    fn the_environment_names_the_backend() {
        assert_eq!(Backend::detect_in(&env_of(&[])), None);
        let ring = env_of(&[("MLX_RANK", "1"), ("MLX_HOSTFILE", "/h.json")]);
        assert_eq!(Backend::detect_in(&ring), Some(Backend::Ring));
        let nccl = env_of(&[("MLX_RANK", "0"), ("NCCL_HOST_IP", "10.0.0.1")]);
        assert_eq!(Backend::detect_in(&nccl), Some(Backend::Nccl));
        let mpi = env_of(&[("OMPI_COMM_WORLD_RANK", "3")]);
        assert_eq!(Backend::detect_in(&mpi), Some(Backend::Mpi));
        assert_eq!(Backend::Mpi.check_environment(&mpi).unwrap(), Some(3));
    }

    #[test]
    fn a_missing_or_bad_variable_is_named() {
        let error = Backend::Ring
            .check_environment(&env_of(&[("MLX_HOSTFILE", "/h.json")]))
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("MLX_RANK") && error.contains("not set"),
            "{error}"
        );
        let error = Backend::Nccl
            .check_environment(&env_of(&[
                ("MLX_RANK", "2"),
                ("MLX_WORLD_SIZE", "2"),
                ("NCCL_HOST_IP", "x"),
                ("NCCL_PORT", "1"),
            ]))
            .unwrap_err()
            .to_string();
        assert!(error.contains("rank 2 of a world of 2"), "{error}");
        let error = Backend::Ring
            .check_environment(&env_of(&[("MLX_RANK", "one"), ("MLX_HOSTFILE", "x")]))
            .unwrap_err()
            .to_string();
        assert!(error.contains("`one`"), "{error}");
    }

    #[test]
    fn the_ring_rank_must_be_in_the_hostfile() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hosts.json");
        std::fs::write(&path, r#"[["127.0.0.1:5000"], ["127.0.0.1:5001"]]"#).unwrap();
        let path = path.to_str().unwrap();
        let ok = env_of(&[("MLX_RANK", "1"), ("MLX_HOSTFILE", path)]);
        assert_eq!(Backend::Ring.check_environment(&ok).unwrap(), Some(1));
        let out = env_of(&[("MLX_RANK", "2"), ("MLX_HOSTFILE", path)]);
        let error = Backend::Ring
            .check_environment(&out)
            .unwrap_err()
            .to_string();
        assert!(error.contains("lists 2 ranks"), "{error}");
    }

    #[test]
    fn names_parse_back() {
        for backend in [
            Backend::Any,
            Backend::Ring,
            Backend::Mpi,
            Backend::Nccl,
            Backend::Jaccl,
        ] {
            assert_eq!(backend.name().parse::<Backend>().unwrap(), backend);
        }
        assert!("gloo".parse::<Backend>().is_err());
    }
}
