//! Quantization plans: which layers get which settings.
//!
//! A plan has a default (quantize everything with these settings, or
//! nothing) and rules. A rule's pattern is a [`ModulePattern`] in the
//! model's own namespace (after weight mapping). The most specific matching rule
//! wins (literal segments count double, then pattern length; equal
//! specificity: the later rule). A rule says "these settings" or "keep in
//! full precision". A pattern that matches no layer is an error.

use super::{QuantMode, QuantSettings};
use crate::error::{Error, Result};
use crate::module_pattern::ModulePattern;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// What a rule does to the layers it matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LayerAction {
    /// Quantize with these settings.
    Quantize(QuantSettings),
    /// Keep in full precision.
    Keep,
}

/// One rule of a plan, as written in a plan file:
/// `{"pattern": "layers.0-3.mlp", "bits": 8, "group_size": 64}` or
/// `{"pattern": "lm_head", "keep": true}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanRule {
    /// The module-path pattern.
    pub pattern: String,
    /// Bits, when quantizing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bits: Option<u8>,
    /// Group size, when quantizing (defaults to the plan's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_size: Option<usize>,
    /// Mode, when quantizing (defaults to the plan's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<QuantMode>,
    /// Leave the matched layers unquantized.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub keep: bool,
}

/// A quantization plan, as read from a plan file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuantPlan {
    /// Settings for layers no rule matches; `None` leaves them unquantized.
    #[serde(default)]
    pub default: Option<QuantSettings>,
    /// The rules.
    #[serde(default)]
    pub rules: Vec<PlanRule>,
}

impl QuantPlan {
    /// Every layer quantized with `settings`.
    pub fn uniform(settings: QuantSettings) -> Self {
        Self {
            default: Some(settings),
            rules: Vec::new(),
        }
    }

    /// A ready-made recipe by name, for a model of `num_layers` blocks:
    /// `mixed-B1-B2` (e.g. `mixed-4-6`, `mixed-3-6`, `mixed-2-6`) quantizes
    /// with B1 bits but gives `v_proj` and `down_proj` of the first and last
    /// blocks and `lm_head` B2 bits, the layers most sensitive to rounding.
    pub fn recipe(name: &str, group_size: usize, num_layers: usize) -> Result<Self> {
        let bits = name
            .strip_prefix("mixed-")
            .and_then(|rest| rest.split_once('-'))
            .and_then(|(low, high)| Some((low.parse::<u8>().ok()?, high.parse::<u8>().ok()?)));
        let Some((low, high)) = bits else {
            return Err(Error::InvalidArgument(format!(
                "unknown quantization recipe {name:?}; expected mixed-LOW-HIGH such as mixed-4-6"
            )));
        };
        let last = num_layers.saturating_sub(1);
        let high_rule = |pattern: String| PlanRule {
            pattern,
            bits: Some(high),
            group_size: Some(group_size),
            mode: None,
            keep: false,
        };
        let mut rules = Vec::new();
        for layer in [0, last] {
            for projection in ["v_proj", "down_proj"] {
                rules.push(high_rule(format!("layers.{layer}.*.{projection}")));
            }
        }
        rules.dedup();
        rules.push(high_rule("lm_head".into()));
        Ok(Self {
            default: Some(QuantSettings::affine(low, group_size)),
            rules,
        })
    }

    /// Reads a plan file (JSON).
    pub fn from_json(text: &str, file: &str) -> Result<Self> {
        serde_json::from_str(text).map_err(|e| Error::Config {
            file: file.to_owned(),
            key: format!("line {} column {}", e.line(), e.column()),
            message: e.to_string(),
        })
    }

    /// Decides every layer of `layers` (module paths). Patterns in
    /// `never_quantize` (the architecture's hook) always keep; a plan rule
    /// that matches no layer is an error.
    pub fn resolve(
        &self,
        layers: &[String],
        never_quantize: &[&str],
    ) -> Result<BTreeMap<String, LayerAction>> {
        let mut compiled = Vec::new();
        for rule in &self.rules {
            let action = if rule.keep {
                LayerAction::Keep
            } else {
                let bits = rule.bits.or(self.default.map(|d| d.bits)).ok_or_else(|| {
                    Error::InvalidArgument(format!(
                        "rule {:?} gives no bits and the plan has no default",
                        rule.pattern
                    ))
                })?;
                let group_size = rule
                    .group_size
                    .or(self.default.map(|d| d.group_size))
                    .unwrap_or(64);
                let mode = rule
                    .mode
                    .or(self.default.map(|d| d.mode))
                    .unwrap_or_default();
                LayerAction::Quantize(QuantSettings {
                    bits,
                    group_size,
                    mode,
                })
            };
            compiled.push((
                rule.pattern.clone(),
                ModulePattern::new(&rule.pattern)?,
                action,
            ));
        }
        let protected = never_quantize
            .iter()
            .map(|p| ModulePattern::new(p))
            .collect::<Result<Vec<_>>>()?;
        let mut decided = BTreeMap::new();
        let mut used = vec![false; compiled.len()];
        for layer in layers {
            if protected.iter().any(|p| p.matches(layer)) {
                decided.insert(layer.clone(), LayerAction::Keep);
                continue;
            }
            let mut best: Option<(usize, (usize, usize))> = None;
            for (index, (_, pattern, _)) in compiled.iter().enumerate() {
                if pattern.matches(layer) {
                    used[index] = true;
                    let score = pattern.specificity();
                    if best.is_none_or(|(_, s)| score >= s) {
                        best = Some((index, score));
                    }
                }
            }
            let action = match best {
                Some((index, _)) => compiled[index].2,
                None => match self.default {
                    Some(settings) => LayerAction::Quantize(settings),
                    None => LayerAction::Keep,
                },
            };
            decided.insert(layer.clone(), action);
        }
        if let Some(index) = used.iter().position(|u| !u) {
            return Err(Error::InvalidArgument(format!(
                "quantization pattern {:?} matches no layer of the model (layers look like {})",
                compiled[index].0,
                layers.first().map(String::as_str).unwrap_or("<none>")
            )));
        }
        Ok(decided)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layers() -> Vec<String> {
        let mut names = Vec::new();
        for i in 0..4 {
            for p in ["self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"] {
                names.push(format!("model.layers.{i}.{p}"));
            }
        }
        names.push("lm_head".into());
        names
    }

    fn q(bits: u8, group_size: usize) -> LayerAction {
        LayerAction::Quantize(QuantSettings::affine(bits, group_size))
    }

    #[test]
    fn most_specific_rule_wins() {
        let plan = QuantPlan::from_json(
            r#"{"default": {"bits": 4, "group_size": 64},
                "rules": [{"pattern": "layers.0-1", "bits": 8},
                          {"pattern": "layers.0.self_attn.v_proj", "bits": 6, "group_size": 32},
                          {"pattern": "lm_head", "keep": true},
                          {"pattern": "layers.*.mlp.down_proj", "bits": 3}]}"#,
            "plan.json",
        )
        .unwrap();
        let decided = plan.resolve(&layers(), &[]).unwrap();
        assert_eq!(decided["model.layers.0.self_attn.v_proj"], q(6, 32));
        assert_eq!(decided["model.layers.1.self_attn.q_proj"], q(8, 64));
        assert_eq!(decided["model.layers.1.mlp.down_proj"], q(3, 64));
        assert_eq!(decided["model.layers.3.self_attn.q_proj"], q(4, 64));
        assert_eq!(decided["lm_head"], LayerAction::Keep);
    }

    #[test]
    fn rules_inherit_or_set_the_mode() {
        let plan = QuantPlan::from_json(
            r#"{"default": {"bits": 4, "group_size": 32, "mode": "mxfp4"},
                "rules": [{"pattern": "lm_head", "bits": 8, "group_size": 64, "mode": "affine"},
                          {"pattern": "layers.0.self_attn.q_proj", "bits": 8}]}"#,
            "plan.json",
        )
        .unwrap();
        let decided = plan.resolve(&layers(), &[]).unwrap();
        let settings = |name: &str| match decided[name] {
            LayerAction::Quantize(s) => s,
            LayerAction::Keep => panic!("{name} kept"),
        };
        assert_eq!(
            settings("model.layers.3.mlp.down_proj").mode,
            QuantMode::Mxfp4
        );
        assert_eq!(settings("lm_head"), QuantSettings::affine(8, 64));
        // 8 bits in mxfp4's groups of 32 is no mode: caught when applied.
        let odd = settings("model.layers.0.self_attn.q_proj");
        assert_eq!(odd.mode, QuantMode::Mxfp4);
        assert!(odd
            .check()
            .unwrap_err()
            .to_string()
            .contains("mxfp4 takes 4 bits"));
    }

    #[test]
    fn pattern_matching_nothing_is_an_error() {
        let plan = QuantPlan {
            default: None,
            rules: vec![PlanRule {
                pattern: "layers.9-12.mlp".into(),
                bits: Some(4),
                group_size: Some(64),
                mode: None,
                keep: false,
            }],
        };
        let err = plan.resolve(&layers(), &[]).unwrap_err().to_string();
        assert!(
            err.contains("layers.9-12.mlp") && err.contains("matches no layer"),
            "{err}"
        );
    }

    #[test]
    fn never_quantize_hook_wins_over_the_plan() {
        let plan = QuantPlan::uniform(QuantSettings::affine(4, 64));
        let decided = plan.resolve(&layers(), &["lm_head"]).unwrap();
        assert_eq!(decided["lm_head"], LayerAction::Keep);
    }

    #[test]
    fn mixed_recipe_raises_the_sensitive_layers() {
        let plan = QuantPlan::recipe("mixed-4-6", 64, 4).unwrap();
        let decided = plan.resolve(&layers(), &[]).unwrap();
        assert_eq!(decided["model.layers.0.self_attn.v_proj"], q(6, 64));
        assert_eq!(decided["model.layers.3.mlp.down_proj"], q(6, 64));
        assert_eq!(decided["model.layers.1.mlp.down_proj"], q(4, 64));
        assert_eq!(decided["lm_head"], q(6, 64));
        assert!(QuantPlan::recipe("fancy", 64, 4).is_err());
    }

    #[test]
    fn bad_patterns_are_refused() {
        assert!(ModulePattern::new("layers.5-2").is_err());
        assert!(ModulePattern::new("layers..mlp").is_err());
        assert!(QuantPlan::from_json("{\"rules\": 3}", "plan.json").is_err());
    }
}
