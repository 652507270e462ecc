//! `zoo finetune`: LoRA, QLoRA, DoRA or full fine-tuning of a model on JSONL
//! data, with a progress line (loss, tokens/s, memory, ETA), `metrics.jsonl`,
//! checkpoints, `--resume`, a clean stop on Ctrl-C (checkpoint first), and
//! at the end the adapter in both PEFT and mlx-lm formats (or the whole
//! model for a full fine-tune).

use anyhow::{bail, Context, Result};
use mlx_zoo::adapter::{AdapterSettings, AdapterTargets};
use mlx_zoo::loader::{self, LoadOptions};
use mlx_zoo::train::{
    load_dataset, DataOptions, Decay, OptimizerKind, Schedule, StepReport, TrainConfig, TrainHooks,
    Trainer,
};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// What is trained.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TrainType {
    /// LoRA adapters on a float base.
    Lora,
    /// LoRA adapters on a base quantized at load (--q-bits).
    Qlora,
    /// DoRA adapters (magnitude + direction).
    Dora,
    /// Every float parameter.
    Full,
}

/// The options `zoo finetune` and `zoo plan` share: what trains, the
/// quantized base, the adapters' rank and targets, the batch shape, the
/// optimizer and gradient checkpointing.
#[derive(Debug, Clone, clap::Args)]
pub struct RunShape {
    /// What to train.
    #[arg(long, value_enum, default_value = "lora")]
    pub train_type: TrainType,
    /// Bits of the quantized base (qlora).
    #[arg(long, default_value_t = 4)]
    pub q_bits: u8,
    /// Group size of the quantized base (qlora).
    #[arg(long, default_value_t = 64)]
    pub q_group_size: usize,
    /// Adapter rank.
    #[arg(long, default_value_t = 16)]
    pub lora_rank: usize,
    /// Target modules, comma-separated (default: the architecture's).
    #[arg(long, value_delimiter = ',')]
    pub lora_targets: Vec<String>,
    /// Sequences per micro-batch.
    #[arg(long, default_value_t = 4)]
    pub batch_size: usize,
    /// Longest sequence in tokens (longer ones are cut, and counted).
    #[arg(long, default_value_t = 512)]
    pub max_seq_len: usize,
    /// Optimizer: adamw, sgd or adafactor.
    #[arg(long, default_value = "adamw")]
    pub optimizer: String,
    /// Recompute each block's activations in the backward pass instead of
    /// keeping them: less memory, one more forward pass per step (measured:
    /// steps about 1.5x as long).
    #[arg(long)]
    pub grad_checkpoint: bool,
    /// Compute dtype of the base model's weights and activations: f32, f16
    /// or bf16 (adapter weights and optimizer state stay float32). bf16 is
    /// what GPUs are fast at and what mlx-lm trains a bfloat16 checkpoint in.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
}

/// Arguments of `zoo finetune`.
#[derive(Debug, Clone, clap::Args)]
pub struct FinetuneArgs {
    /// A model directory or a repo id (org/name@revision).
    pub model: PathBuf,
    /// A JSONL file or a directory with train.jsonl (and valid.jsonl).
    #[arg(long)]
    pub data: PathBuf,
    /// Where adapters, checkpoints and metrics.jsonl go.
    #[arg(long, default_value = "finetuned")]
    pub out: PathBuf,
    /// Read the tokenizer from this directory instead of MODEL.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// What trains, on what, in what batches.
    #[command(flatten)]
    pub shape: RunShape,
    /// Adapter alpha (scale alpha / rank).
    #[arg(long, default_value_t = 32.0)]
    pub lora_alpha: f32,
    /// Dropout on the adapters' input during training (as PEFT places it).
    #[arg(long, default_value_t = 0.0)]
    pub lora_dropout: f32,
    /// Micro-batches per optimizer step.
    #[arg(long, default_value_t = 1)]
    pub grad_accum: usize,
    /// Peak learning rate.
    #[arg(long, default_value_t = 2e-4)]
    pub lr: f32,
    /// Optimizer steps.
    #[arg(long, default_value_t = 100)]
    pub iters: usize,
    /// Warmup steps.
    #[arg(long, default_value_t = 0)]
    pub warmup: usize,
    /// Decay after warmup: constant, linear or cosine.
    #[arg(long, default_value = "cosine")]
    pub decay: String,
    /// Weight decay.
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f32,
    /// Clip gradients to this global norm (0: off).
    #[arg(long, default_value_t = 1.0)]
    pub max_grad_norm: f32,
    /// Loss on completions / the last chat message only.
    #[arg(long)]
    pub mask_prompt: bool,
    /// Shards per micro-batch run concurrently, each on its own MLX stream
    /// (default: one per core, at most the batch size; 1 turns it off).
    #[arg(long)]
    pub streams: Option<usize>,
    /// Compile each step's loss and gradients with MLX's compile (traced
    /// once per batch shape, replayed with fused kernels): auto compiles
    /// on a GPU, where building the graph every step keeps the device
    /// waiting. Runs with several --streams or --lora-dropout train
    /// uncompiled.
    #[arg(long, value_enum, default_value_t = Toggle::Auto)]
    pub compile: Toggle,
    /// Pack each batch's examples into rows of --max-seq-len positions
    /// (longest first) instead of padding each to the longest; packed
    /// examples never attend to each other.
    #[arg(long)]
    pub pack: bool,
    /// Seed of the data order, the adapters' random start and dropout.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Validation loss every N steps (0: at the end only).
    #[arg(long, default_value_t = 0)]
    pub eval_every: usize,
    /// Checkpoint every N steps (0: at the end only).
    #[arg(long, default_value_t = 0)]
    pub save_every: usize,
    /// Continue from a checkpoint directory (OUT/checkpoints/step-N); a
    /// data-parallel run may resume on another number of ranks.
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// MLX's distributed backend when this process is one rank of several
    /// (started by `zoo launch`, `mlx.launch` or `mpirun`): any takes the
    /// one the launcher's environment names (a single process when none);
    /// ring, mpi, nccl or jaccl insists on that one. --batch-size is then
    /// the global batch, split over the ranks.
    #[arg(long, env = "ZOO_DISTRIBUTED", default_value = "any")]
    pub backend: String,
}

/// Prints the progress line and appends `metrics.jsonl`.
struct Progress {
    /// `None` on ranks other than 0, which write nothing.
    metrics: Option<std::fs::File>,
    started: Instant,
    total: usize,
    first_step: usize,
    stop: Arc<AtomicBool>,
    quiet: bool,
}

impl Progress {
    /// Appends one line in a single write and flushes it to the disk, so a
    /// crash leaves whole lines (and at most a torn last one, which
    /// [`trim_metrics`] cuts on resume).
    fn log(&mut self, value: serde_json::Value) {
        let line = format!("{value}\n");
        let Some(metrics) = &mut self.metrics else {
            return;
        };
        if let Err(e) = metrics
            .write_all(line.as_bytes())
            .and_then(|()| metrics.sync_data())
        {
            tracing::warn!("cannot append to metrics.jsonl: {e}");
        }
    }
}

/// Before a run appends to `path`: keeps the complete lines of steps up to
/// `step` (a resumed checkpoint's; 0 for a fresh run) and drops a torn last
/// line and the lines of steps the run will repeat, rewriting the file
/// through a temporary file renamed into place.
fn trim_metrics(path: &Path, step: usize) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(());
    };
    let kept: Vec<&str> = text
        .split_inclusive('\n')
        .filter(|line| line.ends_with('\n'))
        .filter(|line| {
            serde_json::from_str::<serde_json::Value>(line)
                .ok()
                .and_then(|v| v.get("step")?.as_u64())
                .is_some_and(|s| s as usize <= step)
        })
        .collect();
    if kept.concat() == text {
        return Ok(());
    }
    mlx_zoo::atomic::write_bytes(path, kept.concat().as_bytes())
        .with_context(|| format!("trimming {} to step {step}", path.display()))
}

impl TrainHooks for Progress {
    fn on_step(&mut self, r: &StepReport) {
        let mib = |b: usize| b as f64 / (1 << 20) as f64;
        self.log(serde_json::json!({
            "step": r.step, "loss": r.loss, "lr": r.lr, "grad_norm": r.grad_norm,
            "tokens": r.tokens, "loss_tokens": r.loss_tokens,
            "tokens_per_second": r.tokens_per_second,
            "active_memory": r.active_memory, "peak_memory": r.peak_memory,
            "cache_memory": r.cache_memory,
            "eval_seconds": r.eval_seconds, "graph_seconds": r.graph_seconds,
            "comm_seconds": r.comm_seconds, "comm_bytes": r.comm_bytes,
        }));
        if !self.quiet {
            let done = r.step - self.first_step;
            let per_step = self.started.elapsed().as_secs_f64() / done.max(1) as f64;
            let eta = per_step * (self.total - r.step) as f64;
            eprintln!(
                "step {:>5}/{}  loss {:.4}  lr {:.2e}  {:.0} tok/s  mem {:.0} MiB (peak {:.0})  eta {:.0}s",
                r.step,
                self.total,
                r.loss,
                r.lr,
                r.tokens_per_second,
                mib(r.active_memory),
                mib(r.peak_memory),
                eta
            );
        }
    }

    fn on_eval(&mut self, step: usize, loss: f32) {
        self.log(serde_json::json!({"step": step, "valid_loss": loss}));
        if !self.quiet {
            eprintln!("step {step:>5}  validation loss {loss:.4}");
        }
    }

    fn on_checkpoint(&mut self, step: usize, dir: &Path) {
        self.log(serde_json::json!({"step": step, "checkpoint": dir}));
    }

    fn stop_requested(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }
}

/// `zoo finetune`.
pub fn finetune(args: &FinetuneArgs, quiet: bool) -> Result<()> {
    // Joined first: a rank with a broken environment fails before loading.
    let backend: mlx_zoo::distributed::Backend = args.backend.parse().context("--backend")?;
    let group =
        mlx_zoo::distributed::Group::init(backend).context("joining the data-parallel group")?;
    if group.size() > 1 && !quiet {
        eprintln!(
            "rank {} of {} over {} (global batch {}, {} per rank)",
            group.rank(),
            group.size(),
            group.backend().map_or("-", |b| b.name()),
            args.shape.batch_size,
            args.shape.batch_size / group.size().max(1)
        );
    }
    // Only rank 0 reports progress and writes files.
    let main = group.is_main();
    let quiet = quiet || !main;
    let registry = mlx_zoo::registry()?;
    let decay = match args.decay.as_str() {
        "constant" => Decay::Constant,
        "linear" => Decay::Linear,
        "cosine" => Decay::Cosine,
        other => bail!("--decay {other}: expected constant, linear or cosine"),
    };
    let optimizer: OptimizerKind = args.shape.optimizer.parse()?;
    let mut options = LoadOptions {
        dtype: args
            .shape
            .dtype
            .parse::<mlx_zoo::loader::ComputeDtype>()
            .context("--dtype")?,
        ..LoadOptions::default()
    };
    if args.shape.train_type == TrainType::Qlora {
        let settings =
            mlx_zoo::quantize::QuantSettings::affine(args.shape.q_bits, args.shape.q_group_size);
        settings.check().context("--q-bits / --q-group-size")?;
        options.quantize = Some(mlx_zoo::quantize::QuantPlan::uniform(settings));
    }
    let mut loaded = loader::load(&registry, &args.model, &options)
        .with_context(|| format!("loading {}", args.model.display()))?;
    match args.shape.train_type {
        TrainType::Full => {
            if !loaded.quantization.quantized.is_empty() {
                bail!(
                    "{}: a quantized model cannot be fully fine-tuned; use --train-type qlora",
                    args.model.display()
                );
            }
        }
        kind => {
            let method = if kind == TrainType::Dora {
                "dora"
            } else {
                "lora"
            };
            let settings = AdapterSettings {
                rank: args.shape.lora_rank,
                alpha: args.lora_alpha,
                dropout: args.lora_dropout,
                rslora: false,
            };
            let targets = AdapterTargets {
                modules: args.shape.lora_targets.clone(),
                ..Default::default()
            };
            // The adapters' random start comes from MLX's key: seeded, so
            // the same --seed gives the same run.
            mlx_rs::random::seed(args.seed).context("seeding MLX's random key")?;
            let layers = loaded
                .apply_adapter(&registry, method, settings, &targets)
                .context("attaching the adapters")?;
            if !quiet {
                eprintln!(
                    "{method} rank {} on {} layers",
                    args.shape.lora_rank,
                    layers.len()
                );
            }
        }
    }
    if args.shape.grad_checkpoint {
        loaded
            .model
            .set_gradient_checkpointing(true)
            .with_context(|| format!("--grad-checkpoint on {}", loaded.architecture))?;
        if !quiet {
            eprintln!("gradient checkpointing: each block recomputed in the backward pass");
        }
    }
    let tokenizer_dir = args.tokenizer.as_deref().unwrap_or(&args.model);
    let tokenizer = mlx_zoo::tokenizer::Tokenizer::from_path(tokenizer_dir)
        .with_context(|| format!("reading the tokenizer of {}", tokenizer_dir.display()))?;
    let data_options = DataOptions {
        max_seq_len: args.shape.max_seq_len,
        mask_prompt: args.mask_prompt,
        valid_fraction: 0.1,
    };
    let data = load_dataset(&args.data, &tokenizer, &data_options)?;
    data.check_vocabulary(loaded.model.dims().vocab_size)?;
    if !quiet {
        eprintln!(
            "data: {} training and {} validation sequences, {} loss tokens per epoch{}",
            data.train.len(),
            data.valid.len(),
            data.train_loss_tokens,
            if data.truncated > 0 {
                format!(
                    ", {} cut to {} tokens",
                    data.truncated, args.shape.max_seq_len
                )
            } else {
                String::new()
            }
        );
    }
    let config = TrainConfig {
        batch_size: args.shape.batch_size,
        grad_accum: args.grad_accum,
        iters: args.iters,
        schedule: Schedule {
            peak: args.lr,
            warmup: args.warmup,
            total: args.iters,
            decay,
            min_ratio: 0.1,
        },
        optimizer,
        weight_decay: args.weight_decay,
        max_grad_norm: (args.max_grad_norm > 0.0).then_some(args.max_grad_norm),
        seed: args.seed,
        eval_every: args.eval_every,
        eval_batches: 0,
        save_every: args.save_every,
        pack: args.pack.then_some(args.shape.max_seq_len),
        streams: args.streams.unwrap_or_else(|| {
            if mlx_zoo::runtime::on_cpu() {
                // Ranks on one machine share its cores.
                (std::thread::available_parallelism().map_or(1, |n| n.get()) / group.size())
                    .max(1)
                    .min(args.shape.batch_size / group.size())
                    .max(1)
            } else {
                1
            }
        }),
        compile: match args.compile {
            Toggle::On => true,
            Toggle::Off => false,
            Toggle::Auto => !mlx_zoo::runtime::on_cpu(),
        },
    };
    let pad = tokenizer.eos_ids().first().copied().unwrap_or(0);
    let mut trainer = Trainer::new(config, &data, pad)?.with_group(group)?;
    if let Some(checkpoint) = &args.resume {
        trainer.resume(loaded.model.as_mut(), checkpoint)?;
        if !quiet {
            eprintln!(
                "resumed from {} at step {}",
                checkpoint.display(),
                trainer.step()
            );
        }
    }
    if !quiet && trainer.config().compile {
        if trainer.will_compile(loaded.model.as_mut())? {
            eprintln!("compiled steps: traced once per batch shape, then replayed");
        } else {
            eprintln!("compiled steps: off (adapter dropout or several streams train uncompiled)");
        }
    }
    if main {
        std::fs::create_dir_all(&args.out)
            .with_context(|| format!("creating {}", args.out.display()))?;
    }
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        // A second Ctrl-C while the checkpoint is written kills as usual.
        let _ = ctrlc::set_handler(move || {
            if stop.swap(true, Ordering::SeqCst) {
                std::process::exit(130);
            }
        });
    }
    let metrics_path = args.out.join("metrics.jsonl");
    // A resumed run keeps the lines up to its checkpoint; a fresh one
    // starts the file anew (lines of an earlier run in this folder would
    // repeat its steps).
    let metrics = if main {
        trim_metrics(&metrics_path, trainer.step())?;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&metrics_path)
            .with_context(|| format!("opening {}", metrics_path.display()))?;
        Some(file)
    } else {
        None
    };
    let mut progress = Progress {
        metrics,
        started: Instant::now(),
        total: args.iters,
        first_step: trainer.step(),
        stop,
        quiet,
    };
    let checkpoints = args.out.join("checkpoints");
    let summary = trainer.run(loaded.model.as_mut(), &data, &checkpoints, &mut progress)?;
    if !main {
        return Ok(());
    }
    if summary.interrupted {
        eprintln!(
            "stopped at step {}; continue with --resume {}",
            summary.steps,
            summary
                .checkpoint
                .as_deref()
                .map(Path::display)
                .map(|d| d.to_string())
                .unwrap_or_default()
        );
        return Ok(());
    }
    let base = args.model.display().to_string();
    let written = if args.shape.train_type == TrainType::Full {
        let dir = args.out.join("model");
        mlx_zoo::export::save_mlx_model(&loaded, &args.model, &dir, &Default::default())?;
        vec![dir]
    } else {
        use mlx_zoo::lora::formats::{save_adapter, AdapterFormat};
        let mlx_lm = args.out.join("adapters");
        let peft = args.out.join("peft");
        save_adapter(&mut loaded, &mlx_lm, AdapterFormat::MlxLm, &base)?;
        save_adapter(&mut loaded, &peft, AdapterFormat::Peft, &base)?;
        vec![mlx_lm, peft]
    };
    let summary_json = serde_json::json!({
        "steps": summary.steps, "first_loss": summary.first_loss, "last_loss": summary.last_loss,
        "valid_loss": summary.valid_loss, "checkpoint": summary.checkpoint, "outputs": written,
    });
    let summary_path = args.out.join("summary.json");
    mlx_zoo::atomic::write_bytes(&summary_path, format!("{summary_json:#}\n").as_bytes())
        .with_context(|| format!("writing {}", summary_path.display()))?;
    println!(
        "trained {} steps: loss {} -> {}{}",
        summary.steps,
        summary
            .first_loss
            .map(|l| format!("{l:.4}"))
            .unwrap_or_else(|| "-".into()),
        summary
            .last_loss
            .map(|l| format!("{l:.4}"))
            .unwrap_or_else(|| "-".into()),
        summary
            .valid_loss
            .map(|l| format!(", validation {l:.4}"))
            .unwrap_or_default()
    );
    for path in written {
        println!("wrote {}", path.display());
    }
    Ok(())
}

/// Arguments of `zoo plan`.
#[derive(Debug, Clone, clap::Args)]
pub struct PlanArgs {
    /// A model directory or a repo id (org/name@revision).
    pub model: PathBuf,
    /// What would train, on what, in what batches.
    #[command(flatten)]
    pub shape: RunShape,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// `zoo plan`.
pub fn plan(args: &PlanArgs) -> Result<()> {
    use mlx_zoo::train::{PlanMethod, PlanSettings};
    let registry = mlx_zoo::registry()?;
    let inspection = loader::inspect(&registry, &args.model)
        .with_context(|| format!("inspecting {}", args.model.display()))?;
    let targets = if args.shape.lora_targets.is_empty() {
        registry
            .architectures()
            .into_iter()
            .find(|a| a.name == inspection.architecture)
            .map(|a| a.default_adapter_targets)
            .unwrap_or_default()
    } else {
        args.shape.lora_targets.clone()
    };
    let method = match args.shape.train_type {
        TrainType::Full => PlanMethod::Full,
        TrainType::Dora => PlanMethod::Adapter {
            rank: args.shape.lora_rank,
            dora: true,
        },
        _ => PlanMethod::Adapter {
            rank: args.shape.lora_rank,
            dora: false,
        },
    };
    let quantization = (args.shape.train_type == TrainType::Qlora).then_some(
        mlx_zoo::quantize::QuantSettings::affine(args.shape.q_bits, args.shape.q_group_size),
    );
    if let Some(q) = quantization {
        q.check().context("--q-bits / --q-group-size")?;
    }
    let settings = PlanSettings {
        method,
        quantization,
        targets,
        batch_size: args.shape.batch_size,
        seq_len: args.shape.max_seq_len,
        optimizer: args.shape.optimizer.parse()?,
        grad_checkpoint: args.shape.grad_checkpoint,
    };
    let estimate = mlx_zoo::train::plan(&inspection, &settings);
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(
                &serde_json::json!({"settings": settings, "estimate": estimate})
            )?
        );
        return Ok(());
    }
    let mib = |b: u64| format!("{:10.1} MiB", b as f64 / (1 << 20) as f64);
    println!(
        "{} ({}), {:?}, batch {} x {} tokens, {}{}",
        args.model.display(),
        inspection.architecture,
        args.shape.train_type,
        args.shape.batch_size,
        args.shape.max_seq_len,
        args.shape.optimizer,
        if args.shape.grad_checkpoint {
            ", gradient checkpointing"
        } else {
            ""
        }
    );
    println!("  weights      {}", mib(estimate.weights));
    println!(
        "  adapters     {}  ({} layers)",
        mib(estimate.adapters),
        estimate.adapted_layers
    );
    println!(
        "  gradients    {}  ({} trainable parameters)",
        mib(estimate.gradients),
        estimate.trainable_parameters
    );
    println!("  optimizer    {}", mib(estimate.optimizer));
    println!("  activations  {}", mib(estimate.activations));
    println!("  total        {}  (expected peak)", mib(estimate.total));
    Ok(())
}

#[cfg(test)]
mod metrics_tests {
    use super::trim_metrics;

    /// A resumed run keeps the whole lines up to its checkpoint's step and
    /// cuts a torn tail and the steps it will repeat.
    #[test]
    fn resuming_trims_torn_and_repeated_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.jsonl");
        std::fs::write(
            &path,
            "{\"step\":1,\"loss\":3.0}\n{\"step\":2,\"loss\":2.5}\n{\"step\":2,\"checkpoint\":\"c\"}\n\
             {\"step\":3,\"loss\":2.0}\n{\"step\":4,\"lo",
        )
        .unwrap();
        trim_metrics(&path, 2).unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "{\"step\":1,\"loss\":3.0}\n{\"step\":2,\"loss\":2.5}\n{\"step\":2,\"checkpoint\":\"c\"}\n"
        );
        trim_metrics(&dir.path().join("absent.jsonl"), 2).unwrap();
    }
}

/// On, off, or chosen for the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Toggle {
    /// Chosen for the device the run computes on.
    Auto,
    /// Always.
    On,
    /// Never.
    Off,
}
