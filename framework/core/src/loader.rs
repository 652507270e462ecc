//! From a model directory to a running model: read `config.json`, resolve
//! the architecture through the registry, open the checkpoint, plan the
//! weight mapping from names and shapes, refuse an unclean mapping (unless
//! asked not to), then load every tensor once, cast to the compute dtype,
//! into the built model.

use crate::architecture::Prepared;
use crate::checkpoint::Checkpoint;
use crate::config::HfConfig;
use crate::error::{Error, MlxContext, Result};
use crate::mapping::{MappingReport, TensorMeta, WeightMapper};
use crate::model::{CausalLm, ModelDims};
use crate::quantize::apply::{plan_from_config_block, QuantizeMode};
use crate::quantize::{quantize_model, QuantPlan, QuantizationReport};
use crate::quantize::{QuantMode, QuantSettings};
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
    /// Quantize the loaded float weights with this plan.
    pub quantize: Option<QuantPlan>,
    /// The registered quantizer to use (default `affine`).
    pub quantizer: Option<String>,
    /// Attach a fresh adapter after loading (and quantizing).
    pub adapter: Option<crate::adapter::AdapterSpec>,
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
    /// Bytes of tensor data in the checkpoint.
    pub weight_bytes: u64,
    /// How the checkpoint's layers are quantized, if it is an MLX-format
    /// quantized checkpoint.
    pub quantization: Option<QuantizationReport>,
    /// Every weight matrix (linear layer, embedding table, expert stack):
    /// its quantization and the bytes its tensors take in the checkpoint.
    pub layers: Vec<LayerSummary>,
    /// The mapping report.
    pub report: MappingReport,
}

/// One weight matrix of a model, as `inspect` reports it.
#[derive(Debug, Clone, Serialize)]
pub struct LayerSummary {
    /// Module path, e.g. `model.layers.0.self_attn.q_proj`.
    pub path: String,
    /// Its quantization, if any.
    pub quantization: Option<QuantSettings>,
    /// Bytes of its tensors (weight, scales, biases, bias) in the checkpoint.
    pub bytes: u64,
    /// Input features.
    pub input: usize,
    /// Output features.
    pub output: usize,
    /// Experts stacked in it (1 for a plain layer).
    pub experts: usize,
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
    /// The raw `config.json`, to write next to exported weights.
    pub source_config: serde_json::Map<String, serde_json::Value>,
    /// How the linear layers are quantized (empty when none is).
    pub quantization: QuantizationReport,
    /// The modules the architecture adapts when a user names none.
    pub default_adapter_targets: Vec<String>,
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
    /// Attaches a fresh adapter of the registered `method` to `targets`
    /// (module names such as `q_proj`, patterns, or the architecture's
    /// defaults when empty) and returns the adapted layers.
    pub fn apply_adapter(
        &mut self,
        registry: &Registry,
        method: &str,
        settings: crate::adapter::AdapterSettings,
        targets: &crate::adapter::AdapterTargets,
    ) -> Result<Vec<String>> {
        let adapter = registry.adapter(method).ok_or_else(|| {
            let known: Vec<&str> = registry.adapters().iter().map(|a| a.name()).collect();
            Error::InvalidArgument(format!(
                "no adapter named {method:?} is registered (registered: {})",
                known.join(", ")
            ))
        })?;
        let defaults: Vec<&str> = self
            .default_adapter_targets
            .iter()
            .map(String::as_str)
            .collect();
        crate::adapter::attach_adapters(self.model.as_mut(), adapter, settings, targets, &defaults)
    }

    /// LoRA on the layers named in `target_modules` (the seed's
    /// `model.apply_lora(target_modules=[...])`).
    pub fn apply_lora(
        &mut self,
        registry: &Registry,
        target_modules: &[&str],
        settings: crate::adapter::AdapterSettings,
    ) -> Result<Vec<String>> {
        let targets = crate::adapter::AdapterTargets {
            modules: target_modules.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        };
        self.apply_adapter(registry, "lora", settings, &targets)
    }

    /// Names tensors keyed by model parameter the checkpoint's way (the
    /// mapping read backwards), e.g. to name adapter tensors for a format
    /// that uses the checkpoint's module paths.
    pub fn export_tensors(
        &self,
        params: &BTreeMap<String, Array>,
    ) -> Result<BTreeMap<String, Array>> {
        self.mapper.export(params)
    }

    /// Recomputes [`quantization`](Self::quantization) from the layers, after
    /// something (fusing with de-quantization) changed them.
    pub fn refresh_quantization(&mut self) -> Result<()> {
        let mut report = QuantizationReport::default();
        self.model.visit_linears(&mut |path, layer| {
            match layer.quantization {
                Some(settings) => {
                    report.quantized.insert(path.to_owned(), settings);
                }
                None => {
                    report
                        .kept
                        .insert(path.to_owned(), "full precision".to_owned());
                }
            }
            Ok(())
        })?;
        if report.quantized.is_empty() {
            report.kept.clear();
        }
        self.quantization = report;
        Ok(())
    }

    /// The model layers a checkpoint module (e.g. Phi-3's fused
    /// `model.layers.0.self_attn.qkv_proj`, of `out` output features) maps
    /// to, each with the rows of the checkpoint module's output it covers.
    /// Adapter formats name modules the checkpoint's way; this is how their
    /// tensors find the model's layers.
    pub fn model_modules_of(
        &self,
        checkpoint_module: &str,
        out: usize,
        input: usize,
    ) -> Result<Vec<(String, std::ops::Range<usize>)>> {
        use crate::mapping::Op;
        let name = format!("{checkpoint_module}.weight");
        let metas = BTreeMap::from([(
            name.clone(),
            TensorMeta {
                shape: vec![out as i64, input as i64],
                dtype: "F32".into(),
            },
        )]);
        let plan = self.mapper.plan(&metas, &BTreeMap::new());
        let module = |param: &str| param.strip_suffix(".weight").unwrap_or(param).to_owned();
        for op in plan.ops {
            match op {
                Op::Copy { from, to } if from == name => return Ok(vec![(module(&to), 0..out)]),
                Op::Split { from, parts, axis: 0 } if from == name => {
                    let mut start = 0;
                    return Ok(parts
                        .iter()
                        .map(|(part, size)| {
                            let range = start..start + size;
                            start += size;
                            (module(part), range)
                        })
                        .collect());
                }
                Op::Transform { from, .. } | Op::Split { from, .. } if from == name => {
                    return Err(Error::Mapping(format!(
                        "{checkpoint_module} reaches the model through a transformation adapters cannot follow"
                    )))
                }
                _ => {}
            }
        }
        Err(Error::Mapping(format!(
            "{checkpoint_module} is not a layer of this {} model",
            self.architecture
        )))
    }

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
    config: HfConfig,
    never_quantize: Vec<String>,
    default_adapter_targets: Vec<String>,
    /// Whether the checkpoint is an MLX-format quantized one.
    quantized: bool,
    /// Tensors standing in for the checkpoint's (GPTQ/AWQ layers repacked
    /// into MLX's layout), and the checkpoint names they replace.
    overlay: crate::prequantized::Overlay,
    replaced: Vec<String>,
}

impl Opened {
    /// The checkpoint's tensors as the mapping sees them.
    fn tensors(&self) -> BTreeMap<String, TensorMeta> {
        let mut tensors = self.checkpoint.tensors();
        for name in &self.replaced {
            tensors.remove(name);
        }
        for (name, (meta, _)) in &self.overlay {
            tensors.insert(name.clone(), meta.clone());
        }
        tensors
    }

    /// Loads a tensor; packed quantized weights stay integers, everything
    /// else is cast to `dtype`.
    fn load_tensor(&self, name: &str, meta: Option<&TensorMeta>, dtype: Dtype) -> Result<Array> {
        // Packed values (U32) and the floating-point modes' byte scales (U8)
        // stay as stored.
        let packed = meta.is_some_and(|m| m.dtype == "U32" || m.dtype == "U8");
        match self.overlay.get(name) {
            Some((_, array)) if packed => Ok(array.clone()),
            Some((_, array)) => array
                .as_dtype(dtype)
                .context(|| format!("casting {name} to {dtype:?}")),
            None if packed => self.checkpoint.load_raw(name),
            None => self.checkpoint.load(name, dtype),
        }
    }

    /// Builds the model, shaped for the checkpoint's quantization if any.
    ///
    /// As mlx-lm does, a layer counts as quantized when the checkpoint holds
    /// its `scales`; its bits and group size follow from the stored shapes
    /// (`in * bits / 32` packed columns, `in / group` scales per row), which
    /// also covers layers mlx-lm leaves out of the config block.
    fn build(&self) -> Result<(Box<dyn CausalLm>, Option<QuantizationReport>)> {
        let mut model = self.prepared.build()?;
        if !self.quantized {
            return Ok((model, None));
        }
        let tensors = self.tensors();
        let plan = self
            .prepared
            .weight_mapper(&tensors)
            .plan(&tensors, &expected_shapes(model.as_ref()));
        // Scales stored as bytes mark MLX's floating-point modes.
        let byte_scales = |source: &str| {
            source
                .split('+')
                .next()
                .and_then(|first| tensors.get(first))
                .is_some_and(|meta| meta.dtype == "U8")
        };
        let scale_bytes: std::collections::BTreeSet<String> = plan
            .produced
            .iter()
            .filter(|(name, (_, source))| name.ends_with(".scales") && byte_scales(source))
            .map(|(name, _)| name.clone())
            .collect();
        let produced: BTreeMap<String, Vec<i64>> = plan
            .produced
            .into_iter()
            .map(|(name, (shape, _))| (name, shape))
            .collect();
        let mut report = QuantizationReport::default();
        model.visit_linears(&mut |path, layer| {
            let Some(scales) = produced.get(&format!("{path}.scales")) else {
                report
                    .kept
                    .insert(path.to_owned(), "stored in full precision".to_owned());
                return Ok(());
            };
            let packed = produced.get(&format!("{path}.weight")).ok_or_else(|| {
                Error::Mapping(format!("{path} has scales but no weight in the checkpoint"))
            })?;
            let input = layer.input_dims();
            let (groups, words) = (
                scales.last().copied().unwrap_or(0) as usize,
                packed.last().copied().unwrap_or(0) as usize,
            );
            if groups == 0 || input % groups != 0 || (words * 32) % input != 0 {
                return Err(Error::Mapping(format!(
                    "{path}: quantized weight with {words} packed columns and {groups} groups per row does not fit {input} input features"
                )));
            }
            let (bits, group_size) = (
                u8::try_from(words * 32 / input).unwrap_or(u8::MAX),
                input / groups,
            );
            let mode = if scale_bytes.contains(&format!("{path}.scales")) {
                QuantMode::ALL
                    .into_iter()
                    .find(|m| m.fixed() == Some((bits, group_size)))
                    .ok_or_else(|| {
                        Error::Mapping(format!(
                            "{path}: byte scales mark a floating-point mode, but {bits} bits in groups of {group_size} is none of mxfp4, mxfp8, nvfp4"
                        ))
                    })?
            } else {
                QuantMode::Affine
            };
            let settings = QuantSettings {
                bits,
                group_size,
                mode,
            };
            settings
                .check()
                .map_err(|e| Error::Mapping(format!("{path}: {e}")))?;
            layer
                .quantized_placeholder(settings)
                .map_err(|e| Error::Mapping(format!("{path}: {e}")))?;
            report.quantized.insert(path.to_owned(), settings);
            Ok(())
        })?;
        Ok((model, Some(report)))
    }
}

/// Whether `config.json` describes an MLX-format quantized checkpoint,
/// refusing quantized formats this crate cannot read yet.
fn is_quantized_checkpoint(config: &HfConfig) -> Result<bool> {
    let raw = config.raw();
    if let Some(block) = raw.get("quantization") {
        // Validates the block's global settings.
        plan_from_config_block(block)?;
        return Ok(true);
    }
    if let Some(block) = raw.get("quantization_config") {
        let method = block
            .get("quant_method")
            .and_then(serde_json::Value::as_str);
        if let Some(method) = method {
            return Err(Error::config(
                "quantization_config.quant_method",
                format!(
                    "{method:?} checkpoints cannot be loaded yet; expected an MLX-format model \
                     (`quantization` with bits and group_size)"
                ),
            ));
        }
        plan_from_config_block(block)?;
        return Ok(true);
    }
    Ok(false)
}

fn open(registry: &Registry, dir: &Path) -> Result<Opened> {
    if dir.is_file()
        && dir
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
    {
        return open_gguf(registry, dir);
    }
    if !dir.is_dir() {
        return Err(Error::Io {
            path: dir.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "not a model directory"),
        });
    }
    let config = HfConfig::from_file(&dir.join("config.json"))?;
    let prequantized = crate::prequantized::detect(&config)?;
    let quantized = prequantized.is_some() || is_quantized_checkpoint(&config)?;
    let checkpoint = Checkpoint::open(dir)?;
    let (overlay, replaced) = match prequantized {
        Some(settings) => crate::prequantized::repack(&checkpoint, settings)?,
        None => (BTreeMap::new(), Vec::new()),
    };
    let tensors = Tensors {
        checkpoint,
        overlay,
        replaced,
    };
    opened(registry, dir, config, quantized, tensors)
}

/// A GGUF file opened as a checkpoint: its config from the metadata, every
/// tensor in the overlay under its Hugging Face name (see [`crate::gguf`]).
fn open_gguf(registry: &Registry, path: &Path) -> Result<Opened> {
    let (config, overlay) = crate::gguf::read_model(path)?;
    let config = HfConfig::from_value(config)?;
    let quantized = is_quantized_checkpoint(&config)?;
    let tensors = Tensors {
        checkpoint: Checkpoint::open_files(&[])?,
        overlay,
        replaced: Vec::new(),
    };
    opened(registry, path, config, quantized, tensors)
}

/// Where an opened model's tensors come from: the checkpoint, tensors that
/// replace some of its own (repacked or read from another format), and the
/// names replaced.
struct Tensors {
    checkpoint: Checkpoint,
    overlay: crate::prequantized::Overlay,
    replaced: Vec<String>,
}

/// Resolves `config` to an architecture and gathers what loading needs.
fn opened(
    registry: &Registry,
    source: &Path,
    config: HfConfig,
    quantized: bool,
    tensors: Tensors,
) -> Result<Opened> {
    let resolution = registry.resolve(&config)?;
    let prepared = resolution.prepare(&config)?;
    Ok(Opened {
        dir: source.to_path_buf(),
        architecture: resolution.architecture.name().to_owned(),
        reason: resolution.reason,
        candidates: resolution.candidates,
        never_quantize: resolution.architecture.info().never_quantize,
        default_adapter_targets: resolution.architecture.info().default_adapter_targets,
        prepared,
        checkpoint: tensors.checkpoint,
        config,
        quantized,
        overlay: tensors.overlay,
        replaced: tensors.replaced,
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
    // Parameters are counted on the float model (lazy zeros cost nothing).
    let parameters = expected_shapes(opened.prepared.build()?.as_ref())
        .values()
        .map(|s| s.iter().product::<i64>() as u64)
        .sum();
    let (mut model, quantization) = opened.build()?;
    let expected = expected_shapes(model.as_ref());
    let tensors = opened.tensors();
    let plan = opened
        .prepared
        .weight_mapper(&tensors)
        .plan(&tensors, &expected);
    let mut layers = Vec::new();
    model.visit_linears(&mut |path, layer| {
        let prefix = format!("{path}.");
        let bytes = plan
            .produced
            .iter()
            .filter(|(name, _)| name.starts_with(&prefix) && !name[prefix.len()..].contains('.'))
            .map(|(_, (shape, source))| {
                let first = source.split('+').next().unwrap_or(source);
                let dtype = tensors
                    .get(first)
                    .map(|t| t.dtype.as_str())
                    .unwrap_or("F32");
                shape.iter().product::<i64>() as u64 * dtype_bytes(dtype)
            })
            .sum();
        let shape = layer.weight.as_ref().shape();
        layers.push(LayerSummary {
            path: path.to_owned(),
            quantization: layer.quantization,
            bytes,
            input: layer.input_dims(),
            output: layer.output_dims(),
            experts: if shape.len() == 3 {
                shape[0] as usize
            } else {
                1
            },
        });
        Ok(())
    })?;
    let weight_bytes = tensors
        .values()
        .map(|t| t.shape.iter().product::<i64>() as u64 * dtype_bytes(&t.dtype))
        .sum();
    Ok(Inspection {
        dir: opened.dir,
        architecture: opened.architecture,
        reason: opened.reason,
        candidates: opened.candidates,
        config: opened.prepared.config.clone(),
        dims: opened.prepared.dims.clone(),
        parameters,
        files: opened.checkpoint.files(),
        weight_bytes,
        quantization,
        layers,
        report: plan.report,
    })
}

fn dtype_bytes(dtype: &str) -> u64 {
    match dtype {
        "F64" | "I64" | "U64" => 8,
        "F32" | "I32" | "U32" => 4,
        "F16" | "BF16" | "I16" | "U16" => 2,
        _ => 1,
    }
}

/// Loads the model in `dir`.
pub fn load(registry: &Registry, dir: &Path, options: &LoadOptions) -> Result<LoadedModel> {
    let opened = open(registry, dir)?;
    let (mut model, stored) = opened.build()?;
    let expected = expected_shapes(model.as_ref());
    let tensors = opened.tensors();
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
    // Packed quantized weights stay integers; everything else is cast.
    let mut params = plan.execute(|name| opened.load_tensor(name, tensors.get(name), dtype))?;
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
    let quantization = match (&options.quantize, stored) {
        (Some(_), Some(_)) => {
            return Err(Error::InvalidArgument(format!(
                "{} is already quantized; quantize its float original instead",
                dir.display()
            )))
        }
        (Some(plan), None) => {
            // The plan's mode picks the quantizer unless the options name one.
            let by_mode = match plan.default.map(|d| d.mode).unwrap_or_default() {
                crate::quantize::QuantMode::Affine => "affine",
                _ => "mxfp",
            };
            let name = options.quantizer.as_deref().unwrap_or(by_mode);
            let quantizer = registry.quantizer(name).ok_or_else(|| {
                let known: Vec<&str> = registry.quantizers().iter().map(|q| q.name()).collect();
                Error::InvalidArgument(format!(
                    "no quantizer named {name:?} is registered (registered: {})",
                    known.join(", ")
                ))
            })?;
            let never: Vec<&str> = opened.never_quantize.iter().map(String::as_str).collect();
            let report = quantize_model(
                model.as_mut(),
                plan,
                &never,
                QuantizeMode::Weights(quantizer.as_ref()),
            )?;
            let values: Vec<Array> = model
                .parameters()
                .flatten()
                .values()
                .map(|v| (*v).clone())
                .collect();
            mlx_rs::transforms::eval(&values).context(|| "quantizing the weights".into())?;
            report
        }
        (None, Some(report)) => report,
        (None, None) => QuantizationReport::default(),
    };
    if dtype != Dtype::Float32 {
        // Placeholders not filled from the checkpoint are float32 zeros;
        // packed values (uint32) and byte scales (uint8) stay as stored.
        let mut cast = Vec::new();
        for (name, value) in model.parameters().flatten() {
            let integer = matches!(value.dtype(), Dtype::Uint32 | Dtype::Uint8);
            if value.dtype() != dtype && !integer {
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
    let mut loaded = LoadedModel {
        architecture: opened.architecture,
        model,
        report: plan.report,
        config: opened.prepared.config,
        source_config: opened.config.raw().clone(),
        quantization,
        default_adapter_targets: opened.default_adapter_targets,
        mapper,
    };
    if let Some(spec) = &options.adapter {
        loaded.apply_adapter(registry, &spec.method, spec.settings, &spec.targets)?;
    }
    Ok(loaded)
}
