//! The trainer, usable piece by piece or whole: [`loss_and_grad`] of one
//! batch, [`Trainer::train_step`] (gradient accumulation weighted by
//! tokens, clipping by global norm, the scheduled learning rate, one
//! optimizer update), [`Trainer::evaluate`], checkpoints that resume bit for
//! bit, and [`Trainer::run`] with [`TrainHooks`] for logging, evaluation and
//! stopping. Given a [`Group`] of ranks ([`Trainer::with_group`]) it trains
//! data-parallel: each rank takes its share of every global batch, and the
//! gradients, losses and token counts are summed over the ranks in a few
//! fused buffers, so N ranks make the update one process makes on the
//! whole batch.

use crate::batch::{make_batch, make_packed_batch, pad_batch, Batch, BatchOrder, BatchPosition};
use crate::compiled::{CompiledFunction, CompiledLossGrad};
use crate::data::{Dataset, Example};
use crate::error::{Result, TrainError};
use crate::loss::masked_cross_entropy;
use crate::optim::{clip_scale, norm_of, Optimizer, OptimizerKind};
use crate::schedule::Schedule;
use mlx_rs::error::Exception;
use mlx_rs::module::{FlattenedModuleParam, ModuleParameters};
use mlx_rs::Array;
use mlx_zoo_core::CausalLm;
use mlx_zoo_distributed::{fused, Group};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::Instant;

/// Settings of a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// Sequences per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    /// Optimizer steps.
    pub iters: usize,
    /// Learning rate per step.
    pub schedule: Schedule,
    /// The optimizer.
    pub optimizer: OptimizerKind,
    /// Decoupled weight decay (AdamW) or L2 (SGD, Adafactor).
    pub weight_decay: f32,
    /// Clip gradients to this global norm.
    pub max_grad_norm: Option<f32>,
    /// Seed of the data order.
    pub seed: u64,
    /// Validation loss every this many steps (0: only at the end).
    pub eval_every: usize,
    /// Validation batches per evaluation (0: the whole set).
    pub eval_batches: usize,
    /// Checkpoint every this many steps (0: only at the end).
    pub save_every: usize,
    /// Pack each batch's examples into rows of at most this many positions
    /// instead of padding every example to the longest.
    #[serde(default)]
    pub pack: Option<usize>,
    /// Split each micro-batch into this many shards whose forward and
    /// backward passes run concurrently, each on an MLX stream of its own
    /// (on the CPU, each stream is a thread: MLX's element-wise kernels are
    /// single-threaded, so shards put every core to work). OpenBLAS gets
    /// `cores / streams` threads meanwhile. Gradients are combined weighted
    /// by tokens, as in accumulation. On a GPU the setting is ignored: one
    /// stream already fills the device.
    #[serde(default = "one_stream")]
    pub streams: usize,
    /// Compile each micro-batch's loss and gradients with MLX's `compile`
    /// (traced once per batch shape, then replayed with fused element-wise
    /// kernels and no graph building on the host). Not with several streams
    /// or adapter dropout, which train uncompiled. Padded batches are
    /// rounded up to a multiple of [`COMPILED_PAD_MULTIPLE`] positions so
    /// few shapes need a trace. Frozen weights are constants of a trace:
    /// a trainer given another model traces anew, but weights changed in
    /// place between steps (other than by the trainer) go unseen.
    #[serde(default)]
    pub compile: bool,
}

/// Padded batch lengths of a compiled run are multiples of this.
pub const COMPILED_PAD_MULTIPLE: usize = 32;

fn one_stream() -> usize {
    1
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            batch_size: 4,
            grad_accum: 1,
            iters: 100,
            schedule: Schedule::constant(2e-4),
            optimizer: OptimizerKind::AdamW,
            weight_decay: 0.0,
            max_grad_norm: Some(1.0),
            seed: 0,
            eval_every: 0,
            eval_batches: 0,
            save_every: 0,
            pack: None,
            streams: 1,
            compile: false,
        }
    }
}

impl TrainConfig {
    /// Checks the settings.
    pub fn validate(&self) -> Result<()> {
        let bad = |what: &str| Err(TrainError::InvalidSetting(what.to_string()));
        if self.batch_size == 0 {
            return bad("batch_size must be at least 1");
        }
        if self.grad_accum == 0 {
            return bad("grad_accum must be at least 1");
        }
        if !(self.schedule.peak.is_finite() && self.schedule.peak > 0.0) {
            return bad("the learning rate must be positive");
        }
        if self.max_grad_norm.is_some_and(|n| n.is_nan() || n <= 0.0) {
            return bad("max_grad_norm must be positive");
        }
        if self.pack.is_some_and(|capacity| capacity < 2) {
            return bad("packed rows need at least 2 positions");
        }
        if self.streams == 0 {
            return bad("streams must be at least 1");
        }
        Ok(())
    }
}

/// What one optimizer step did.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StepReport {
    /// Optimizer steps completed (1 after the first).
    pub step: usize,
    /// Mean loss over the step's loss tokens.
    pub loss: f32,
    /// Learning rate used.
    pub lr: f32,
    /// Global gradient norm before clipping.
    pub grad_norm: f32,
    /// Tokens fed to the model (padding included).
    pub tokens: usize,
    /// Tokens counting in the loss.
    pub loss_tokens: usize,
    /// Fed tokens per second of this step.
    pub tokens_per_second: f32,
    /// MLX memory in use after the step, bytes.
    pub active_memory: usize,
    /// MLX peak memory so far, bytes.
    pub peak_memory: usize,
    /// MLX buffer cache, bytes.
    pub cache_memory: usize,
    /// Seconds of this step spent waiting for MLX to evaluate graphs (the
    /// computation, plus the host's scheduling of it).
    pub eval_seconds: f32,
    /// The rest of the step's seconds: batching and building the graphs
    /// (forward, autodiff, update) on the host.
    pub graph_seconds: f32,
    /// Seconds of this step spent summing gradients and counts over the
    /// ranks of a data-parallel run (0 in a single process).
    pub comm_seconds: f32,
    /// Bytes this rank contributed to those sums.
    pub comm_bytes: usize,
}

/// Callbacks of [`Trainer::run`]; every method has a do-nothing default.
pub trait TrainHooks {
    /// After each optimizer step.
    fn on_step(&mut self, _report: &StepReport) {}
    /// After each evaluation.
    fn on_eval(&mut self, _step: usize, _loss: f32) {}
    /// After each checkpoint.
    fn on_checkpoint(&mut self, _step: usize, _dir: &Path) {}
    /// Polled before each step: `true` saves a checkpoint and returns.
    fn stop_requested(&self) -> bool {
        false
    }
}

impl TrainHooks for () {}

/// How [`Trainer::run`] ended.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RunSummary {
    /// Optimizer steps completed in total.
    pub steps: usize,
    /// Loss of the first step of this run.
    pub first_loss: Option<f32>,
    /// Loss of the last step.
    pub last_loss: Option<f32>,
    /// Final validation loss, if there is a validation set.
    pub valid_loss: Option<f32>,
    /// The last checkpoint written.
    pub checkpoint: Option<PathBuf>,
    /// Whether a stop was requested before the last step.
    pub interrupted: bool,
}

/// The mean loss of `batch` and its gradients with respect to the model's
/// trainable parameters.
pub fn loss_and_grad(
    model: &mut dyn CausalLm,
    batch: &Batch,
) -> Result<(f32, FlattenedModuleParam)> {
    let (loss, grads) = lazy_loss_and_grad(model, batch)?;
    mlx_rs::transforms::eval(std::iter::once(&loss).chain(grads.values()))?;
    Ok((loss.item_cast::<f32>(), grads))
}

/// [`loss_and_grad`] as a graph not yet evaluated, built on the current
/// default stream.
fn lazy_loss_and_grad(
    model: &mut dyn CausalLm,
    batch: &Batch,
) -> Result<(Array, FlattenedModuleParam)> {
    Ok(loss_and_grad_graph(
        model,
        &batch.inputs,
        &batch.targets,
        &batch.mask,
        batch.segments.as_ref(),
    )?)
}

/// The graph of the mean masked loss of `inputs` (packed rows when
/// `segments` is given) and its gradients with respect to the model's
/// trainable parameters; shared by the plain and the compiled step.
pub(crate) fn loss_and_grad_graph(
    model: &mut dyn CausalLm,
    inputs: &Array,
    targets: &Array,
    mask: &Array,
    segments: Option<&Array>,
) -> std::result::Result<(Array, FlattenedModuleParam), Exception> {
    let segments = segments.cloned();
    let loss_fn = |model: &mut &mut dyn CausalLm,
                   (inputs, targets, mask): (Array, Array, Array)|
     -> std::result::Result<Vec<Array>, Exception> {
        let logits = match &segments {
            Some(segments) => model.forward_packed(&inputs, segments),
            None => model.forward(&inputs, None),
        }
        .map_err(|e| Exception::custom(e.to_string()))?;
        let (loss, count) = masked_cross_entropy(&logits, &targets, &mask)?;
        Ok(vec![loss, count])
    };
    let mut value_and_grad = mlx_rs::nn::value_and_grad(loss_fn);
    let mut model = model;
    let (values, grads) =
        value_and_grad(&mut model, (inputs.clone(), targets.clone(), mask.clone()))?;
    let loss = values
        .into_iter()
        .next()
        .ok_or_else(|| Exception::custom("the loss function returned nothing"))?;
    Ok((loss, grads))
}

/// The global L2 norm of `gradients`, summed in name order (a hash map's
/// order changes between runs, and with it the rounding: resumed runs must
/// repeat the same bits).
pub fn global_norm(gradients: &FlattenedModuleParam) -> Result<f32> {
    Ok(lazy_global_norm(gradients)?.item_cast::<f32>())
}

/// [`global_norm`] as a graph not yet evaluated.
fn lazy_global_norm(gradients: &FlattenedModuleParam) -> Result<Array> {
    let mut names: Vec<&Rc<str>> = gradients.keys().collect();
    names.sort();
    Ok(norm_of(names.into_iter().map(|name| &gradients[name]))?)
}

/// A training run's optimizer, schedule position and data position.
pub struct Trainer {
    config: TrainConfig,
    optimizer: Optimizer,
    step: usize,
    order: BatchOrder,
    pad_id: u32,
    last_checkpoint: Option<PathBuf>,
    /// One MLX stream per shard (none when the run uses one stream).
    streams: Vec<mlx_rs::Stream>,
    /// Time the current step has spent in evaluations.
    waited: std::time::Duration,
    /// The compiled loss and gradients, when the run compiles.
    compiled: Option<CompiledLossGrad>,
    /// The compiled update (AdamW), when the run compiles.
    compiled_update: CompiledFunction,
    /// The model the compiled traces were made for (its address): its
    /// frozen weights are constants of the traces, so another model needs
    /// new ones.
    compiled_for: usize,
    /// When the last pipelined step completed (steps overlap, so a step's
    /// time runs from there).
    last_completed: Option<Instant>,
    /// The ranks of a data-parallel run (a group of one otherwise).
    group: Group,
    /// Time and bytes of the current step's communication.
    comm: (std::time::Duration, usize),
}

/// What a checkpoint records besides the arrays.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct CheckpointState {
    step: usize,
    position: BatchPosition,
    train_examples: usize,
    config: TrainConfig,
}

impl Trainer {
    /// A trainer at step 0 for `data`; `pad_id` fills short sequences
    /// (masked out, any id works).
    pub fn new(config: TrainConfig, data: &Dataset, pad_id: u32) -> Result<Self> {
        config.validate()?;
        let optimizer =
            Optimizer::new(config.optimizer, config.schedule.lr(0), config.weight_decay)?;
        let order = BatchOrder::new(data.train.len(), config.batch_size, config.seed)?;
        // Concurrent shards only help MLX's CPU backend (its element-wise
        // kernels are single-threaded); a GPU runs one stream's work wide.
        let streams = if config.streams > 1 && mlx_zoo_core::runtime::on_cpu() {
            let device = mlx_rs::Device::try_default()?;
            (0..config.streams)
                .map(|_| mlx_rs::Stream::new_with_device(&device))
                .collect()
        } else {
            Vec::new()
        };
        Ok(Self {
            config,
            optimizer,
            step: 0,
            order,
            pad_id,
            last_checkpoint: None,
            streams,
            waited: std::time::Duration::ZERO,
            compiled: None,
            compiled_update: CompiledFunction::new(),
            compiled_for: 0,
            last_completed: None,
            group: Group::single(),
            comm: (std::time::Duration::ZERO, 0),
        })
    }

    /// The trainer of one rank of a data-parallel run over `group`:
    /// `batch_size` is the global batch, which the ranks split in rank
    /// order. Every rank must run the same model, data and settings.
    pub fn with_group(mut self, group: Group) -> Result<Self> {
        if self.config.batch_size % group.size() != 0 {
            return Err(TrainError::InvalidSetting(format!(
                "the batch size {} is the global batch and must be divisible by the {} ranks",
                self.config.batch_size,
                group.size()
            )));
        }
        self.group = group;
        Ok(self)
    }

    /// The ranks this trainer trains with.
    pub fn group(&self) -> &Group {
        &self.group
    }

    /// This rank's share of a global batch's example indices (all of them
    /// in a single process): contiguous, in rank order.
    fn my_share(&self, indices: Vec<usize>) -> Vec<usize> {
        let size = self.group.size();
        if size == 1 {
            return indices;
        }
        let share = indices.len().div_ceil(size);
        indices
            .into_iter()
            .skip(share * self.group.rank())
            .take(share)
            .collect()
    }

    /// The run's settings.
    pub fn config(&self) -> &TrainConfig {
        &self.config
    }

    /// Whether the steps on `model` run compiled: the run asks for it, on
    /// one stream, and no adapter uses dropout.
    pub fn will_compile(&self, model: &mut dyn CausalLm) -> Result<bool> {
        Ok(self.config.compile
            && self.streams.is_empty()
            && !mlx_zoo_core::adapter::adapter_dropout_in_use(model)?)
    }

    /// Whether the steps so far ran compiled.
    pub fn compiled(&self) -> bool {
        self.compiled.is_some()
    }

    /// Optimizer steps completed.
    pub fn step(&self) -> usize {
        self.step
    }

    /// The next training batch in the seeded order.
    pub fn next_batch(&mut self, data: &Dataset) -> Result<Batch> {
        let indices = self.order.next_indices();
        let indices = self.my_share(indices);
        let examples: Vec<&Example> = indices.iter().map(|&i| &data.train[i]).collect();
        self.batch_of(&examples)
    }

    /// The next micro-batch in the seeded order, as one batch per stream
    /// (contiguous shares of its examples; fewer when it is short).
    fn next_shards(&mut self, data: &Dataset) -> Result<Vec<Batch>> {
        let indices = self.order.next_indices();
        let indices = self.my_share(indices);
        let examples: Vec<&Example> = indices.iter().map(|&i| &data.train[i]).collect();
        let shards = self.streams.len().clamp(1, examples.len().max(1));
        examples
            .chunks(examples.len().div_ceil(shards).max(1))
            .map(|share| self.batch_of(share))
            .collect()
    }

    /// `examples` padded, or packed when the run packs; a compiled run pads
    /// to a multiple of [`COMPILED_PAD_MULTIPLE`].
    fn batch_of(&self, examples: &[&Example]) -> Result<Batch> {
        match self.config.pack {
            Some(capacity) => make_packed_batch(examples, self.pad_id, capacity),
            None if self.compiled.is_some() => pad_batch(
                make_batch(examples, self.pad_id)?,
                COMPILED_PAD_MULTIPLE,
                self.pad_id,
            ),
            None => make_batch(examples, self.pad_id),
        }
    }

    /// One optimizer step: `grad_accum` micro-batches, their gradients
    /// weighted by loss tokens, clipped, applied with the scheduled rate.
    /// A non-finite loss stops before anything is applied.
    pub fn train_step(&mut self, model: &mut dyn CausalLm, data: &Dataset) -> Result<StepReport> {
        let started = Instant::now();
        self.waited = std::time::Duration::ZERO;
        self.begin_step(model, self.step)?;
        // Streams share the cores with OpenBLAS's threads: one each.
        let _blas = (self.streams.len() > 1).then(|| {
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            mlx_zoo_core::runtime::limit_blas_threads(cores / self.streams.len())
        });
        let result = self.accumulate(model, data);
        mlx_zoo_core::adapter::set_adapter_training(model, false)?;
        let (accumulated, loss_sum, loss_tokens, tokens) = result?;
        let (accumulated, loss_sum, loss_tokens, tokens) =
            self.sum_over_ranks(model, accumulated, loss_sum, loss_tokens, tokens)?;
        let loss = (loss_sum / loss_tokens.max(1) as f64) as f32;
        if loss_tokens == 0 {
            return Err(no_loss_tokens());
        }
        if !loss.is_finite() {
            return Err(TrainError::NonFiniteLoss {
                step: self.step + 1,
                loss,
                last_checkpoint: self.last_checkpoint.clone(),
            });
        }
        let lr = self.config.schedule.lr(self.step);
        let grad_norm = self.apply(model, accumulated, loss_tokens, lr)?;
        self.finish_step(model, grad_norm, loss_sum, loss_tokens, tokens, lr, started)
    }

    /// What every step does first: MLX's key seeded for the step with
    /// `index` steps before it (adapter dropout draws the same masks in a
    /// resumed run), adapters in training mode, and the compiled traces
    /// made (anew for another model) when the run compiles.
    fn begin_step(&mut self, model: &mut dyn CausalLm, index: usize) -> Result<()> {
        // Ranks other than 0 draw other dropout masks (rank 0 draws those
        // of a single process).
        let rank_salt = (self.group.rank() as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        mlx_rs::random::seed(self.config.seed.wrapping_add(index as u64) ^ rank_salt)?;
        mlx_zoo_core::adapter::set_adapter_training(model, true)?;
        let address = model as *const dyn CausalLm as *const () as usize;
        if self.compiled.is_some() && self.compiled_for != address {
            self.compiled = None;
            self.compiled_update = CompiledFunction::new();
        }
        if self.compiled.is_none() && self.will_compile(model)? {
            self.compiled = Some(CompiledLossGrad::new());
            self.compiled_for = address;
        }
        Ok(())
    }

    /// The micro-batches of one step on this rank: token-weighted gradient
    /// sums (none when no micro-batch had loss tokens), the loss sum,
    /// counted and fed tokens. A single process stops at the first
    /// non-finite micro-batch; the ranks of a data-parallel run go on to
    /// the sum over ranks, where all of them see it.
    fn accumulate(
        &mut self,
        model: &mut dyn CausalLm,
        data: &Dataset,
    ) -> Result<(Option<FlattenedModuleParam>, f64, usize, usize)> {
        let mut accumulated: Option<FlattenedModuleParam> = None;
        let (mut loss_sum, mut loss_tokens, mut tokens) = (0f64, 0usize, 0usize);
        for _ in 0..self.config.grad_accum {
            let shards = self.next_shards(data)?;
            tokens += shards.iter().map(|b| b.inputs.size()).sum::<usize>();
            let counted: usize = shards.iter().map(|b| b.loss_tokens).sum();
            if counted == 0 {
                continue;
            }
            // Every shard's graph on its own stream, then one evaluation.
            let mut losses = Vec::new();
            let mut summed = accumulated.take();
            for (index, shard) in shards.iter().enumerate() {
                if shard.loss_tokens == 0 {
                    continue;
                }
                let (loss, grads) = match (self.streams.get(index), &self.compiled) {
                    (Some(stream), _) => {
                        mlx_rs::with_stream(stream, || lazy_loss_and_grad(model, shard))?
                    }
                    (None, Some(compiled)) => compiled.loss_and_grad(model, shard)?,
                    (None, None) => lazy_loss_and_grad(model, shard)?,
                };
                let weight = Array::from_f32(shard.loss_tokens as f32);
                summed = Some(weigh(&grads, &weight, summed)?);
                losses.push((loss, shard.loss_tokens));
            }
            let Some(summed) = summed else { continue };
            let waiting = Instant::now();
            mlx_rs::transforms::eval(losses.iter().map(|(l, _)| l).chain(summed.values()))?;
            self.waited += waiting.elapsed();
            let batch_sum = weighted_loss_sum(&losses);
            let loss = (batch_sum / counted as f64) as f32;
            if !loss.is_finite() && self.group.size() == 1 {
                return Err(TrainError::NonFiniteLoss {
                    step: self.step + 1,
                    loss,
                    last_checkpoint: self.last_checkpoint.clone(),
                });
            }
            loss_sum += batch_sum;
            loss_tokens += counted;
            accumulated = Some(summed);
        }
        Ok((accumulated, loss_sum, loss_tokens, tokens))
    }

    /// The step's gradient sums, loss sum and token counts summed over the
    /// ranks (as they are in a single process), in fused buffers: one
    /// all-sum per bucket of [`fused::DEFAULT_BUCKET_BYTES`], the counts
    /// riding in the float32 one. A rank without loss tokens contributes
    /// zeros. Records the time and bytes in the step's report.
    fn sum_over_ranks(
        &mut self,
        model: &mut dyn CausalLm,
        accumulated: Option<FlattenedModuleParam>,
        loss_sum: f64,
        loss_tokens: usize,
        tokens: usize,
    ) -> Result<(FlattenedModuleParam, f64, usize, usize)> {
        self.comm = (std::time::Duration::ZERO, 0);
        if self.group.size() == 1 {
            let accumulated = accumulated.ok_or_else(no_loss_tokens)?;
            return Ok((accumulated, loss_sum, loss_tokens, tokens));
        }
        let started = Instant::now();
        let accumulated = match accumulated {
            Some(sums) => sums,
            None => trainable_snapshot(model)
                .into_iter()
                .map(|(k, v)| Ok((k, mlx_rs::ops::zeros_like(&v)?)))
                .collect::<Result<_, Exception>>()?,
        };
        let mut names: Vec<Rc<str>> = accumulated.keys().cloned().collect();
        names.sort();
        let mut arrays: Vec<Array> = names.iter().map(|n| accumulated[n].clone()).collect();
        arrays.push(Array::from_slice(
            &[loss_sum as f32, loss_tokens as f32, tokens as f32],
            &[3],
        ));
        let (mut sums, stats) = fused::all_sum(&self.group, &arrays, fused::DEFAULT_BUCKET_BYTES)?;
        mlx_zoo_distributed::group::eval(&sums.iter().collect::<Vec<_>>())?;
        let counts = sums.pop().expect("the counts were pushed last");
        let counts = counts.as_slice::<f32>();
        self.comm = (started.elapsed(), stats.bytes);
        self.waited += started.elapsed();
        Ok((
            names.into_iter().zip(sums).collect(),
            counts[0] as f64,
            counts[1].round() as usize,
            counts[2].round() as usize,
        ))
    }

    /// Averages, clips and applies accumulated gradients at rate `lr`: one
    /// compiled graph when the run compiles with AdamW, else op by op.
    /// Returns the norm before clipping, lazily.
    fn apply(
        &mut self,
        model: &mut dyn CausalLm,
        accumulated: FlattenedModuleParam,
        loss_tokens: usize,
        lr: f32,
    ) -> Result<Array> {
        self.optimizer.set_lr(lr);
        let mut model_ref = model;
        let compiled_norm = match self.compiled {
            Some(_) => self.optimizer.compiled_step(
                &self.compiled_update,
                &mut model_ref,
                &accumulated,
                loss_tokens as f32,
                self.config.max_grad_norm,
            )?,
            None => None,
        };
        match compiled_norm {
            Some(norm) => Ok(norm),
            None => self.update_uncompiled(model_ref, accumulated, loss_tokens),
        }
    }

    /// Builds the whole graph of the step with `index` steps before it and
    /// queues it (MLX's `async_eval`) without waiting: loss, gradients and
    /// update of a compiled run. The host then builds the next step while
    /// the device computes this one; [`Self::complete_step`] waits for it.
    fn launch_step(
        &mut self,
        model: &mut dyn CausalLm,
        data: &Dataset,
        index: usize,
    ) -> Result<InFlight> {
        let launched = Instant::now();
        let before = (trainable_snapshot(model), self.optimizer.clone());
        self.begin_step(model, index)?;
        let built = self.build_lazy_step(model, data, index);
        mlx_zoo_core::adapter::set_adapter_training(model, false)?;
        let (losses, grad_norm, loss_tokens, tokens, lr) = built?;
        let mut outputs: Vec<Array> = trainable_snapshot(model).into_values().collect();
        outputs.extend(self.optimizer.state_arrays()?);
        outputs.push(grad_norm.clone());
        outputs.extend(losses.iter().map(|(l, _)| l.clone()));
        mlx_rs::transforms::async_eval(outputs.iter())?;
        Ok(InFlight {
            losses,
            grad_norm,
            outputs,
            loss_tokens,
            tokens,
            lr,
            before,
            launched,
        })
    }

    /// The graph of one step, nothing waited for: the micro-batches' losses
    /// (with their loss tokens), the norm, counted and fed tokens, the rate.
    #[allow(clippy::type_complexity)]
    fn build_lazy_step(
        &mut self,
        model: &mut dyn CausalLm,
        data: &Dataset,
        index: usize,
    ) -> Result<(Vec<(Array, usize)>, Array, usize, usize, f32)> {
        let mut summed: Option<FlattenedModuleParam> = None;
        let mut losses = Vec::new();
        let (mut loss_tokens, mut tokens) = (0usize, 0usize);
        for _ in 0..self.config.grad_accum {
            let batch = self.next_batch(data)?;
            tokens += batch.inputs.size();
            if batch.loss_tokens == 0 {
                continue;
            }
            let (loss, grads) = match &self.compiled {
                Some(compiled) => compiled.loss_and_grad(model, &batch)?,
                None => lazy_loss_and_grad(model, &batch)?,
            };
            let weight = Array::from_f32(batch.loss_tokens as f32);
            let sums = weigh(&grads, &weight, summed.take())?;
            if self.config.grad_accum > 1 {
                // Bounds the graph (and the activations alive at once) to
                // one micro-batch, still without waiting.
                mlx_rs::transforms::async_eval(sums.values().chain(std::iter::once(&loss)))?;
            }
            summed = Some(sums);
            losses.push((loss, batch.loss_tokens));
            loss_tokens += batch.loss_tokens;
        }
        let Some(summed) = summed else {
            return Err(no_loss_tokens());
        };
        let lr = self.config.schedule.lr(index);
        let grad_norm = self.apply(model, summed, loss_tokens, lr)?;
        Ok((losses, grad_norm, loss_tokens, tokens, lr))
    }

    /// Waits for a launched step and reports it. A non-finite loss puts the
    /// trainable parameters and the optimizer back as they were before the
    /// step (a step launched after it is dropped with them) and stops.
    fn complete_step(&mut self, model: &mut dyn CausalLm, flight: InFlight) -> Result<StepReport> {
        let waiting = Instant::now();
        mlx_rs::transforms::eval(flight.outputs.iter())?;
        let waited = waiting.elapsed();
        let loss_sum = weighted_loss_sum(&flight.losses);
        let loss = (loss_sum / flight.loss_tokens as f64) as f32;
        if !loss.is_finite() {
            let (params, optimizer) = flight.before;
            let mut model_ref = model;
            ModuleParameters::update_flattened(&mut model_ref, params);
            self.optimizer = optimizer;
            return Err(TrainError::NonFiniteLoss {
                step: self.step + 1,
                loss,
                last_checkpoint: self.last_checkpoint.clone(),
            });
        }
        self.step += 1;
        // Steps overlap: a step's time runs from the end of the one before.
        let now = Instant::now();
        let from = match self.last_completed {
            Some(previous) if previous > flight.launched => previous,
            _ => flight.launched,
        };
        self.last_completed = Some(now);
        let seconds = now.duration_since(from).as_secs_f32().max(1e-9);
        let memory = mlx_zoo_core::runtime::memory();
        Ok(StepReport {
            step: self.step,
            loss,
            lr: flight.lr,
            grad_norm: flight.grad_norm.item_cast::<f32>(),
            tokens: flight.tokens,
            loss_tokens: flight.loss_tokens,
            tokens_per_second: flight.tokens as f32 / seconds,
            active_memory: memory.active,
            peak_memory: memory.peak,
            cache_memory: memory.cache,
            eval_seconds: waited.as_secs_f32().min(seconds),
            graph_seconds: (seconds - waited.as_secs_f32()).max(0.0),
            comm_seconds: 0.0,
            comm_bytes: 0,
        })
    }

    /// Whether the hooks ask to stop; in a data-parallel run, whether any
    /// rank's do (every rank stops at the same step).
    fn stop_agreed(&self, hooks: &dyn TrainHooks) -> Result<bool> {
        let local = hooks.stop_requested();
        if self.group.size() == 1 {
            return Ok(local);
        }
        let votes = self
            .group
            .all_sum(&Array::from_f32(if local { 1.0 } else { 0.0 }))?;
        mlx_zoo_distributed::group::eval(&[&votes])?;
        Ok(votes.item_cast::<f32>() > 0.0)
    }

    /// Whether [`Self::run`] evaluates or checkpoints after step `number`.
    fn pauses_after(&self, number: usize) -> bool {
        let every = |n: usize| n > 0 && number % n == 0;
        number >= self.config.iters
            || every(self.config.eval_every)
            || every(self.config.save_every)
    }

    /// The optimizer's own update, op by op; returns the norm before
    /// clipping (lazily).
    fn update_uncompiled(
        &mut self,
        model: &mut dyn CausalLm,
        accumulated: FlattenedModuleParam,
        loss_tokens: usize,
    ) -> Result<Array> {
        let total = Array::from_f32(loss_tokens as f32);
        let mut grads: FlattenedModuleParam = accumulated
            .into_iter()
            .map(|(k, g)| Ok((k, g.divide(&total)?)))
            .collect::<Result<_, Exception>>()?;
        let grad_norm = lazy_global_norm(&grads)?;
        if let Some(max) = self.config.max_grad_norm {
            let scale = clip_scale(&grad_norm, max)?;
            grads = grads
                .into_iter()
                .map(|(k, g)| Ok((k, g.multiply(&scale)?)))
                .collect::<Result<_, Exception>>()?;
        }
        let mut model_ref = model;
        self.optimizer.update(&mut model_ref, &grads)?;
        Ok(grad_norm)
    }

    /// Evaluates the updated parameters, the optimizer state and the norm,
    /// and reports the step.
    #[allow(clippy::too_many_arguments)]
    fn finish_step(
        &mut self,
        model_ref: &mut dyn CausalLm,
        grad_norm: Array,
        loss_sum: f64,
        loss_tokens: usize,
        tokens: usize,
        lr: f32,
        started: Instant,
    ) -> Result<StepReport> {
        let mut updated: Vec<Array> = model_ref
            .trainable_parameters()
            .flatten()
            .values()
            .map(|a| (*a).clone())
            .collect();
        updated.extend(self.optimizer.state_arrays()?);
        updated.push(grad_norm.clone());
        let waiting = Instant::now();
        mlx_rs::transforms::eval(updated.iter())?;
        self.waited += waiting.elapsed();
        let grad_norm = grad_norm.item_cast::<f32>();
        self.step += 1;
        let memory = mlx_zoo_core::runtime::memory();
        let seconds = started.elapsed().as_secs_f32().max(1e-9);
        Ok(StepReport {
            step: self.step,
            loss: (loss_sum / loss_tokens as f64) as f32,
            lr,
            grad_norm,
            tokens,
            loss_tokens,
            tokens_per_second: tokens as f32 / seconds,
            active_memory: memory.active,
            peak_memory: memory.peak,
            cache_memory: memory.cache,
            eval_seconds: self.waited.saturating_sub(self.comm.0).as_secs_f32(),
            graph_seconds: (seconds - self.waited.as_secs_f32()).max(0.0),
            comm_seconds: self.comm.0.as_secs_f32(),
            comm_bytes: self.comm.1,
        })
    }

    /// The mean loss over `examples` (token-weighted), in batches of the
    /// run's size; at most `max_batches` batches when non-zero. Each rank
    /// of a data-parallel run takes its share of every batch and the sums
    /// are added over the ranks.
    pub fn evaluate(
        &self,
        model: &mut dyn CausalLm,
        examples: &[Example],
        max_batches: usize,
    ) -> Result<Option<f32>> {
        let (mut sum, mut count) = (0f64, 0f64);
        for (index, chunk) in examples.chunks(self.config.batch_size).enumerate() {
            if max_batches > 0 && index >= max_batches {
                break;
            }
            let share = self.my_share((0..chunk.len()).collect());
            if share.is_empty() {
                continue;
            }
            let refs: Vec<&Example> = share.iter().map(|&i| &chunk[i]).collect();
            let batch = self.batch_of(&refs)?;
            let logits = match &batch.segments {
                Some(segments) => model.forward_packed(&batch.inputs, segments)?,
                None => model.forward(&batch.inputs, None)?,
            };
            let (loss, n) = masked_cross_entropy(&logits, &batch.targets, &batch.mask)?;
            let n = n.item_cast::<f32>() as f64;
            sum += loss.item_cast::<f32>() as f64 * n;
            count += n;
        }
        if self.group.size() > 1 {
            let mine = Array::from_slice(&[sum as f32, count as f32], &[2]);
            let total = self.group.all_sum(&mine)?;
            mlx_zoo_distributed::group::eval(&[&total])?;
            let total = total.as_slice::<f32>();
            (sum, count) = (total[0] as f64, total[1] as f64);
        }
        Ok((count > 0.0).then(|| (sum / count) as f32))
    }

    /// Writes `dir/step-NNNNNN/` (the trainable parameters, the optimizer
    /// state, the step and data position) through a temporary directory
    /// renamed into place, and returns its path. In a data-parallel run
    /// only rank 0 writes (every rank holds the same state); the others
    /// return the path it writes.
    pub fn save_checkpoint(&mut self, model: &mut dyn CausalLm, dir: &Path) -> Result<PathBuf> {
        let target = dir.join(format!("step-{:06}", self.step));
        if !self.group.is_main() {
            self.last_checkpoint = Some(target.clone());
            return Ok(target);
        }
        let temp = dir.join(format!(".step-{:06}.tmp", self.step));
        let io = |path: &Path| TrainError::io(path.to_path_buf());
        if temp.exists() {
            std::fs::remove_dir_all(&temp).map_err(io(&temp))?;
        }
        std::fs::create_dir_all(&temp).map_err(io(&temp))?;
        let params: Vec<(Rc<str>, Array)> = model
            .trainable_parameters()
            .flatten()
            .into_iter()
            .map(|(k, v)| (k, v.clone()))
            .collect();
        let trainable = temp.join("trainable.safetensors");
        Array::save_safetensors(params, None, &trainable).map_err(|e| {
            TrainError::BadCheckpoint {
                path: trainable.clone(),
                reason: format!("cannot write: {e}"),
            }
        })?;
        self.optimizer
            .save_state(&temp.join("optimizer.safetensors"))?;
        let state = CheckpointState {
            step: self.step,
            position: self.order.position(),
            train_examples: self.order.len(),
            config: self.config.clone(),
        };
        let json = serde_json::to_string_pretty(&state).map_err(|e| TrainError::BadCheckpoint {
            path: temp.clone(),
            reason: e.to_string(),
        })?;
        std::fs::write(temp.join("trainer.json"), json).map_err(io(&temp))?;
        // Durable before it is visible: every file, then the folder.
        for name in [
            "trainable.safetensors",
            "optimizer.safetensors",
            "trainer.json",
            "",
        ] {
            let path = temp.join(name);
            sync_path(&path).map_err(io(&path))?;
        }
        // A checkpoint of the same step is replaced without a moment with
        // none: the old one moves aside, the new one takes its name, then
        // the old one goes.
        let aside = dir.join(format!(".step-{:06}.old", self.step));
        if aside.exists() {
            std::fs::remove_dir_all(&aside).map_err(io(&aside))?;
        }
        let replaced = target.exists();
        if replaced {
            std::fs::rename(&target, &aside).map_err(io(&target))?;
        }
        std::fs::rename(&temp, &target).map_err(io(&target))?;
        sync_path(dir).map_err(io(dir))?;
        if replaced {
            std::fs::remove_dir_all(&aside).map_err(io(&aside))?;
        }
        self.last_checkpoint = Some(target.clone());
        Ok(target)
    }

    /// Restores a checkpoint written by [`Trainer::save_checkpoint`]: the
    /// model's trainable parameters (every name must match), the optimizer
    /// state, the step and the data position. The run's data and batch size
    /// must be those of the checkpoint.
    pub fn resume(&mut self, model: &mut dyn CausalLm, checkpoint: &Path) -> Result<()> {
        let bad = |reason: String| TrainError::BadCheckpoint {
            path: checkpoint.to_path_buf(),
            reason,
        };
        let state_path = checkpoint.join("trainer.json");
        let text = std::fs::read_to_string(&state_path).map_err(TrainError::io(&state_path))?;
        let state: CheckpointState =
            serde_json::from_str(&text).map_err(|e| bad(format!("trainer.json: {e}")))?;
        if state.train_examples != self.order.len() {
            return Err(bad(format!(
                "it was written for {} training examples, this run has {}",
                state.train_examples,
                self.order.len()
            )));
        }
        if state.config.batch_size != self.config.batch_size
            || state.config.optimizer != self.config.optimizer
        {
            return Err(bad(format!(
                "it was written with batch size {} and {:?}, this run uses {} and {:?}",
                state.config.batch_size,
                state.config.optimizer,
                self.config.batch_size,
                self.config.optimizer
            )));
        }
        let path = checkpoint.join("trainable.safetensors");
        let saved = Array::load_safetensors(&path)
            .map_err(|e| bad(format!("trainable.safetensors: {e}")))?;
        let expected: Vec<String> = model
            .trainable_parameters()
            .flatten()
            .iter()
            .map(|(k, v)| format!("{k} {:?}", v.shape()))
            .collect();
        let mut found: Vec<String> = saved
            .iter()
            .map(|(k, v)| format!("{k} {:?}", v.shape()))
            .collect();
        let mut expected_sorted = expected.clone();
        expected_sorted.sort();
        found.sort();
        if expected_sorted != found {
            let missing: Vec<&String> = expected_sorted
                .iter()
                .filter(|e| !found.contains(e))
                .collect();
            let extra: Vec<&String> = found
                .iter()
                .filter(|f| !expected_sorted.contains(f))
                .collect();
            return Err(bad(format!(
                "its parameters do not fit the model's trainable ones: missing {missing:?}, unexpected {extra:?}"
            )));
        }
        let mut model_ref = model;
        ModuleParameters::update_flattened(
            &mut model_ref,
            saved
                .into_iter()
                .map(|(k, v)| (Rc::from(k.as_str()), v))
                .collect(),
        );
        self.optimizer
            .load_state(&checkpoint.join("optimizer.safetensors"))?;
        self.step = state.step;
        self.order = BatchOrder::at(self.order.len(), self.config.batch_size, state.position)?;
        self.last_checkpoint = Some(checkpoint.to_path_buf());
        Ok(())
    }

    /// Trains until `config.iters` steps are done (or a stop is requested),
    /// evaluating and checkpointing into `checkpoints` as configured, with a
    /// final evaluation and checkpoint.
    pub fn run(
        &mut self,
        model: &mut dyn CausalLm,
        data: &Dataset,
        checkpoints: &Path,
        hooks: &mut dyn TrainHooks,
    ) -> Result<RunSummary> {
        let mut summary = RunSummary {
            steps: self.step,
            first_loss: None,
            last_loss: None,
            valid_loss: None,
            checkpoint: self.last_checkpoint.clone(),
            interrupted: false,
        };
        // A compiled run pipelines its steps: the next step's graph is built
        // and queued while the device computes the current one, except
        // before an evaluation, a checkpoint, the end or a stop, which need
        // the model as of the step that completed.
        // Data-parallel steps wait for the sum over ranks each step.
        let pipelined = self.will_compile(model)? && self.group.size() == 1;
        let mut in_flight: Option<InFlight> = None;
        self.last_completed = None;
        while self.step < self.config.iters {
            if in_flight.is_none() && self.stop_agreed(hooks)? {
                summary.interrupted = true;
                break;
            }
            let report = if pipelined {
                let flight = match in_flight.take() {
                    Some(flight) => flight,
                    None => self.launch_step(model, data, self.step)?,
                };
                let number = self.step + 1;
                if !self.pauses_after(number) && !hooks.stop_requested() {
                    in_flight = Some(self.launch_step(model, data, number)?);
                }
                self.complete_step(model, flight)?
            } else {
                self.train_step(model, data)?
            };
            summary.first_loss.get_or_insert(report.loss);
            summary.last_loss = Some(report.loss);
            hooks.on_step(&report);
            if in_flight.is_some() {
                continue;
            }
            let step = self.step;
            let last = step == self.config.iters;
            if !last && self.config.eval_every > 0 && step % self.config.eval_every == 0 {
                if let Some(loss) = self.evaluate(model, &data.valid, self.config.eval_batches)? {
                    hooks.on_eval(step, loss);
                }
            }
            if !last && self.config.save_every > 0 && step % self.config.save_every == 0 {
                let dir = self.save_checkpoint(model, checkpoints)?;
                hooks.on_checkpoint(step, &dir);
            }
        }
        if let Some(loss) = self.evaluate(model, &data.valid, self.config.eval_batches)? {
            hooks.on_eval(self.step, loss);
            summary.valid_loss = Some(loss);
        }
        if self.last_checkpoint.as_deref()
            != Some(&checkpoints.join(format!("step-{:06}", self.step)))
        {
            let dir = self.save_checkpoint(model, checkpoints)?;
            hooks.on_checkpoint(self.step, &dir);
        }
        summary.steps = self.step;
        summary.checkpoint = self.last_checkpoint.clone();
        Ok(summary)
    }
}

/// A step built and queued but not yet waited for (see
/// [`Trainer::launch_step`]).
struct InFlight {
    /// Each micro-batch's mean loss (lazy) and its loss tokens.
    losses: Vec<(Array, usize)>,
    /// The gradient norm before clipping (lazy).
    grad_norm: Array,
    /// Everything the step computes: updated parameters, optimizer state,
    /// norm and losses.
    outputs: Vec<Array>,
    loss_tokens: usize,
    tokens: usize,
    lr: f32,
    /// The trainable parameters and the optimizer before the step.
    before: (FlattenedModuleParam, Optimizer),
    launched: Instant,
}

/// The model's trainable parameters as they are now (the arrays are shared).
fn trainable_snapshot(model: &mut dyn CausalLm) -> FlattenedModuleParam {
    model
        .trainable_parameters()
        .flatten()
        .into_iter()
        .map(|(k, v)| (k, v.clone()))
        .collect()
}

/// `sum(loss * tokens)` over evaluated micro-batch losses.
fn weighted_loss_sum(losses: &[(Array, usize)]) -> f64 {
    losses
        .iter()
        .map(|(l, n)| l.item_cast::<f32>() as f64 * *n as f64)
        .sum()
}

fn no_loss_tokens() -> TrainError {
    TrainError::InvalidSetting("a whole step of batches had no loss tokens".into())
}

/// `acc + grads * weight`, key by key.
fn weigh(
    grads: &FlattenedModuleParam,
    weight: &Array,
    acc: Option<FlattenedModuleParam>,
) -> Result<FlattenedModuleParam> {
    let mut out = FlattenedModuleParam::new();
    for (key, g) in grads {
        let scaled = g.multiply(weight)?;
        let value = match acc.as_ref().and_then(|a| a.get(key)) {
            Some(previous) => previous.add(&scaled)?,
            None => scaled,
        };
        out.insert(key.clone(), value);
    }
    Ok(out)
}

/// Flushes a file or a folder (its entries) to the disk.
fn sync_path(path: &Path) -> std::io::Result<()> {
    std::fs::File::open(path)?.sync_all()
}
