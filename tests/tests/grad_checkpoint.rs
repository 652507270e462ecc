//! Gradient checkpointing: every family's gradients equal those of the
//! plain backward pass (full fine-tuning, LoRA, and LoRA on a 4-bit base),
//! and MLX's measured peak memory falls on a model large enough to show it.
//! The tests share one lock: the peak is process-wide.

use mlx_rs::module::ModuleParameters;
use mlx_rs::Array;
use mlx_zoo::loader::{LoadOptions, LoadedModel};
use mlx_zoo::quantize::{QuantPlan, QuantSettings};
use mlx_zoo::train::{
    loss_and_grad, make_batch, plan, Batch, Example, OptimizerKind, PlanMethod, PlanSettings,
};
use mlx_zoo_tests::random_model::RandomLlama;
use std::sync::Mutex;

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// `batch` sequences of `len` seeded token ids below `vocab`, the first
/// quarter of each masked out of the loss.
fn batch(batch: usize, len: usize, vocab: u32) -> Batch {
    let examples: Vec<Example> = (0..batch)
        .map(|b| Example {
            ids: (0..len)
                .map(|i| ((i * 7 + b * 13 + i * i) as u32) % vocab)
                .collect(),
            loss_start: len / 4,
        })
        .collect();
    let refs: Vec<&Example> = examples.iter().collect();
    make_batch(&refs, 0).unwrap()
}

/// Largest absolute difference between the two gradient sets, which must
/// name the same parameters; and the largest gradient.
fn compare(
    plain: &mlx_rs::module::FlattenedModuleParam,
    checkpointed: &mlx_rs::module::FlattenedModuleParam,
) -> (f32, f32) {
    let mut names: Vec<_> = plain.keys().collect();
    names.sort();
    let mut other: Vec<_> = checkpointed.keys().collect();
    other.sort();
    assert_eq!(names, other, "the same parameters get gradients");
    let (mut worst, mut largest) = (0f32, 0f32);
    for name in names {
        let a = &plain[name];
        let b = &checkpointed[name];
        let diff = a.subtract(b).unwrap().abs().unwrap().max(None).unwrap();
        worst = worst.max(diff.item_cast::<f32>());
        largest = largest.max(a.abs().unwrap().max(None).unwrap().item_cast::<f32>());
    }
    (worst, largest)
}

/// Loss and gradients of `batch` without and then with checkpointing.
fn both_ways(loaded: &mut LoadedModel, batch: &Batch) -> (f32, f32, f32, f32) {
    let model = loaded.model.as_mut();
    assert!(!model.gradient_checkpointing());
    let (plain_loss, plain) = loss_and_grad(model, batch).unwrap();
    model.set_gradient_checkpointing(true).unwrap();
    assert!(model.gradient_checkpointing());
    let (loss, checkpointed) = loss_and_grad(model, batch).unwrap();
    model.set_gradient_checkpointing(false).unwrap();
    let (worst, largest) = compare(&plain, &checkpointed);
    (plain_loss, loss, worst, largest)
}

fn lora(loaded: &mut LoadedModel, targets: &[&str]) {
    let registry = mlx_zoo::registry().unwrap();
    let settings = mlx_zoo_tests::adapter_settings(4);
    loaded.apply_lora(&registry, targets, settings).unwrap();
    // LoRA's B starts at zero, which would leave A's gradient at zero.
    let b: Vec<(std::rc::Rc<str>, Array)> = loaded
        .model
        .trainable_parameters()
        .flatten()
        .into_iter()
        .filter(|(name, _)| name.ends_with("lora_b"))
        .map(|(name, value)| {
            let key = mlx_rs::random::key(5).unwrap();
            let noise = mlx_rs::random::normal::<f32>(value.shape(), 0.0, 0.05, &key).unwrap();
            (name, noise)
        })
        .collect();
    loaded.model.update_flattened(b.into_iter().collect());
}

#[test]
fn every_family_gets_the_same_gradients_with_checkpointing() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let cases = [
        "llama-gqa",
        "mistral-sliding",
        "mixtral-moe",
        "phi2",
        "phi3",
        "qwen-v1",
        "qwen2",
    ];
    for case in cases {
        let mut loaded = mlx_zoo_tests::load(case);
        let vocab = loaded.model.dims().vocab_size as u32;
        let (plain, checkpointed, worst, largest) = both_ways(&mut loaded, &batch(2, 24, vocab));
        assert_eq!(plain, checkpointed, "{case}: the loss");
        assert!(largest > 1e-3, "{case}: gradients are not all zero");
        assert!(worst <= 1e-5, "{case}: gradients differ by {worst}");
    }
}

#[test]
fn lora_and_qlora_get_the_same_gradients_with_checkpointing() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let registry = mlx_zoo::registry().unwrap();
    let q4 = LoadOptions {
        quantize: Some(QuantPlan::uniform(QuantSettings::affine(4, 32))),
        ..Default::default()
    };
    for (case, options) in [
        ("llama-gqa", LoadOptions::default()),
        ("llama-gqa", q4),
        ("mixtral-moe", LoadOptions::default()),
    ] {
        let mut loaded =
            mlx_zoo::loader::load(&registry, &mlx_zoo_tests::fixture(case), &options).unwrap();
        lora(&mut loaded, &["q_proj", "v_proj", "o_proj", "down_proj"]);
        let trainable = loaded.model.trainable_parameters().flatten();
        assert!(trainable.keys().all(|k| k.contains("lora_")));
        let vocab = loaded.model.dims().vocab_size as u32;
        let (plain, checkpointed, worst, largest) = both_ways(&mut loaded, &batch(2, 24, vocab));
        assert_eq!(plain, checkpointed, "{case}: the loss");
        assert!(largest > 1e-4, "{case}: gradients are not all zero");
        assert!(worst <= 1e-5, "{case}: gradients differ by {worst}");
    }
}

/// MLX's peak while computing one batch's gradients.
fn peak_of_one_step(loaded: &mut LoadedModel, batch: &Batch) -> usize {
    mlx_rs::memory::clear_cache().unwrap();
    mlx_rs::memory::reset_peak_memory().unwrap();
    loss_and_grad(loaded.model.as_mut(), batch).unwrap();
    mlx_rs::memory::peak_memory().unwrap()
}

#[test]
fn checkpointing_lowers_the_peak_memory() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    RandomLlama {
        hidden: 256,
        heads: 4,
        kv_heads: 2,
        head_dim: 64,
        intermediate: 704,
        vocab: 256,
        layers: 6,
        sliding_window: None,
    }
    .write(dir.path());
    let registry = mlx_zoo::registry().unwrap();
    let mut loaded = mlx_zoo::loader::load(&registry, dir.path(), &LoadOptions::default()).unwrap();
    lora(&mut loaded, &["q_proj", "k_proj", "v_proj", "o_proj"]);
    let batch = batch(4, 256, 256);
    mlx_rs::transforms::eval(loaded.model.parameters().flatten().values().copied()).unwrap();
    let plain = peak_of_one_step(&mut loaded, &batch);
    loaded.model.set_gradient_checkpointing(true).unwrap();
    let checkpointed = peak_of_one_step(&mut loaded, &batch);
    let mib = |b: usize| b as f64 / (1 << 20) as f64;
    eprintln!(
        "peak of one LoRA step, 6 blocks, 4 x 256 tokens: {:.1} MiB plain, {:.1} MiB checkpointed",
        mib(plain),
        mib(checkpointed)
    );
    // `zoo plan`'s estimates for both.
    let inspection = mlx_zoo::loader::inspect(&registry, dir.path()).unwrap();
    for (grad_checkpoint, measured) in [(false, plain), (true, checkpointed)] {
        let settings = PlanSettings {
            method: PlanMethod::Adapter {
                rank: 4,
                dora: false,
            },
            quantization: None,
            targets: ["q_proj", "k_proj", "v_proj", "o_proj"]
                .map(String::from)
                .to_vec(),
            batch_size: 4,
            seq_len: 255,
            optimizer: OptimizerKind::AdamW,
            grad_checkpoint,
        };
        let estimate = plan(&inspection, &settings).total;
        let ratio = measured as f64 / estimate as f64;
        eprintln!("checkpointing {grad_checkpoint}: measured / planned {ratio:.2}");
        assert!((0.67..1.5).contains(&ratio), "{ratio}");
    }
    assert!(
        (checkpointed as f64) < 0.6 * plain as f64,
        "checkpointed peak {:.1} MiB is not well below the plain {:.1} MiB",
        mib(checkpointed),
        mib(plain)
    );
}
