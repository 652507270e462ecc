//! Mistral and Mixtral for mlx-zoo.
//!
//! Reference: transformers' `modeling_mistral.py` and `modeling_mixtral.py`.
//! Both are the core's pre-norm decoder: Mistral with grouped-query attention
//! limited to a sliding window (`sliding_window`, null for full attention),
//! Mixtral with a sparse mixture of experts in place of the MLP (a linear
//! router, softmax, top-k, renormalised scores). Mixtral checkpoints store
//! each expert's `w1`/`w2`/`w3` separately; the mapping stacks them into one
//! tensor per projection and un-stacks them on export.

#![warn(missing_docs)]

mod config;

pub use config::{MistralConfig, MixtralConfig};

use mlx_zoo_core::mapping::{MappingTable, Rule, TensorMeta, WeightMapper};
use mlx_zoo_core::nn::{decoder_rules, Decoder};
use mlx_zoo_core::{Architecture, CausalLm, Result};
use std::collections::BTreeMap;

/// The Mistral family (dense, sliding-window attention).
#[derive(Debug, Clone, Copy, Default)]
pub struct MistralArchitecture;

impl Architecture for MistralArchitecture {
    type Config = MistralConfig;

    fn name(&self) -> &'static str {
        "mistral"
    }

    fn description(&self) -> &'static str {
        "Mistral: LLaMA-style decoder with GQA and sliding-window attention"
    }

    fn model_types(&self) -> &'static [&'static str] {
        &["mistral"]
    }

    fn hf_architectures(&self) -> &'static [&'static str] {
        &["MistralForCausalLM"]
    }

    fn weight_mapper(
        &self,
        config: &MistralConfig,
        _checkpoint: &BTreeMap<String, TensorMeta>,
    ) -> Box<dyn WeightMapper> {
        Box::new(MappingTable::from_rules(decoder_rules(
            config.tie_word_embeddings,
        )))
    }

    fn build(&self, config: &MistralConfig) -> Result<Box<dyn CausalLm>> {
        Ok(Box::new(Decoder::new(&config.decoder_config()?)?))
    }

    fn default_adapter_targets(&self) -> &'static [&'static str] {
        &["q_proj", "v_proj"]
    }
}

/// The Mixtral family (sparse mixture of experts).
#[derive(Debug, Clone, Copy, Default)]
pub struct MixtralArchitecture;

/// Mixtral's per-expert projections and the stacked parameter each feeds.
const EXPERT_PROJECTIONS: [(&str, &str); 3] =
    [("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")];

impl Architecture for MixtralArchitecture {
    type Config = MixtralConfig;

    fn name(&self) -> &'static str {
        "mixtral"
    }

    fn description(&self) -> &'static str {
        "Mixtral: Mistral with a sparse mixture of experts (top-k routing)"
    }

    fn model_types(&self) -> &'static [&'static str] {
        &["mixtral"]
    }

    fn hf_architectures(&self) -> &'static [&'static str] {
        &["MixtralForCausalLM"]
    }

    fn weight_mapper(
        &self,
        config: &MixtralConfig,
        _checkpoint: &BTreeMap<String, TensorMeta>,
    ) -> Box<dyn WeightMapper> {
        let mut rules: Vec<Rule> = EXPERT_PROJECTIONS
            .iter()
            .map(|(checkpoint, model)| {
                Rule::stack(
                    &format!(
                        "model.layers.{{L}}.block_sparse_moe.experts.{{E}}.{checkpoint}.weight"
                    ),
                    &format!("model.layers.{{L}}.block_sparse_moe.switch_mlp.{model}.weight"),
                    config.num_local_experts,
                )
            })
            .collect();
        // mlx-lm writes the experts already stacked (always so when quantized).
        rules.extend(EXPERT_PROJECTIONS.iter().map(|(_, model)| {
            Rule::keep(&format!(
                "model.layers.{{L}}.block_sparse_moe.switch_mlp.{model}.weight"
            ))
        }));
        rules.extend(decoder_rules(config.tie_word_embeddings));
        Box::new(MappingTable::from_rules(rules))
    }

    fn build(&self, config: &MixtralConfig) -> Result<Box<dyn CausalLm>> {
        Ok(Box::new(Decoder::new(&config.decoder_config()?)?))
    }

    fn default_adapter_targets(&self) -> &'static [&'static str] {
        &["q_proj", "v_proj"]
    }

    fn never_quantize(&self) -> &'static [&'static str] {
        // The router is tiny and its top-k choice is sensitive to rounding.
        &["model.layers.*.block_sparse_moe.gate"]
    }
}

mlx_zoo_core::register_architecture!(MistralArchitecture);
mlx_zoo_core::register_architecture!(MixtralArchitecture);
