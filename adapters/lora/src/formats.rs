//! Reading adapters written by PEFT (`adapter_model.safetensors` +
//! `adapter_config.json`) and by mlx-lm (`adapters.safetensors` +
//! `adapter_config.json`), detected from the files present.
//!
//! PEFT stores `base_model.model.<module>.lora_A.weight` (`[r, in]`),
//! `lora_B.weight` (`[out, r]`) and, for DoRA, `lora_magnitude_vector`
//! (`[out]`), with `r`, `lora_alpha`, `use_rslora` and `use_dora` in its
//! config. mlx-lm stores `<module>.lora_a` (`[in, r]`), `lora_b`
//! (`[r, out]`) and DoRA's `m` (`[out]`), with `rank` and `scale` (the whole
//! factor, so `alpha = scale * rank`). Module paths are the checkpoint's;
//! a fused checkpoint module (Phi-3's `qkv_proj`) spreads over the model's
//! split layers: `A` is shared, `B` and the magnitude are split by rows.
//!
//! Loading is strict: a tensor that lands on no module, a module with half a
//! pair, a shape that does not fit, or an adapter that does not change its
//! module's output is an error naming the tensor.

use crate::{Dora, Lora};
use mlx_rs::Array;
use mlx_zoo_core::adapter::{AdapterParams, AdapterSettings};
use mlx_zoo_core::error::MlxContext;
use mlx_zoo_core::loader::LoadedModel;
use mlx_zoo_core::{Adapter, Error, Result};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Who wrote an adapter directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdapterFormat {
    /// Hugging Face PEFT.
    Peft,
    /// mlx-lm.
    MlxLm,
}

/// What [`load_adapter`] attached.
#[derive(Debug, Clone)]
pub struct LoadedAdapter {
    /// The format read.
    pub format: AdapterFormat,
    /// `lora` or `dora`.
    pub method: &'static str,
    /// Rank and scaling.
    pub settings: AdapterSettings,
    /// The model layers that received an adapter.
    pub modules: Vec<String>,
}

/// Tells PEFT and mlx-lm adapter directories apart.
pub fn detect_format(dir: &Path) -> Result<AdapterFormat> {
    if dir.join("adapter_model.safetensors").is_file() {
        Ok(AdapterFormat::Peft)
    } else if dir.join("adapters.safetensors").is_file() {
        Ok(AdapterFormat::MlxLm)
    } else {
        Err(Error::InvalidArgument(format!(
            "{}: no adapter found: expected adapter_model.safetensors (PEFT) or adapters.safetensors (mlx-lm) with adapter_config.json",
            dir.display()
        )))
    }
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|source| Error::Json {
        path: path.to_path_buf(),
        source,
    })
}

fn read_tensors(path: &Path) -> Result<BTreeMap<String, Array>> {
    Array::load_safetensors(path)
        .map(|t| t.into_iter().collect())
        .map_err(|e| Error::Safetensors {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
}

fn config_error(file: &Path, key: &str, message: impl Into<String>) -> Error {
    Error::Config {
        file: file.display().to_string(),
        key: key.to_owned(),
        message: message.into(),
    }
}

/// One checkpoint module's adapter tensors, in mlx-lm's orientation.
#[derive(Default)]
struct ModuleTensors {
    a: Option<(String, Array)>,
    b: Option<(String, Array)>,
    magnitude: Option<(String, Array)>,
}

/// Checks an adapter tensor's rank and dtype before anything indexes its
/// shape, and casts it to float32: PEFT writes float16 or bfloat16 adapters
/// for half-precision bases (most adapters on the Hub), and the adapter
/// math runs in float32.
fn checked_adapter_tensor(
    tensor: Array,
    name: &str,
    role: Role,
    format: AdapterFormat,
    path: &Path,
) -> Result<Array> {
    let ranks: &[usize] = match (role, format) {
        (Role::Magnitude, _) => &[1],
        // mlx-lm stores expert stacks as [experts, r, in] / [experts, out, r].
        (Role::A | Role::B, AdapterFormat::MlxLm) => &[2, 3],
        (Role::A | Role::B, AdapterFormat::Peft) => &[2],
    };
    if !ranks.contains(&tensor.ndim()) {
        return Err(Error::Mapping(format!(
            "{}: tensor {name} has shape {:?}; expected {} dimensions",
            path.display(),
            tensor.shape(),
            ranks
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(" or ")
        )));
    }
    if tensor.shape().contains(&0) {
        return Err(Error::Mapping(format!(
            "{}: tensor {name} has an empty dimension (shape {:?})",
            path.display(),
            tensor.shape()
        )));
    }
    match tensor.dtype() {
        mlx_rs::Dtype::Float32 => Ok(tensor),
        mlx_rs::Dtype::Float16 | mlx_rs::Dtype::Bfloat16 => tensor
            .as_dtype(mlx_rs::Dtype::Float32)
            .context(|| format!("casting {name} to float32")),
        other => Err(Error::Mapping(format!(
            "{}: tensor {name} has dtype {other:?}; expected float32, float16 or bfloat16",
            path.display()
        ))),
    }
}

/// Reads an adapter directory, maps it onto `model` and attaches it.
pub fn load_adapter(model: &mut LoadedModel, dir: &Path) -> Result<LoadedAdapter> {
    let format = detect_format(dir)?;
    let config_path = dir.join("adapter_config.json");
    let config = read_json(&config_path)?;
    let (settings, dora, tensors_path) = match format {
        AdapterFormat::Peft => peft_settings(&config, &config_path)?,
        AdapterFormat::MlxLm => mlx_lm_settings(&config, &config_path)?,
    };
    let tensors = read_tensors(&tensors_path)?;
    let mut modules: BTreeMap<String, ModuleTensors> = BTreeMap::new();
    for (name, tensor) in tensors {
        let (module, role) = match format {
            AdapterFormat::Peft => peft_role(&name),
            AdapterFormat::MlxLm => mlx_lm_role(&name),
        }
        .ok_or_else(|| {
            Error::Mapping(format!(
                "{}: tensor {name} is not a LoRA/DoRA parameter this loader knows",
                tensors_path.display()
            ))
        })?;
        let tensor = checked_adapter_tensor(tensor, &name, role, format, &tensors_path)?;
        let entry = modules.entry(module).or_default();
        let slot = match role {
            Role::A => &mut entry.a,
            Role::B => &mut entry.b,
            Role::Magnitude => &mut entry.magnitude,
        };
        // PEFT stores A as [r, in] and B as [out, r]; mlx-lm the transposes.
        let tensor = match (format, role) {
            (AdapterFormat::Peft, Role::A | Role::B) => tensor.t(),
            _ => tensor,
        };
        *slot = Some((name, tensor));
    }

    // Model layer -> adapter parameters.
    let mut planned: BTreeMap<String, (AdapterParams, String)> = BTreeMap::new();
    for (module, parts) in modules {
        let (Some((a_name, a)), Some((b_name, b))) = (parts.a, parts.b) else {
            return Err(Error::Mapping(format!(
                "{}: module {module} has only half of its adapter (lora A and B come in pairs)",
                tensors_path.display()
            )));
        };
        if dora != parts.magnitude.is_some() {
            return Err(Error::Mapping(format!(
                "{}: module {module} {} a DoRA magnitude but the config says {}",
                tensors_path.display(),
                if dora { "lacks" } else { "has" },
                if dora { "DoRA" } else { "LoRA" }
            )));
        }
        // [in, r] / [r, out], or mlx-lm's switch layout for expert stacks:
        // [experts, r, in] / [experts, out, r].
        let experts = a.ndim() == 3;
        let (input, rank, b_rank, out) = if experts {
            (a.shape()[2], a.shape()[1], b.shape()[2], b.shape()[1])
        } else {
            (a.shape()[0], a.shape()[1], b.shape()[0], b.shape()[1])
        };
        let (input, rank, out) = (input as usize, rank as usize, out as usize);
        if rank != settings.rank || b_rank as usize != rank || b.ndim() != a.ndim() {
            return Err(Error::Mapping(format!(
                "{}: {a_name} / {b_name} (shapes {:?} / {:?}) do not have the config's rank {}",
                tensors_path.display(),
                a.shape(),
                b.shape(),
                settings.rank
            )));
        }
        if experts && format == AdapterFormat::Peft {
            return Err(Error::Mapping(format!(
                "{}: {a_name}: PEFT adapters on expert stacks are not supported",
                tensors_path.display()
            )));
        }
        let all_zero = b
            .abs()
            .and_then(|v| v.max(None))
            .context(|| format!("checking {b_name}"))?
            .item_exact::<f32>()
            == 0.0;
        if all_zero {
            return Err(Error::Mapping(format!(
                "{}: {b_name} is all zeros, so the adapter would not change {module}",
                tensors_path.display()
            )));
        }
        let targets = model.model_modules_of(&module, out, input)?;
        if experts {
            let [(layer, _)] = targets.as_slice() else {
                return Err(Error::Mapping(format!(
                    "{}: {module} is an expert stack split across layers; not supported",
                    tensors_path.display()
                )));
            };
            let params: AdapterParams = [
                (
                    "lora_a".to_owned(),
                    a.as_dtype(mlx_rs::Dtype::Float32)
                        .context(|| format!("casting {a_name}"))?,
                ),
                (
                    "lora_b".to_owned(),
                    b.as_dtype(mlx_rs::Dtype::Float32)
                        .context(|| format!("casting {b_name}"))?,
                ),
            ]
            .into();
            planned.insert(layer.clone(), (params, a_name.clone()));
            continue;
        }
        for (layer, rows) in targets {
            let range = rows.start as i32..rows.end as i32;
            let b_part = b
                .index((.., range.clone()))
                .as_dtype(mlx_rs::Dtype::Float32)
                .context(|| format!("slicing {b_name}"))?;
            let mut params: AdapterParams = [
                (
                    "lora_a".to_owned(),
                    a.as_dtype(mlx_rs::Dtype::Float32)
                        .context(|| format!("casting {a_name}"))?,
                ),
                ("lora_b".to_owned(), b_part),
            ]
            .into();
            if let Some((m_name, m)) = &parts.magnitude {
                if m.shape() != [out as i32] {
                    return Err(Error::Mapping(format!(
                        "{}: {m_name} has shape {:?}, expected [{out}]",
                        tensors_path.display(),
                        m.shape()
                    )));
                }
                params.insert(
                    "magnitude".to_owned(),
                    m.index(range)
                        .as_dtype(mlx_rs::Dtype::Float32)
                        .context(|| format!("slicing {m_name}"))?,
                );
            }
            planned.insert(layer, (params, a_name.clone()));
        }
    }

    let method: Arc<dyn Adapter> = if dora { Arc::new(Dora) } else { Arc::new(Lora) };
    let mut attached = Vec::new();
    model.model.visit_linears(&mut |path, layer| {
        if let Some((params, tensor)) = planned.remove(path) {
            let input = layer.input_dims();
            let (a, b) = (&params["lora_a"], &params["lora_b"]);
            let stack = layer.weight.as_ref().ndim() == 3;
            if (a.ndim() == 3) != stack {
                return Err(Error::Mapping(format!(
                    "{tensor}: shape {:?} does not fit {path} ({})",
                    a.shape(),
                    if stack {
                        "an expert stack"
                    } else {
                        "a single matrix"
                    }
                )));
            }
            let a_inputs = if stack { a.shape()[2] } else { a.shape()[0] } as usize;
            if a_inputs != input {
                return Err(Error::Mapping(format!(
                    "{tensor}: {a_inputs} inputs, but {path} has {input}"
                )));
            }
            if b.shape()[1] as usize != layer.output_dims() {
                return Err(Error::Mapping(format!(
                    "{tensor}: the update has {} outputs, but {path} has {}",
                    b.shape()[1],
                    layer.output_dims()
                )));
            }
            layer.set_adapter(method.clone(), settings, params)?;
            attached.push(path.to_owned());
        }
        Ok(())
    })?;
    if let Some((path, (_, tensor))) = planned.into_iter().next() {
        return Err(Error::Mapping(format!(
            "{tensor}: maps to {path}, which is not a linear layer of the model"
        )));
    }
    mlx_zoo_core::adapter::freeze_all_but_adapters(model.model.as_mut())?;
    Ok(LoadedAdapter {
        format,
        method: method.name(),
        settings,
        modules: attached,
    })
}

#[derive(Clone, Copy)]
enum Role {
    A,
    B,
    Magnitude,
}

fn peft_role(name: &str) -> Option<(String, Role)> {
    let name = name.strip_prefix("base_model.model.").unwrap_or(name);
    for (suffix, role) in [
        (".lora_A.weight", Role::A),
        (".lora_B.weight", Role::B),
        (".lora_magnitude_vector.weight", Role::Magnitude),
        (".lora_magnitude_vector", Role::Magnitude),
    ] {
        if let Some(module) = name.strip_suffix(suffix) {
            return Some((module.to_owned(), role));
        }
    }
    None
}

fn mlx_lm_role(name: &str) -> Option<(String, Role)> {
    for (suffix, role) in [
        (".lora_a", Role::A),
        (".lora_b", Role::B),
        (".m", Role::Magnitude),
    ] {
        if let Some(module) = name.strip_suffix(suffix) {
            return Some((module.to_owned(), role));
        }
    }
    None
}

fn peft_settings(config: &Value, path: &Path) -> Result<(AdapterSettings, bool, PathBuf)> {
    let peft_type = config
        .get("peft_type")
        .and_then(Value::as_str)
        .unwrap_or("LORA");
    if peft_type != "LORA" {
        return Err(config_error(
            path,
            "peft_type",
            format!("{peft_type:?} adapters are not supported; expected \"LORA\""),
        ));
    }
    if config.get("fan_in_fan_out").and_then(Value::as_bool) == Some(true) {
        return Err(config_error(
            path,
            "fan_in_fan_out",
            "transposed (Conv1D) base layers are not supported",
        ));
    }
    match config.get("bias").and_then(Value::as_str) {
        None | Some("none") => {}
        Some(other) => {
            return Err(config_error(
                path,
                "bias",
                format!("{other:?} bias training is not supported; expected \"none\""),
            ))
        }
    }
    let rank = config
        .get("r")
        .and_then(Value::as_u64)
        .ok_or_else(|| config_error(path, "r", "expected the rank (a positive integer)"))?
        as usize;
    let alpha = config
        .get("lora_alpha")
        .and_then(Value::as_f64)
        .ok_or_else(|| config_error(path, "lora_alpha", "expected a number"))?
        as f32;
    let settings = AdapterSettings {
        rank,
        alpha,
        dropout: config
            .get("lora_dropout")
            .and_then(Value::as_f64)
            .unwrap_or(0.0) as f32,
        rslora: config
            .get("use_rslora")
            .and_then(Value::as_bool)
            .unwrap_or(false),
    };
    let dora = config
        .get("use_dora")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let dir = path.parent().unwrap_or(Path::new("."));
    Ok((settings, dora, dir.join("adapter_model.safetensors")))
}

fn mlx_lm_settings(config: &Value, path: &Path) -> Result<(AdapterSettings, bool, PathBuf)> {
    let kind = config
        .get("fine_tune_type")
        .and_then(Value::as_str)
        .unwrap_or("lora");
    let dora = match kind {
        "lora" => false,
        "dora" => true,
        other => {
            return Err(config_error(
                path,
                "fine_tune_type",
                format!("{other:?} is not an adapter; expected lora or dora"),
            ))
        }
    };
    let params = config
        .get("lora_parameters")
        .ok_or_else(|| config_error(path, "lora_parameters", "missing"))?;
    let rank =
        params.get("rank").and_then(Value::as_u64).ok_or_else(|| {
            config_error(path, "lora_parameters.rank", "expected a positive integer")
        })? as usize;
    let scale = params
        .get("scale")
        .and_then(Value::as_f64)
        .ok_or_else(|| config_error(path, "lora_parameters.scale", "expected a number"))?
        as f32;
    let settings = AdapterSettings {
        rank,
        alpha: scale * rank as f32,
        dropout: params.get("dropout").and_then(Value::as_f64).unwrap_or(0.0) as f32,
        rslora: false,
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    Ok((settings, dora, dir.join("adapters.safetensors")))
}

use mlx_rs::ops::indexing::IndexOp;

/// One checkpoint module's adapter, gathered from the model's layers.
struct SavedModule {
    a: Array,
    b: Array,
    magnitude: Option<Array>,
}

/// Writes the adapters attached to `model` to `dir` in `format`, naming
/// modules the checkpoint's way (split layers of a fused checkpoint module
/// are joined back: their `A` must be shared). Returns the files written.
pub fn save_adapter(
    model: &mut LoadedModel,
    dir: &Path,
    format: AdapterFormat,
    base_model: &str,
) -> Result<Vec<PathBuf>> {
    // Adapted layers with their parameters.
    let mut layers: BTreeMap<String, (AdapterParams, AdapterSettings, &'static str)> =
        BTreeMap::new();
    model.model.visit_linears(&mut |path, layer| {
        if let Some(attached) = &layer.adapter {
            layers.insert(
                path.to_owned(),
                (
                    layer.adapter_params(),
                    attached.settings,
                    attached.method.name(),
                ),
            );
        }
        Ok(())
    })?;
    let Some((_, (_, settings, method))) = layers.iter().next() else {
        return Err(Error::InvalidArgument(
            "the model has no adapter to save".into(),
        ));
    };
    let (settings, method) = (*settings, *method);
    if layers
        .values()
        .any(|(_, s, m)| *s != settings || *m != method)
    {
        return Err(Error::InvalidArgument(
            "the model's adapters differ in method or settings; one adapter file holds one kind"
                .into(),
        ));
    }
    // Checkpoint module names, through the mapping read backwards. Expert
    // stacks keep the model's names, which are mlx-lm's stacked ones.
    let ctx = || "naming adapter tensors".to_owned();
    let mut modules: BTreeMap<String, SavedModule> = BTreeMap::new();
    for (path, (params, ..)) in layers.iter().filter(|(_, (p, ..))| p["lora_a"].ndim() == 3) {
        modules.insert(
            path.clone(),
            SavedModule {
                a: params["lora_a"].clone(),
                b: params["lora_b"].clone(),
                magnitude: None,
            },
        );
    }
    let probes: BTreeMap<String, Array> = layers
        .iter()
        .filter(|(_, (p, ..))| p["lora_a"].ndim() == 2)
        .map(|(path, (params, ..))| {
            // A [out, 1] stand-in: only names and row counts go through.
            let rows = params["lora_b"].shape()[1];
            let probe = mlx_rs::ops::zeros::<f32>(&[rows, 1]).context(ctx)?;
            Ok((format!("{path}.weight"), probe))
        })
        .collect::<Result<_>>()?;
    let named = model.export_tensors(&probes).map_err(|e| {
        Error::InvalidArgument(format!(
            "{e}; an adapter on part of a fused checkpoint module needs adapters on all its parts"
        ))
    })?;
    for (name, probe) in &named {
        let module = name.strip_suffix(".weight").unwrap_or(name).to_owned();
        let out = probe.shape()[0] as usize;
        // Only the rows matter to where a module's tensors go.
        let parts = model.model_modules_of(&module, out, 1)?;
        let mut a: Option<Array> = None;
        let (mut bs, mut ms) = (Vec::new(), Vec::new());
        for (layer, _) in &parts {
            let (params, ..) = layers.get(layer).ok_or_else(|| {
                Error::InvalidArgument(format!("{module}: its part {layer} has no adapter"))
            })?;
            let part_a = &params["lora_a"];
            if let Some(first) = &a {
                let same = first.shape() == part_a.shape()
                    && mlx_rs::ops::array_eq(first, part_a, None)
                        .context(ctx)?
                        .item_exact::<bool>();
                if !same {
                    return Err(Error::InvalidArgument(format!(
                        "{module}: its parts have different lora_a, so they cannot be saved as one module"
                    )));
                }
            } else {
                a = Some(part_a.clone());
            }
            bs.push(params["lora_b"].clone());
            if let Some(m) = params.get("magnitude") {
                ms.push(m.clone());
            }
        }
        let b = mlx_rs::ops::concatenate(&bs, 1).context(ctx)?;
        let magnitude = if ms.is_empty() {
            None
        } else {
            Some(mlx_rs::ops::concatenate(&ms, 0).context(ctx)?)
        };
        modules.insert(
            module,
            SavedModule {
                a: a.ok_or_else(|| Error::InvalidArgument("a module with no parts".into()))?,
                b,
                magnitude,
            },
        );
    }

    std::fs::create_dir_all(dir).map_err(|source| Error::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut tensors: BTreeMap<String, Array> = BTreeMap::new();
    let dora = method == "dora";
    let (weights_name, config) = match format {
        AdapterFormat::Peft => {
            if let Some(module) = modules
                .iter()
                .find(|(_, m)| m.a.ndim() == 3)
                .map(|(n, _)| n)
            {
                return Err(Error::InvalidArgument(format!(
                    "{module} is an expert stack; PEFT's format for expert adapters is not supported, save in mlx-lm's format"
                )));
            }
            for (module, saved) in &modules {
                let key = format!("base_model.model.{module}");
                tensors.insert(format!("{key}.lora_A.weight"), saved.a.t());
                tensors.insert(format!("{key}.lora_B.weight"), saved.b.t());
                if let Some(m) = &saved.magnitude {
                    tensors.insert(format!("{key}.lora_magnitude_vector"), m.clone());
                }
            }
            let mut targets: Vec<String> = modules
                .keys()
                .filter_map(|m| m.rsplit('.').next().map(str::to_owned))
                .collect();
            targets.sort();
            targets.dedup();
            let config = serde_json::json!({
                "peft_type": "LORA",
                "task_type": "CAUSAL_LM",
                "base_model_name_or_path": base_model,
                "r": settings.rank,
                "lora_alpha": settings.alpha,
                "lora_dropout": settings.dropout,
                "use_rslora": settings.rslora,
                "use_dora": dora,
                "target_modules": targets,
                "bias": "none",
                "fan_in_fan_out": false,
                "inference_mode": true,
                "layers_to_transform": null,
                "modules_to_save": null,
            });
            ("adapter_model.safetensors", config)
        }
        AdapterFormat::MlxLm => {
            if settings.rslora {
                return Err(Error::InvalidArgument(
                    "mlx-lm's format has no rsLoRA flag; save rsLoRA adapters in PEFT's format"
                        .into(),
                ));
            }
            for (module, saved) in &modules {
                tensors.insert(format!("{module}.lora_a"), saved.a.clone());
                tensors.insert(format!("{module}.lora_b"), saved.b.clone());
                if let Some(m) = &saved.magnitude {
                    tensors.insert(format!("{module}.m"), m.clone());
                }
            }
            let mut keys: Vec<String> = modules
                .keys()
                .filter_map(|m| {
                    let parts: Vec<&str> = m.split('.').collect();
                    let at = parts.iter().position(|p| *p == "layers" || *p == "h")?;
                    Some(parts[at + 2..].join("."))
                })
                .collect();
            keys.sort();
            keys.dedup();
            let config = serde_json::json!({
                "fine_tune_type": if dora { "dora" } else { "lora" },
                "num_layers": model.model.dims().num_layers,
                "lora_parameters": {
                    "rank": settings.rank,
                    "scale": settings.scale(),
                    "dropout": settings.dropout,
                    "keys": keys,
                },
            });
            ("adapters.safetensors", config)
        }
    };
    let weights_path = dir.join(weights_name);
    let metadata: std::collections::HashMap<String, String> = [(
        "format".to_owned(),
        if format == AdapterFormat::Peft {
            "pt"
        } else {
            "mlx"
        }
        .to_owned(),
    )]
    .into();
    mlx_zoo_core::export::save_safetensors_atomically(tensors.iter(), &metadata, &weights_path)?;
    let config_path = dir.join("adapter_config.json");
    let text = serde_json::to_string_pretty(&config).unwrap_or_default();
    mlx_zoo_core::atomic::write_bytes(&config_path, text.as_bytes()).map_err(|source| {
        Error::Io {
            path: config_path.clone(),
            source,
        }
    })?;
    Ok(vec![weights_path, config_path])
}
