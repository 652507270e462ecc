//! Quantization: per-layer plans, MLX-format checkpoints written and read
//! back bit for bit, logits of quantized models, and clear errors.

use mlx_zoo::export::{save_mlx_model, SaveOptions};
use mlx_zoo::loader::{self, ComputeDtype, LoadOptions, LoadedModel};
use mlx_zoo::quantize::{QuantPlan, QuantSettings};
use mlx_zoo_tests::{fixture, max_abs_diff, reference};
use std::path::Path;

fn load_with(dir: &Path, quantize: Option<QuantPlan>) -> mlx_zoo::Result<LoadedModel> {
    let registry = mlx_zoo::registry()?;
    loader::load(
        &registry,
        dir,
        &LoadOptions {
            quantize,
            ..LoadOptions::default()
        },
    )
}

fn uniform(bits: u8, group_size: usize) -> Option<QuantPlan> {
    Some(QuantPlan::uniform(QuantSettings::affine(bits, group_size)))
}

fn logits(model: &mut LoadedModel, case: &str) -> Vec<f32> {
    let r = reference(case);
    model
        .model
        .forward(&r.input_ids, None)
        .unwrap()
        .as_slice::<f32>()
        .to_vec()
}

#[test]
fn convert_load_convert_is_bit_identical() {
    let tmp = tempfile::tempdir().unwrap();
    let (first, second) = (tmp.path().join("first"), tmp.path().join("second"));
    let quantized = load_with(&fixture("llama-gqa"), uniform(4, 32)).unwrap();
    save_mlx_model(
        &quantized,
        &fixture("llama-gqa"),
        &first,
        &SaveOptions::default(),
    )
    .unwrap();
    let reloaded = load_with(&first, None).unwrap();
    assert_eq!(
        reloaded.quantization.quantized,
        quantized.quantization.quantized
    );
    assert_eq!(
        reloaded.quantization.kept.keys().collect::<Vec<_>>(),
        quantized.quantization.kept.keys().collect::<Vec<_>>()
    );
    save_mlx_model(&reloaded, &first, &second, &SaveOptions::default()).unwrap();
    for file in ["model.safetensors", "config.json"] {
        let a = std::fs::read(first.join(file)).unwrap();
        let b = std::fs::read(second.join(file)).unwrap();
        assert!(a == b, "{file} differs after a second conversion");
    }
}

#[test]
fn quantized_checkpoint_gives_the_logits_of_quantizing_at_load() {
    let tmp = tempfile::tempdir().unwrap();
    let mut at_load = load_with(&fixture("llama-gqa"), uniform(4, 32)).unwrap();
    save_mlx_model(
        &at_load,
        &fixture("llama-gqa"),
        tmp.path(),
        &SaveOptions::default(),
    )
    .unwrap();
    let mut from_disk = load_with(tmp.path(), None).unwrap();
    let diff = max_abs_diff(
        &logits(&mut at_load, "llama-gqa"),
        &logits(&mut from_disk, "llama-gqa"),
    );
    assert_eq!(diff, 0.0);
}

#[test]
fn quantization_error_shrinks_with_more_bits() {
    let float = reference("llama-gqa").logits;
    let mut errors = Vec::new();
    for bits in [2, 3, 4, 6, 8] {
        let mut model = load_with(&fixture("llama-gqa"), uniform(bits, 32)).unwrap();
        let error = max_abs_diff(&logits(&mut model, "llama-gqa"), &float);
        assert!(error.is_finite() && error > 0.0, "{bits} bits: {error}");
        errors.push(error);
    }
    assert!(
        errors.windows(2).all(|w| w[1] < w[0]),
        "errors by bits: {errors:?}"
    );
    assert!(errors[4] < 0.1, "8-bit error {}", errors[4]);
}

#[test]
fn indivisible_layers_stay_float_and_are_reported() {
    // down_proj has 160 inputs, which do not divide into groups of 64.
    let model = load_with(&fixture("llama-gqa"), uniform(4, 64)).unwrap();
    let kept = &model.quantization.kept;
    assert_eq!(kept.len(), 2, "{kept:?}");
    assert!(kept["model.layers.0.mlp.down_proj"].contains("160 input features"));
    // 15 projections, the output head and the embedding table, less the two.
    assert_eq!(model.quantization.quantized.len(), 14);
}

#[test]
fn mixed_plan_round_trips_through_the_config_block() {
    let plan = QuantPlan::from_json(
        r#"{"default": {"bits": 4, "group_size": 32},
            "rules": [{"pattern": "layers.0.self_attn.v_proj", "bits": 8},
                      {"pattern": "layers.1.mlp", "bits": 6, "group_size": 32},
                      {"pattern": "lm_head", "keep": true}]}"#,
        "plan.json",
    )
    .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let mut quantized = load_with(&fixture("llama-gqa"), Some(plan)).unwrap();
    let q = &quantized.quantization;
    assert_eq!(q.quantized["model.layers.0.self_attn.v_proj"].bits, 8);
    assert_eq!(q.quantized["model.layers.1.mlp.up_proj"].bits, 6);
    assert!(q.kept.contains_key("lm_head"));
    save_mlx_model(
        &quantized,
        &fixture("llama-gqa"),
        tmp.path(),
        &SaveOptions::default(),
    )
    .unwrap();
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tmp.path().join("config.json")).unwrap())
            .unwrap();
    let block = &config["quantization"];
    assert_eq!(block["bits"], 4);
    assert_eq!(block["model.layers.0.self_attn.v_proj"]["bits"], 8);
    assert_eq!(block["lm_head"], false);
    let mut reloaded = load_with(tmp.path(), None).unwrap();
    assert_eq!(
        reloaded.quantization.quantized,
        quantized.quantization.quantized
    );
    assert_eq!(
        reloaded.quantization.kept.keys().collect::<Vec<_>>(),
        quantized.quantization.kept.keys().collect::<Vec<_>>()
    );
    let diff = max_abs_diff(
        &logits(&mut quantized, "llama-gqa"),
        &logits(&mut reloaded, "llama-gqa"),
    );
    assert_eq!(diff, 0.0);
}

#[test]
fn sharded_output_loads_back() {
    let tmp = tempfile::tempdir().unwrap();
    let mut model = load_with(&fixture("llama-gqa"), uniform(8, 32)).unwrap();
    let options = SaveOptions {
        max_shard_bytes: 40_000,
        ..SaveOptions::default()
    };
    let files = save_mlx_model(&model, &fixture("llama-gqa"), tmp.path(), &options).unwrap();
    assert!(
        tmp.path().join("model.safetensors.index.json").is_file(),
        "{files:?}"
    );
    assert!(
        files
            .iter()
            .filter(|f| f.to_string_lossy().contains("-of-"))
            .count()
            >= 2
    );
    let mut reloaded = load_with(tmp.path(), None).unwrap();
    let diff = max_abs_diff(
        &logits(&mut model, "llama-gqa"),
        &logits(&mut reloaded, "llama-gqa"),
    );
    assert_eq!(diff, 0.0);
}

#[test]
fn four_bit_storage_is_close_to_its_theoretical_size() {
    let tmp = tempfile::tempdir().unwrap();
    let (f16, q4) = (tmp.path().join("f16"), tmp.path().join("q4"));
    let half = SaveOptions {
        dtype: Some(ComputeDtype::Float16),
        ..SaveOptions::default()
    };
    let float = load_with(&fixture("llama-gqa"), None).unwrap();
    save_mlx_model(&float, &fixture("llama-gqa"), &f16, &half).unwrap();
    let quantized = load_with(&fixture("llama-gqa"), uniform(4, 32)).unwrap();
    save_mlx_model(&quantized, &fixture("llama-gqa"), &q4, &half).unwrap();
    let registry = mlx_zoo::registry().unwrap();
    let bytes = |dir: &Path| loader::inspect(&registry, dir).unwrap().weight_bytes as f64;
    // Weight matrices (projections, output head, embedding table): 16 bits
    // each in f16; 4 bits plus an f16 scale and bias per 32 weights (1 bit)
    // when quantized. Norms stay f16 in both.
    let d = loader::inspect(&registry, &fixture("llama-gqa"))
        .unwrap()
        .dims;
    let norms = ((2 * d.num_layers + 1) * d.hidden_size) as f64 * 2.0;
    let matrices = (d.parameters_in_linears() + d.vocab_size * d.hidden_size) as f64;
    let (expected_q4, expected_f16) = (norms + matrices * 5.0 / 8.0, norms + matrices * 2.0);
    let (measured_q4, measured_f16) = (bytes(&q4), bytes(&f16));
    assert!(
        (measured_q4 / expected_q4 - 1.0).abs() < 0.03,
        "4-bit model takes {measured_q4} bytes, theory says {expected_q4}"
    );
    assert!(
        (measured_f16 / expected_f16 - 1.0).abs() < 0.03,
        "f16 model takes {measured_f16} bytes, theory says {expected_f16}"
    );
}

#[test]
fn bad_settings_and_plans_are_clear_errors() {
    let err = |plan: Option<QuantPlan>| {
        load_with(&fixture("llama-gqa"), plan)
            .err()
            .unwrap()
            .to_string()
    };
    assert!(err(uniform(7, 32)).contains("7 bits is not supported"));
    assert!(err(uniform(4, 48)).contains("group size 48 is not supported"));
    let unmatched = QuantPlan::from_json(
        r#"{"default": {"bits": 4, "group_size": 32}, "rules": [{"pattern": "layers.7.mlp", "bits": 8}]}"#,
        "plan.json",
    )
    .unwrap();
    let message = err(Some(unmatched));
    assert!(
        message.contains("\"layers.7.mlp\" matches no layer"),
        "{message}"
    );
}

#[test]
fn scales_of_the_wrong_shape_name_the_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let model = load_with(&fixture("llama-gqa"), uniform(4, 32)).unwrap();
    save_mlx_model(
        &model,
        &fixture("llama-gqa"),
        tmp.path(),
        &SaveOptions::default(),
    )
    .unwrap();
    mlx_zoo_tests::rewrite_safetensors(&tmp.path().join("model.safetensors"), |t| {
        let (dtype, _, _) = t["model.layers.0.self_attn.q_proj.scales"].clone();
        t.insert(
            "model.layers.0.self_attn.q_proj.scales".into(),
            (dtype, vec![64, 3], vec![0; 64 * 3 * 4]),
        );
    });
    let message = load_with(tmp.path(), None).err().unwrap().to_string();
    assert!(
        message.contains("model.layers.0.self_attn.q_proj") && message.contains("3 groups per row"),
        "{message}"
    );
}

/// mlx-lm's own quantization (made by make_mlx_fixtures.py with mlx
/// 0.32.4) of small matrices, for every bit width and group size: the
/// affine quantizer must produce the same packed codes, scales and biases
/// bit for bit, and the same de-quantized values.
#[test]
fn affine_quantizer_matches_mlx_bit_for_bit() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/quant/affine-cases.safetensors");
    let cases = mlx_rs::Array::load_safetensors(&path).unwrap();
    let registry = mlx_zoo::registry().unwrap();
    let affine = registry
        .quantizer("affine")
        .expect("affine quantizer registered");
    let mut checked = 0;
    for (name, expected_q) in &cases {
        let Some(stem) = name.strip_suffix(".q") else {
            continue;
        };
        let mut parts = stem.split('.');
        let (matrix, bits, group) = (
            parts.next().unwrap(),
            parts.next().unwrap(),
            parts.next().unwrap(),
        );
        let settings = QuantSettings::affine(
            bits.trim_start_matches('b').parse().unwrap(),
            group.trim_start_matches('g').parse().unwrap(),
        );
        let w = &cases[matrix];
        let q = affine.quantize(w, settings).unwrap();
        let same = |a: &mlx_rs::Array, b: &mlx_rs::Array| {
            a.shape() == b.shape()
                && mlx_rs::ops::array_eq(a, b, None)
                    .unwrap()
                    .item_exact::<bool>()
        };
        assert!(same(&q.packed, expected_q), "{stem}: packed codes differ");
        assert!(
            same(&q.scales, &cases[&format!("{stem}.scales")]),
            "{stem}: scales differ"
        );
        assert!(
            same(
                q.biases.as_ref().unwrap(),
                &cases[&format!("{stem}.biases")]
            ),
            "{stem}: biases differ"
        );
        let deq = affine.dequantize(&q).unwrap();
        assert!(
            same(&deq, &cases[&format!("{stem}.deq")]),
            "{stem}: de-quantized values differ"
        );
        checked += 1;
    }
    assert!(checked >= 20, "only {checked} cases checked");
}

// Checkpoints quantized and saved by mlx-lm itself (make_mlx_fixtures.py),
// with mlx-lm's logits on the same input: loading them here must give the
// same logits.

#[test]
fn mlx_lm_4bit_llama_matches_mlx_lm() {
    mlx_zoo_tests::assert_parity("llama-gqa-q4");
}

#[test]
fn mlx_lm_8bit_llama_with_float_layers_matches_mlx_lm() {
    mlx_zoo_tests::assert_parity("llama-gqa-q8");
}

#[test]
fn mlx_lm_mixed_precision_llama_matches_mlx_lm() {
    mlx_zoo_tests::assert_parity("llama-gqa-mixed");
}

#[test]
fn mlx_lm_4bit_mixtral_experts_match_mlx_lm() {
    mlx_zoo_tests::assert_parity("mixtral-moe-q4");
}

#[test]
fn mlx_lm_4bit_phi3_fused_projections_match_mlx_lm() {
    mlx_zoo_tests::assert_parity("phi3-q4");
}

#[test]
fn mlx_lm_4bit_tied_qwen2_matches_mlx_lm() {
    mlx_zoo_tests::assert_parity("qwen2-q4");
}

/// Models mlx-lm quantized in MLX's floating-point modes (`--q-mode`):
/// packed values with `uint8` scales and no biases, read through the mxfp
/// layout and MLX's kernels for the mode.
#[test]
fn mlx_lm_float_modes_match_mlx_lm() {
    for case in ["llama-gqa-mxfp4", "llama-gqa-mxfp8", "llama-gqa-nvfp4"] {
        mlx_zoo_tests::assert_parity(case);
    }
}

/// In bfloat16 the floating-point modes' byte scales stay bytes (they were
/// cast with the float parameters, and MLX refused to de-quantize).
#[test]
fn float_modes_run_in_bfloat16() {
    let registry = mlx_zoo::registry().unwrap();
    for case in ["llama-gqa-mxfp4", "llama-gqa-nvfp4"] {
        let mut model = loader::load(
            &registry,
            &fixture(case),
            &LoadOptions {
                dtype: ComputeDtype::Bfloat16,
                ..LoadOptions::default()
            },
        )
        .unwrap();
        let r = reference(case);
        let out = model
            .model
            .forward(&r.input_ids, None)
            .unwrap()
            .as_dtype(mlx_rs::Dtype::Float32)
            .unwrap();
        let expected = &r.logits;
        let worst = out
            .as_slice::<f32>()
            .iter()
            .zip(expected)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        // bfloat16 keeps 8 bits of mantissa: logits of std 1 move by a few 1e-2.
        assert!(worst < 0.1, "{case}: bfloat16 logits differ by {worst}");
    }
}

// Models written by mlx-zoo, read by mlx-lm (mlx_lm_reads_zoo.py records
// mlx-lm's logits on them): the committed model must still be exactly what
// mlx-zoo writes today, and mlx-lm's logits on it must equal ours.

fn assert_mlx_lm_reads_what_we_write(case: &str, source: &str, plan: QuantPlan) {
    let tmp = tempfile::tempdir().unwrap();
    let model = load_with(&fixture(source), Some(plan)).unwrap();
    save_mlx_model(
        &model,
        &fixture(source),
        tmp.path(),
        &SaveOptions::default(),
    )
    .unwrap();
    let today = std::fs::read(tmp.path().join("model.safetensors")).unwrap();
    let committed = std::fs::read(fixture(case).join("model.safetensors")).unwrap();
    assert!(
        today == committed,
        "{case}: zoo convert no longer writes the committed bytes"
    );
    mlx_zoo_tests::assert_parity(case);
}

#[test]
fn mlx_lm_reads_our_4bit_llama_with_our_logits() {
    assert_mlx_lm_reads_what_we_write("zoo-llama-gqa-q4", "llama-gqa", uniform(4, 32).unwrap());
}

#[test]
fn mlx_lm_reads_our_mixed_recipe_with_our_logits() {
    let plan = QuantPlan::recipe("mixed-4-6", 32, 2).unwrap();
    assert_mlx_lm_reads_what_we_write("zoo-llama-gqa-mixed", "llama-gqa", plan);
}

#[test]
fn mlx_lm_reads_our_float_modes_with_our_logits() {
    use mlx_zoo::quantize::QuantMode;
    for (case, mode) in [
        ("zoo-llama-gqa-mxfp4", QuantMode::Mxfp4),
        ("zoo-llama-gqa-mxfp8", QuantMode::Mxfp8),
        ("zoo-llama-gqa-nvfp4", QuantMode::Nvfp4),
    ] {
        let plan = QuantPlan::uniform(QuantSettings::of_mode(mode));
        assert_mlx_lm_reads_what_we_write(case, "llama-gqa", plan);
    }
}

#[test]
fn mlx_lm_reads_our_4bit_mixtral_with_our_logits() {
    assert_mlx_lm_reads_what_we_write("zoo-mixtral-moe-q4", "mixtral-moe", uniform(4, 32).unwrap());
}

// Pre-quantized Hugging Face checkpoints (make_prequantized_fixtures.py),
// repacked into MLX's layout at load; the reference logits come from
// PyTorch on the de-quantized weights.

#[test]
fn gptq_checkpoint_matches_its_dequantized_reference() {
    mlx_zoo_tests::assert_parity("llama-gqa-gptq");
}

#[test]
fn awq_checkpoint_matches_its_dequantized_reference() {
    mlx_zoo_tests::assert_parity("llama-gqa-awq");
}

#[test]
fn act_order_gptq_is_refused_with_the_key() {
    let message = load_with(&fixture("llama-gqa-gptq-actorder"), None)
        .err()
        .unwrap()
        .to_string();
    assert!(
        message.contains("quantization_config.desc_act"),
        "{message}"
    );
}

#[test]
fn prequantized_checkpoints_convert_to_mlx_format() {
    let tmp = tempfile::tempdir().unwrap();
    let mut gptq = load_with(&fixture("llama-gqa-gptq"), None).unwrap();
    assert_eq!(gptq.quantization.quantized.len(), 14);
    save_mlx_model(
        &gptq,
        &fixture("llama-gqa-gptq"),
        tmp.path(),
        &SaveOptions::default(),
    )
    .unwrap();
    let config = std::fs::read_to_string(tmp.path().join("config.json")).unwrap();
    assert!(
        !config.contains("\"gptq\""),
        "the GPTQ block must not survive conversion"
    );
    let mut converted = load_with(tmp.path(), None).unwrap();
    let diff = max_abs_diff(
        &logits(&mut gptq, "llama-gqa"),
        &logits(&mut converted, "llama-gqa"),
    );
    assert_eq!(diff, 0.0);
}

/// One layer (`model.layers.0.mlp.down_proj`) of each pre-quantized
/// fixture, checked weight by weight: the repacked codes, scales and biases
/// equal the MLX layout the fixture script derived, and de-quantize to the
/// script's de-quantized weight.
#[test]
fn prequantized_layers_repack_exactly() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/quant/prequantized.safetensors");
    let expected = mlx_rs::Array::load_safetensors(&path).unwrap();
    for (format, case) in [("gptq", "llama-gqa-gptq"), ("awq", "llama-gqa-awq")] {
        let mut loaded = load_with(&fixture(case), None).unwrap();
        let mut checked = false;
        loaded
            .model
            .visit_linears(&mut |layer_path, layer| {
                if layer_path != "model.layers.0.mlp.down_proj" {
                    return Ok(());
                }
                let same = |a: &mlx_rs::Array, b: &mlx_rs::Array| {
                    a.shape() == b.shape()
                        && mlx_rs::ops::array_eq(a, b, None)
                            .unwrap()
                            .item_exact::<bool>()
                };
                assert!(
                    same(
                        layer.weight.as_ref(),
                        &expected[&format!("{format}.mlx.weight")]
                    ),
                    "{format}: codes"
                );
                assert!(
                    same(
                        layer.scales.as_ref().as_ref().unwrap(),
                        &expected[&format!("{format}.mlx.scales")]
                    ),
                    "{format}: scales"
                );
                let weight = layer.float_weight().unwrap();
                let diff = max_abs_diff(
                    weight.as_slice::<f32>(),
                    expected[&format!("{format}.deq")].as_slice::<f32>(),
                );
                assert!(
                    diff < 1e-6,
                    "{format}: de-quantized weight differs by {diff}"
                );
                checked = true;
                Ok(())
            })
            .unwrap();
        assert!(checked, "{format}: layer not found");
    }
}

/// Every packed tensor of a GPTQ and an AWQ checkpoint given a shape that
/// does not fit (1-D, empty, a column count that is not a multiple of 8,
/// too small): loading fails with the tensor's name instead of indexing
/// past its data (the repacking indexed before checking).
#[test]
fn prequantized_tensors_of_the_wrong_shape_are_named() {
    let registry = mlx_zoo::registry().unwrap();
    for case in ["llama-gqa-gptq", "llama-gqa-awq"] {
        let prefix = "model.layers.0.self_attn.q_proj";
        for part in ["qweight", "qzeros", "scales"] {
            for shape in [
                vec![8usize],
                vec![0, 8],
                vec![2, 9],
                vec![1, 1],
                vec![16, 4],
            ] {
                let (_tmp, dir) = mlx_zoo_tests::copy_fixture(case);
                let name = format!("{prefix}.{part}");
                mlx_zoo_tests::rewrite_safetensors(&dir.join("model.safetensors"), |t| {
                    let (dtype, _, data) = t.remove(&name).unwrap();
                    let elements: usize = shape.iter().product();
                    let size = match dtype {
                        safetensors::Dtype::F16 | safetensors::Dtype::BF16 => 2,
                        _ => 4,
                    };
                    let bytes = data.iter().copied().cycle().take(elements * size).collect();
                    t.insert(name.clone(), (dtype, shape.clone(), bytes));
                });
                let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    loader::load(&registry, &dir, &LoadOptions::default()).map(drop)
                }));
                match outcome {
                    Err(_) => panic!("{case}: {part} of shape {shape:?} panicked"),
                    Ok(Ok(())) => panic!("{case}: {part} of shape {shape:?} loaded"),
                    Ok(Err(e)) => {
                        let message = e.to_string();
                        assert!(
                            message.contains(prefix),
                            "{case}: {part} {shape:?}: {message}"
                        );
                    }
                }
            }
        }
    }
}
