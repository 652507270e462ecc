//! Adapters: PEFT and mlx-lm adapter directories (made by
//! make_adapter_fixtures.py with the libraries themselves, with non-zero
//! weights) load onto the model and give the library's logits.

use mlx_zoo::lora::formats::{load_adapter, AdapterFormat};
use mlx_zoo_tests::{load, max_abs_diff, TOLERANCE};
use std::path::{Path, PathBuf};

fn adapter_dir(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/adapters")
        .join(case)
}

fn reference(case: &str) -> (mlx_rs::Array, Vec<f32>) {
    let tensors =
        mlx_rs::Array::load_safetensors(adapter_dir(case).join("reference.safetensors")).unwrap();
    let ids = tensors["input_ids"].as_dtype(mlx_rs::Dtype::Int32).unwrap();
    (ids, tensors["logits"].as_slice::<f32>().to_vec())
}

/// Loads base `model`, applies adapter `case`, and compares with the
/// library's logits. Returns the attached layer count.
fn assert_adapter_parity(model: &str, case: &str, format: AdapterFormat, method: &str) -> usize {
    let mut loaded = load(model);
    let (ids, expected) = reference(case);
    let base = loaded
        .model
        .forward(&ids, None)
        .unwrap()
        .as_slice::<f32>()
        .to_vec();
    let attached =
        load_adapter(&mut loaded, &adapter_dir(case)).unwrap_or_else(|e| panic!("{case}: {e}"));
    assert_eq!(attached.format, format, "{case}");
    assert_eq!(attached.method, method, "{case}");
    let logits = loaded.model.forward(&ids, None).unwrap();
    let diff = max_abs_diff(logits.as_slice::<f32>(), &expected);
    eprintln!("{case}: max abs diff against the library {diff:e}");
    assert!(diff < TOLERANCE, "{case}: {diff}");
    assert!(
        max_abs_diff(&base, &expected) > 1e-2,
        "{case}: the adapter changes nothing"
    );
    attached.modules.len()
}

#[test]
fn peft_lora_matches_peft() {
    assert_eq!(
        assert_adapter_parity("llama-gqa", "peft-lora-llama", AdapterFormat::Peft, "lora"),
        4
    );
}

#[test]
fn peft_rslora_on_every_projection_matches_peft() {
    assert_eq!(
        assert_adapter_parity(
            "llama-gqa",
            "peft-rslora-llama",
            AdapterFormat::Peft,
            "lora"
        ),
        14
    );
}

#[test]
fn peft_dora_matches_peft() {
    assert_eq!(
        assert_adapter_parity("llama-gqa", "peft-dora-llama", AdapterFormat::Peft, "dora"),
        6
    );
}

#[test]
fn peft_lora_on_phi3_fused_projections_matches_peft() {
    // qkv_proj spreads over q/k/v and gate_up_proj over gate/up: 2 x (3 + 2 + 1).
    assert_eq!(
        assert_adapter_parity("phi3", "peft-lora-phi3", AdapterFormat::Peft, "lora"),
        12
    );
}

#[test]
fn peft_lora_on_one_layer_matches_peft() {
    assert_eq!(
        assert_adapter_parity(
            "llama-gqa",
            "peft-lora-llama-layers",
            AdapterFormat::Peft,
            "lora"
        ),
        2
    );
}

/// A copy of adapter `case` in a temporary directory.
fn copy_adapter(case: &str) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(adapter_dir(case)).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), tmp.path().join(entry.file_name())).unwrap();
    }
    tmp
}

fn load_error(model: &str, dir: &Path) -> String {
    let mut loaded = load(model);
    match load_adapter(&mut loaded, dir) {
        Ok(_) => panic!("{} loaded although it is broken", dir.display()),
        Err(e) => e.to_string(),
    }
}

const Q_B: &str = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight";

/// The error of loading `peft-lora-llama` onto llama-gqa after `edit`
/// changed its tensors.
fn broken_peft_error(edit: impl FnOnce(&mut mlx_zoo_tests::RawTensors)) -> String {
    let tmp = copy_adapter("peft-lora-llama");
    mlx_zoo_tests::rewrite_safetensors(&tmp.path().join("adapter_model.safetensors"), edit);
    load_error("llama-gqa", tmp.path())
}

#[test]
fn half_a_pair_is_named() {
    let err = broken_peft_error(|t| {
        t.remove(Q_B);
    });
    assert!(
        err.contains("model.layers.0.self_attn.q_proj has only half of its adapter"),
        "{err}"
    );
}

#[test]
fn an_unknown_tensor_is_named() {
    let err = broken_peft_error(|t| {
        let b = t[Q_B].clone();
        t.insert(
            "base_model.model.model.layers.0.self_attn.q_proj.lora_C.weight".into(),
            b,
        );
    });
    assert!(
        err.contains("lora_C.weight is not a LoRA/DoRA parameter"),
        "{err}"
    );
}

#[test]
fn a_tensor_for_a_missing_module_is_named() {
    let err = broken_peft_error(|t| {
        for role in ["lora_A", "lora_B"] {
            let v = t[&format!("base_model.model.model.layers.0.self_attn.q_proj.{role}.weight")]
                .clone();
            t.insert(
                format!("base_model.model.model.layers.7.self_attn.q_proj.{role}.weight"),
                v,
            );
        }
    });
    assert!(
        err.contains("layers.7.self_attn.q_proj.lora_A.weight: maps to model.layers.7.self_attn.q_proj, which is not a linear layer"),
        "{err}"
    );
}

#[test]
fn all_zero_b_is_refused_as_a_no_op() {
    let err = broken_peft_error(|t| {
        let (dtype, shape, bytes) = t[Q_B].clone();
        t.insert(Q_B.into(), (dtype, shape, vec![0; bytes.len()]));
    });
    assert!(err.contains("q_proj.lora_B.weight is all zeros"), "{err}");
}

#[test]
fn rank_disagreeing_with_the_config_is_named() {
    let tmp = copy_adapter("peft-lora-llama");
    let path = tmp.path().join("adapter_config.json");
    let config = std::fs::read_to_string(&path)
        .unwrap()
        .replace("\"r\": 4", "\"r\": 8");
    std::fs::write(&path, config).unwrap();
    let err = load_error("llama-gqa", tmp.path());
    assert!(err.contains("do not have the config's rank 8"), "{err}");
}

#[test]
fn an_adapter_for_another_architecture_is_named() {
    // Phi-3's fused qkv_proj is no module of a llama.
    let err = load_error("llama-gqa", &adapter_dir("peft-lora-phi3"));
    assert!(
        err.contains("_proj is not a layer of this llama model"),
        "{err}"
    );
}

#[test]
fn a_shape_that_does_not_fit_is_named() {
    let err = broken_peft_error(|t| {
        let name = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight";
        let (dtype, _, bytes) = t[name].clone();
        t.insert(
            name.into(),
            (dtype, vec![4, 32], bytes[..bytes.len() / 2].to_vec()),
        );
    });
    assert!(
        err.contains("q_proj.lora_A.weight: 32 inputs, but model.layers.0.self_attn.q_proj has 64"),
        "{err}"
    );
}

#[test]
fn expert_adapters_are_refused_clearly() {
    let err = load_error("mixtral-moe", &adapter_dir("peft-lora-mixtral-experts"));
    assert!(err.contains("mlp.experts"), "{err}");
}

#[test]
fn a_directory_without_an_adapter_says_what_it_expected() {
    let tmp = tempfile::tempdir().unwrap();
    let err = load_error("llama-gqa", tmp.path());
    assert!(
        err.contains("expected adapter_model.safetensors (PEFT) or adapters.safetensors (mlx-lm)"),
        "{err}"
    );
}

#[test]
fn mlx_lm_lora_matches_mlx_lm() {
    assert_eq!(
        assert_adapter_parity(
            "llama-gqa",
            "mlxlm-lora-llama",
            AdapterFormat::MlxLm,
            "lora"
        ),
        4
    );
}

#[test]
fn mlx_lm_dora_matches_mlx_lm() {
    assert_eq!(
        assert_adapter_parity(
            "llama-gqa",
            "mlxlm-dora-llama",
            AdapterFormat::MlxLm,
            "dora"
        ),
        4
    );
}

#[test]
fn mlx_lm_qlora_on_a_4bit_base_matches_mlx_lm() {
    assert_eq!(
        assert_adapter_parity(
            "llama-gqa-q4",
            "mlxlm-lora-llama-q4",
            AdapterFormat::MlxLm,
            "lora"
        ),
        4
    );
}

fn logits_of(loaded: &mut mlx_zoo::loader::LoadedModel, case: &str) -> Vec<f32> {
    let (ids, _) = reference(case);
    loaded
        .model
        .forward(&ids, None)
        .unwrap()
        .as_slice::<f32>()
        .to_vec()
}

#[test]
fn fusing_into_a_float_base_equals_the_unfused_forward() {
    for (model, case) in [
        ("llama-gqa", "peft-lora-llama"),
        ("llama-gqa", "peft-dora-llama"),
        ("phi3", "peft-lora-phi3"),
    ] {
        let mut loaded = load(model);
        load_adapter(&mut loaded, &adapter_dir(case)).unwrap();
        let unfused = logits_of(&mut loaded, case);
        let fused = mlx_zoo::adapter::fuse_adapters(loaded.model.as_mut(), None, false).unwrap();
        assert!(fused.iter().all(|l| l.kept_fraction.is_none()));
        let after = logits_of(&mut loaded, case);
        let diff = max_abs_diff(&unfused, &after);
        assert!(diff < TOLERANCE, "{case}: fused differs by {diff}");
        // The fused model has no adapter left, and saves and reloads as a plain model.
        let tmp = tempfile::tempdir().unwrap();
        loaded.refresh_quantization().unwrap();
        let options = mlx_zoo::export::SaveOptions::default();
        mlx_zoo::export::save_mlx_model(
            &loaded,
            &mlx_zoo_tests::fixture(model),
            tmp.path(),
            &options,
        )
        .unwrap();
        let registry = mlx_zoo::registry().unwrap();
        let mut reloaded =
            mlx_zoo::loader::load(&registry, tmp.path(), &Default::default()).unwrap();
        let diff = max_abs_diff(&unfused, &logits_of(&mut reloaded, case));
        assert!(
            diff < TOLERANCE,
            "{case}: reloaded fused model differs by {diff}"
        );
    }
}

#[test]
fn fusing_into_a_quantized_base_measures_what_survives() {
    let registry = mlx_zoo::registry().unwrap();
    let affine = registry.quantizer("affine").unwrap();
    let case = "mlxlm-lora-llama-q4";
    let mut requantized = load("llama-gqa-q4");
    load_adapter(&mut requantized, &adapter_dir(case)).unwrap();
    let unfused = logits_of(&mut requantized, case);
    let fused =
        mlx_zoo::adapter::fuse_adapters(requantized.model.as_mut(), Some(affine.as_ref()), false)
            .unwrap();
    assert_eq!(fused.len(), 4);
    for layer in &fused {
        let kept = layer
            .kept_fraction
            .expect("a re-quantized layer reports what survives");
        assert!(kept > 0.0 && kept.is_finite(), "{}: {kept}", layer.path);
    }
    // De-quantizing instead keeps the update exactly.
    let mut dequantized = load("llama-gqa-q4");
    load_adapter(&mut dequantized, &adapter_dir(case)).unwrap();
    mlx_zoo::adapter::fuse_adapters(dequantized.model.as_mut(), None, true).unwrap();
    let diff = max_abs_diff(&unfused, &logits_of(&mut dequantized, case));
    assert!(diff < TOLERANCE, "de-quantized fuse differs by {diff}");
    dequantized.refresh_quantization().unwrap();
    assert_eq!(
        dequantized.quantization.quantized.len(),
        12,
        "untouched layers stay quantized"
    );
}

#[test]
fn saved_adapters_load_back_with_the_same_logits_in_both_formats() {
    use mlx_zoo::lora::formats::save_adapter;
    for (model, case, formats) in [
        (
            "llama-gqa",
            "peft-lora-llama",
            vec![AdapterFormat::Peft, AdapterFormat::MlxLm],
        ),
        (
            "llama-gqa",
            "peft-dora-llama",
            vec![AdapterFormat::Peft, AdapterFormat::MlxLm],
        ),
        ("llama-gqa", "peft-rslora-llama", vec![AdapterFormat::Peft]),
        (
            "phi3",
            "peft-lora-phi3",
            vec![AdapterFormat::Peft, AdapterFormat::MlxLm],
        ),
        (
            "llama-gqa-q4",
            "mlxlm-lora-llama-q4",
            vec![AdapterFormat::Peft, AdapterFormat::MlxLm],
        ),
    ] {
        let mut loaded = load(model);
        let original = load_adapter(&mut loaded, &adapter_dir(case)).unwrap();
        let expected = logits_of(&mut loaded, case);
        for format in formats {
            let tmp = tempfile::tempdir().unwrap();
            save_adapter(&mut loaded, tmp.path(), format, model).unwrap();
            let mut reloaded = load(model);
            let again = load_adapter(&mut reloaded, tmp.path()).unwrap();
            assert_eq!(again.format, format);
            assert_eq!(again.modules, original.modules, "{case} as {format:?}");
            let diff = max_abs_diff(&expected, &logits_of(&mut reloaded, case));
            assert!(diff < 1e-5, "{case} saved as {format:?} differs by {diff}");
        }
    }
}

#[test]
fn rslora_cannot_be_saved_in_mlx_lm_format() {
    let mut loaded = load("llama-gqa");
    load_adapter(&mut loaded, &adapter_dir("peft-rslora-llama")).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let err = mlx_zoo::lora::formats::save_adapter(
        &mut loaded,
        tmp.path(),
        AdapterFormat::MlxLm,
        "llama-gqa",
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("rsLoRA"), "{err}");
}

// Adapters written by mlx-zoo in the other library's format, read by that
// library (libraries_read_zoo_adapters.py records its logits): the committed
// files must still be what mlx-zoo writes, and our logits with them must
// equal the library's.

fn assert_library_reads_what_we_write(
    case: &str,
    source: &str,
    model: &str,
    format: AdapterFormat,
) {
    let mut loaded = load(model);
    load_adapter(&mut loaded, &adapter_dir(source)).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let base = mlx_zoo_tests::fixture(model).display().to_string();
    mlx_zoo::lora::formats::save_adapter(&mut loaded, tmp.path(), format, &base).unwrap();
    let weights = match format {
        AdapterFormat::Peft => "adapter_model.safetensors",
        AdapterFormat::MlxLm => "adapters.safetensors",
    };
    let today = std::fs::read(tmp.path().join(weights)).unwrap();
    let committed = std::fs::read(adapter_dir(case).join(weights)).unwrap();
    assert!(
        today == committed,
        "{case}: save_adapter no longer writes the committed bytes"
    );
    assert_adapter_parity(
        model,
        case,
        format,
        if source.contains("dora") {
            "dora"
        } else {
            "lora"
        },
    );
}

#[test]
fn peft_reads_our_lora_with_our_logits() {
    assert_library_reads_what_we_write(
        "zoo-peft-from-mlxlm-lora",
        "mlxlm-lora-llama",
        "llama-gqa",
        AdapterFormat::Peft,
    );
}

#[test]
fn peft_reads_our_dora_with_our_logits() {
    assert_library_reads_what_we_write(
        "zoo-peft-from-mlxlm-dora",
        "mlxlm-dora-llama",
        "llama-gqa",
        AdapterFormat::Peft,
    );
}

#[test]
fn mlx_lm_reads_our_lora_with_our_logits() {
    assert_library_reads_what_we_write(
        "zoo-mlxlm-from-peft-lora",
        "peft-lora-llama",
        "llama-gqa",
        AdapterFormat::MlxLm,
    );
}

#[test]
fn mlx_lm_reads_our_fused_phi3_lora_with_our_logits() {
    assert_library_reads_what_we_write(
        "zoo-mlxlm-from-peft-phi3",
        "peft-lora-phi3",
        "phi3",
        AdapterFormat::MlxLm,
    );
}

/// Where an adapter on each checkpoint module of block 0 lands, per family:
/// checkpoint module -> model layers with the rows of the update they take.
#[test]
fn adapter_key_mapping_per_family() {
    let mut by_family = std::collections::BTreeMap::new();
    for case in [
        "llama-gqa",
        "llama-meta",
        "mistral-sliding",
        "mixtral-moe",
        "phi2",
        "phi2-msft",
        "phi3",
        "qwen2",
        "qwen-v1",
    ] {
        let loaded = load(case);
        let checkpoint =
            mlx_zoo::checkpoint::Checkpoint::open(&mlx_zoo_tests::fixture(case)).unwrap();
        let mut modules = std::collections::BTreeMap::new();
        for (name, meta) in checkpoint.tensors() {
            let Some(module) = name.strip_suffix(".weight") else {
                continue;
            };
            let in_block_0 = mlx_zoo::adapter::layer_index(module) == Some(0);
            if !in_block_0
                || meta.shape.len() != 2
                || module.contains("norm")
                || module.ends_with(".ln")
                || module.contains("ln_")
            {
                continue;
            }
            let (out, input) = (meta.shape[0] as usize, meta.shape[1] as usize);
            let targets: Vec<String> = match loaded.model_modules_of(module, out, input) {
                Ok(parts) => parts
                    .into_iter()
                    .map(|(layer, rows)| format!("{layer} [{}..{}]", rows.start, rows.end))
                    .collect(),
                Err(e) => vec![format!("error: {e}")],
            };
            modules.insert(format!("base_model.model.{module}.lora_B.weight"), targets);
        }
        by_family.insert(case, modules);
    }
    insta::assert_yaml_snapshot!(by_family);
}

#[test]
fn the_seed_api_creates_a_quantized_model_with_an_adapter_in_one_call() {
    use mlx_zoo::adapter::{AdapterSpec, AdapterTargets};
    let registry = mlx_zoo::registry().unwrap();
    let settings = mlx_zoo_tests::adapter_settings(8);
    let options = mlx_zoo::loader::LoadOptions {
        quantize: Some(mlx_zoo::quantize::QuantPlan::uniform(
            mlx_zoo::quantize::QuantSettings::affine(4, 32),
        )),
        adapter: Some(AdapterSpec {
            method: "lora".into(),
            settings,
            targets: AdapterTargets {
                modules: vec![
                    "q_proj".into(),
                    "v_proj".into(),
                    "k_proj".into(),
                    "o_proj".into(),
                ],
                ..Default::default()
            },
        }),
        ..Default::default()
    };
    let mut model = mlx_zoo::loader::load(
        &registry,
        &mlx_zoo_tests::fixture("mistral-sliding"),
        &options,
    )
    .unwrap();
    assert_eq!(model.quantization.quantized.len(), 16);
    let mut adapted = Vec::new();
    model
        .model
        .visit_linears(&mut |path, layer| {
            if layer.adapter.is_some() {
                assert!(
                    layer.is_quantized(),
                    "{path}: QLoRA keeps the base quantized"
                );
                adapted.push(path.to_owned());
            }
            Ok(())
        })
        .unwrap();
    assert_eq!(adapted.len(), 8);
    // apply_lora on an already loaded float model, with the family's defaults too.
    let mut plain = load("phi2");
    let added = plain
        .apply_lora(&registry, &["dense", "fc1"], settings)
        .unwrap_err()
        .to_string();
    assert!(
        added.contains("\"dense\" matches no linear layer"),
        "{added}"
    );
    let layers = plain
        .apply_lora(&registry, &["o_proj", "fc1"], settings)
        .unwrap();
    assert_eq!(layers.len(), 4);
    let mut defaults = load("qwen-v1");
    let targets = defaults
        .apply_adapter(&registry, "dora", settings, &AdapterTargets::default())
        .unwrap();
    assert_eq!(
        targets,
        vec!["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]
    );
    let ranged = load("llama-gqa")
        .apply_adapter(
            &registry,
            "lora",
            settings,
            &AdapterTargets {
                all_linear: true,
                layers: Some((1, 1)),
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!(ranged.len(), 7, "{ranged:?}");
}

#[test]
fn only_adapter_parameters_are_trainable() {
    use mlx_rs::module::ModuleParameters;
    let mut loaded = load("llama-gqa-q4");
    load_adapter(&mut loaded, &adapter_dir("mlxlm-lora-llama-q4")).unwrap();
    let trainable: Vec<String> = loaded
        .model
        .trainable_parameters()
        .flatten()
        .keys()
        .map(|k| k.to_string())
        .collect();
    assert_eq!(trainable.len(), 8, "{trainable:?}");
    assert!(
        trainable
            .iter()
            .all(|k| k.ends_with(".lora_a") || k.ends_with(".lora_b")),
        "{trainable:?}"
    );
    let registry = mlx_zoo::registry().unwrap();
    let settings = mlx_zoo_tests::adapter_settings(2);
    let mut dora = load("llama-gqa");
    dora.apply_adapter(&registry, "dora", settings, &Default::default())
        .unwrap();
    let count = dora.model.trainable_parameters().flatten().len();
    assert_eq!(
        count,
        4 * 3,
        "q_proj and v_proj of 2 blocks, 3 tensors each"
    );
}

#[test]
fn lora_on_expert_stacks_fuses_to_the_same_forward() {
    let registry = mlx_zoo::registry().unwrap();
    let settings = mlx_zoo_tests::adapter_settings(4);
    let targets = mlx_zoo::adapter::AdapterTargets {
        modules: vec!["switch_mlp.gate_proj".into(), "switch_mlp.down_proj".into()],
        ..Default::default()
    };
    let mut loaded = load("mixtral-moe");
    let layers = loaded
        .apply_adapter(&registry, "lora", settings, &targets)
        .unwrap();
    assert_eq!(layers.len(), 4, "{layers:?}");
    // Give B values so the adapter does something, then compare with fusing.
    loaded
        .model
        .visit_linears(&mut |_, layer| {
            if layer.adapter.is_some() {
                let shape = layer.lora_b.as_ref().as_ref().unwrap().shape().to_vec();
                let key = mlx_rs::random::key(5).unwrap();
                let b = mlx_rs::random::normal::<f32>(&shape, None, None, &key).unwrap();
                layer.lora_b = mlx_rs::module::Param::new(Some(b));
            }
            Ok(())
        })
        .unwrap();
    let ids = mlx_zoo_tests::reference("mixtral-moe").input_ids;
    let adapted = loaded
        .model
        .forward(&ids, None)
        .unwrap()
        .as_slice::<f32>()
        .to_vec();
    mlx_zoo::adapter::fuse_adapters(loaded.model.as_mut(), None, false).unwrap();
    let fused = loaded
        .model
        .forward(&ids, None)
        .unwrap()
        .as_slice::<f32>()
        .to_vec();
    let diff = max_abs_diff(&adapted, &fused);
    assert!(diff < TOLERANCE, "expert LoRA fused differs by {diff}");
    let dora = load("mixtral-moe")
        .apply_adapter(&registry, "dora", settings, &targets)
        .unwrap_err();
    assert!(
        dora.to_string()
            .contains("DoRA adapters do not support expert stacks"),
        "{dora}"
    );
}

#[test]
fn mlx_lm_lora_on_mixtral_experts_matches_mlx_lm() {
    // q_proj and the three switch_mlp stacks in 2 blocks.
    assert_eq!(
        assert_adapter_parity(
            "mixtral-moe",
            "mlxlm-lora-mixtral",
            AdapterFormat::MlxLm,
            "lora"
        ),
        8
    );
}

#[test]
fn expert_adapters_round_trip_in_mlx_lm_format_only() {
    use mlx_zoo::lora::formats::save_adapter;
    let mut loaded = load("mixtral-moe");
    load_adapter(&mut loaded, &adapter_dir("mlxlm-lora-mixtral")).unwrap();
    let expected = logits_of(&mut loaded, "mlxlm-lora-mixtral");
    let tmp = tempfile::tempdir().unwrap();
    save_adapter(&mut loaded, tmp.path(), AdapterFormat::MlxLm, "mixtral-moe").unwrap();
    let mut reloaded = load("mixtral-moe");
    load_adapter(&mut reloaded, tmp.path()).unwrap();
    let diff = max_abs_diff(&expected, &logits_of(&mut reloaded, "mlxlm-lora-mixtral"));
    assert!(diff < 1e-5, "{diff}");
    let peft = tempfile::tempdir().unwrap();
    let err =
        save_adapter(&mut loaded, peft.path(), AdapterFormat::Peft, "mixtral-moe").unwrap_err();
    assert!(err.to_string().contains("is an expert stack"), "{err}");
}

#[test]
fn dora_on_a_quantized_base_equals_dora_on_its_dequantized_weights() {
    use mlx_zoo::lora::formats::save_adapter;
    let registry = mlx_zoo::registry().unwrap();
    let settings = mlx_zoo_tests::adapter_settings(4);
    // A DoRA adapter with non-zero B on the 4-bit model, saved ...
    let mut quantized = load("llama-gqa-q4");
    quantized
        .apply_adapter(&registry, "dora", settings, &Default::default())
        .unwrap();
    quantized
        .model
        .visit_linears(&mut |_, layer| {
            if layer.adapter.is_some() {
                let shape = layer.lora_b.as_ref().as_ref().unwrap().shape().to_vec();
                let key = mlx_rs::random::key(11).unwrap();
                layer.lora_b = mlx_rs::module::Param::new(Some(
                    mlx_rs::random::normal::<f32>(&shape, None, None, &key).unwrap(),
                ));
            }
            Ok(())
        })
        .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    save_adapter(
        &mut quantized,
        tmp.path(),
        AdapterFormat::Peft,
        "llama-gqa-q4",
    )
    .unwrap();
    let ids = mlx_zoo_tests::reference("llama-gqa").input_ids;
    let on_quantized = quantized
        .model
        .forward(&ids, None)
        .unwrap()
        .as_slice::<f32>()
        .to_vec();
    // ... and loaded onto the same model with every layer de-quantized.
    let mut float = load("llama-gqa-q4");
    float
        .model
        .visit_linears(&mut |_, layer| {
            if layer.is_quantized() {
                let weight = layer.float_weight()?;
                layer.weight = mlx_rs::module::Param::new(weight);
                layer.scales = mlx_rs::module::Param::new(None);
                layer.biases = mlx_rs::module::Param::new(None);
                layer.quantization = None;
            }
            Ok(())
        })
        .unwrap();
    load_adapter(&mut float, tmp.path()).unwrap();
    let on_float = float
        .model
        .forward(&ids, None)
        .unwrap()
        .as_slice::<f32>()
        .to_vec();
    let diff = max_abs_diff(&on_quantized, &on_float);
    assert!(
        diff < TOLERANCE,
        "QDoRA differs from DoRA on the de-quantized weights by {diff}"
    );
}

/// A copy of adapter `case` whose tensors are stored as `dtype`, as PEFT
/// and mlx-lm write adapters trained on a half-precision base.
fn half_precision_copy(case: &str, file: &str, dtype: mlx_rs::Dtype) -> tempfile::TempDir {
    let tmp = copy_adapter(case);
    let path = tmp.path().join(file);
    let tensors = mlx_rs::Array::load_safetensors(&path).unwrap();
    let cast: std::collections::HashMap<String, mlx_rs::Array> = tensors
        .into_iter()
        .map(|(name, t)| (name, t.as_dtype(dtype).unwrap()))
        .collect();
    let written = tmp.path().join("cast.safetensors");
    mlx_rs::Array::save_safetensors(cast, None, &written)
        .unwrap_or_else(|e| panic!("{}: {e:?}", written.display()));
    std::fs::rename(&written, &path).unwrap();
    tmp
}

/// PEFT and mlx-lm adapters saved in float16 or bfloat16 load (they used to
/// panic on a dtype check) and give the library's logits for the float32
/// adapter within the rounding of the stored weights: float16 keeps 11
/// significant bits (the diff stays near the float32 tolerance), bfloat16 8.
#[test]
fn half_precision_adapters_load_and_match_the_library() {
    for (case, file, format) in [
        (
            "peft-lora-llama",
            "adapter_model.safetensors",
            AdapterFormat::Peft,
        ),
        (
            "peft-dora-llama",
            "adapter_model.safetensors",
            AdapterFormat::Peft,
        ),
        (
            "mlxlm-lora-llama",
            "adapters.safetensors",
            AdapterFormat::MlxLm,
        ),
    ] {
        let (ids, expected) = reference(case);
        for (dtype, tolerance) in [
            (mlx_rs::Dtype::Float16, 2e-3),
            (mlx_rs::Dtype::Bfloat16, 2e-2),
        ] {
            let tmp = half_precision_copy(case, file, dtype);
            let mut loaded = load("llama-gqa");
            let attached = load_adapter(&mut loaded, tmp.path())
                .unwrap_or_else(|e| panic!("{case} as {dtype:?}: {e}"));
            assert_eq!(attached.format, format);
            let logits = loaded.model.forward(&ids, None).unwrap();
            let diff = max_abs_diff(logits.as_slice::<f32>(), &expected);
            eprintln!("{case} as {dtype:?}: max abs diff against the library {diff:e}");
            assert!(diff < tolerance, "{case} as {dtype:?}: {diff}");
        }
    }
}

#[test]
fn a_lora_a_of_the_wrong_rank_is_named() {
    const Q_A: &str = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight";
    let err = broken_peft_error(|t| {
        let (dtype, shape, data) = t.remove(Q_A).unwrap();
        let len = shape.iter().product::<usize>();
        t.insert(Q_A.to_owned(), (dtype, vec![len], data));
    });
    assert!(
        err.contains("q_proj.lora_A.weight has shape") && err.contains("expected 2 dimensions"),
        "{err}"
    );
}

#[test]
fn an_integer_adapter_tensor_is_named() {
    let err = broken_peft_error(|t| {
        let (_, shape, data) = t.remove(Q_B).unwrap();
        t.insert(Q_B.to_owned(), (safetensors::Dtype::I32, shape, data));
    });
    assert!(
        err.contains("q_proj.lora_B.weight has dtype") && err.contains("expected float32"),
        "{err}"
    );
}
