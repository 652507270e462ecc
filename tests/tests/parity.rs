//! LLaMA-family logits against Hugging Face transformers (float32).

use mlx_zoo_tests::{assert_cached_parity, assert_parity};

#[test]
fn gqa_llama_matches_transformers() {
    assert_parity("llama-gqa");
}

#[test]
fn tied_embedding_llama_matches_transformers() {
    assert_parity("llama-tied");
}

#[test]
fn llama_with_attention_and_mlp_bias_matches_transformers() {
    assert_parity("llama-bias");
}

#[test]
fn llama3_rope_matches_transformers_past_the_original_context() {
    assert_parity("llama3-rope");
}

#[test]
fn linear_rope_scaling_matches_transformers() {
    assert_parity("llama-linear-rope");
}

#[test]
fn dynamic_ntk_rope_matches_transformers_past_the_context() {
    assert_parity("llama-dynamic-rope");
}

#[test]
fn sharded_checkpoint_matches_transformers() {
    assert_parity("llama-sharded");
}

#[test]
fn meta_layout_checkpoint_matches_transformers() {
    assert_parity("llama-meta");
}

#[test]
fn transformers_4_config_matches_transformers() {
    assert_parity("llama-v4-config");
}

#[test]
fn llama_cached_decoding_matches_one_pass() {
    assert_cached_parity("llama-gqa", 5);
}

#[test]
fn mistral_cached_decoding_keeps_to_the_window() {
    // Window 4, 16 positions: every step past the fourth must drop old keys.
    assert_cached_parity("mistral-sliding", 3);
}

#[test]
fn mixtral_cached_decoding_matches_one_pass() {
    assert_cached_parity("mixtral-moe", 4);
}

#[test]
fn mistral_sliding_window_matches_transformers() {
    assert_parity("mistral-sliding");
}

#[test]
fn mistral_without_window_matches_transformers() {
    assert_parity("mistral-no-window");
}

#[test]
fn mixtral_experts_match_transformers() {
    assert_parity("mixtral-moe");
}
