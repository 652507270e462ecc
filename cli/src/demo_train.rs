//! The training half of `zoo demo`: the bundled tiny LLaMA (random weights,
//! vocabulary 128) with the bundled character tokenizer is fully fine-tuned
//! on a few sentences until it recites them, quantized to 4 bits, then
//! LoRA-tuned (QLoRA) on a small question-answer set with the loss on the
//! answers only; generations before and after each stage show what changed.

use anyhow::{Context, Result};
use mlx_zoo::adapter::{AdapterSettings, AdapterTargets};
use mlx_zoo::generate::{generate, GenerateOptions};
use mlx_zoo::loader::{self, LoadOptions, LoadedModel};
use mlx_zoo::tokenizer::Tokenizer;
use mlx_zoo::train::{
    load_dataset, DataOptions, Decay, Schedule, StepReport, TrainConfig, TrainHooks, Trainer,
};
use std::path::Path;

/// The character tokenizer made by tests/fixtures/make_tokenizer_fixture.py.
pub const TOKENIZER_FILES: [(&str, &[u8]); 2] = [
    (
        "tokenizer.json",
        include_bytes!("../../tests/fixtures/tokenizer/char-128/tokenizer.json"),
    ),
    (
        "tokenizer_config.json",
        include_bytes!("../../tests/fixtures/tokenizer/char-128/tokenizer_config.json"),
    ),
];

/// What the full fine-tune teaches.
const SENTENCES: [&str; 4] = [
    "the zoo keeps llamas, mistrals, phis and qwens.",
    "mlx runs them on the cpu with openblas.",
    "rust loads, quantizes and tunes them.",
    "adapters are small; the base stays frozen.",
];

/// What the QLoRA stage teaches: (question, answer).
const QUESTIONS: [(&str, &str); 4] = [
    ("Q: who keeps the llamas?\nA:", " the zoo"),
    ("Q: what runs them?\nA:", " mlx"),
    ("Q: which language?\nA:", " rust"),
    ("Q: what stays frozen?\nA:", " the base"),
];

/// Prints every `every`-th step's loss.
pub(crate) struct Every {
    /// Steps between two lines.
    pub(crate) every: usize,
}

impl TrainHooks for Every {
    fn on_step(&mut self, r: &StepReport) {
        if r.step == 1 || r.step % self.every == 0 {
            println!(
                "  step {:>3}  loss {:.3}  ({:.0} tokens/s)",
                r.step, r.loss, r.tokens_per_second
            );
        }
    }
}

fn continue_text(
    loaded: &mut LoadedModel,
    tokenizer: &Tokenizer,
    prompt: &str,
    max: usize,
) -> Result<String> {
    let ids = tokenizer.encode(prompt, true)?;
    let options = GenerateOptions {
        max_tokens: max,
        stop_tokens: tokenizer.eos_ids().to_vec(),
        ..Default::default()
    };
    let tokens: Vec<u32> =
        generate(loaded.model.as_mut(), &ids, options)?.collect::<Result<_, _>>()?;
    let text = tokenizer.decode(&tokens)?;
    Ok(text.lines().next().unwrap_or("").to_string())
}

fn write_jsonl(path: &Path, lines: impl Iterator<Item = serde_json::Value>) -> Result<()> {
    let text: Vec<String> = lines.map(|v| v.to_string()).collect();
    std::fs::write(path, text.join("\n")).with_context(|| format!("writing {}", path.display()))
}

fn config(iters: usize, lr: f32) -> TrainConfig {
    TrainConfig {
        batch_size: 4,
        iters,
        schedule: Schedule {
            peak: lr,
            warmup: 5,
            total: iters,
            decay: Decay::Cosine,
            min_ratio: 0.1,
        },
        ..Default::default()
    }
}

/// Runs the three stages on the model in `dir` (the bundled one, with the
/// tokenizer files written next to it), working in `scratch`.
pub fn run(dir: &Path, scratch: &Path) -> Result<()> {
    let registry = mlx_zoo::registry()?;
    let tokenizer = Tokenizer::from_dir(dir)?;
    let data_options = DataOptions {
        max_seq_len: 96,
        mask_prompt: false,
        valid_fraction: 0.0,
    };

    println!("\n== 1. full fine-tune on {} sentences ==", SENTENCES.len());
    let mut loaded = loader::load(&registry, dir, &LoadOptions::default())?;
    let prompt = "the zoo ";
    println!(
        "  before: {prompt:?} -> {:?}",
        continue_text(&mut loaded, &tokenizer, prompt, 40)?
    );
    let text_data = scratch.join("sentences.jsonl");
    write_jsonl(
        &text_data,
        SENTENCES.iter().map(|s| serde_json::json!({"text": s})),
    )?;
    let data = load_dataset(&text_data, &tokenizer, &data_options)?;
    let pad = tokenizer.eos_ids().first().copied().unwrap_or(0);
    let mut trainer = Trainer::new(config(120, 3e-3), &data, pad)?;
    let mut hooks = Every { every: 30 };
    trainer.run(
        loaded.model.as_mut(),
        &data,
        &scratch.join("full-checkpoints"),
        &mut hooks,
    )?;
    println!(
        "  after:  {prompt:?} -> {:?}",
        continue_text(&mut loaded, &tokenizer, prompt, 40)?
    );

    println!("\n== 2. quantize the tuned model to 4 bits (groups of 32) ==");
    let tuned = scratch.join("tuned");
    mlx_zoo::export::save_mlx_model(&loaded, dir, &tuned, &Default::default())?;
    let settings = mlx_zoo::quantize::QuantSettings::affine(4, 32);
    let options = LoadOptions {
        quantize: Some(mlx_zoo::quantize::QuantPlan::uniform(settings)),
        ..Default::default()
    };
    let mut quantized = loader::load(&registry, &tuned, &options)?;
    println!(
        "  {} layers quantized; 4-bit: {prompt:?} -> {:?}",
        quantized.quantization.quantized.len(),
        continue_text(&mut quantized, &tokenizer, prompt, 40)?
    );

    println!(
        "\n== 3. QLoRA on {} questions (loss on the answers only) ==",
        QUESTIONS.len()
    );
    let qa_data = scratch.join("questions.jsonl");
    write_jsonl(
        &qa_data,
        QUESTIONS
            .iter()
            .map(|(q, a)| serde_json::json!({"prompt": q, "completion": a})),
    )?;
    let data = load_dataset(
        &qa_data,
        &tokenizer,
        &DataOptions {
            mask_prompt: true,
            ..data_options
        },
    )?;
    for (q, _) in &QUESTIONS {
        println!(
            "  before: {:?} -> {:?}",
            q.lines().next().unwrap_or(q),
            continue_text(&mut quantized, &tokenizer, q, 12)?
        );
    }
    let adapter = AdapterSettings {
        rank: 16,
        alpha: 32.0,
        dropout: 0.0,
        rslora: false,
    };
    let targets = AdapterTargets {
        all_linear: true,
        ..Default::default()
    };
    // LoRA's A starts random: seeded, so every run of the demo is the same.
    mlx_rs::random::seed(7)?;
    let layers = quantized.apply_adapter(&registry, "lora", adapter, &targets)?;
    println!(
        "  lora rank 16 on {} quantized layers; the questions packed into shared rows",
        layers.len()
    );
    // The questions are short: packed into one row rather than padded.
    let packed = TrainConfig {
        pack: Some(data_options.max_seq_len),
        ..config(300, 3e-3)
    };
    let mut trainer = Trainer::new(packed, &data, pad)?;
    let mut hooks = Every { every: 100 };
    trainer.run(
        quantized.model.as_mut(),
        &data,
        &scratch.join("qlora-checkpoints"),
        &mut hooks,
    )?;
    let mut right = 0;
    for (q, a) in &QUESTIONS {
        let answer = continue_text(&mut quantized, &tokenizer, q, 12)?;
        right += usize::from(answer.trim() == a.trim());
        println!(
            "  after:  {:?} -> {answer:?}",
            q.lines().next().unwrap_or(q)
        );
    }
    println!("  {right} of {} answers right", QUESTIONS.len());
    Ok(())
}
