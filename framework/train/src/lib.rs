//! Training for mlx-zoo models, library first: every piece a custom
//! training loop needs is public ([`data`] to read and tokenize JSONL,
//! [`batch`] for padded batches with loss masks and a resumable order,
//! [`loss`], [`schedule`], [`optim`]), and [`Trainer`] puts them together:
//! gradient accumulation, clipping, evaluation, checkpoints that resume bit
//! for bit, and hooks for logging and stopping. Which parameters train is
//! the model's business: attach adapters (LoRA, DoRA; QLoRA on a quantized
//! base) and only they are trainable, or leave a float model unfrozen for a
//! full fine-tune.

#![warn(missing_docs)]

pub mod batch;
pub mod compiled;
pub mod data;
pub mod error;
pub mod loss;
pub mod optim;
pub mod plan;
pub mod schedule;
pub mod trainer;

pub use batch::{make_batch, make_packed_batch, pad_batch, Batch, BatchOrder, BatchPosition};
pub use compiled::{CompiledFunction, CompiledLossGrad};
pub use data::{load_dataset, DataOptions, Dataset, Example, Record};
pub use error::{Result, TrainError};
pub use loss::masked_cross_entropy;
pub use optim::{Optimizer, OptimizerKind};
pub use plan::{plan, MemoryPlan, PlanMethod, PlanSettings};
pub use schedule::{Decay, Schedule};
pub use trainer::{
    global_norm, loss_and_grad, RunSummary, StepReport, TrainConfig, TrainHooks, Trainer,
};
