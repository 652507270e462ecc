//! The [`Architecture`] trait a model family implements, and its
//! type-erased form that the registry stores.
//!
//! A family states its identity (name, the Hugging Face `model_type`s and
//! `architectures` it claims), detects configs, parses them into its own
//! typed config, builds the model, and describes its weights with a
//! [`WeightMapper`]. Everything else (resolution, loading, reporting) is the
//! core's job.

use crate::config::HfConfig;
use crate::error::Result;
use crate::mapping::{TensorMeta, WeightMapper};
use crate::model::{CausalLm, ModelDims};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::collections::BTreeMap;

/// The outcome of asking an architecture whether it handles a config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Detection {
    /// Yes, with a priority (higher wins) and the reason.
    Match {
        /// Priority; by convention 100 for `model_type`, 50 for `architectures`.
        priority: u32,
        /// Why, e.g. `model_type "llama"`.
        reason: String,
    },
    /// No, and why not.
    NoMatch {
        /// Why not.
        reason: String,
    },
}

/// Priority of a match on `model_type`.
pub const PRIORITY_MODEL_TYPE: u32 = 100;
/// Priority of a match on an `architectures` class name.
pub const PRIORITY_ARCHITECTURES: u32 = 50;

/// Detection by `model_type` first and `architectures` second, which is what
/// transformers' Auto classes do. [`Architecture::detect`] defaults to it.
pub fn detect_by_names(
    model_types: &[&str],
    hf_architectures: &[&str],
    config: &HfConfig,
) -> Detection {
    if let Some(model_type) = config.model_type() {
        if model_types.contains(&model_type) {
            return Detection::Match {
                priority: PRIORITY_MODEL_TYPE,
                reason: format!("model_type \"{model_type}\""),
            };
        }
    }
    if let Some(class) = config
        .architectures()
        .into_iter()
        .find(|class| hf_architectures.contains(class))
    {
        return Detection::Match {
            priority: PRIORITY_ARCHITECTURES,
            reason: format!("architectures contains \"{class}\""),
        };
    }
    Detection::NoMatch {
        reason: match config.model_type() {
            Some(t) => format!("model_type \"{t}\" is not one of {model_types:?}"),
            None => "no model_type, and no known class in architectures".to_owned(),
        },
    }
}

/// A family's typed configuration.
pub trait ModelConfig:
    Serialize + DeserializeOwned + std::fmt::Debug + Clone + Send + Sync + 'static
{
    /// Fills keys whose defaults depend on other keys (`head_dim` from the
    /// width, key/value heads from the query heads), so the parsed config
    /// states every value it runs with. Called before [`validate`](Self::validate).
    fn resolve_defaults(&mut self) {}
    /// Checks values serde cannot (divisibility, ranges), naming the key.
    fn validate(&self) -> Result<()>;
    /// The model's dimensions.
    fn dims(&self) -> ModelDims;
}

/// A model family.
pub trait Architecture: Send + Sync + 'static {
    /// The family's typed config.
    type Config: ModelConfig;

    /// A short unique name, e.g. `llama`.
    fn name(&self) -> &'static str;
    /// One line about what the family covers.
    fn description(&self) -> &'static str;
    /// The `model_type` values it claims.
    fn model_types(&self) -> &'static [&'static str];
    /// The `architectures` class names it claims.
    fn hf_architectures(&self) -> &'static [&'static str];

    /// Whether this family handles `config`.
    fn detect(&self, config: &HfConfig) -> Detection {
        detect_by_names(self.model_types(), self.hf_architectures(), config)
    }

    /// Parses the typed config, resolves dependent defaults and validates.
    fn parse_config(&self, config: &HfConfig) -> Result<Self::Config> {
        let mut parsed: Self::Config = config.parse()?;
        parsed.resolve_defaults();
        parsed.validate()?;
        Ok(parsed)
    }

    /// The mapping from this checkpoint's tensors to the model's parameters.
    /// `checkpoint` lets a family recognise alternative layouts (Meta's
    /// original naming, older remote-code names).
    fn weight_mapper(
        &self,
        config: &Self::Config,
        checkpoint: &BTreeMap<String, TensorMeta>,
    ) -> Box<dyn WeightMapper>;

    /// Builds the model with placeholder weights (lazy zeros).
    fn build(&self, config: &Self::Config) -> Result<Box<dyn CausalLm>>;

    /// Module names an adapter targets when the user names none.
    fn default_adapter_targets(&self) -> &'static [&'static str] {
        &["q_proj", "v_proj"]
    }

    /// Parameter-path patterns a quantizer must leave in full precision.
    fn never_quantize(&self) -> &'static [&'static str] {
        &[]
    }
}

/// What the registry lists about an architecture.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ArchitectureInfo {
    /// The name.
    pub name: String,
    /// One line about it.
    pub description: String,
    /// Claimed `model_type`s.
    pub model_types: Vec<String>,
    /// Claimed `architectures` class names.
    pub hf_architectures: Vec<String>,
    /// Default adapter targets.
    pub default_adapter_targets: Vec<String>,
    /// Layers never quantized.
    pub never_quantize: Vec<String>,
}

/// Produces the weight mapper for a checkpoint's tensors.
type MapperFactory =
    Box<dyn Fn(&BTreeMap<String, TensorMeta>) -> Box<dyn WeightMapper> + Send + Sync>;
/// Builds the model.
type ModelFactory = Box<dyn Fn() -> Result<Box<dyn CausalLm>> + Send + Sync>;

/// A config resolved by one architecture: the typed config (as JSON, with
/// every default filled in), dimensions, and how to map and build.
pub struct Prepared {
    /// The typed config serialized back to JSON.
    pub config: serde_json::Value,
    /// The model's dimensions.
    pub dims: ModelDims,
    mapper: MapperFactory,
    builder: ModelFactory,
}

impl std::fmt::Debug for Prepared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prepared")
            .field("config", &self.config)
            .field("dims", &self.dims)
            .finish_non_exhaustive()
    }
}

impl Prepared {
    /// The weight mapper for a checkpoint with these tensors.
    pub fn weight_mapper(
        &self,
        checkpoint: &BTreeMap<String, TensorMeta>,
    ) -> Box<dyn WeightMapper> {
        (self.mapper)(checkpoint)
    }

    /// Builds the model with placeholder weights.
    pub fn build(&self) -> Result<Box<dyn CausalLm>> {
        (self.builder)()
    }
}

/// The object-safe face of an [`Architecture`], as the registry holds it.
/// Implemented for every `Architecture`; families never implement it.
pub trait DynArchitecture: Send + Sync {
    /// Identity and hooks.
    fn info(&self) -> ArchitectureInfo;
    /// The name.
    fn name(&self) -> &'static str;
    /// Whether this family handles `config`.
    fn detect(&self, config: &HfConfig) -> Detection;
    /// Parses the config and captures what loading needs.
    fn prepare(&self, config: &HfConfig) -> Result<Prepared>;
}

impl<A: Architecture + Clone> DynArchitecture for A {
    fn info(&self) -> ArchitectureInfo {
        let owned = |items: &[&str]| items.iter().map(|s| s.to_string()).collect();
        ArchitectureInfo {
            name: self.name().to_owned(),
            description: self.description().to_owned(),
            model_types: owned(self.model_types()),
            hf_architectures: owned(self.hf_architectures()),
            default_adapter_targets: owned(self.default_adapter_targets()),
            never_quantize: owned(self.never_quantize()),
        }
    }

    fn name(&self) -> &'static str {
        Architecture::name(self)
    }

    fn detect(&self, config: &HfConfig) -> Detection {
        Architecture::detect(self, config)
    }

    fn prepare(&self, config: &HfConfig) -> Result<Prepared> {
        let typed = self.parse_config(config)?;
        let json = serde_json::to_value(&typed).map_err(|e| {
            crate::error::Error::config(
                "<root>",
                format!("cannot re-serialize the parsed config: {e}"),
            )
        })?;
        let dims = typed.dims();
        let (for_mapper, for_builder) = (typed.clone(), typed);
        let (arch_m, arch_b) = (self.clone(), self.clone());
        Ok(Prepared {
            config: json,
            dims,
            mapper: Box::new(move |checkpoint| arch_m.weight_mapper(&for_mapper, checkpoint)),
            builder: Box::new(move || arch_b.build(&for_builder)),
        })
    }
}
