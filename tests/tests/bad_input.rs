//! Bad checkpoints give clear errors that name the file, tensor or key, and
//! never panic.

use mlx_zoo::loader::{self, LoadOptions};
use mlx_zoo_tests::{copy_fixture, fixture, rewrite_safetensors as rewrite};
use safetensors::Dtype;
use std::path::Path;

fn load_error(dir: &Path) -> String {
    let registry = mlx_zoo::registry().unwrap();
    match loader::load(&registry, dir, &LoadOptions::default()) {
        Ok(_) => panic!("{} loaded although it is broken", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn unknown_model_type_names_it_and_the_closest_architecture() {
    let (_tmp, dir) = copy_fixture("llama-gqa");
    let config = std::fs::read_to_string(dir.join("config.json")).unwrap();
    let config = config
        .replace("\"model_type\": \"llama\"", "\"model_type\": \"lama\"")
        .replace("LlamaForCausalLM", "LamaForCausalLM");
    std::fs::write(dir.join("config.json"), config).unwrap();
    let err = load_error(&dir);
    assert!(err.contains("model_type `lama`"), "{err}");
    assert!(err.contains("did you mean llama"), "{err}");
}

#[test]
fn missing_tensor_is_named() {
    let (_tmp, dir) = copy_fixture("llama-gqa");
    rewrite(&dir.join("model.safetensors"), |t| {
        t.remove("model.layers.1.mlp.up_proj.weight");
    });
    let err = load_error(&dir);
    assert!(
        err.contains("missing from the checkpoint: model.layers.1.mlp.up_proj.weight"),
        "{err}"
    );
}

#[test]
fn unexpected_tensor_is_named() {
    let (_tmp, dir) = copy_fixture("llama-gqa");
    rewrite(&dir.join("model.safetensors"), |t| {
        t.insert(
            "model.vision_tower.weight".into(),
            (Dtype::F32, vec![2], vec![0; 8]),
        );
    });
    let err = load_error(&dir);
    assert!(
        err.contains("unexpected in the checkpoint: model.vision_tower.weight"),
        "{err}"
    );
}

#[test]
fn wrong_shape_names_tensor_and_both_shapes() {
    let (_tmp, dir) = copy_fixture("llama-gqa");
    rewrite(&dir.join("model.safetensors"), |t| {
        t.insert(
            "model.layers.0.self_attn.k_proj.weight".into(),
            (Dtype::F32, vec![16, 64], vec![0; 16 * 64 * 4]),
        );
    });
    let err = load_error(&dir);
    assert!(
        err.contains("model.layers.0.self_attn.k_proj.weight")
            && err.contains("expected [32, 64], found [16, 64]"),
        "{err}"
    );
}

#[test]
fn allow_unclean_loads_anyway() {
    let (_tmp, dir) = copy_fixture("llama-gqa");
    rewrite(&dir.join("model.safetensors"), |t| {
        t.insert("extra".into(), (Dtype::F32, vec![1], vec![0; 4]));
    });
    let registry = mlx_zoo::registry().unwrap();
    let options = LoadOptions {
        allow_unclean: true,
        ..Default::default()
    };
    let loaded = loader::load(&registry, &dir, &options).unwrap();
    assert_eq!(loaded.report.unexpected, vec!["extra"]);
}

#[test]
fn truncated_safetensors_names_the_file() {
    let (_tmp, dir) = copy_fixture("llama-gqa");
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let err = load_error(&dir);
    assert!(
        err.contains("model.safetensors: not a valid safetensors file"),
        "{err}"
    );
}

#[test]
fn garbage_header_names_the_file() {
    let (_tmp, dir) = copy_fixture("llama-gqa");
    std::fs::write(
        dir.join("model.safetensors"),
        b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......",
    )
    .unwrap();
    let err = load_error(&dir);
    assert!(err.contains("not a valid safetensors file"), "{err}");
}

#[test]
fn index_pointing_to_a_missing_shard_names_it() {
    let (_tmp, dir) = copy_fixture("llama-sharded");
    let shard = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .find(|n| n.starts_with("model-00002"))
        .unwrap();
    std::fs::remove_file(dir.join(&shard)).unwrap();
    let err = load_error(&dir);
    assert!(err.contains("model.safetensors.index.json"), "{err}");
    assert!(err.contains(&format!("points to shard {shard}")), "{err}");
}

#[test]
fn index_missing_a_tensor_its_shard_holds_is_an_error() {
    let (_tmp, dir) = copy_fixture("llama-sharded");
    let index_path = dir.join("model.safetensors.index.json");
    let mut index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&index_path).unwrap()).unwrap();
    index["weight_map"]
        .as_object_mut()
        .unwrap()
        .remove("model.norm.weight");
    std::fs::write(&index_path, index.to_string()).unwrap();
    let err = load_error(&dir);
    assert!(
        err.contains("does not list tensor model.norm.weight"),
        "{err}"
    );
}

#[test]
fn invalid_config_json_names_the_file() {
    let (_tmp, dir) = copy_fixture("llama-gqa");
    std::fs::write(dir.join("config.json"), "{\"model_type\": \"llama\",").unwrap();
    let err = load_error(&dir);
    assert!(err.contains("config.json: invalid JSON"), "{err}");
}

#[test]
fn config_value_of_the_wrong_type_names_the_key() {
    let (_tmp, dir) = copy_fixture("llama-gqa");
    let config = std::fs::read_to_string(dir.join("config.json"))
        .unwrap()
        .replace(
            "\"num_key_value_heads\": 2",
            "\"num_key_value_heads\": \"two\"",
        );
    std::fs::write(dir.join("config.json"), config).unwrap();
    let err = load_error(&dir);
    assert!(err.contains("key `num_key_value_heads`"), "{err}");
}

#[test]
fn inconsistent_heads_name_the_key() {
    let (_tmp, dir) = copy_fixture("llama-gqa");
    let config = std::fs::read_to_string(dir.join("config.json"))
        .unwrap()
        .replace("\"num_key_value_heads\": 2", "\"num_key_value_heads\": 3");
    std::fs::write(dir.join("config.json"), config).unwrap();
    let err = load_error(&dir);
    assert!(
        err.contains("num_key_value_heads") && err.contains("does not divide"),
        "{err}"
    );
}

#[test]
fn unsupported_rope_type_names_the_key() {
    let (_tmp, dir) = copy_fixture("llama-gqa");
    let config = std::fs::read_to_string(dir.join("config.json"))
        .unwrap()
        .replace("\"rope_type\": \"default\"", "\"rope_type\": \"wobbly\"");
    std::fs::write(dir.join("config.json"), config).unwrap();
    let err = load_error(&dir);
    assert!(
        err.contains("rope_scaling") && err.contains("wobbly"),
        "{err}"
    );
}

#[test]
fn directory_without_weights_says_what_it_expected() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixture("llama-gqa").join("config.json"),
        tmp.path().join("config.json"),
    )
    .unwrap();
    let err = load_error(tmp.path());
    assert!(err.contains("no weights found"), "{err}");
}

#[test]
fn unsupported_dtype_names_the_tensor() {
    let (_tmp, dir) = copy_fixture("llama-gqa");
    rewrite(&dir.join("model.safetensors"), |t| {
        let (_, shape, bytes) = t.remove("model.norm.weight").unwrap();
        let ints = bytes
            .chunks_exact(4)
            .flat_map(|_| 1i32.to_le_bytes())
            .collect();
        t.insert("model.norm.weight".into(), (Dtype::I32, shape, ints));
    });
    let err = load_error(&dir);
    assert!(
        err.contains("tensor `model.norm.weight` has dtype I32"),
        "{err}"
    );
}

/// Every top-level integer of each family's config.json set to 0, to 1 and
/// to 2^40: loading returns (an error or a model) without panicking, in
/// bounded time. A `"num_attention_heads": 0` divided by zero in qwen2
/// before validation.
#[test]
fn extreme_config_numbers_never_panic() {
    let registry = mlx_zoo::registry().unwrap();
    for case in [
        "llama-gqa",
        "mistral-sliding",
        "mixtral-moe",
        "phi2",
        "phi3-longrope",
        "qwen2",
        "qwen-v1",
    ] {
        let (_tmp, dir) = copy_fixture(case);
        let original: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap())
                .unwrap();
        let keys: Vec<String> = original
            .as_object()
            .unwrap()
            .iter()
            .filter(|(_, v)| v.is_u64())
            .map(|(k, _)| k.clone())
            .collect();
        for key in keys {
            for value in [0u64, 1, 1 << 40] {
                let mut config = original.clone();
                config[&key] = value.into();
                std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
                eprintln!("{case}: {key} = {value}");
                let started = std::time::Instant::now();
                let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    loader::load(&registry, &dir, &LoadOptions::default()).map(drop)
                }));
                let seconds = started.elapsed().as_secs_f32();
                match outcome {
                    Err(_) => panic!("{case}: {key} = {value} panicked"),
                    Ok(Err(e)) => {
                        let message = e.to_string();
                        assert!(!message.is_empty(), "{case}: {key} = {value}");
                    }
                    Ok(Ok(())) => {}
                }
                assert!(seconds < 10.0, "{case}: {key} = {value} took {seconds} s");
            }
        }
    }
}

/// A quantization width that does not fit a byte (`"bits": 260` was read
/// as 4) or that MLX has no kernel for is refused, naming the key.
#[test]
fn quantization_bits_out_of_range_are_named() {
    for (bits, expected) in [(260, "260 bits is not a quantization width"), (7, "7 bits")] {
        let (_tmp, dir) = copy_fixture("llama-gqa-q4");
        let mut config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap())
                .unwrap();
        config["quantization"]["bits"] = bits.into();
        std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
        let err = load_error(&dir);
        assert!(
            err.contains("quantization") && err.contains(expected),
            "{bits}: {err}"
        );
    }
}
