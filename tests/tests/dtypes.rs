//! Half-precision checkpoints load into a float32 model, and a float32
//! checkpoint runs in half precision, both close to transformers' float32
//! logits (within what 16-bit rounding allows).

use mlx_rs::{Array, Dtype};
use mlx_zoo::loader::{self, ComputeDtype, LoadOptions};
use mlx_zoo_tests::{fixture, max_abs_diff, reference};
use std::collections::HashMap;

fn logits(dir: &std::path::Path, dtype: ComputeDtype) -> Vec<f32> {
    let registry = mlx_zoo::registry().unwrap();
    let options = LoadOptions {
        dtype,
        ..Default::default()
    };
    let mut loaded = loader::load(&registry, dir, &options).unwrap();
    let reference = reference("llama-gqa");
    let out = loaded.model.forward(&reference.input_ids, None).unwrap();
    assert_eq!(out.dtype(), dtype.dtype());
    out.as_dtype(Dtype::Float32)
        .unwrap()
        .as_slice::<f32>()
        .to_vec()
}

fn half_copy(storage: Dtype) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixture("llama-gqa").join("config.json"),
        tmp.path().join("config.json"),
    )
    .unwrap();
    let tensors = Array::load_safetensors(fixture("llama-gqa").join("model.safetensors")).unwrap();
    let half: HashMap<String, Array> = tensors
        .into_iter()
        .map(|(name, array)| (name, array.as_dtype(storage).unwrap()))
        .collect();
    Array::save_safetensors(&half, None, tmp.path().join("model.safetensors")).unwrap();
    tmp
}

#[test]
fn float16_checkpoint_loads_as_float32() {
    let dir = half_copy(Dtype::Float16);
    let diff = max_abs_diff(
        &logits(dir.path(), ComputeDtype::Float32),
        &reference("llama-gqa").logits,
    );
    assert!(diff < 2e-2, "float16 storage: max abs diff {diff}");
}

#[test]
fn bfloat16_checkpoint_loads_as_float32() {
    let dir = half_copy(Dtype::Bfloat16);
    let diff = max_abs_diff(
        &logits(dir.path(), ComputeDtype::Float32),
        &reference("llama-gqa").logits,
    );
    assert!(diff < 1e-1, "bfloat16 storage: max abs diff {diff}");
}

#[test]
fn float32_checkpoint_computes_in_bfloat16() {
    let diff = max_abs_diff(
        &logits(&fixture("llama-gqa"), ComputeDtype::Bfloat16),
        &reference("llama-gqa").logits,
    );
    assert!(diff < 2e-1, "bfloat16 compute: max abs diff {diff}");
    assert!(
        diff > 0.0,
        "bfloat16 compute should not be bit-exact float32"
    );
}

/// Adapters keep float32 factors (master weights) but add their update in
/// the layer's dtype: a bfloat16 model with LoRA or DoRA attached still
/// computes in bfloat16 (a float32 update would promote the residual
/// stream, and with it every later matmul, to float32).
#[test]
fn adapters_on_a_bfloat16_model_keep_it_bfloat16() {
    use mlx_zoo::adapter::{AdapterSettings, AdapterTargets};
    let registry = mlx_zoo::registry().unwrap();
    let reference = reference("llama-gqa");
    for method in ["lora", "dora"] {
        let options = LoadOptions {
            dtype: ComputeDtype::Bfloat16,
            ..Default::default()
        };
        let mut loaded = loader::load(&registry, &fixture("llama-gqa"), &options).unwrap();
        let settings = AdapterSettings {
            rank: 4,
            alpha: 8.0,
            dropout: 0.0,
            rslora: false,
        };
        let targets = AdapterTargets {
            modules: vec!["q_proj".into(), "down_proj".into()],
            ..Default::default()
        };
        let layers = loaded
            .apply_adapter(&registry, method, settings, &targets)
            .unwrap();
        assert!(!layers.is_empty());
        let out = loaded.model.forward(&reference.input_ids, None).unwrap();
        assert_eq!(out.dtype(), Dtype::Bfloat16, "{method}");
    }
}
