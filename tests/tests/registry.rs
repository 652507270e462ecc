//! The registry: built-in plugins are linked and found through inventory,
//! embedders can register their own, and resolution is strict.

use mlx_zoo::architecture::{Detection, ModelConfig};
use mlx_zoo::mapping::{MappingTable, TensorMeta, WeightMapper};
use mlx_zoo::{Architecture, CausalLm, HfConfig, ModelDims, Registry, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[test]
fn builtin_llama_is_registered_through_inventory() {
    let registry = mlx_zoo::registry().unwrap();
    let names: Vec<String> = registry
        .architectures()
        .into_iter()
        .map(|a| a.name)
        .collect();
    assert!(names.contains(&"llama".to_string()), "{names:?}");
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct ToyConfig {}

impl ModelConfig for ToyConfig {
    fn validate(&self) -> Result<()> {
        Ok(())
    }
    fn dims(&self) -> ModelDims {
        ModelDims {
            vocab_size: 1,
            hidden_size: 1,
            num_layers: 0,
            num_heads: 1,
            num_kv_heads: 1,
            head_dim: 1,
            intermediate_size: 1,
            max_position_embeddings: 1,
        }
    }
}

/// A test architecture claiming `model_type` "llama" too.
#[derive(Clone)]
struct Impostor {
    name: &'static str,
}

impl Architecture for Impostor {
    type Config = ToyConfig;
    fn name(&self) -> &'static str {
        self.name
    }
    fn description(&self) -> &'static str {
        "test double"
    }
    fn model_types(&self) -> &'static [&'static str] {
        &["llama"]
    }
    fn hf_architectures(&self) -> &'static [&'static str] {
        &[]
    }
    fn weight_mapper(
        &self,
        _: &ToyConfig,
        _: &BTreeMap<String, TensorMeta>,
    ) -> Box<dyn WeightMapper> {
        Box::new(MappingTable::new())
    }
    fn build(&self, _: &ToyConfig) -> Result<Box<dyn CausalLm>> {
        Err(mlx_zoo::Error::InvalidArgument("not buildable".into()))
    }
}

fn llama_config() -> HfConfig {
    HfConfig::from_value(
        serde_json::json!({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}),
    )
    .unwrap()
}

#[test]
fn explicit_registration_resolves_and_duplicates_are_refused() {
    let mut registry = Registry::empty();
    registry.register(Impostor { name: "toy" }).unwrap();
    let resolution = registry.resolve(&llama_config()).unwrap();
    assert_eq!(resolution.architecture.name(), "toy");
    assert_eq!(resolution.reason, "model_type \"llama\" (priority 100)");
    let err = registry.register(Impostor { name: "toy" }).unwrap_err();
    assert!(err.to_string().contains("already registered"), "{err}");
    registry.register_or_replace(Impostor { name: "toy" });
}

#[test]
fn a_tie_names_every_candidate() {
    let mut registry = mlx_zoo::registry().unwrap();
    registry.register(Impostor { name: "impostor" }).unwrap();
    let err = registry.resolve(&llama_config()).err().unwrap().to_string();
    assert!(err.contains("impostor (priority 100"), "{err}");
    assert!(err.contains("llama (priority 100"), "{err}");
}

#[test]
fn architectures_class_name_is_the_fallback() {
    let registry = mlx_zoo::registry().unwrap();
    let config = HfConfig::from_value(serde_json::json!({
        "model_type": "my-llama-finetune",
        "architectures": ["LlamaForCausalLM"]
    }))
    .unwrap();
    let resolution = registry.resolve(&config).unwrap();
    assert_eq!(resolution.architecture.name(), "llama");
    let llama = resolution
        .candidates
        .iter()
        .find(|c| c.name == "llama")
        .unwrap();
    assert!(matches!(
        llama.detection,
        Detection::Match { priority: 50, .. }
    ));
}

#[test]
fn no_match_lists_what_is_registered() {
    let registry = mlx_zoo::registry().unwrap();
    let config = HfConfig::from_value(serde_json::json!({"model_type": "bert"})).unwrap();
    let err = registry.resolve(&config).err().unwrap().to_string();
    assert!(
        err.contains("no registered architecture accepts model_type `bert`"),
        "{err}"
    );
    assert!(
        err.contains("registered: gemma, gemma2, gemma3_text, llama, mistral"),
        "{err}"
    );
}

#[test]
fn every_family_is_detected_by_model_type_and_by_class_name() {
    let registry = mlx_zoo::registry().unwrap();
    for (model_type, class, expected) in [
        ("llama", "LlamaForCausalLM", "llama"),
        ("mistral", "MistralForCausalLM", "mistral"),
        ("mixtral", "MixtralForCausalLM", "mixtral"),
        ("phi", "PhiForCausalLM", "phi"),
        ("phi3", "Phi3ForCausalLM", "phi3"),
        ("qwen2", "Qwen2ForCausalLM", "qwen2"),
        ("qwen", "QWenLMHeadModel", "qwen"),
        ("qwen3", "Qwen3ForCausalLM", "qwen3"),
        ("qwen3_moe", "Qwen3MoeForCausalLM", "qwen3_moe"),
        ("gemma", "GemmaForCausalLM", "gemma"),
        ("gemma2", "Gemma2ForCausalLM", "gemma2"),
        ("gemma3_text", "Gemma3ForCausalLM", "gemma3_text"),
    ] {
        let by_type =
            HfConfig::from_value(serde_json::json!({ "model_type": model_type })).unwrap();
        let resolved = registry.resolve(&by_type).unwrap();
        assert_eq!(
            resolved.architecture.name(),
            expected,
            "model_type {model_type}"
        );
        let by_class = HfConfig::from_value(serde_json::json!({
            "model_type": format!("custom-{model_type}"),
            "architectures": [class]
        }))
        .unwrap();
        let resolved = registry.resolve(&by_class).unwrap();
        assert_eq!(resolved.architecture.name(), expected, "class {class}");
        assert!(resolved.reason.contains(class), "{}", resolved.reason);
    }
}
