//! Data-parallel building blocks on MLX's own distributed layer: a
//! [`Group`] of processes joined over one of MLX's backends (the ring over
//! TCP, MPI, NCCL on NVIDIA GPUs, JACCL over Thunderbolt RDMA), its
//! collectives on arrays (all-sum, all-gather, send, receive), a
//! [`fused::all_sum`] that reduces many arrays in a few large buffers, and
//! the hostfile formats MLX's launcher reads and writes.
//!
//! A process started by a launcher (`mlx.launch`, `mpirun`, `zoo launch`)
//! finds its rank and peers in its environment:
//!
//! ```no_run
//! use mlx_zoo_distributed::{Backend, Group};
//! # fn main() -> Result<(), mlx_zoo_distributed::DistributedError> {
//! let group = Group::init(Backend::Any)?; // a group of one when not launched
//! let x = mlx_rs::Array::from_slice(&[group.rank() as f32], &[1]);
//! let sum = group.all_sum(&x)?; // 0 + 1 + ... + (size - 1) on every rank
//! # Ok(()) }
//! ```

#![warn(missing_docs)]

pub mod backend;
pub mod error;
pub mod fused;
pub mod group;
pub mod hostfile;

pub use backend::Backend;
pub use error::DistributedError;
pub use group::Group;
