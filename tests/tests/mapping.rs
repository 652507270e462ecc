//! The LLaMA weight mapping: reports snapshotted with insta, and the export
//! direction giving back the checkpoint's own names and tensors bit for bit.

use mlx_zoo::loader;
use mlx_zoo_tests::{fixture, load};
use std::collections::BTreeMap;

fn report(case: &str) -> mlx_zoo::MappingReport {
    let registry = mlx_zoo::registry().unwrap();
    loader::inspect(&registry, &fixture(case)).unwrap().report
}

#[test]
fn hf_layout_report() {
    insta::assert_yaml_snapshot!(report("llama-gqa"));
}

#[test]
fn tied_embeddings_report() {
    let report = report("llama-tied");
    assert!(report.is_clean());
    insta::assert_yaml_snapshot!(report);
}

#[test]
fn meta_layout_report() {
    insta::assert_yaml_snapshot!(report("llama-meta"));
}

fn checkpoint_tensors(case: &str) -> BTreeMap<String, Vec<u8>> {
    let checkpoint = mlx_zoo::checkpoint::Checkpoint::open(&fixture(case)).unwrap();
    checkpoint
        .tensors()
        .into_keys()
        .map(|name| {
            let array = checkpoint.load(&name, mlx_rs::Dtype::Float32).unwrap();
            let bytes = array
                .as_slice::<f32>()
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect();
            (name, bytes)
        })
        .collect()
}

fn assert_export_round_trips(case: &str) {
    let loaded = load(case);
    let exported = loaded.export_weights().unwrap();
    let original = checkpoint_tensors(case);
    let exported: BTreeMap<String, Vec<u8>> = exported
        .into_iter()
        .map(|(name, array)| {
            let bytes = array
                .as_slice::<f32>()
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect();
            (name, bytes)
        })
        .collect();
    assert_eq!(
        exported.keys().collect::<Vec<_>>(),
        original.keys().collect::<Vec<_>>(),
        "{case}: exported names"
    );
    for (name, bytes) in &original {
        assert!(
            exported[name] == *bytes,
            "{case}: {name} differs after export"
        );
    }
}

#[test]
fn hf_layout_exports_bit_for_bit() {
    assert_export_round_trips("llama-gqa");
}

#[test]
fn meta_layout_exports_bit_for_bit() {
    assert_export_round_trips("llama-meta");
}

#[test]
fn tied_checkpoint_exports_without_an_output_projection() {
    assert_export_round_trips("llama-tied");
}
