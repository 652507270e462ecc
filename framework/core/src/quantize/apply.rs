//! Applying a plan to a model, and the `quantization` block of an
//! MLX-format `config.json` that records the result.
//!
//! The block is the one mlx-lm writes and reads: global `group_size`,
//! `bits` and `mode` (`affine` when absent), plus an entry per module path
//! whose settings differ, either `{"group_size": G, "bits": B, "mode": M}`
//! or `false` for a layer left in full precision.

use super::plan::{LayerAction, QuantPlan};
use super::{QuantMode, QuantSettings, Quantizer};
use crate::error::{Error, Result};
use crate::model::CausalLm;
use serde::Serialize;
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;

/// What quantization did to each linear layer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct QuantizationReport {
    /// Quantized layers and their settings.
    pub quantized: BTreeMap<String, QuantSettings>,
    /// Layers left in full precision, with the reason.
    pub kept: BTreeMap<String, String>,
}

/// Whether [`quantize_model`] quantizes the loaded weights or only shapes
/// the layers to receive quantized weights from a checkpoint.
#[derive(Clone, Copy)]
pub enum QuantizeMode<'a> {
    /// Quantize the current float weights with this quantizer.
    Weights(&'a dyn Quantizer),
    /// Install zero placeholders of the quantized shapes.
    Placeholders,
}

/// Quantizes the linear layers of `model` as `plan` decides, leaving the
/// architecture's `never_quantize` layers and layers whose input size does
/// not divide into groups in full precision (reported with the reason).
pub fn quantize_model(
    model: &mut dyn CausalLm,
    plan: &QuantPlan,
    never_quantize: &[&str],
    mode: QuantizeMode<'_>,
) -> Result<QuantizationReport> {
    let mut layers = Vec::new();
    model.visit_linears(&mut |path, _| {
        layers.push(path.to_owned());
        Ok(())
    })?;
    let decided = plan.resolve(&layers, never_quantize)?;
    for action in decided.values() {
        if let LayerAction::Quantize(settings) = action {
            settings.check()?;
        }
    }
    let mut report = QuantizationReport::default();
    model.visit_linears(&mut |path, layer| {
        match decided.get(path) {
            Some(LayerAction::Quantize(settings)) => {
                let input = layer.input_dims();
                if input % settings.group_size != 0 {
                    report.kept.insert(
                        path.to_owned(),
                        format!(
                            "{input} input features do not divide into groups of {}",
                            settings.group_size
                        ),
                    );
                    return Ok(());
                }
                match mode {
                    QuantizeMode::Weights(quantizer) => layer.quantize_with(quantizer, *settings),
                    QuantizeMode::Placeholders => layer.quantized_placeholder(*settings),
                }
                .map_err(|e| Error::InvalidArgument(format!("{path}: {e}")))?;
                report.quantized.insert(path.to_owned(), *settings);
            }
            _ => {
                let reason = if plan.rules.is_empty() && plan.default.is_none() {
                    "no quantization requested"
                } else {
                    "kept by the plan or the architecture"
                };
                report.kept.insert(path.to_owned(), reason.to_owned());
            }
        }
        Ok(())
    })?;
    Ok(report)
}

impl QuantizationReport {
    /// The most common settings among quantized layers.
    pub fn dominant(&self) -> Option<QuantSettings> {
        let mut counts: BTreeMap<(u8, usize, QuantMode), usize> = BTreeMap::new();
        for s in self.quantized.values() {
            *counts.entry((s.bits, s.group_size, s.mode)).or_default() += 1;
        }
        counts
            .into_iter()
            .max_by_key(|(_, n)| *n)
            .map(|((bits, group_size, mode), _)| QuantSettings {
                bits,
                group_size,
                mode,
            })
    }

    /// The `quantization` block for `config.json`, or `None` when nothing
    /// was quantized.
    pub fn to_config_block(&self) -> Option<Value> {
        let default = self.dominant()?;
        let mut block = Map::new();
        block.insert("group_size".into(), json!(default.group_size));
        block.insert("bits".into(), json!(default.bits));
        block.insert("mode".into(), json!(default.mode.as_str()));
        for (path, settings) in &self.quantized {
            if *settings != default {
                block.insert(
                    path.clone(),
                    json!({"group_size": settings.group_size, "bits": settings.bits, "mode": settings.mode.as_str()}),
                );
            }
        }
        for path in self.kept.keys() {
            block.insert(path.clone(), Value::Bool(false));
        }
        Some(Value::Object(block))
    }
}

/// Reads the `quantization` (or `quantization_config`) block of an
/// MLX-format `config.json` into a plan over the model's layer paths.
pub fn plan_from_config_block(block: &Value) -> Result<QuantPlan> {
    let object = block
        .as_object()
        .ok_or_else(|| Error::config("quantization", "expected an object"))?;
    let number = |value: Option<&Value>, key: &str| -> Result<usize> {
        value
            .and_then(Value::as_u64)
            .map(|v| v as usize)
            .ok_or_else(|| Error::config(format!("quantization.{key}"), "expected a whole number"))
    };
    let bits = |value: Option<&Value>, key: &str| -> Result<u8> {
        let n = number(value, key)?;
        u8::try_from(n).map_err(|_| {
            Error::config(
                format!("quantization.{key}"),
                format!("{n} bits is not a quantization width (2 to 8)"),
            )
        })
    };
    let mode = |value: Option<&Value>, key: &str| -> Result<Option<QuantMode>> {
        match value {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(name)) => name
                .parse()
                .map(Some)
                .map_err(|e: Error| Error::config(format!("quantization.{key}"), e.to_string())),
            Some(other) => Err(Error::config(
                format!("quantization.{key}"),
                format!("expected a mode name, found {other}"),
            )),
        }
    };
    let default = QuantSettings {
        bits: bits(object.get("bits"), "bits")?,
        group_size: number(object.get("group_size"), "group_size")?,
        mode: mode(object.get("mode"), "mode")?.unwrap_or_default(),
    };
    default
        .check()
        .map_err(|e| Error::config("quantization", e.to_string()))?;
    let mut rules = Vec::new();
    for (path, entry) in object {
        match entry {
            Value::Bool(false) => rules.push(super::plan::PlanRule {
                pattern: path.clone(),
                bits: None,
                group_size: None,
                mode: None,
                keep: true,
            }),
            Value::Object(settings) => rules.push(super::plan::PlanRule {
                pattern: path.clone(),
                bits: Some(bits(settings.get("bits"), &format!("{path}.bits"))?),
                group_size: Some(number(
                    settings.get("group_size"),
                    &format!("{path}.group_size"),
                )?),
                mode: mode(settings.get("mode"), &format!("{path}.mode"))?,
                keep: false,
            }),
            _ => {}
        }
    }
    Ok(QuantPlan {
        default: Some(default),
        rules,
    })
}
