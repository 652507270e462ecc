//! How LLaMA checkpoints name their tensors.
//!
//! The model's parameters carry the Hugging Face names, so the Hugging Face
//! table is a list of names kept as they are, plus what a checkpoint may
//! carry that the model does not load. Meta's original ("consolidated")
//! naming is renamed, and its query/key rows permuted from the interleaved
//! rotary layout to Hugging Face's halves.

use crate::LlamaConfig;
use mlx_zoo_core::mapping::{MappingTable, Rule, TensorMeta, Transform};
use std::collections::BTreeMap;

/// Per-layer parameters, relative to `model.layers.{L}.`.
const LAYER_PARAMETERS: &[&str] = &[
    "self_attn.q_proj.weight",
    "self_attn.q_proj.bias",
    "self_attn.k_proj.weight",
    "self_attn.k_proj.bias",
    "self_attn.v_proj.weight",
    "self_attn.v_proj.bias",
    "self_attn.o_proj.weight",
    "self_attn.o_proj.bias",
    "mlp.gate_proj.weight",
    "mlp.gate_proj.bias",
    "mlp.up_proj.weight",
    "mlp.up_proj.bias",
    "mlp.down_proj.weight",
    "mlp.down_proj.bias",
    "input_layernorm.weight",
    "post_attention_layernorm.weight",
];

const EMBED: &str = "model.embed_tokens.weight";
const LM_HEAD: &str = "lm_head.weight";

/// Whether the checkpoint uses Meta's original names.
pub fn is_meta_layout(checkpoint: &BTreeMap<String, TensorMeta>) -> bool {
    checkpoint.contains_key("tok_embeddings.weight")
        || checkpoint.keys().any(|k| k.starts_with("layers."))
}

fn output_rules(config: &LlamaConfig, checkpoint_name: &str) -> Vec<Rule> {
    if config.tie_word_embeddings {
        vec![Rule::drop(
            checkpoint_name,
            "tie_word_embeddings: the output projection reuses model.embed_tokens.weight",
        )]
    } else {
        vec![
            Rule::rename(checkpoint_name, LM_HEAD),
            // A checkpoint without an output projection shares the embedding.
            Rule::tie(LM_HEAD, EMBED),
        ]
    }
}

/// The Hugging Face layout (`model.layers.N.self_attn.q_proj.weight`, ...).
pub fn hf_table(config: &LlamaConfig) -> MappingTable {
    let mut rules = vec![
        Rule::drop(
            "model.layers.{L}.self_attn.rotary_emb.inv_freq",
            "recomputed from the config",
        ),
        Rule::keep(EMBED),
        Rule::keep("model.norm.weight"),
    ];
    rules.extend(
        LAYER_PARAMETERS
            .iter()
            .map(|p| Rule::keep(&format!("model.layers.{{L}}.{p}"))),
    );
    rules.extend(output_rules(config, LM_HEAD));
    MappingTable::from_rules(rules)
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
        Rule::rename("tok_embeddings.weight", EMBED),
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
    rules.extend(output_rules(config, "output.weight"));
    MappingTable::from_rules(rules)
}
