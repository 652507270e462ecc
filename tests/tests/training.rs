//! Training end to end on the tiny fixtures with the character-level
//! fixture tokenizer (all vocab 128): LoRA, QLoRA and full fine-tuning
//! lower the loss (Mixtral's experts too); a resumed run repeats the
//! uninterrupted run's losses bit for bit; gradient accumulation equals the
//! larger batch; packed batches equal padded ones; dropout applies in
//! training only, experts included; a NaN stops the run; bad data is
//! refused naming the line.

use mlx_rs::module::ModuleParameters;
use mlx_zoo::adapter::AdapterSettings;
use mlx_zoo::loader::{LoadOptions, LoadedModel};
use mlx_zoo::tokenizer::Tokenizer;
use mlx_zoo::train::{
    load_dataset, DataOptions, Dataset, Decay, OptimizerKind, Schedule, TrainConfig, TrainError,
    TrainHooks, Trainer,
};
use std::path::{Path, PathBuf};

fn tokenizer() -> Tokenizer {
    Tokenizer::from_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/tokenizer/char-128"))
        .expect("fixture tokenizer")
}

/// Sixteen prompt/completion records (twelve to train, four to validate).
fn write_data(dir: &Path) -> PathBuf {
    let path = dir.join("data.jsonl");
    let lines: Vec<String> = (0..16)
        .map(|i| {
            let a = i % 7;
            let b = (i * 3) % 5;
            serde_json::json!({"prompt": format!("{a}+{b}="), "completion": format!("{}", a + b)})
                .to_string()
        })
        .collect();
    std::fs::write(&path, lines.join("\n")).unwrap();
    path
}

fn dataset(dir: &Path, mask_prompt: bool) -> Dataset {
    let options = DataOptions {
        max_seq_len: 64,
        mask_prompt,
        valid_fraction: 0.25,
    };
    load_dataset(&write_data(dir), &tokenizer(), &options).unwrap()
}

fn with_lora(mut loaded: LoadedModel) -> LoadedModel {
    let registry = mlx_zoo::registry().unwrap();
    let settings = mlx_zoo_tests::adapter_settings(4);
    loaded
        .apply_lora(
            &registry,
            &["q_proj", "k_proj", "v_proj", "o_proj"],
            settings,
        )
        .unwrap();
    loaded
}

fn config(iters: usize, lr: f32) -> TrainConfig {
    TrainConfig {
        batch_size: 4,
        grad_accum: 1,
        iters,
        schedule: Schedule {
            peak: lr,
            warmup: 2,
            total: iters,
            decay: Decay::Cosine,
            min_ratio: 0.1,
        },
        optimizer: OptimizerKind::AdamW,
        weight_decay: 0.0,
        max_grad_norm: Some(1.0),
        seed: 3,
        eval_every: 0,
        eval_batches: 0,
        save_every: 0,
        pack: None,
        streams: 1,
        compile: false,
    }
}

/// Losses of `steps` optimizer steps.
fn losses(
    trainer: &mut Trainer,
    loaded: &mut LoadedModel,
    data: &Dataset,
    steps: usize,
) -> Vec<f32> {
    (0..steps)
        .map(|_| {
            trainer
                .train_step(loaded.model.as_mut(), data)
                .unwrap()
                .loss
        })
        .collect()
}

#[test]
fn lora_lowers_the_loss_and_only_adapters_change() {
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(dir.path(), true);
    assert_eq!((data.train.len(), data.valid.len()), (12, 4));
    let mut loaded = with_lora(mlx_zoo_tests::load("llama-gqa"));
    let frozen_before: Vec<f32> = loaded.model.parameters().flatten()
        ["model.layers.0.self_attn.q_proj.weight"]
        .as_slice::<f32>()
        .to_vec();
    let mut trainer = Trainer::new(config(60, 5e-3), &data, 0).unwrap();
    let valid_before = trainer
        .evaluate(loaded.model.as_mut(), &data.valid, 0)
        .unwrap()
        .unwrap();
    let losses = losses(&mut trainer, &mut loaded, &data, 60);
    let valid_after = trainer
        .evaluate(loaded.model.as_mut(), &data.valid, 0)
        .unwrap()
        .unwrap();
    let first: f32 = losses[..6].iter().sum::<f32>() / 6.0;
    let last: f32 = losses[54..].iter().sum::<f32>() / 6.0;
    assert!(
        last < 0.5 * first,
        "training loss {first} -> {last}: {losses:?}"
    );
    assert!(
        valid_after < valid_before,
        "validation loss {valid_before} -> {valid_after}"
    );
    let frozen_after = loaded.model.parameters().flatten()
        ["model.layers.0.self_attn.q_proj.weight"]
        .as_slice::<f32>()
        .to_vec();
    assert_eq!(
        frozen_before, frozen_after,
        "the base weights must not move"
    );
}

/// The model's trainable parameters, copied.
fn trainable(loaded: &LoadedModel) -> Vec<(std::rc::Rc<str>, mlx_rs::Array)> {
    loaded
        .model
        .trainable_parameters()
        .flatten()
        .into_iter()
        .map(|(k, v)| (k, v.clone()))
        .collect()
}

/// A run of `config.iters` steps on the llama fixture from the same seeded
/// start (the LoRA initialisation draws from MLX's per-thread key): LoRA
/// rank 4, or full fine-tuning when `full`. Returns the losses and the
/// trained parameters.
fn seeded_run(
    config: TrainConfig,
    full: bool,
    data: &Dataset,
) -> (Vec<f32>, Vec<(std::rc::Rc<str>, mlx_rs::Array)>) {
    mlx_rs::random::seed(42).unwrap();
    let mut loaded = if full {
        mlx_zoo_tests::load("llama-gqa")
    } else {
        with_lora(mlx_zoo_tests::load("llama-gqa"))
    };
    let steps = config.iters;
    let mut trainer = Trainer::new(config, data, 0).unwrap();
    let losses = losses(&mut trainer, &mut loaded, data, steps);
    (losses, trainable(&loaded))
}

/// The mean of the last `window` losses is under half the mean of the
/// first `window`.
fn assert_loss_halves(losses: &[f32], window: usize, what: &str) {
    let first: f32 = losses[..window].iter().sum();
    let last: f32 = losses[losses.len() - window..].iter().sum();
    assert!(last < 0.5 * first, "{what}: {losses:?}");
}

#[test]
fn a_resumed_run_repeats_the_uninterrupted_losses_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(dir.path(), true);
    let mut straight_model = with_lora(mlx_zoo_tests::load("llama-gqa"));
    let start = trainable(&straight_model);
    let mut straight = Trainer::new(config(8, 5e-3), &data, 0).unwrap();
    let expected = losses(&mut straight, &mut straight_model, &data, 8);

    // The same start (LoRA's A is random: copy it), four steps, a checkpoint.
    let mut model = with_lora(mlx_zoo_tests::load("llama-gqa"));
    let mut model_ref = model.model.as_mut();
    ModuleParameters::update_flattened(&mut model_ref, start.into_iter().collect());
    let mut trainer = Trainer::new(config(8, 5e-3), &data, 0).unwrap();
    let mut got = losses(&mut trainer, &mut model, &data, 4);
    let checkpoints = dir.path().join("checkpoints");
    let checkpoint = trainer
        .save_checkpoint(model.model.as_mut(), &checkpoints)
        .unwrap();
    assert!(checkpoint.ends_with("step-000004"));
    drop((trainer, model));

    // A new process: a fresh model (another random A), resumed.
    let mut model = with_lora(mlx_zoo_tests::load("llama-gqa"));
    let mut trainer = Trainer::new(config(8, 5e-3), &data, 0).unwrap();
    trainer.resume(model.model.as_mut(), &checkpoint).unwrap();
    assert_eq!(trainer.step(), 4);
    got.extend(losses(&mut trainer, &mut model, &data, 4));
    assert_eq!(
        got, expected,
        "resumed losses differ from the uninterrupted run"
    );

    // A checkpoint of another run shape is refused, naming why.
    let mut other = Trainer::new(
        TrainConfig {
            batch_size: 2,
            ..config(8, 5e-3)
        },
        &data,
        0,
    )
    .unwrap();
    let error = other
        .resume(model.model.as_mut(), &checkpoint)
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("batch size 4") && error.contains("step-000004"),
        "{error}"
    );
    let mut bare = mlx_zoo_tests::load("llama-gqa");
    let registry = mlx_zoo::registry().unwrap();
    let settings = mlx_zoo_tests::adapter_settings(4);
    bare.apply_lora(&registry, &["q_proj"], settings).unwrap();
    let mut trainer = Trainer::new(config(8, 5e-3), &data, 0).unwrap();
    let error = trainer
        .resume(bare.model.as_mut(), &checkpoint)
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("unexpected") && error.contains("k_proj"),
        "{error}"
    );
}

#[test]
fn gradient_accumulation_equals_the_larger_batch() {
    let dir = tempfile::tempdir().unwrap();
    let mut data = dataset(dir.path(), false);
    data.train.truncate(4);
    let mut one = with_lora(mlx_zoo_tests::load("llama-gqa"));
    let start = trainable(&one);
    let mut two = with_lora(mlx_zoo_tests::load("llama-gqa"));
    let mut two_ref = two.model.as_mut();
    ModuleParameters::update_flattened(&mut two_ref, start.into_iter().collect());
    let sgd = |batch_size, grad_accum| TrainConfig {
        batch_size,
        grad_accum,
        optimizer: OptimizerKind::Sgd,
        max_grad_norm: None,
        ..config(1, 0.1)
    };
    let big = Trainer::new(sgd(4, 1), &data, 0)
        .unwrap()
        .train_step(one.model.as_mut(), &data)
        .unwrap();
    let small = Trainer::new(sgd(2, 2), &data, 0)
        .unwrap()
        .train_step(two.model.as_mut(), &data)
        .unwrap();
    assert_eq!(big.loss_tokens, small.loss_tokens);
    assert!(
        (big.loss - small.loss).abs() < 1e-5,
        "{} vs {}",
        big.loss,
        small.loss
    );
    assert!((big.grad_norm - small.grad_norm).abs() < 1e-5 * big.grad_norm.max(1.0));
    let (a, b) = (trainable(&one), trainable(&two));
    let worst = a
        .iter()
        .map(|(k, v)| {
            let w = b
                .iter()
                .find(|(kb, _)| kb == k)
                .unwrap()
                .1
                .as_slice::<f32>()
                .to_vec();
            mlx_zoo_tests::max_abs_diff(v.as_slice::<f32>(), &w)
        })
        .fold(0f32, f32::max);
    assert!(worst < 1e-6, "parameters differ by {worst}");
}

#[test]
fn full_fine_tuning_and_qlora_lower_the_loss() {
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(dir.path(), true);
    let mut full = mlx_zoo_tests::load("llama-gqa");
    let trainable_count = full.model.trainable_parameters().flatten().len();
    assert_eq!(
        trainable_count,
        full.model.parameters().flatten().len(),
        "nothing frozen"
    );
    let mut trainer = Trainer::new(config(30, 2e-3), &data, 0).unwrap();
    let l = losses(&mut trainer, &mut full, &data, 30);
    assert_loss_halves(&l, 5, "full");

    let registry = mlx_zoo::registry().unwrap();
    let quantize =
        mlx_zoo::quantize::QuantPlan::uniform(mlx_zoo::quantize::QuantSettings::affine(4, 32));
    let options = LoadOptions {
        quantize: Some(quantize),
        ..Default::default()
    };
    let q4 =
        mlx_zoo::loader::load(&registry, &mlx_zoo_tests::fixture("llama-gqa"), &options).unwrap();
    let mut qlora = with_lora(q4);
    assert!(qlora
        .model
        .trainable_parameters()
        .flatten()
        .keys()
        .all(|k| k.contains("lora_")));
    let mut trainer = Trainer::new(config(60, 5e-3), &data, 0).unwrap();
    let l = losses(&mut trainer, &mut qlora, &data, 60);
    assert_loss_halves(&l, 6, "qlora");
}

/// Fills every LoRA `B` factor with NaN, so the next loss is not finite.
fn poison_lora_b(loaded: &mut LoadedModel) {
    loaded
        .model
        .visit_linears(&mut |_, layer| {
            if let Some(b) = layer.lora_b.as_ref().as_ref() {
                let nan =
                    mlx_rs::ops::full::<f32>(b.shape(), mlx_rs::Array::from_f32(f32::NAN)).unwrap();
                layer.lora_b = mlx_rs::module::Param::new(Some(nan));
            }
            Ok(())
        })
        .unwrap();
}

#[test]
fn a_non_finite_loss_stops_before_the_update() {
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(dir.path(), false);
    let mut loaded = with_lora(mlx_zoo_tests::load("llama-gqa"));
    let mut trainer = Trainer::new(config(4, 1e-3), &data, 0).unwrap();
    trainer.train_step(loaded.model.as_mut(), &data).unwrap();
    let checkpoint = trainer
        .save_checkpoint(loaded.model.as_mut(), &dir.path().join("ck"))
        .unwrap();
    poison_lora_b(&mut loaded);
    let error = trainer
        .train_step(loaded.model.as_mut(), &data)
        .unwrap_err();
    assert!(
        matches!(error, TrainError::NonFiniteLoss { step: 2, .. }),
        "{error}"
    );
    let message = error.to_string();
    assert!(
        message.contains("NaN") && message.contains(&checkpoint.display().to_string()),
        "{message}"
    );
    assert_eq!(trainer.step(), 1);
}

#[test]
fn bad_data_is_refused_naming_the_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.jsonl");
    let options = DataOptions::default();
    for (content, needle) in [
        (
            "{\"text\": \"ok\"}\n{\"prompt\": \"x\"}\n",
            ":2: `prompt` without `completion`",
        ),
        (
            "{\"text\": \"ok\"}\n\n{\"txt\": 1}\n",
            ":3: unknown field `txt`",
        ),
        (
            "{\"text\": \"a\", \"messages\": []}\n",
            ":1: expected exactly one of",
        ),
        ("not json\n", ":1: expected"),
    ] {
        std::fs::write(&path, content).unwrap();
        let error = load_dataset(&path, &tokenizer(), &options)
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("bad.jsonl") && error.contains(needle),
            "{error}"
        );
    }
    let error = load_dataset(dir.path(), &tokenizer(), &options)
        .unwrap_err()
        .to_string();
    assert!(error.contains("no train.jsonl"), "{error}");
}

#[test]
fn long_sequences_are_cut_and_counted_and_chats_mask_all_but_the_answer() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("train.jsonl");
    let chat = serde_json::json!({"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"}]});
    std::fs::write(
        &path,
        format!("{chat}\n{}\n", serde_json::json!({"text": "x".repeat(100)})),
    )
    .unwrap();
    let options = DataOptions {
        max_seq_len: 60,
        mask_prompt: true,
        valid_fraction: 0.0,
    };
    let data = load_dataset(dir.path(), &tokenizer(), &options).unwrap();
    assert_eq!(data.truncated, 1);
    assert!(data.train.iter().all(|e| e.ids.len() <= 60));
    let chat = &data.train[0];
    let tok = tokenizer();
    // The loss covers the assistant's text (and what the template puts after it).
    let answer = tok.decode(&chat.ids[chat.loss_start..]).unwrap();
    assert_eq!(answer.trim_end(), " Hello", "{answer:?}");
    let prompt = tok.decode(&chat.ids[..chat.loss_start]).unwrap();
    assert!(prompt.ends_with("ASSISTANT:"), "{prompt:?}");
}

#[test]
fn lora_dropout_applies_in_training_only_and_resumes_identically() {
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(dir.path(), true);
    let registry = mlx_zoo::registry().unwrap();
    let settings = AdapterSettings {
        rank: 4,
        alpha: 8.0,
        dropout: 0.3,
        rslora: false,
    };
    let dropout_lora = || {
        let mut loaded = mlx_zoo_tests::load("llama-gqa");
        loaded
            .apply_lora(&registry, &["q_proj", "v_proj"], settings)
            .unwrap();
        loaded
    };
    let mut straight_model = dropout_lora();
    let start = trainable(&straight_model);
    let mut straight = Trainer::new(config(6, 5e-3), &data, 0).unwrap();
    let expected = losses(&mut straight, &mut straight_model, &data, 6);

    let ids = mlx_rs::Array::from_slice(&[1i32, 20, 30, 40], &[1, 4]);
    let model = straight_model.model.as_mut();
    let eval_a = model
        .forward(&ids, None)
        .unwrap()
        .as_slice::<f32>()
        .to_vec();
    let eval_b = model
        .forward(&ids, None)
        .unwrap()
        .as_slice::<f32>()
        .to_vec();
    assert_eq!(eval_a, eval_b, "no dropout outside training");
    assert_eq!(
        mlx_zoo::adapter::set_adapter_training(model, true).unwrap(),
        4
    );
    let train_a = model
        .forward(&ids, None)
        .unwrap()
        .as_slice::<f32>()
        .to_vec();
    let train_b = model
        .forward(&ids, None)
        .unwrap()
        .as_slice::<f32>()
        .to_vec();
    mlx_zoo::adapter::set_adapter_training(model, false).unwrap();
    assert_ne!(train_a, train_b, "dropout draws new masks");

    let mut model = dropout_lora();
    let mut model_ref = model.model.as_mut();
    ModuleParameters::update_flattened(&mut model_ref, start.into_iter().collect());
    let mut trainer = Trainer::new(config(6, 5e-3), &data, 0).unwrap();
    let mut got = losses(&mut trainer, &mut model, &data, 3);
    let checkpoint = trainer
        .save_checkpoint(model.model.as_mut(), &dir.path().join("ck"))
        .unwrap();
    let mut model = dropout_lora();
    let mut trainer = Trainer::new(config(6, 5e-3), &data, 0).unwrap();
    trainer.resume(model.model.as_mut(), &checkpoint).unwrap();
    got.extend(losses(&mut trainer, &mut model, &data, 3));
    assert_eq!(got, expected, "dropout masks must repeat after a resume");
}

/// Largest absolute difference between two gradient sets over the same
/// parameters, and the largest gradient.
fn gradient_gap(
    a: &mlx_rs::module::FlattenedModuleParam,
    b: &mlx_rs::module::FlattenedModuleParam,
) -> (f32, f32) {
    assert_eq!(a.len(), b.len());
    a.iter().fold((0f32, 0f32), |(gap, largest), (name, x)| {
        let y = &b[name];
        let diff = x.subtract(y).unwrap().abs().unwrap().max(None).unwrap();
        let size = x.abs().unwrap().max(None).unwrap();
        (
            gap.max(diff.item_cast::<f32>()),
            largest.max(size.item_cast::<f32>()),
        )
    })
}

#[test]
fn packed_batches_give_the_padded_loss_and_gradients() {
    use mlx_zoo::train::{loss_and_grad, make_batch, make_packed_batch, Example};
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(dir.path(), true);
    // Ten sequences of 3 to 25 tokens (character ids), some with prompts.
    let owned: Vec<Example> = [25usize, 3, 4, 12, 6, 20, 5, 8, 3, 10]
        .iter()
        .enumerate()
        .map(|(i, &len)| Example {
            ids: (0..len)
                .map(|t| 32 + ((t * 7 + i * 11) % 90) as u32)
                .collect(),
            loss_start: if i % 3 == 0 { len / 2 } else { 0 },
        })
        .collect();
    let examples: Vec<&Example> = owned.iter().collect();
    let padded = make_batch(&examples, 0).unwrap();
    let packed = make_packed_batch(&examples, 0, 32).unwrap();
    assert!(
        packed.inputs.size() * 2 < padded.inputs.size(),
        "{:?} packed against {:?} padded",
        packed.inputs.shape(),
        padded.inputs.shape()
    );
    // Sliding windows (mistral, qwen2: 4 positions, shorter than the
    // examples), experts, parallel blocks, partial rotary, dynamic NTK
    // within its limit.
    for case in [
        "llama-gqa",
        "mistral-sliding",
        "mixtral-moe",
        "phi2",
        "phi3",
        "qwen2",
        "llama-dynamic-rope",
    ] {
        let mut loaded = mlx_zoo_tests::load(case);
        let (padded_loss, padded_grads) = loss_and_grad(loaded.model.as_mut(), &padded).unwrap();
        let (packed_loss, packed_grads) = loss_and_grad(loaded.model.as_mut(), &packed).unwrap();
        assert!(
            (padded_loss - packed_loss).abs() < 1e-5,
            "{case}: loss {padded_loss} padded, {packed_loss} packed"
        );
        let (gap, largest) = gradient_gap(&padded_grads, &packed_grads);
        assert!(largest > 1e-3, "{case}: gradients are not all zero");
        assert!(gap < 1e-5, "{case}: gradients differ by {gap}");
    }

    // Past the dynamic-NTK limit (32 positions) a packed row would rotate
    // its examples differently: refused.
    let mut dynamic = mlx_zoo_tests::load("llama-dynamic-rope");
    let long = make_packed_batch(&examples, 0, 64).unwrap();
    assert!(long.inputs.shape()[1] > 32);
    let err = loss_and_grad(dynamic.model.as_mut(), &long)
        .unwrap_err()
        .to_string();
    assert!(err.contains("exceed 32"), "{err}");
    // The original Qwen scales by absolute position: no packing.
    let mut qwen = mlx_zoo_tests::load("qwen-v1");
    let err = loss_and_grad(qwen.model.as_mut(), &packed)
        .unwrap_err()
        .to_string();
    assert!(err.contains("packed"), "{err}");

    // A packed run repeats the padded run's losses.
    let losses_of = |pack: Option<usize>| {
        let config = TrainConfig {
            pack,
            ..config(4, 5e-3)
        };
        seeded_run(config, false, &data).0
    };
    // Evaluation packs too, with the same result.
    let mut model = with_lora(mlx_zoo_tests::load("llama-gqa"));
    let evaluate = |pack: Option<usize>, model: &mut LoadedModel| {
        let trainer = Trainer::new(
            TrainConfig {
                pack,
                ..config(1, 1e-3)
            },
            &data,
            0,
        )
        .unwrap();
        trainer
            .evaluate(model.model.as_mut(), &owned, 0)
            .unwrap()
            .unwrap()
    };
    let (padded_eval, packed_eval) = (evaluate(None, &mut model), evaluate(Some(32), &mut model));
    assert!(
        (padded_eval - packed_eval).abs() < 1e-5,
        "evaluation: {padded_eval} padded, {packed_eval} packed"
    );

    let padded_losses = losses_of(None);
    let packed_losses = losses_of(Some(32));
    for (a, b) in padded_losses.iter().zip(&packed_losses) {
        assert!(
            (a - b).abs() < 1e-4,
            "{padded_losses:?} vs {packed_losses:?}"
        );
    }
}

#[test]
fn expert_adapters_drop_out_in_training_only() {
    let registry = mlx_zoo::registry().unwrap();
    let mut loaded = mlx_zoo_tests::load("mixtral-moe");
    let settings = AdapterSettings {
        rank: 4,
        alpha: 8.0,
        dropout: 0.5,
        rslora: false,
    };
    let layers = loaded
        .apply_lora(&registry, &["gate_proj", "up_proj", "down_proj"], settings)
        .unwrap();
    assert!(
        layers.iter().all(|l| l.contains("switch_mlp")),
        "expert stacks adapted: {layers:?}"
    );
    // B starts at zero, which would hide the adapters (and their dropout).
    let key = mlx_rs::random::key(9).unwrap();
    let noise: Vec<_> = loaded
        .model
        .trainable_parameters()
        .flatten()
        .into_iter()
        .filter(|(name, _)| name.ends_with("lora_b"))
        .map(|(name, b)| {
            let value = mlx_rs::random::normal::<f32>(b.shape(), 0.0, 0.5, &key).unwrap();
            (name, value)
        })
        .collect();
    loaded.model.update_flattened(noise.into_iter().collect());
    let ids = mlx_rs::Array::from_slice(&[1i32, 20, 30, 40, 50], &[1, 5]);
    let model = loaded.model.as_mut();
    let logits = |model: &mut dyn mlx_zoo::CausalLm| {
        model
            .forward(&ids, None)
            .unwrap()
            .as_slice::<f32>()
            .to_vec()
    };
    let eval = logits(model);
    assert_eq!(eval, logits(model), "no dropout outside training");
    assert_eq!(
        mlx_zoo::adapter::set_adapter_training(model, true).unwrap(),
        layers.len()
    );
    let train_a = logits(model);
    let train_b = logits(model);
    mlx_zoo::adapter::set_adapter_training(model, false).unwrap();
    assert_ne!(train_a, train_b, "dropout draws new masks in the experts");
    assert_eq!(eval, logits(model), "and stops after training");
}

#[test]
fn mixtral_lora_on_attention_and_experts_lowers_the_loss() {
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(dir.path(), true);
    let registry = mlx_zoo::registry().unwrap();
    let mut loaded = mlx_zoo_tests::load("mixtral-moe");
    let settings = mlx_zoo_tests::adapter_settings(4);
    loaded
        .apply_lora(&registry, &["q_proj", "v_proj", "down_proj"], settings)
        .unwrap();
    let mut trainer = Trainer::new(config(40, 5e-3), &data, 0).unwrap();
    let l = losses(&mut trainer, &mut loaded, &data, 40);
    assert_loss_halves(&l, 5, "mixtral lora");
}

#[test]
fn shards_on_concurrent_streams_train_like_one_stream() {
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(dir.path(), true);
    let run = |streams: usize, full: bool| {
        let config = TrainConfig {
            streams,
            ..config(5, 5e-3)
        };
        seeded_run(config, full, &data)
    };
    for full in [false, true] {
        let (one, one_params) = run(1, full);
        let (two, two_params) = run(2, full);
        for (a, b) in one.iter().zip(&two) {
            assert!((a - b).abs() < 1e-4, "full {full}: {one:?} vs {two:?}");
        }
        let worst = one_params
            .iter()
            .map(|(name, a)| {
                let b = &two_params.iter().find(|(n, _)| n == name).unwrap().1;
                a.subtract(b)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .max(None)
                    .unwrap()
                    .item_cast::<f32>()
            })
            .fold(0f32, f32::max);
        assert!(worst < 1e-4, "full {full}: parameters differ by {worst}");
    }
    // OpenBLAS gets its threads back after a step on two streams.
    let before = mlx_zoo::runtime::blas_threads();
    let _ = run(2, false);
    assert_eq!(mlx_zoo::runtime::blas_threads(), before);
}

/// Training in bfloat16 keeps the model bfloat16: full fine-tuning's
/// parameters (which the optimizer's float32 state would promote) and a
/// LoRA model's frozen weights and logits; both still learn.
#[test]
fn bfloat16_training_keeps_the_model_bfloat16() {
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(dir.path(), true);
    let registry = mlx_zoo::registry().unwrap();
    let options = LoadOptions {
        dtype: mlx_zoo::loader::ComputeDtype::Bfloat16,
        ..Default::default()
    };
    let bf16 = || {
        mlx_zoo::loader::load(&registry, &mlx_zoo_tests::fixture("llama-gqa"), &options).unwrap()
    };
    for (name, mut loaded) in [("full", bf16()), ("lora", with_lora(bf16()))] {
        let mut trainer = Trainer::new(config(12, 2e-3), &data, 0).unwrap();
        let l = losses(&mut trainer, &mut loaded, &data, 12);
        assert!(l.iter().all(|x| x.is_finite()), "{name}: {l:?}");
        assert!(l[11] < l[0], "{name} did not learn: {l:?}");
        let params = loaded.model.parameters().flatten();
        let weight = &params["model.layers.0.mlp.down_proj.weight"];
        assert_eq!(weight.dtype(), mlx_rs::Dtype::Bfloat16, "{name}");
        let ids = mlx_rs::Array::from_slice(&[1i32, 20, 30], &[1, 3]);
        let logits = loaded.model.forward(&ids, None).unwrap();
        assert_eq!(logits.dtype(), mlx_rs::Dtype::Bfloat16, "{name}");
    }
}

/// The largest absolute difference between two runs' parameters.
fn params_diff(
    a: &[(std::rc::Rc<str>, mlx_rs::Array)],
    b: &[(std::rc::Rc<str>, mlx_rs::Array)],
) -> f32 {
    a.iter()
        .map(|(name, x)| {
            let y = &b.iter().find(|(n, _)| n == name).unwrap().1;
            x.subtract(y)
                .unwrap()
                .abs()
                .unwrap()
                .max(None)
                .unwrap()
                .item_cast::<f32>()
        })
        .fold(0f32, f32::max)
}

/// A compiled step (MLX's compile over loss and gradients, traced once per
/// batch shape) trains like the uncompiled one: LoRA and full fine-tuning,
/// with accumulation and packing, and with gradient checkpointing; batches
/// of two lengths make it trace twice and replay.
#[test]
fn compiled_steps_train_like_uncompiled_ones() {
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(dir.path(), true);
    for (full, grad_accum, pack) in [(false, 1, false), (true, 1, false), (false, 2, true)] {
        let run = |compile: bool| {
            let config = TrainConfig {
                compile,
                grad_accum,
                pack: pack.then_some(64),
                ..config(6, 5e-3)
            };
            mlx_rs::random::seed(42).unwrap();
            let mut loaded = if full {
                mlx_zoo_tests::load("llama-gqa")
            } else {
                with_lora(mlx_zoo_tests::load("llama-gqa"))
            };
            let mut trainer = Trainer::new(config, &data, 0).unwrap();
            let losses = losses(&mut trainer, &mut loaded, &data, 6);
            assert_eq!(trainer.compiled(), compile);
            (losses, trainable(&loaded))
        };
        let (plain, plain_params) = run(false);
        let (compiled, compiled_params) = run(true);
        for (a, b) in plain.iter().zip(&compiled) {
            assert!(
                (a - b).abs() < 1e-5,
                "full {full} accum {grad_accum} pack {pack}: {plain:?} vs {compiled:?}"
            );
        }
        // AdamW divides by the gradients' own scale, so a parameter whose
        // gradient is near zero moves by up to the learning rate either way:
        // the same bound as concurrent streams.
        let worst = params_diff(&plain_params, &compiled_params);
        assert!(worst < 1e-4, "full {full}: parameters differ by {worst}");
    }

    // Gradient checkpointing inside the compiled graph.
    let run = |compile: bool| {
        mlx_rs::random::seed(42).unwrap();
        let mut loaded = with_lora(mlx_zoo_tests::load("llama-gqa"));
        loaded.model.set_gradient_checkpointing(true).unwrap();
        let config = TrainConfig {
            compile,
            ..config(4, 5e-3)
        };
        let mut trainer = Trainer::new(config, &data, 0).unwrap();
        let losses = losses(&mut trainer, &mut loaded, &data, 4);
        assert_eq!(trainer.compiled(), compile);
        losses
    };
    let (plain, compiled) = (run(false), run(true));
    for (a, b) in plain.iter().zip(&compiled) {
        assert!(
            (a - b).abs() < 1e-5,
            "checkpointed: {plain:?} vs {compiled:?}"
        );
    }
}

/// Adapter dropout draws new masks every step, which a replayed trace would
/// freeze: a compiled run with dropout trains uncompiled, step for step the
/// same as a run that never asked to compile.
#[test]
fn compiled_runs_with_dropout_train_uncompiled() {
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(dir.path(), true);
    let registry = mlx_zoo::registry().unwrap();
    let run = |compile: bool| {
        mlx_rs::random::seed(42).unwrap();
        let mut loaded = mlx_zoo_tests::load("llama-gqa");
        let settings = AdapterSettings {
            rank: 4,
            alpha: 8.0,
            dropout: 0.3,
            rslora: false,
        };
        loaded
            .apply_lora(&registry, &["q_proj", "v_proj"], settings)
            .unwrap();
        let config = TrainConfig {
            compile,
            ..config(4, 5e-3)
        };
        let mut trainer = Trainer::new(config, &data, 0).unwrap();
        assert!(!trainer.will_compile(loaded.model.as_mut()).unwrap());
        let losses = losses(&mut trainer, &mut loaded, &data, 4);
        assert!(!trainer.compiled());
        losses
    };
    assert_eq!(run(false), run(true));
}

/// Frozen weights are constants of a compiled trace: a trainer handed
/// another model (same shapes, other weights) traces anew and trains it
/// exactly as an uncompiled trainer does.
#[test]
fn a_compiled_trainer_given_another_model_traces_it_anew() {
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(dir.path(), true);
    let run = |compile: bool| {
        mlx_rs::random::seed(42).unwrap();
        let mut first = with_lora(mlx_zoo_tests::load("llama-gqa"));
        let mut second = mlx_zoo_tests::load("llama-gqa");
        let mut model = second.model.as_mut();
        let doubled: mlx_rs::module::FlattenedModuleParam = model
            .parameters()
            .flatten()
            .into_iter()
            .filter(|(name, _)| name.ends_with("mlp.down_proj.weight"))
            .map(|(name, w)| (name, w.multiply(mlx_rs::Array::from_f32(2.0)).unwrap()))
            .collect();
        ModuleParameters::update_flattened(&mut model, doubled);
        let mut second = with_lora(second);
        let config = TrainConfig {
            compile,
            ..config(4, 5e-3)
        };
        let mut trainer = Trainer::new(config, &data, 0).unwrap();
        let mut losses = vec![];
        for which in [0, 1, 0] {
            let loaded = if which == 0 { &mut first } else { &mut second };
            losses.push(
                trainer
                    .train_step(loaded.model.as_mut(), &data)
                    .unwrap()
                    .loss,
            );
        }
        assert_eq!(trainer.compiled(), compile);
        losses
    };
    let (plain, compiled) = (run(false), run(true));
    for (a, b) in plain.iter().zip(&compiled) {
        assert!((a - b).abs() < 1e-5, "{plain:?} vs {compiled:?}");
    }
}

/// Records what [`Trainer::run`] reports.
#[derive(Default)]
struct Recorded {
    losses: Vec<f32>,
    evals: Vec<usize>,
    checkpoints: Vec<usize>,
}

impl TrainHooks for Recorded {
    fn on_step(&mut self, report: &mlx_zoo::train::StepReport) {
        assert_eq!(
            report.step,
            self.losses.len() + 1,
            "steps reported in order"
        );
        self.losses.push(report.loss);
    }
    fn on_eval(&mut self, step: usize, _loss: f32) {
        self.evals.push(step);
    }
    fn on_checkpoint(&mut self, step: usize, _dir: &Path) {
        self.checkpoints.push(step);
    }
}

/// A compiled run pipelines its steps (the next step's graph is queued
/// while the current one computes) and pauses the pipeline for
/// evaluations and checkpoints: the losses, the evaluation and checkpoint
/// steps and the checkpointed parameters are those of step-by-step
/// training, with accumulation too.
#[test]
fn a_pipelined_run_trains_like_step_by_step_training() {
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(dir.path(), true);
    for grad_accum in [1, 2] {
        let config = TrainConfig {
            compile: true,
            grad_accum,
            eval_every: 3,
            save_every: 4,
            ..config(7, 5e-3)
        };
        mlx_rs::random::seed(42).unwrap();
        let mut stepped = with_lora(mlx_zoo_tests::load("llama-gqa"));
        let mut trainer = Trainer::new(config.clone(), &data, 0).unwrap();
        let expected = losses(&mut trainer, &mut stepped, &data, 7);

        mlx_rs::random::seed(42).unwrap();
        let mut piped = with_lora(mlx_zoo_tests::load("llama-gqa"));
        let mut trainer = Trainer::new(config.clone(), &data, 0).unwrap();
        let mut recorded = Recorded::default();
        let out = dir.path().join(format!("ck-{grad_accum}"));
        let summary = trainer
            .run(piped.model.as_mut(), &data, &out, &mut recorded)
            .unwrap();
        assert!(trainer.compiled());
        assert_eq!(summary.steps, 7);
        assert_eq!(recorded.evals, vec![3, 6, 7]);
        assert_eq!(recorded.checkpoints, vec![4, 7]);
        for (a, b) in expected.iter().zip(&recorded.losses) {
            assert!(
                (a - b).abs() < 1e-5,
                "accum {grad_accum}: {expected:?} vs {:?}",
                recorded.losses
            );
        }
        assert_eq!(recorded.losses.len(), 7);
        let worst = params_diff(&trainable(&stepped), &trainable(&piped));
        assert!(
            worst < 1e-6,
            "accum {grad_accum}: parameters differ by {worst}"
        );

        // The step-4 checkpoint holds step 4's parameters, not step 5's,
        // which a pipeline would already have queued.
        mlx_rs::random::seed(42).unwrap();
        let mut again = with_lora(mlx_zoo_tests::load("llama-gqa"));
        let mut trainer = Trainer::new(config, &data, 0).unwrap();
        losses(&mut trainer, &mut again, &data, 4);
        let saved =
            mlx_rs::Array::load_safetensors(out.join("step-000004").join("trainable.safetensors"))
                .unwrap();
        let saved: Vec<(std::rc::Rc<str>, mlx_rs::Array)> = saved
            .into_iter()
            .map(|(k, v)| (std::rc::Rc::from(k.as_str()), v))
            .collect();
        let at_four = trainable(&again);
        assert_eq!(saved.len(), at_four.len());
        let worst = params_diff(&at_four, &saved);
        assert!(
            worst < 1e-6,
            "accum {grad_accum}: step-4 checkpoint differs by {worst}"
        );
    }
}

/// A non-finite loss found while the next step is already queued puts the
/// trainable parameters back as they were before the failing step.
#[test]
fn a_pipelined_run_stopped_by_a_non_finite_loss_keeps_the_parameters_before_it() {
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(dir.path(), true);
    let mut loaded = with_lora(mlx_zoo_tests::load("llama-gqa"));
    poison_lora_b(&mut loaded);
    let mut before = trainable(&loaded);
    before.sort_by(|a, b| a.0.cmp(&b.0));
    let config = TrainConfig {
        compile: true,
        ..config(5, 5e-3)
    };
    let mut trainer = Trainer::new(config, &data, 0).unwrap();
    let error = trainer
        .run(
            loaded.model.as_mut(),
            &data,
            &dir.path().join("ck"),
            &mut (),
        )
        .unwrap_err();
    assert!(
        matches!(error, TrainError::NonFiniteLoss { step: 1, .. }),
        "{error}"
    );
    assert_eq!(trainer.step(), 0);
    let mut after = trainable(&loaded);
    after.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(before.len(), after.len());
    for ((name, value), (_, now)) in before.iter().zip(&after) {
        let same = mlx_rs::ops::array_eq(value, now, true)
            .unwrap()
            .item_exact::<bool>();
        assert!(same, "{name} changed");
    }
}
