//! How LLaMA checkpoints name their tensors.
//!
//! The model is the core's decoder, whose parameters carry the Hugging Face
//! names, so the Hugging Face table is the core's decoder rules. Meta's
//! original ("consolidated") naming is renamed, and its query/key rows
//! permuted from the interleaved rotary layout to Hugging Face's halves.

use crate::LlamaConfig;
use mlx_zoo_core::mapping::{MappingTable, Rule, TensorMeta, Transform};
use mlx_zoo_core::nn::{decoder_rules, output_rules};
use std::collections::BTreeMap;

/// Whether the checkpoint uses Meta's original names.
pub fn is_meta_layout(checkpoint: &BTreeMap<String, TensorMeta>) -> bool {
    checkpoint.contains_key("tok_embeddings.weight")
        || checkpoint.keys().any(|k| k.starts_with("layers."))
}

/// The Hugging Face layout (`model.layers.N.self_attn.q_proj.weight`, ...).
pub fn hf_table(config: &LlamaConfig) -> MappingTable {
    MappingTable::from_rules(decoder_rules(config.tie_word_embeddings))
}

/// Meta's consolidated layout (`layers.N.attention.wq.weight`, ...).
pub fn meta_table(config: &LlamaConfig) -> MappingTable {
    let layer = |meta: &str, hf: &str| {
        Rule::rename(
            &format!("layers.{{L}}.{meta}"),
            &format!("model.layers.{{L}}.{hf}"),
        )
    };
    let mut rules = vec![
        Rule::drop("rope.freqs", "recomputed from the config"),
        Rule::rename("tok_embeddings.weight", "model.embed_tokens.weight"),
        Rule::rename("norm.weight", "model.norm.weight"),
        Rule::transform(
            "layers.{L}.attention.wq.weight",
            "model.layers.{L}.self_attn.q_proj.weight",
            Transform::RotaryInterleavedToHalves {
                heads: config.num_attention_heads,
            },
        ),
        Rule::transform(
            "layers.{L}.attention.wk.weight",
            "model.layers.{L}.self_attn.k_proj.weight",
            Transform::RotaryInterleavedToHalves {
                heads: config.kv_heads(),
            },
        ),
        layer("attention.wv.weight", "self_attn.v_proj.weight"),
        layer("attention.wo.weight", "self_attn.o_proj.weight"),
        layer("feed_forward.w1.weight", "mlp.gate_proj.weight"),
        layer("feed_forward.w2.weight", "mlp.down_proj.weight"),
        layer("feed_forward.w3.weight", "mlp.up_proj.weight"),
        layer("attention_norm.weight", "input_layernorm.weight"),
        layer("ffn_norm.weight", "post_attention_layernorm.weight"),
    ];
    rules.extend(output_rules(config.tie_word_embeddings, "output.weight"));
    MappingTable::from_rules(rules)
}
