//! The LLaMA weight mapping: reports snapshotted with insta, and the export
//! direction giving back the checkpoint's own names and tensors bit for bit.

use mlx_zoo::loader;
use mlx_zoo_tests::{assert_export_round_trips, mapping_report as report};

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

#[test]
fn untied_config_without_output_projection_ties_it_and_says_so() {
    let (_tmp, dir) = mlx_zoo_tests::copy_fixture("llama-gqa");
    mlx_zoo_tests::rewrite_safetensors(&dir.join("model.safetensors"), |t| {
        t.remove("lm_head.weight");
    });
    let registry = mlx_zoo::registry().unwrap();
    let loaded = loader::load(&registry, &dir, &Default::default()).unwrap();
    assert_eq!(loaded.report.tied.len(), 1);
    assert_eq!(loaded.report.tied[0].parameter, "lm_head.weight");
    assert_eq!(loaded.report.tied[0].source, "model.embed_tokens.weight");
}

#[test]
fn tied_config_drops_a_stored_output_projection_with_the_reason() {
    let (_tmp, dir) = mlx_zoo_tests::copy_fixture("llama-gqa");
    let config = std::fs::read_to_string(dir.join("config.json"))
        .unwrap()
        .replace(
            "\"tie_word_embeddings\": false",
            "\"tie_word_embeddings\": true",
        );
    std::fs::write(dir.join("config.json"), config).unwrap();
    let report = loader::inspect(&mlx_zoo::registry().unwrap(), &dir)
        .unwrap()
        .report;
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(report.dropped.len(), 1);
    assert_eq!(report.dropped[0].tensor, "lm_head.weight");
    assert!(report.dropped[0].reason.contains("tie_word_embeddings"));
}

#[test]
fn mistral_report() {
    insta::assert_yaml_snapshot!(report("mistral-sliding"));
}

#[test]
fn mixtral_report_stacks_experts() {
    insta::assert_yaml_snapshot!(report("mixtral-moe"));
}

#[test]
fn mixtral_exports_per_expert_tensors_bit_for_bit() {
    assert_export_round_trips("mixtral-moe");
}

#[test]
fn mistral_exports_bit_for_bit() {
    assert_export_round_trips("mistral-sliding");
}

#[test]
fn phi2_report_renames_dense() {
    insta::assert_yaml_snapshot!(report("phi2-qk-layernorm"));
}

#[test]
fn phi_msft_report_splits_wqkv() {
    insta::assert_yaml_snapshot!(report("phi2-msft"));
}

#[test]
fn phi3_report_splits_fused_projections_by_gqa_sizes() {
    insta::assert_yaml_snapshot!(report("phi3"));
}

#[test]
fn qwen2_report() {
    insta::assert_yaml_snapshot!(report("qwen2"));
}

#[test]
fn qwen_v1_report() {
    insta::assert_yaml_snapshot!(report("qwen-v1"));
}

#[test]
fn qwen3_moe_report_stacks_experts_and_keeps_qk_norms() {
    insta::assert_yaml_snapshot!(report("qwen3-moe"));
}

#[test]
fn gemma3_text_report_keeps_sandwich_and_qk_norms() {
    insta::assert_yaml_snapshot!(report("gemma3-text"));
}

#[test]
fn every_family_exports_bit_for_bit() {
    for case in [
        "phi2",
        "phi2-qk-layernorm",
        "phi2-msft",
        "phi3",
        "phi3-longrope",
        "qwen2",
        "qwen-v1",
        "qwen3",
        "qwen3-yarn",
        "qwen3-moe",
        "gemma",
        "gemma2",
        "gemma3-text",
    ] {
        assert_export_round_trips(case);
    }
}
