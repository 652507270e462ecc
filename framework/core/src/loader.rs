//! From a model directory to a running model: read `config.json`, resolve
//! the architecture through the registry, open the checkpoint, plan the
//! weight mapping from names and shapes, refuse an unclean mapping (unless
//! asked not to), then load every tensor once, cast to the compute dtype,
//! into the built model.

use crate::architecture::Prepared;
use crate::checkpoint::Checkpoint;
use crate::config::HfConfig;
use crate::error::{Error, MlxContext, Result};
use crate::mapping::{MappingReport, WeightMapper};
use crate::model::{CausalLm, ModelDims};
use crate::registry::{Candidate, Registry};
use mlx_rs::module::ModuleParameters;
use mlx_rs::{Array, Dtype};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The dtype the model computes in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ComputeDtype {
    /// 32-bit floats (the default; what parity tests use).
    #[default]
    Float32,
    /// 16-bit IEEE floats.
    Float16,
    /// bfloat16.
    Bfloat16,
}

impl ComputeDtype {
    /// The MLX dtype.
    pub fn dtype(self) -> Dtype {
        match self {
            ComputeDtype::Float32 => Dtype::Float32,
            ComputeDtype::Float16 => Dtype::Float16,
            ComputeDtype::Bfloat16 => Dtype::Bfloat16,
        }
    }
}

impl std::str::FromStr for ComputeDtype {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "f32" | "float32" => Ok(Self::Float32),
            "f16" | "float16" => Ok(Self::Float16),
            "bf16" | "bfloat16" => Ok(Self::Bfloat16),
            other => Err(Error::InvalidArgument(format!(
                "unknown dtype {other:?}: expected f32, f16 or bf16"
            ))),
        }
    }
}

/// How to load.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// Compute dtype.
    pub dtype: ComputeDtype,
    /// Load even when tensors are missing, unexpected or mis-shaped
    /// (missing parameters keep their zero placeholders).
    pub allow_unclean: bool,
}

/// What `inspect` finds out without loading tensor data.
#[derive(Debug, Serialize)]
pub struct Inspection {
    /// The model directory.
    pub dir: PathBuf,
    /// The chosen architecture.
    pub architecture: String,
    /// Why it was chosen.
    pub reason: String,
    /// Every architecture's answer.
    pub candidates: Vec<Candidate>,
    /// The typed config with defaults filled in.
    pub config: serde_json::Value,
    /// The model's dimensions.
    pub dims: ModelDims,
    /// Number of model parameters.
    pub parameters: u64,
    /// Checkpoint files.
    pub files: Vec<PathBuf>,
    /// The mapping report.
    pub report: MappingReport,
}

/// A loaded model.
pub struct LoadedModel {
    /// The chosen architecture's name.
    pub architecture: String,
    /// The model.
    pub model: Box<dyn CausalLm>,
    /// The mapping report of the load.
    pub report: MappingReport,
    /// The typed config with defaults filled in.
    pub config: serde_json::Value,
    mapper: Box<dyn WeightMapper>,
}

impl std::fmt::Debug for LoadedModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedModel")
            .field("architecture", &self.architecture)
            .field("dims", &self.model.dims())
            .finish_non_exhaustive()
    }
}

impl LoadedModel {
    /// The model's parameters under the checkpoint's own names (the mapping
    /// read backwards), e.g. to save a Hugging Face-layout copy.
    pub fn export_weights(&self) -> Result<BTreeMap<String, Array>> {
        let params: BTreeMap<String, Array> = self
            .model
            .parameters()
            .flatten()
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect();
        self.mapper.export(&params)
    }
}

struct Opened {
    dir: PathBuf,
    architecture: String,
    reason: String,
    candidates: Vec<Candidate>,
    prepared: Prepared,
    checkpoint: Checkpoint,
}

fn open(registry: &Registry, dir: &Path) -> Result<Opened> {
    if !dir.is_dir() {
        return Err(Error::Io {
            path: dir.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "not a model directory"),
        });
    }
    let config = HfConfig::from_file(&dir.join("config.json"))?;
    let resolution = registry.resolve(&config)?;
    let prepared = resolution.prepare(&config)?;
    let checkpoint = Checkpoint::open(dir)?;
    Ok(Opened {
        dir: dir.to_path_buf(),
        architecture: resolution.architecture.name().to_owned(),
        reason: resolution.reason,
        candidates: resolution.candidates,
        prepared,
        checkpoint,
    })
}

fn expected_shapes(model: &dyn CausalLm) -> BTreeMap<String, Vec<i64>> {
    model
        .parameters()
        .flatten()
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.shape().iter().map(|&d| d as i64).collect()))
        .collect()
}

/// Resolves and maps the model in `dir` without loading tensor data.
pub fn inspect(registry: &Registry, dir: &Path) -> Result<Inspection> {
    let opened = open(registry, dir)?;
    let model = opened.prepared.build()?;
    let expected = expected_shapes(model.as_ref());
    let tensors = opened.checkpoint.tensors();
    let plan = opened
        .prepared
        .weight_mapper(&tensors)
        .plan(&tensors, &expected);
    Ok(Inspection {
        dir: opened.dir,
        architecture: opened.architecture,
        reason: opened.reason,
        candidates: opened.candidates,
        config: opened.prepared.config.clone(),
        dims: opened.prepared.dims.clone(),
        parameters: expected
            .values()
            .map(|s| s.iter().product::<i64>() as u64)
            .sum(),
        files: opened.checkpoint.files(),
        report: plan.report,
    })
}

/// Loads the model in `dir`.
pub fn load(registry: &Registry, dir: &Path, options: &LoadOptions) -> Result<LoadedModel> {
    let opened = open(registry, dir)?;
    let mut model = opened.prepared.build()?;
    let expected = expected_shapes(model.as_ref());
    let tensors = opened.checkpoint.tensors();
    let mapper = opened.prepared.weight_mapper(&tensors);
    let plan = mapper.plan(&tensors, &expected);
    if !plan.report.is_clean() && !options.allow_unclean {
        return Err(Error::Mapping(format!(
            "{}: the checkpoint does not fit the {} model ({})\n{}",
            dir.display(),
            opened.architecture,
            plan.report.counts(),
            plan.report.problems(8)
        )));
    }
    let dtype = options.dtype.dtype();
    let mut params = plan.execute(|name| opened.checkpoint.load(name, dtype))?;
    if options.allow_unclean {
        // Keep placeholders where the checkpoint's tensor has the wrong shape.
        params.retain(|name, value| {
            expected.get(name).is_some_and(|shape| {
                value
                    .shape()
                    .iter()
                    .map(|&d| d as i64)
                    .eq(shape.iter().copied())
            })
        });
    }
    let values: Vec<Array> = params.values().cloned().collect();
    mlx_rs::transforms::eval(&values)
        .context(|| format!("loading the weights of {}", dir.display()))?;
    let flattened = params
        .into_iter()
        .map(|(k, v)| (std::rc::Rc::<str>::from(k), v))
        .collect();
    model.update_flattened(flattened);
    if dtype != Dtype::Float32 {
        // Placeholders not filled from the checkpoint are float32 zeros.
        let mut cast = Vec::new();
        for (name, value) in model.parameters().flatten() {
            if value.dtype() != dtype {
                cast.push((
                    name.clone(),
                    value
                        .as_dtype(dtype)
                        .context(|| format!("casting {name}"))?,
                ));
            }
        }
        model.update_flattened(cast.into_iter().collect());
    }
    Ok(LoadedModel {
        architecture: opened.architecture,
        model,
        report: plan.report,
        config: opened.prepared.config,
        mapper,
    })
}
