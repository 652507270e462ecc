//! LLaMA-family logits against Hugging Face transformers (float32).

use mlx_zoo_tests::{assert_parity, load, max_abs_diff, reference, TOLERANCE};

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
fn cached_decoding_equals_one_forward_pass() {
    let reference = reference("llama-gqa");
    let mut loaded = load("llama-gqa");
    let mut cache = loaded.model.new_cache();
    let seq = reference.shape[1];
    let vocab = reference.shape[2] as usize;
    // Prefix of 5 tokens at once, then one token at a time.
    let prefix = reference.input_ids.index((.., ..5));
    let mut steps = vec![loaded.model.forward(&prefix, Some(&mut cache)).unwrap()];
    for t in 5..seq {
        let token = reference.input_ids.index((.., t..t + 1));
        steps.push(loaded.model.forward(&token, Some(&mut cache)).unwrap());
    }
    let logits = mlx_rs::ops::concatenate(&steps, 1).unwrap();
    let logits = logits.as_slice::<f32>();
    let diff = max_abs_diff(logits, &reference.logits);
    assert!(diff < TOLERANCE, "cached decoding differs by {diff}");
    assert_eq!(logits.len(), reference.logits.len());
    assert_eq!(vocab * seq as usize * 2, logits.len());
}

use mlx_rs::ops::indexing::IndexOp;
