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

#[test]
fn phi2_matches_transformers() {
    assert_parity("phi2");
}

#[test]
fn phi2_with_qk_layernorm_matches_transformers() {
    assert_parity("phi2-qk-layernorm");
}

#[test]
fn phi_msft_layout_matches_transformers() {
    assert_parity("phi2-msft");
}

#[test]
fn phi3_fused_projections_match_transformers() {
    assert_parity("phi3");
}

#[test]
fn phi3_longrope_matches_transformers_past_the_original_context() {
    assert_parity("phi3-longrope");
}

#[test]
fn phi3_partial_rotary_matches_transformers() {
    assert_parity("phi3-partial-rotary");
}

#[test]
fn qwen2_matches_transformers_without_its_disabled_window() {
    assert_parity("qwen2");
}

#[test]
fn qwen2_dynamic_rope_matches_transformers_past_the_context() {
    assert_parity("qwen2-dynamic-rope");
}

#[test]
fn qwen_v1_matches_the_reference_implementation() {
    assert_parity("qwen-v1");
}

#[test]
fn qwen_v1_dynamic_ntk_and_logn_match_the_reference_implementation() {
    assert_parity("qwen-v1-ntk-logn");
}

#[test]
fn qwen3_per_head_qk_norms_match_transformers() {
    assert_parity("qwen3");
}

#[test]
fn qwen3_yarn_matches_transformers_past_the_original_context() {
    assert_parity("qwen3-yarn");
}

#[test]
fn qwen3_moe_matches_transformers() {
    assert_parity("qwen3-moe");
}

#[test]
fn qwen3_cached_decoding_matches_one_pass() {
    assert_cached_parity("qwen3", 4);
    assert_cached_parity("qwen3-yarn", 5);
    assert_cached_parity("qwen3-moe", 3);
}

#[test]
fn gemma_matches_transformers() {
    assert_parity("gemma");
}

#[test]
fn gemma2_softcapping_sandwich_norms_and_sliding_layers_match_transformers() {
    assert_parity("gemma2");
}

#[test]
fn gemma3_text_qk_norms_and_local_rope_match_transformers() {
    assert_parity("gemma3-text");
}

#[test]
fn gemma_cached_decoding_matches_one_pass() {
    assert_cached_parity("gemma", 4);
    assert_cached_parity("gemma2", 6);
    assert_cached_parity("gemma3-text", 5);
}

#[test]
fn phi2_cached_decoding_matches_one_pass() {
    assert_cached_parity("phi2", 4);
}

#[test]
fn phi3_cached_decoding_matches_one_pass() {
    assert_cached_parity("phi3", 4);
}

#[test]
fn qwen2_cached_decoding_matches_one_pass() {
    assert_cached_parity("qwen2", 4);
}

#[test]
fn qwen_v1_cached_decoding_matches_one_pass() {
    assert_cached_parity("qwen-v1", 4);
}

#[test]
fn sliding_window_cache_keeps_only_the_window() {
    use mlx_rs::ops::indexing::IndexOp;
    let reference = mlx_zoo_tests::reference("mistral-sliding");
    let mut loaded = mlx_zoo_tests::load("mistral-sliding");
    let mut cache = loaded.model.new_cache();
    for t in 0..reference.shape[1] {
        let token = reference.input_ids.index((.., t..t + 1));
        loaded.model.forward(&token, Some(&mut cache)).unwrap();
        for layer in cache.layers() {
            assert!(
                layer.stored() <= 3,
                "window 4 keeps 3 past positions, found {}",
                layer.stored()
            );
        }
    }
    assert_eq!(cache.offset(), reference.shape[1]);
}
