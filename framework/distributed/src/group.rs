//! A group of processes joined over one of MLX's backends, and its
//! collectives on arrays. The operations are lazy like every MLX operation:
//! they run when their result is evaluated, on the CPU for the ring, MPI and
//! JACCL backends and on the GPU for NCCL. A process that was not launched
//! as a rank is a group of one, whose collectives return their input.

use crate::backend::Backend;
use crate::error::{DistributedError, Result};
use mlx_rs::{Array, Dtype, Stream};
use mlx_zoo_core::mlx_error::capture;
use std::ffi::CString;
use std::rc::Rc;

/// MLX's group handle, freed with the last clone of the [`Group`].
struct RawGroup(mlx_sys::mlx_distributed_group);

impl Drop for RawGroup {
    fn drop(&mut self) {
        // SAFETY: the handle came from mlx-c and is freed once.
        unsafe {
            mlx_sys::mlx_distributed_group_free(self.0);
        }
    }
}

/// The processes of a data-parallel run (cheap to clone: clones share
/// MLX's group).
#[derive(Clone)]
pub struct Group {
    raw: Option<Rc<RawGroup>>,
    backend: Option<Backend>,
    rank: usize,
    size: usize,
}

impl std::fmt::Debug for Group {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Group")
            .field("backend", &self.backend)
            .field("rank", &self.rank)
            .field("size", &self.size)
            .finish()
    }
}

impl Group {
    /// The group of this process alone.
    pub fn single() -> Self {
        Self {
            raw: None,
            backend: None,
            rank: 0,
            size: 1,
        }
    }

    /// Joins the group the launcher started this process in. With
    /// [`Backend::Any`], the backend its environment names (a group of one
    /// when it names none); otherwise that backend, whose variables must
    /// be set. Blocks until every rank has joined.
    pub fn init(backend: Backend) -> Result<Self> {
        let env = |name: &str| std::env::var(name).ok();
        let backend = match backend {
            Backend::Any => match Backend::detect() {
                Some(found) => found,
                None => return Ok(Self::single()),
            },
            chosen => chosen,
        };
        if !backend.is_available() {
            return Err(DistributedError::Unavailable {
                backend: backend.name().into(),
                hint: match backend {
                    Backend::Mpi => ": install an MPI library (e.g. `apt install libopenmpi-dev`; MPI_LIBNAME names another file)".into(),
                    Backend::Nccl => ": NCCL needs a CUDA build (MLX_ZOO_BACKEND=cuda)".into(),
                    Backend::Jaccl => ": JACCL needs macOS with RDMA over Thunderbolt".into(),
                    _ => String::new(),
                },
            });
        }
        let expected_rank = backend.check_environment(&env)?;
        let name = CString::new(backend.name()).expect("backend names have no NUL");
        // SAFETY: `group` starts empty and is filled by mlx-c on success.
        let raw = unsafe {
            let mut group = mlx_sys::mlx_distributed_group_new();
            if let Err(message) =
                capture(|| mlx_sys::mlx_distributed_init(&mut group, true, name.as_ptr()))
            {
                mlx_sys::mlx_distributed_group_free(group);
                return Err(DistributedError::Init {
                    backend: backend.name().into(),
                    message,
                });
            }
            RawGroup(group)
        };
        // SAFETY: a live group handle.
        let (rank, size) = unsafe {
            (
                mlx_sys::mlx_distributed_group_rank(raw.0),
                mlx_sys::mlx_distributed_group_size(raw.0),
            )
        };
        let (rank, size) = (rank.max(0) as usize, size.max(1) as usize);
        if expected_rank.is_some_and(|r| r != rank) {
            return Err(DistributedError::Init {
                backend: backend.name().into(),
                message: format!(
                    "MLX joined as rank {rank}, the environment says {}",
                    expected_rank.unwrap_or_default()
                ),
            });
        }
        Ok(Self {
            raw: Some(Rc::new(raw)),
            backend: Some(backend),
            rank,
            size,
        })
    }

    /// This process's rank, from 0.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// The number of processes.
    pub fn size(&self) -> usize {
        self.size
    }

    /// The backend, `None` for a group of one.
    pub fn backend(&self) -> Option<Backend> {
        self.backend
    }

    /// Whether this process writes the run's files (rank 0).
    pub fn is_main(&self) -> bool {
        self.rank == 0
    }

    /// Splits the group: processes passing the same `color` form a new
    /// group, ordered by `key` (their rank when negative). Not every
    /// backend can split (MLX's ring cannot).
    pub fn split(&self, color: i32, key: i32) -> Result<Self> {
        let Some(raw) = &self.raw else {
            return Ok(self.clone());
        };
        // SAFETY: a live group handle; the new one is freed on failure.
        unsafe {
            let mut group = mlx_sys::mlx_distributed_group_new();
            if let Err(message) =
                capture(|| mlx_sys::mlx_distributed_group_split(&mut group, raw.0, color, key))
            {
                mlx_sys::mlx_distributed_group_free(group);
                return Err(op_error("split", message));
            }
            let rank = mlx_sys::mlx_distributed_group_rank(group).max(0) as usize;
            let size = mlx_sys::mlx_distributed_group_size(group).max(1) as usize;
            Ok(Self {
                raw: Some(Rc::new(RawGroup(group))),
                backend: self.backend,
                rank,
                size,
            })
        }
    }

    /// The element-wise sum of `x` over every rank, on every rank.
    pub fn all_sum(&self, x: &Array) -> Result<Array> {
        self.reduce("all_sum", x, mlx_sys::mlx_distributed_all_sum)
    }

    /// The element-wise maximum of `x` over every rank.
    pub fn all_max(&self, x: &Array) -> Result<Array> {
        self.reduce("all_max", x, mlx_sys::mlx_distributed_all_max)
    }

    /// Every rank's `x` concatenated along the first axis, in rank order.
    pub fn all_gather(&self, x: &Array) -> Result<Array> {
        if self.raw.is_none() && x.ndim() == 0 {
            return x
                .reshape(&[1])
                .map_err(|e| op_error("all_gather", e.to_string()));
        }
        self.reduce("all_gather", x, mlx_sys::mlx_distributed_all_gather)
    }

    /// Sends `x` to rank `to`; the send happens when the returned array is
    /// evaluated.
    pub fn send(&self, x: &Array, to: usize) -> Result<Array> {
        let raw = self.require("send")?;
        self.check_peer("send", to)?;
        self.call("send", |res, stream| unsafe {
            mlx_sys::mlx_distributed_send(res, x.as_ptr(), to as i32, raw, stream)
        })
    }

    /// Receives an array of `shape` and `dtype` from rank `from`.
    pub fn recv(&self, shape: &[i32], dtype: Dtype, from: usize) -> Result<Array> {
        let raw = self.require("recv")?;
        self.check_peer("recv", from)?;
        self.call("recv", |res, stream| unsafe {
            mlx_sys::mlx_distributed_recv(
                res,
                shape.as_ptr(),
                shape.len(),
                dtype as mlx_sys::mlx_dtype,
                from as i32,
                raw,
                stream,
            )
        })
    }

    /// Receives an array shaped and typed like `like` from rank `from`.
    pub fn recv_like(&self, like: &Array, from: usize) -> Result<Array> {
        self.recv(like.shape(), like.dtype(), from)
    }

    fn require(&self, op: &str) -> Result<mlx_sys::mlx_distributed_group> {
        self.raw
            .as_ref()
            .map(|raw| raw.0)
            .ok_or_else(|| op_error(op, "a group of one process has no peer".into()))
    }

    fn check_peer(&self, op: &str, peer: usize) -> Result<()> {
        if peer >= self.size || peer == self.rank {
            return Err(op_error(
                op,
                format!(
                    "rank {peer} is not a peer of rank {} in a group of {}",
                    self.rank, self.size
                ),
            ));
        }
        Ok(())
    }

    /// A collective of one input: the input itself in a group of one.
    fn reduce(
        &self,
        op: &str,
        x: &Array,
        function: unsafe extern "C" fn(
            *mut mlx_sys::mlx_array,
            mlx_sys::mlx_array,
            mlx_sys::mlx_distributed_group,
            mlx_sys::mlx_stream,
        ) -> i32,
    ) -> Result<Array> {
        let Some(raw) = &self.raw else {
            return Ok(x.clone());
        };
        let raw = raw.0;
        self.call(op, |res, stream| unsafe {
            function(res, x.as_ptr(), raw, stream)
        })
    }

    /// Runs an mlx-c collective on the backend's stream.
    fn call(
        &self,
        op: &str,
        body: impl FnOnce(*mut mlx_sys::mlx_array, mlx_sys::mlx_stream) -> i32,
    ) -> Result<Array> {
        let stream = if self.backend.is_some_and(Backend::on_gpu) {
            Stream::gpu()
        } else {
            Stream::cpu()
        };
        // SAFETY: `res` starts empty; mlx-c fills it on success and it is
        // freed on failure.
        unsafe {
            let mut res = mlx_sys::mlx_array_new();
            match capture(|| body(&mut res, stream.as_ptr())) {
                Ok(()) => Ok(Array::from_ptr(res)),
                Err(message) => {
                    mlx_sys::mlx_array_free(res);
                    Err(op_error(op, message))
                }
            }
        }
    }
}

fn op_error(op: &str, message: String) -> DistributedError {
    DistributedError::Op {
        op: op.into(),
        message,
    }
}

/// Evaluates arrays that involve collectives, reporting a failure (a peer
/// gone, a broken connection) as a distributed error.
pub fn eval(arrays: &[&Array]) -> Result<()> {
    mlx_rs::transforms::eval(arrays.iter().copied())
        .map_err(|e| op_error("evaluating a collective", e.what().to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_group_of_one_returns_its_input() {
        let group = Group::single();
        assert_eq!((group.rank(), group.size(), group.is_main()), (0, 1, true));
        let x = Array::from_slice(&[1f32, 2.0], &[2]);
        assert_eq!(group.all_sum(&x).unwrap().as_slice::<f32>(), &[1.0, 2.0]);
        assert_eq!(
            group.all_gather(&Array::from_f32(3.0)).unwrap().shape(),
            &[1]
        );
        let error = group.send(&x, 1).unwrap_err().to_string();
        assert!(error.contains("no peer"), "{error}");
    }

    #[test]
    fn not_launched_any_gives_a_group_of_one() {
        if Backend::detect().is_none() {
            assert_eq!(Group::init(Backend::Any).unwrap().size(), 1);
        }
    }
}
