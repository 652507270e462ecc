//! The subcommands. Each returns an `anyhow` report whose context chain
//! says what was being done; `main` prints it.

use crate::npy;
use crate::output::StagedOutput;
use anyhow::{bail, Context, Result};
use mlx_rs::Array;
use mlx_zoo::loader::{self, ComputeDtype, LoadOptions};
use mlx_zoo::registry::Candidate;
use mlx_zoo::{Detection, MappingReport};
use std::path::Path;

fn registry() -> Result<mlx_zoo::Registry> {
    mlx_zoo::registry().context("building the plugin registry")
}

/// `zoo archs`.
pub fn archs(json: bool) -> Result<()> {
    let archs = registry()?.architectures();
    if json {
        println!("{}", serde_json::to_string_pretty(&archs)?);
        return Ok(());
    }
    for arch in archs {
        println!("{}  {}", arch.name, arch.description);
        println!("    model_type:    {}", arch.model_types.join(", "));
        println!("    architectures: {}", arch.hf_architectures.join(", "));
        println!(
            "    adapter targets by default: {}",
            arch.default_adapter_targets.join(", ")
        );
    }
    Ok(())
}

/// `n` bytes in binary units (B, KiB, MiB, ...).
pub fn bytes(n: usize) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// `zoo info`.
pub fn info(json: bool) -> Result<()> {
    let info = mlx_zoo::runtime::runtime_info();
    if json {
        println!("{}", serde_json::to_string_pretty(&info)?);
        return Ok(());
    }
    println!(
        "MLX        {} (mlx-c {})",
        info.mlx_version, info.mlx_c_version
    );
    println!("library    {}", info.libmlx);
    println!("backend    {}", info.backend);
    println!("device     {}", info.device);
    match &info.gpu {
        Some(gpu) => println!(
            "GPU        {} ({} of memory){}",
            gpu.name,
            bytes(gpu.total_memory),
            if gpu.count > 1 {
                format!(", {} GPUs", gpu.count)
            } else {
                String::new()
            }
        ),
        None if info.backend == "cpu" => {
            println!("GPU        none (CPU build; MLX_ZOO_BACKEND=cuda builds for NVIDIA GPUs)")
        }
        None => println!("GPU        none usable (no device or driver found)"),
    }
    let slow = if info.blas.slow {
        "  (slow: install libopenblas-dev and rebuild)"
    } else {
        ""
    };
    println!(
        "BLAS       {} {}{slow}",
        info.blas.name,
        info.blas.library.as_deref().unwrap_or("")
    );
    println!(
        "threads    {} cores; BLAS {}; MLX_BFS_MAX_WIDTH {}",
        info.cores,
        info.blas_threads
            .map_or_else(|| "-".to_owned(), |t| t.to_string()),
        info.bfs_max_width.as_deref().unwrap_or("unset (MLX's 20)")
    );
    println!("kernels    mlx-zoo's own CPU kernels: {}", info.kernels);
    println!(
        "memory     active {}, peak {}, cache {}, limit {}",
        bytes(info.memory.active),
        bytes(info.memory.peak),
        bytes(info.memory.cache),
        bytes(info.memory.limit)
    );
    Ok(())
}

fn print_candidates(candidates: &[Candidate]) {
    for candidate in candidates {
        match &candidate.detection {
            Detection::Match { priority, reason } => {
                println!(
                    "    {:<10} match, priority {priority}: {reason}",
                    candidate.name
                )
            }
            Detection::NoMatch { reason } => println!("    {:<10} no: {reason}", candidate.name),
        }
    }
}

fn print_report(report: &MappingReport) {
    println!("mapping       {}", report.counts());
    for t in &report.transformed {
        println!(
            "    {} -> {}: {}",
            t.from.join(" + "),
            t.to.join(", "),
            t.op
        );
    }
    for t in &report.tied {
        println!("    {} tied to {}", t.parameter, t.source);
    }
    for d in &report.dropped {
        println!("    dropped {}: {}", d.tensor, d.reason);
    }
    let problems = report.problems(20);
    if !problems.is_empty() {
        for line in problems.lines() {
            println!("    {line}");
        }
    }
}

/// `zoo inspect`.
pub fn inspect(model: &Path, json: bool, layers: bool) -> Result<()> {
    let inspection = loader::inspect(&registry()?, model)
        .with_context(|| format!("inspecting {}", model.display()))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&inspection)?);
        return Ok(());
    }
    let d = &inspection.dims;
    println!("model         {}", inspection.dir.display());
    println!(
        "architecture  {} ({})",
        inspection.architecture, inspection.reason
    );
    print_candidates(&inspection.candidates);
    println!(
        "config        hidden {}, layers {}, heads {} (kv {}), head_dim {}, intermediate {}, vocab {}, context {}",
        d.hidden_size, d.num_layers, d.num_heads, d.num_kv_heads, d.head_dim,
        d.intermediate_size, d.vocab_size, d.max_position_embeddings
    );
    println!("parameters    {}", inspection.parameters);
    println!(
        "weights       {} in the checkpoint",
        bytes(inspection.weight_bytes as usize)
    );
    if let Some(q) = &inspection.quantization {
        print_quantization(q);
    }
    let files: Vec<String> = inspection
        .files
        .iter()
        .map(|f| {
            f.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        })
        .collect();
    println!("files         {}", files.join(", "));
    if layers {
        println!("layers");
        for layer in &inspection.layers {
            let q = match layer.quantization {
                Some(q) => describe_quantization(q),
                None => "full precision".to_owned(),
            };
            println!(
                "    {:<48} {:>10}  {q}",
                layer.path,
                bytes(layer.bytes as usize)
            );
        }
    }
    print_report(&inspection.report);
    Ok(())
}

/// `4 bits, group 64`, with the mode named when it is not affine.
fn describe_quantization(q: mlx_zoo::quantize::QuantSettings) -> String {
    match q.mode {
        mlx_zoo::quantize::QuantMode::Affine => format!("{} bits, group {}", q.bits, q.group_size),
        mode => format!("{mode} ({} bits, group {})", q.bits, q.group_size),
    }
}

fn print_quantization(q: &mlx_zoo::quantize::QuantizationReport) {
    let mut by_setting: std::collections::BTreeMap<String, Vec<&str>> = Default::default();
    for (layer, s) in &q.quantized {
        by_setting
            .entry(describe_quantization(*s))
            .or_default()
            .push(layer);
    }
    println!(
        "quantization  {} layers quantized, {} kept in full precision",
        q.quantized.len(),
        q.kept.len()
    );
    for (setting, layers) in by_setting {
        println!(
            "    {setting}: {} layers (e.g. {})",
            layers.len(),
            layers[0]
        );
    }
    for (layer, reason) in &q.kept {
        println!("    kept {layer}: {reason}");
    }
}

/// Arguments of `zoo convert`.
#[derive(Debug, clap::Args)]
pub struct ConvertArgs {
    /// A model directory (config.json + weights) or a repo id (org/name@revision).
    pub model: std::path::PathBuf,
    /// The output directory.
    #[arg(long)]
    pub out: std::path::PathBuf,
    /// Quantize every linear layer to this many bits (2, 3, 4, 5, 6, 8).
    #[arg(long)]
    pub q_bits: Option<u8>,
    /// Inputs per quantization group (32, 64, 128).
    #[arg(long, default_value_t = 64)]
    pub q_group_size: usize,
    /// The encoding: affine (default; --q-bits and --q-group-size), or
    /// one of MLX's floating-point modes mxfp4, mxfp8, nvfp4 (their own
    /// bits and groups), as `mlx_lm.convert --q-mode`.
    #[arg(long, conflicts_with_all = ["q_plan", "q_recipe"])]
    pub q_mode: Option<String>,
    /// A plan file: {"default": {"bits": 4, "group_size": 64}, "rules": [{"pattern": "layers.0-3.mlp", "bits": 8}, {"pattern": "lm_head", "keep": true}]}.
    #[arg(long, conflicts_with_all = ["q_bits", "q_recipe"])]
    pub q_plan: Option<std::path::PathBuf>,
    /// A ready-made mixed recipe: mixed-4-6, mixed-3-6, mixed-2-6.
    #[arg(long, conflicts_with = "q_bits")]
    pub q_recipe: Option<String>,
    /// Store float tensors as f32, f16 or bf16 (default: as loaded, f32).
    #[arg(long)]
    pub dtype: Option<String>,
    /// Start a new shard above this many MiB.
    #[arg(long, default_value_t = 5120)]
    pub max_shard_mib: u64,
    /// Replace a non-empty output directory (atomically: the old
    /// output stays until the new one is complete).
    #[arg(long)]
    pub force: bool,
}

/// `zoo convert`.
pub fn convert(args: &ConvertArgs) -> Result<()> {
    use mlx_zoo::quantize::{QuantPlan, QuantSettings};
    let staged = StagedOutput::begin(&args.out, args.force)?;
    let registry = registry()?;
    let plan = if let Some(path) = &args.q_plan {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Some(QuantPlan::from_json(&text, &path.display().to_string())?)
    } else if let Some(recipe) = &args.q_recipe {
        let layers = loader::inspect(&registry, &args.model)
            .with_context(|| format!("inspecting {}", args.model.display()))?
            .dims
            .num_layers;
        Some(QuantPlan::recipe(recipe, args.q_group_size, layers)?)
    } else {
        let mode = args
            .q_mode
            .as_deref()
            .map(str::parse::<mlx_zoo::quantize::QuantMode>)
            .transpose()?
            .unwrap_or_default();
        match mode.fixed() {
            // A floating-point mode fixes its group; --q-bits may only repeat its bits.
            Some((bits, group_size)) => Some(QuantPlan::uniform(QuantSettings {
                bits: args.q_bits.unwrap_or(bits),
                group_size,
                mode,
            })),
            None => args
                .q_bits
                .map(|bits| QuantPlan::uniform(QuantSettings::affine(bits, args.q_group_size))),
        }
    };
    let dtype = args
        .dtype
        .as_deref()
        .map(str::parse::<ComputeDtype>)
        .transpose()?;
    let started = std::time::Instant::now();
    let loaded = loader::load(
        &registry,
        &args.model,
        &LoadOptions {
            quantize: plan,
            ..LoadOptions::default()
        },
    )
    .with_context(|| format!("loading {}", args.model.display()))?;
    let options = mlx_zoo::export::SaveOptions {
        dtype,
        max_shard_bytes: args.max_shard_mib << 20,
        ..Default::default()
    };
    let files = mlx_zoo::export::save_mlx_model(&loaded, &args.model, staged.path(), &options)
        .with_context(|| format!("writing {}", args.out.display()))?;
    let total: u64 = files
        .iter()
        .filter_map(|f| std::fs::metadata(f).ok())
        .map(|m| m.len())
        .sum();
    staged.commit()?;
    if !loaded.quantization.quantized.is_empty() {
        print_quantization(&loaded.quantization);
    }
    println!(
        "wrote {} files ({}) to {} in {:.1} s",
        files.len(),
        bytes(total as usize),
        args.out.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Arguments of `zoo generate`.
pub struct GenerateArgs {
    pub model: std::path::PathBuf,
    pub prompt_ids: Vec<u32>,
    pub prompt: Option<String>,
    pub chat: Option<String>,
    pub system: Option<String>,
    /// A template name the checkpoint defines, or a Jinja file.
    pub chat_template: Option<String>,
    pub tokenizer: Option<std::path::PathBuf>,
    pub stop: Vec<String>,
    pub adapter: Option<std::path::PathBuf>,
    pub json: bool,
    pub options: mlx_zoo::generate::GenerateOptions,
}

/// `zoo generate`.
pub fn generate(args: &GenerateArgs) -> Result<()> {
    use std::io::Write;
    let mut loaded = loader::load(&registry()?, &args.model, &LoadOptions::default())
        .with_context(|| format!("loading {}", args.model.display()))?;
    if let Some(dir) = &args.adapter {
        mlx_zoo::lora::formats::load_adapter(&mut loaded, dir)
            .with_context(|| format!("applying the adapter in {}", dir.display()))?;
    }
    // Text in means text out, through the model's tokenizer.
    let tokenizer = if args.prompt.is_some() || args.chat.is_some() || !args.stop.is_empty() {
        let dir = args.tokenizer.as_deref().unwrap_or(&args.model);
        Some(mlx_zoo::tokenizer::Tokenizer::from_path(dir)?)
    } else {
        None
    };
    // --chat-template: a file replaces the default template, a name picks one.
    let (tokenizer, template_name) = match (tokenizer, &args.chat_template) {
        (Some(mut tokenizer), Some(choice)) if Path::new(choice).is_file() => {
            let text = std::fs::read_to_string(choice)
                .with_context(|| format!("reading the chat template {choice}"))?;
            tokenizer.set_chat_template(text);
            (Some(tokenizer), None)
        }
        (tokenizer, choice) => (tokenizer, choice.as_deref()),
    };
    let prompt_ids = match (&args.prompt, &args.chat, &tokenizer) {
        (Some(text), _, Some(tokenizer)) => tokenizer.encode(text, true)?,
        (_, Some(user), Some(tokenizer)) => {
            use mlx_zoo::tokenizer::ChatMessage;
            let mut messages = Vec::new();
            if let Some(system) = &args.system {
                messages.push(ChatMessage {
                    role: "system".into(),
                    content: system.clone(),
                });
            }
            messages.push(ChatMessage {
                role: "user".into(),
                content: user.clone(),
            });
            // The template writes the special tokens itself.
            let rendered = tokenizer.apply_named_chat_template(&messages, true, template_name)?;
            tokenizer.encode(&rendered, false)?
        }
        _ => args.prompt_ids.clone(),
    };
    let mut options = args.options.clone();
    if let Some(tokenizer) = &tokenizer {
        options.stop_tokens.extend_from_slice(tokenizer.eos_ids());
    }
    let mut generation = mlx_zoo::generate::generate(loaded.model.as_mut(), &prompt_ids, options)
        .context("processing the prompt")?;
    let mut tokens = Vec::new();
    let mut text = String::new();
    let mut out = std::io::stdout().lock();
    for token in generation.by_ref() {
        let token = token.context("generating")?;
        tokens.push(token);
        match &tokenizer {
            Some(tokenizer) => {
                let decoded = tokenizer.decode(&tokens)?;
                let stop_at = args
                    .stop
                    .iter()
                    .filter_map(|s| decoded.find(s.as_str()))
                    .min();
                let visible = &decoded[..stop_at.unwrap_or(decoded.len())];
                if !args.json && visible.len() > text.len() && visible.starts_with(&text) {
                    write!(out, "{}", &visible[text.len()..])?;
                    out.flush()?;
                }
                text = visible.to_owned();
                if stop_at.is_some() {
                    break;
                }
            }
            None if !args.json => {
                write!(out, "{token} ")?;
                out.flush()?;
            }
            None => {}
        }
    }
    let stats = generation.stats().clone();
    if args.json {
        let mut report = serde_json::json!({
            "prompt_ids": prompt_ids,
            "generated_ids": tokens,
            "prompt_tokens": stats.prompt_tokens,
            "generated_tokens": stats.generated_tokens,
            "prompt_tokens_per_second": stats.prompt_tps(),
            "generation_tokens_per_second": stats.generation_tps(),
        });
        if tokenizer.is_some() {
            report["text"] = serde_json::Value::String(text);
        }
        writeln!(out, "{}", serde_json::to_string_pretty(&report)?)?;
    } else {
        writeln!(out)?;
        eprintln!(
            "prompt: {} tokens, {:.1} tokens/s; generation: {} tokens, {:.1} tokens/s",
            stats.prompt_tokens,
            stats.prompt_tps(),
            stats.generated_tokens,
            stats.generation_tps()
        );
    }
    Ok(())
}

/// `zoo convert-adapter`.
pub fn convert_adapter(
    adapter: &Path,
    model: &Path,
    out: &Path,
    to: &str,
    force: bool,
) -> Result<()> {
    use mlx_zoo::lora::formats::{load_adapter, save_adapter, AdapterFormat};
    let format = match to {
        "peft" => AdapterFormat::Peft,
        "mlx-lm" | "mlx_lm" | "mlxlm" => AdapterFormat::MlxLm,
        other => bail!("unknown adapter format {other:?}: expected peft or mlx-lm"),
    };
    let staged = StagedOutput::begin(out, force)?;
    let mut loaded = loader::load(&registry()?, model, &LoadOptions::default())
        .with_context(|| format!("loading {}", model.display()))?;
    let attached = load_adapter(&mut loaded, adapter)
        .with_context(|| format!("reading the adapter in {}", adapter.display()))?;
    let base = model.display().to_string();
    let files = save_adapter(&mut loaded, staged.path(), format, &base)
        .with_context(|| format!("writing {}", out.display()))?;
    staged.commit()?;
    println!(
        "wrote the {} adapter ({} layers) as {to} to {} ({} files)",
        attached.method,
        attached.modules.len(),
        out.display(),
        files.len()
    );
    Ok(())
}

/// `zoo fuse`.
pub fn fuse(
    model: &Path,
    adapter: &Path,
    out: &Path,
    dequantize: bool,
    hf: bool,
    dtype: Option<&str>,
    force: bool,
) -> Result<()> {
    let staged = StagedOutput::begin(out, force)?;
    let registry = registry()?;
    let mut loaded = loader::load(&registry, model, &LoadOptions::default())
        .with_context(|| format!("loading {}", model.display()))?;
    let attached = mlx_zoo::lora::formats::load_adapter(&mut loaded, adapter)
        .with_context(|| format!("applying the adapter in {}", adapter.display()))?;
    let quantizer = registry.quantizer("affine");
    let fused = mlx_zoo::adapter::fuse_adapters(
        loaded.model.as_mut(),
        quantizer.as_deref(),
        dequantize || hf,
    )?;
    loaded.refresh_quantization()?;
    let mut worst: Option<(&str, f32)> = None;
    for layer in &fused {
        if let Some(kept) = layer.kept_fraction {
            if worst.is_none_or(|(_, w)| kept < w) {
                worst = Some((&layer.path, kept));
            }
        }
    }
    println!(
        "fused a {} adapter into {} layers",
        attached.method,
        fused.len()
    );
    if let Some((path, kept)) = worst {
        println!(
            "re-quantization keeps {:.0}% of the update in the worst layer ({path})",
            kept * 100.0
        );
        if kept < 0.5 {
            tracing::warn!(
                "re-quantizing erases most of the adapter's change to {path}; \
                 write a de-quantized model with --dequantize to keep it"
            );
            eprintln!(
                "warning: re-quantizing erases most of the adapter's change ({:.0}% kept in {path}); consider --dequantize",
                kept * 100.0
            );
        }
    }
    let options = mlx_zoo::export::SaveOptions {
        dtype: dtype.map(str::parse::<ComputeDtype>).transpose()?,
        metadata_format: if hf { "pt" } else { "mlx" },
        ..Default::default()
    };
    let files = mlx_zoo::export::save_mlx_model(&loaded, model, staged.path(), &options)
        .with_context(|| format!("writing {}", out.display()))?;
    staged.commit()?;
    println!("wrote {} files to {}", files.len(), out.display());
    Ok(())
}

/// Reads a JSON array of equal-length arrays of token ids, checked against
/// the vocabulary.
fn read_tokens(path: &Path, vocab: usize) -> Result<Array> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let rows: Vec<Vec<i64>> = serde_json::from_str(&text).with_context(|| {
        format!(
            "{}: expected a JSON array of arrays of integer token ids, e.g. [[1, 2, 3]]",
            path.display()
        )
    })?;
    if rows.is_empty() || rows[0].is_empty() {
        bail!(
            "{}: expected at least one non-empty sequence of token ids",
            path.display()
        );
    }
    let seq = rows[0].len();
    let mut flat = Vec::with_capacity(rows.len() * seq);
    for (i, row) in rows.iter().enumerate() {
        if row.len() != seq {
            bail!(
                "{}: sequence {i} has {} ids but sequence 0 has {seq}; all sequences must have the same length",
                path.display(),
                row.len()
            );
        }
        for (j, &id) in row.iter().enumerate() {
            if id < 0 || id as usize >= vocab {
                bail!(
                    "{}: token id {id} at [{i}][{j}] is outside the vocabulary [0, {vocab})",
                    path.display()
                );
            }
            flat.push(id as i32);
        }
    }
    Ok(Array::from_slice(&flat, &[rows.len() as i32, seq as i32]))
}

/// `zoo logits`.
#[allow(clippy::too_many_arguments)]
pub fn logits(
    model: &Path,
    tokens: &Path,
    out: &Path,
    dtype: &str,
    allow_unclean: bool,
    adapter: Option<&Path>,
) -> Result<()> {
    let dtype: ComputeDtype = dtype.parse()?;
    let options = LoadOptions {
        dtype,
        allow_unclean,
        ..LoadOptions::default()
    };
    let mut loaded = loader::load(&registry()?, model, &options)
        .with_context(|| format!("loading {}", model.display()))?;
    if let Some(dir) = adapter {
        let attached = mlx_zoo::lora::formats::load_adapter(&mut loaded, dir)
            .with_context(|| format!("applying the adapter in {}", dir.display()))?;
        eprintln!(
            "applied a {} {} adapter (rank {}, scale {}) to {} layers",
            match attached.format {
                mlx_zoo::lora::formats::AdapterFormat::Peft => "PEFT",
                mlx_zoo::lora::formats::AdapterFormat::MlxLm => "mlx-lm",
            },
            attached.method,
            attached.settings.rank,
            attached.settings.scale(),
            attached.modules.len()
        );
    }
    let ids = read_tokens(tokens, loaded.model.dims().vocab_size)?;
    let logits = loaded
        .model
        .forward(&ids, None)
        .with_context(|| format!("running {}", model.display()))?
        .as_dtype(mlx_rs::Dtype::Float32)
        .context("casting logits to float32")?;
    logits.eval().context("computing logits")?;
    let shape: Vec<usize> = logits.shape().iter().map(|&d| d as usize).collect();
    npy::write_f32(out, &shape, logits.as_slice::<f32>())?;
    tracing::info!(?shape, out = %out.display(), "wrote logits");
    eprintln!(
        "wrote {} logits {:?} to {}",
        loaded.architecture,
        shape,
        out.display()
    );
    Ok(())
}

/// The tiny LLaMA bundled into the binary (made by
/// tests/fixtures/make_fixtures.py with transformers).
const DEMO_FILES: [(&str, &[u8]); 3] = [
    (
        "config.json",
        include_bytes!("../../tests/fixtures/models/llama-gqa/config.json"),
    ),
    (
        "model.safetensors",
        include_bytes!("../../tests/fixtures/models/llama-gqa/model.safetensors"),
    ),
    (
        "reference.safetensors",
        include_bytes!("../../tests/fixtures/models/llama-gqa/reference.safetensors"),
    ),
];

/// Token ids, their `[batch, seq]` shape and transformers' logits, as
/// recorded next to a fixture.
struct Reference {
    ids: Vec<i32>,
    shape: Vec<usize>,
    logits: Vec<f32>,
}

fn reference(dir: &Path) -> Result<Option<Reference>> {
    let path = dir.join("reference.safetensors");
    if !path.is_file() {
        return Ok(None);
    }
    let tensors = mlx_rs::Array::load_safetensors(&path)
        .with_context(|| format!("reading {}", path.display()))?;
    let ids = tensors
        .get("input_ids")
        .context("reference has no input_ids")?;
    let logits = tensors.get("logits").context("reference has no logits")?;
    let ids = ids.as_dtype(mlx_rs::Dtype::Int32)?;
    Ok(Some(Reference {
        ids: ids.as_slice::<i32>().to_vec(),
        shape: ids.shape().iter().map(|&d| d as usize).collect(),
        logits: logits.as_slice::<f32>().to_vec(),
    }))
}

/// `zoo demo`.
pub fn demo(model: Option<&Path>) -> Result<()> {
    // The bundled model's directory is removed when the demo ends, however
    // it ends.
    let _scratch: tempfile::TempDir;
    let dir = match model {
        Some(dir) => dir.to_path_buf(),
        None => {
            _scratch = tempfile::Builder::new()
                .prefix("zoo-demo-")
                .tempdir()
                .context("creating a temporary directory for the bundled model")?;
            let dir = _scratch.path().to_path_buf();
            for (name, data) in DEMO_FILES.iter().chain(&crate::demo_train::TOKENIZER_FILES) {
                std::fs::write(dir.join(name), data)
                    .with_context(|| format!("writing the bundled model to {}", dir.display()))?;
            }
            println!(
                "bundled tiny LLaMA (2 layers, GQA 4/2 heads, vocab 128) unpacked to {}",
                dir.display()
            );
            dir
        }
    };
    let info = mlx_zoo::runtime::runtime_info();
    println!(
        "MLX {} on {} with {}\n",
        info.mlx_version, info.device, info.blas.name
    );
    inspect(&dir, false, false)?;

    let started = std::time::Instant::now();
    let mut loaded = loader::load(&registry()?, &dir, &LoadOptions::default())
        .with_context(|| format!("loading {}", dir.display()))?;
    println!(
        "\nloaded in {:.1} ms",
        started.elapsed().as_secs_f64() * 1e3
    );

    if let Some(Reference {
        ids,
        shape,
        logits: expected,
    }) = reference(&dir)?
    {
        let input = Array::from_slice(&ids, &[shape[0] as i32, shape[1] as i32]);
        let logits = loaded.model.forward(&input, None)?;
        let diff = logits
            .as_slice::<f32>()
            .iter()
            .zip(&expected)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        println!(
            "logits for {}x{} reference tokens: max |mlx-zoo - transformers| = {diff:.2e} ({})",
            shape[0],
            shape[1],
            if diff < 1e-4 { "match" } else { "MISMATCH" }
        );
        if diff >= 1e-4 {
            bail!("the bundled model's logits differ from transformers' by {diff}");
        }
        let prompt: Vec<i32> = ids[..shape[1]].to_vec();
        let generated = greedy(loaded.model.as_mut(), &prompt, 8)?;
        println!("greedy continuation of {prompt:?}: {generated:?}");
    }
    if model.is_none() {
        let work = tempfile::Builder::new()
            .prefix("zoo-demo-train-")
            .tempdir()
            .context("creating a temporary directory for the training demo")?;
        crate::demo_train::run(&dir, work.path())?;
    }
    Ok(())
}

fn greedy(model: &mut dyn mlx_zoo::CausalLm, prompt: &[i32], steps: usize) -> Result<Vec<i32>> {
    let mut cache = model.new_cache();
    let mut input = Array::from_slice(prompt, &[1, prompt.len() as i32]);
    let mut out = Vec::new();
    for _ in 0..steps {
        let logits = model.forward(&input, Some(&mut cache))?;
        let last = logits.shape()[1] - 1;
        use mlx_rs::ops::indexing::IndexOp;
        let next = mlx_rs::ops::indexing::argmax_axis(logits.index((.., last, ..)), -1, None)?;
        let token = next.as_dtype(mlx_rs::Dtype::Int32)?.item_exact::<i32>();
        out.push(token);
        input = Array::from_slice(&[token], &[1, 1]);
    }
    Ok(out)
}
