//! `zoo` with a plugin of your own, in a few lines: an architecture crate
//! (here inline: a llama variant answering to `model_type:
//! "zoo-example-llama"`) registers itself through `inventory`, and `main`
//! hands over to the CLI library, so `zoo archs`, `inspect`, `generate`,
//! `finetune`, `convert` ... all know it.
//!
//!     cargo run --release -p mlx-zoo-examples --example zoo_with_plugin -- archs

use mlx_zoo::llama::{LlamaArchitecture, LlamaConfig};
use mlx_zoo::mapping::{TensorMeta, WeightMapper};
use mlx_zoo::{Architecture, CausalLm, Result};
use std::collections::BTreeMap;

/// A llama under another name: what a third party's family crate holds.
#[derive(Debug, Clone, Copy, Default)]
pub struct ExampleLlama;

impl Architecture for ExampleLlama {
    type Config = LlamaConfig;

    fn name(&self) -> &'static str {
        "zoo-example-llama"
    }

    fn description(&self) -> &'static str {
        "an example plugin: a LLaMA registered from outside the zoo"
    }

    fn model_types(&self) -> &'static [&'static str] {
        &["zoo-example-llama"]
    }

    fn hf_architectures(&self) -> &'static [&'static str] {
        &["ZooExampleForCausalLM"]
    }

    fn weight_mapper(
        &self,
        config: &LlamaConfig,
        checkpoint: &BTreeMap<String, TensorMeta>,
    ) -> Box<dyn WeightMapper> {
        LlamaArchitecture.weight_mapper(config, checkpoint)
    }

    fn build(&self, config: &LlamaConfig) -> Result<Box<dyn CausalLm>> {
        LlamaArchitecture.build(config)
    }
}

mlx_zoo::register_architecture!(ExampleLlama);

#[allow(dead_code)]
fn main() -> std::process::ExitCode {
    mlx_zoo_cli::run()
}
