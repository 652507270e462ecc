//! A training loop of your own on a model from the registry, using
//! mlx-zoo's pieces instead of `Trainer`: load, attach LoRA, tokenize,
//! batch, `loss_and_grad`, your own clipping and learning-rate rule, an
//! mlx-rs optimizer step, and a greedy generation before and after.
//!
//! ```sh
//! cargo run -p mlx-zoo-examples --example custom_training_loop [MODEL_DIR TOKENIZER_DIR]
//! ```
//!
//! Without arguments it uses the tiny llama and character tokenizer the
//! tests ship.

use mlx_zoo::adapter::AdapterSettings;
use mlx_zoo::generate::{generate, GenerateOptions};
use mlx_zoo::tokenizer::Tokenizer;
use mlx_zoo::train::{global_norm, loss_and_grad, make_batch, Example, Optimizer, OptimizerKind};
use std::path::{Path, PathBuf};

type Error = Box<dyn std::error::Error>;

fn main() -> Result<(), Error> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures");
    let mut args = std::env::args().skip(1);
    let model_dir = args
        .next()
        .map(PathBuf::from)
        .unwrap_or(root.join("models/llama-gqa"));
    let tokenizer_dir = args
        .next()
        .map(PathBuf::from)
        .unwrap_or(root.join("tokenizer/char-128"));
    run(&model_dir, &tokenizer_dir, 200)?;
    Ok(())
}

/// What a run did: the first and last losses, the answer before and after.
pub struct Outcome {
    /// Loss of the first step.
    pub first_loss: f32,
    /// Loss of the last step.
    pub last_loss: f32,
    /// The answer to the first question before training.
    pub before: String,
    /// The answer after training.
    pub after: String,
}

/// Trains LoRA for `steps` steps on three colour questions and answers the
/// first before and after.
pub fn run(model_dir: &Path, tokenizer_dir: &Path, steps: usize) -> Result<Outcome, Error> {
    // 1. A model from the registry, with LoRA on the attention projections.
    let registry = mlx_zoo::registry()?;
    let mut loaded = mlx_zoo::loader::load(&registry, model_dir, &Default::default())?;
    let settings = AdapterSettings {
        rank: 8,
        alpha: 16.0,
        dropout: 0.0,
        rslora: false,
    };
    let layers = loaded.apply_lora(
        &registry,
        &["q_proj", "k_proj", "v_proj", "o_proj"],
        settings,
    )?;
    println!("{}: LoRA on {} layers", loaded.architecture, layers.len());

    // 2. Data: tokenized by hand; the loss counts from `loss_start` on.
    let tokenizer = Tokenizer::from_dir(tokenizer_dir)?;
    let pairs = [
        ("colour of the sky:", " blue"),
        ("colour of grass:", " green"),
        ("colour of snow:", " white"),
    ];
    let mut examples = Vec::new();
    for (prompt, answer) in pairs {
        let mut ids = tokenizer.encode(prompt, true)?;
        let loss_start = ids.len();
        ids.extend(tokenizer.encode(answer, false)?);
        ids.extend(tokenizer.eos_ids().first());
        examples.push(Example { ids, loss_start });
    }
    let refs: Vec<&Example> = examples.iter().collect();
    let batch = make_batch(&refs, 0)?;

    let answer =
        |loaded: &mut mlx_zoo::loader::LoadedModel, prompt: &str| -> Result<String, Error> {
            let ids = tokenizer.encode(prompt, true)?;
            let options = GenerateOptions {
                max_tokens: 8,
                stop_tokens: tokenizer.eos_ids().to_vec(),
                ..Default::default()
            };
            let out: Vec<u32> =
                generate(loaded.model.as_mut(), &ids, options)?.collect::<Result<_, _>>()?;
            Ok(tokenizer.decode(&out)?)
        };
    let before = answer(&mut loaded, pairs[0].0)?;
    println!("before: {before:?}");

    // 3. The loop: your schedule, your clipping, mlx-rs's optimizer.
    let mut optimizer = Optimizer::new(OptimizerKind::AdamW, 3e-3, 0.0)?;
    let (mut first_loss, mut last_loss) = (f32::NAN, f32::NAN);
    for step in 0..steps {
        let (loss, grads) = loss_and_grad(loaded.model.as_mut(), &batch)?;
        if step == 0 {
            first_loss = loss;
        }
        last_loss = loss;
        let norm = global_norm(&grads)?;
        let scale = mlx_rs::Array::from_f32((1.0 / norm).min(1.0));
        let grads = grads
            .into_iter()
            .map(|(k, g)| Ok((k, g.multiply(&scale)?)))
            .collect::<Result<_, mlx_rs::error::Exception>>()?;
        optimizer.set_lr(if step < 10 {
            3e-3 * (step + 1) as f32 / 10.0
        } else {
            3e-3
        });
        let mut model = loaded.model.as_mut();
        optimizer.update(&mut model, &grads)?;
        if step % 50 == 0 {
            println!("step {step:>3}  loss {loss:.4}  grad norm {norm:.3}");
        }
    }
    let after = answer(&mut loaded, pairs[0].0)?;
    println!("after:  {after:?}");
    Ok(Outcome {
        first_loss,
        last_loss,
        before,
        after,
    })
}
