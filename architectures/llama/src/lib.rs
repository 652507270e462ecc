//! LLaMA for mlx-zoo: LLaMA 1/2/3 and Code Llama style checkpoints.
//!
//! Reference: Hugging Face transformers' `modeling_llama.py` (and Meta's
//! original `model.py` for the consolidated layout). Pre-norm decoder blocks
//! with RMSNorm, grouped-query attention with rotary embeddings (default,
//! linear, dynamic NTK or Llama 3 scaling), a SwiGLU MLP, optional biases on
//! attention and MLP projections, and embeddings tied to the output
//! projection when the config says so.
//!
//! The crate registers [`LlamaArchitecture`] with the mlx-zoo registry; the
//! core names nothing in it.

#![warn(missing_docs)]

mod config;
mod mapping;
mod model;

pub use config::LlamaConfig;
pub use model::{decoder_config, Llama};

use mlx_zoo_core::mapping::{TensorMeta, WeightMapper};
use mlx_zoo_core::{Architecture, CausalLm, Result};
use std::collections::BTreeMap;

/// The LLaMA family.
#[derive(Debug, Clone, Copy, Default)]
pub struct LlamaArchitecture;

impl Architecture for LlamaArchitecture {
    type Config = LlamaConfig;

    fn name(&self) -> &'static str {
        "llama"
    }

    fn description(&self) -> &'static str {
        "LLaMA 1/2/3, Code Llama: RMSNorm, GQA, RoPE (default/linear/dynamic/llama3), SwiGLU"
    }

    fn model_types(&self) -> &'static [&'static str] {
        &["llama"]
    }

    fn hf_architectures(&self) -> &'static [&'static str] {
        &["LlamaForCausalLM"]
    }

    fn weight_mapper(
        &self,
        config: &LlamaConfig,
        checkpoint: &BTreeMap<String, TensorMeta>,
    ) -> Box<dyn WeightMapper> {
        Box::new(if mapping::is_meta_layout(checkpoint) {
            mapping::meta_table(config)
        } else {
            mapping::hf_table(config)
        })
    }

    fn build(&self, config: &LlamaConfig) -> Result<Box<dyn CausalLm>> {
        Ok(Box::new(Llama::new(&decoder_config(config)?)?))
    }

    fn default_adapter_targets(&self) -> &'static [&'static str] {
        &["q_proj", "v_proj"]
    }

    fn never_quantize(&self) -> &'static [&'static str] {
        &[]
    }
}

mlx_zoo_core::register_architecture!(LlamaArchitecture);
