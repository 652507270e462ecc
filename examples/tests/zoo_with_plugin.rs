//! The `zoo_with_plugin` example: the CLI library with an architecture
//! registered from outside the zoo runs `zoo logits` on a checkpoint only
//! that plugin claims, with the llama fixture's transformers logits.

#[allow(dead_code)]
#[path = "../zoo_with_plugin.rs"]
mod example;

use mlx_rs::Array;
use std::path::{Path, PathBuf};

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/models/llama-gqa")
}

/// The fixture llama relabelled as `zoo-example-llama`.
fn relabelled(dir: &Path) {
    let text = std::fs::read_to_string(fixture().join("config.json")).unwrap();
    let mut config: serde_json::Value = serde_json::from_str(&text).unwrap();
    config["model_type"] = "zoo-example-llama".into();
    config["architectures"] = serde_json::json!(["ZooExampleForCausalLM"]);
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    std::fs::copy(
        fixture().join("model.safetensors"),
        dir.join("model.safetensors"),
    )
    .unwrap();
}

fn read_npy(path: &Path) -> Vec<f32> {
    let data = std::fs::read(path).unwrap();
    let (header, dtype, _) = mlx_zoo::export::parse_npy_header(&data).unwrap();
    assert_eq!(dtype, "F32");
    data[header..]
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

#[test]
fn a_plugin_linked_into_the_cli_library_serves_every_command() {
    let dir = tempfile::tempdir().unwrap();
    relabelled(dir.path());
    let reference = Array::load_safetensors(fixture().join("reference.safetensors")).unwrap();
    let ids = &reference["input_ids"];
    let rows: Vec<Vec<i64>> = ids
        .as_dtype(mlx_rs::Dtype::Int64)
        .unwrap()
        .as_slice::<i64>()
        .chunks(ids.shape()[1] as usize)
        .map(<[i64]>::to_vec)
        .collect();
    let tokens = dir.path().join("ids.json");
    std::fs::write(&tokens, serde_json::to_string(&rows).unwrap()).unwrap();
    let out = dir.path().join("logits.npy");
    let status = mlx_zoo_cli::run_with_args([
        "zoo".into(),
        "-q".into(),
        "logits".into(),
        dir.path().as_os_str().to_owned(),
        "--tokens".into(),
        tokens.as_os_str().to_owned(),
        "--out".into(),
        out.as_os_str().to_owned(),
    ]);
    assert_eq!(status, std::process::ExitCode::SUCCESS);
    let logits = read_npy(&out);
    let expected = reference["logits"].as_slice::<f32>().to_vec();
    assert_eq!(logits.len(), expected.len());
    let diff = logits
        .iter()
        .zip(&expected)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(diff < 1e-4, "max abs diff {diff}");

    // The registry of this binary lists the plugin beside the built-ins.
    let registry = mlx_zoo::registry().unwrap();
    assert!(registry.architecture("zoo-example-llama").is_some());
    assert!(registry.architecture("llama").is_some());
}
