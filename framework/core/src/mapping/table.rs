//! A mapping table: an ordered list of [`Rule`]s applied by one small engine.
//! Planning looks only at names and shapes (no tensor data), so `zoo
//! inspect` can report on a checkpoint without loading it; executing the plan
//! then turns checkpoint tensors into parameters; exporting reads the same
//! rules backwards.

use super::pattern::{Captures, Pattern};
use super::report::{Dropped, MappingReport, Renamed, ShapeMismatch, Tied, Transformed};
use super::rules::{Rule, Transform};
use super::{TensorMeta, WeightMapper};
use crate::error::{Error, MlxContext, Result};
use mlx_rs::Array;
use std::collections::{BTreeMap, BTreeSet};

/// An ordered list of rules; the first rule matching a name wins.
#[derive(Debug, Clone, Default)]
pub struct MappingTable {
    rules: Vec<Rule>,
}

/// One step of a plan.
#[derive(Debug, Clone)]
pub enum Op {
    /// Copy a tensor.
    Copy {
        /// Checkpoint name.
        from: String,
        /// Parameter name.
        to: String,
    },
    /// Copy through a transformation.
    Transform {
        /// Checkpoint name.
        from: String,
        /// Parameter name.
        to: String,
        /// The transformation.
        transform: Transform,
    },
    /// Split a tensor into consecutive parts along `axis`.
    Split {
        /// Checkpoint name.
        from: String,
        /// Parameters and their sizes along `axis`.
        parts: Vec<(String, usize)>,
        /// The axis.
        axis: usize,
    },
    /// Stack tensors along a new leading axis.
    Stack {
        /// Checkpoint names, in expert order.
        from: Vec<String>,
        /// Parameter name.
        to: String,
    },
    /// Reuse the tensor of another parameter.
    Tie {
        /// The parameter to fill.
        parameter: String,
        /// The parameter whose tensor is reused.
        source: String,
    },
}

/// The result of planning: what to do and the report of it.
#[derive(Debug, Clone)]
pub struct MappingPlan {
    /// The steps, in execution order (ties last).
    pub ops: Vec<Op>,
    /// Every parameter the plan produces: its shape and the checkpoint
    /// tensor(s) it comes from (`a+b` for a stack, the source parameter for
    /// a tie).
    pub produced: BTreeMap<String, (Vec<i64>, String)>,
    /// The report.
    pub report: MappingReport,
}

impl MappingPlan {
    /// Checkpoint tensors the plan reads.
    pub fn sources(&self) -> BTreeSet<&str> {
        let mut names = BTreeSet::new();
        for op in &self.ops {
            match op {
                Op::Copy { from, .. } | Op::Transform { from, .. } | Op::Split { from, .. } => {
                    names.insert(from.as_str());
                }
                Op::Stack { from, .. } => names.extend(from.iter().map(String::as_str)),
                Op::Tie { .. } => {}
            }
        }
        names
    }

    /// Runs the plan, reading checkpoint tensors through `fetch`.
    pub fn execute(
        &self,
        mut fetch: impl FnMut(&str) -> Result<Array>,
    ) -> Result<BTreeMap<String, Array>> {
        let mut out = BTreeMap::new();
        for op in &self.ops {
            match op {
                Op::Copy { from, to } => {
                    out.insert(to.clone(), fetch(from)?);
                }
                Op::Transform {
                    from,
                    to,
                    transform,
                } => {
                    out.insert(to.clone(), transform.apply(&fetch(from)?)?);
                }
                Op::Split { from, parts, axis } => {
                    let tensor = fetch(from)?;
                    let mut offsets = Vec::new();
                    let mut offset = 0;
                    for (_, size) in &parts[..parts.len().saturating_sub(1)] {
                        offset += *size as i32;
                        offsets.push(offset);
                    }
                    let pieces = mlx_rs::ops::split_at_indices(&tensor, &offsets, *axis as i32)
                        .context(|| format!("splitting {from}"))?;
                    for ((name, _), piece) in parts.iter().zip(pieces) {
                        out.insert(name.clone(), piece);
                    }
                }
                Op::Stack { from, to } => {
                    let tensors = from.iter().map(|n| fetch(n)).collect::<Result<Vec<_>>>()?;
                    let stacked = mlx_rs::ops::stack(&tensors, 0)
                        .context(|| format!("stacking experts into {to}"))?;
                    out.insert(to.clone(), stacked);
                }
                Op::Tie { parameter, source } => {
                    let tensor = out.get(source).cloned().ok_or_else(|| {
                        Error::Mapping(format!(
                            "{parameter} is tied to {source}, which was not loaded"
                        ))
                    })?;
                    out.insert(parameter.clone(), tensor);
                }
            }
        }
        Ok(out)
    }
}

impl MappingTable {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// A table of `rules`.
    pub fn from_rules(rules: Vec<Rule>) -> Self {
        Self { rules }
    }

    /// Appends a rule.
    pub fn rule(mut self, rule: Rule) -> Self {
        self.rules.push(rule);
        self
    }

    /// The rules, in order.
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// The rules plus, for every rule about a `.weight`, the same rule for
    /// the `.scales` and `.biases` a quantized layer stores beside it: a
    /// quantized weight's companions are renamed, split, stacked, permuted,
    /// tied or dropped exactly as the weight is (their rows follow the
    /// weight's rows).
    fn effective_rules(&self) -> Vec<Rule> {
        let mut rules = self.rules.clone();
        for companion in [".scales", ".biases"] {
            let swap = |p: &Pattern| {
                p.as_str()
                    .strip_suffix(".weight")
                    .map(|stem| Pattern::new(&format!("{stem}{companion}")))
            };
            let swap_name = |n: &str| {
                n.strip_suffix(".weight")
                    .map(|stem| format!("{stem}{companion}"))
            };
            for rule in &self.rules {
                let twin = match rule {
                    Rule::Rename { from, to } => swap(from)
                        .zip(swap(to))
                        .map(|(from, to)| Rule::Rename { from, to }),
                    Rule::Transform {
                        from,
                        to,
                        transform,
                    } => swap(from).zip(swap(to)).map(|(from, to)| Rule::Transform {
                        from,
                        to,
                        transform: transform.clone(),
                    }),
                    Rule::Drop { pattern, reason } => swap(pattern).map(|pattern| Rule::Drop {
                        pattern,
                        reason: reason.clone(),
                    }),
                    Rule::Split { from, into, axis } => {
                        let parts: Option<Vec<(Pattern, usize)>> =
                            into.iter().map(|(p, n)| swap(p).map(|p| (p, *n))).collect();
                        swap(from).zip(parts).map(|(from, into)| Rule::Split {
                            from,
                            into,
                            axis: *axis,
                        })
                    }
                    Rule::Stack { from, to, count } => {
                        swap(from).zip(swap(to)).map(|(from, to)| Rule::Stack {
                            from,
                            to,
                            count: *count,
                        })
                    }
                    Rule::Tie { parameter, source } => swap_name(parameter)
                        .zip(swap_name(source))
                        .map(|(parameter, source)| Rule::Tie { parameter, source }),
                };
                rules.extend(twin);
            }
        }
        rules
    }
}

fn split_shape(shape: &[i64], axis: usize, size: usize) -> Vec<i64> {
    let mut shape = shape.to_vec();
    if let Some(dim) = shape.get_mut(axis) {
        *dim = size as i64;
    }
    shape
}

impl WeightMapper for MappingTable {
    fn plan(
        &self,
        checkpoint: &BTreeMap<String, TensorMeta>,
        expected: &BTreeMap<String, Vec<i64>>,
    ) -> MappingPlan {
        let mut report = MappingReport::default();
        let mut ops = Vec::new();
        // Parameter -> (shape it will have, where it comes from).
        let mut produced: BTreeMap<String, (Vec<i64>, String)> = BTreeMap::new();
        // Stack groups: (rule index, target) -> expert -> checkpoint name.
        let mut stacks: BTreeMap<(usize, String), BTreeMap<usize, String>> = BTreeMap::new();
        let rules = self.effective_rules();

        for (name, meta) in checkpoint {
            let mut matched = false;
            for (index, rule) in rules.iter().enumerate() {
                let hit = match rule {
                    Rule::Rename { from, to } => from.matches(name).map(|c| {
                        let target = to.fill(&c);
                        report.mapped.push(Renamed {
                            from: name.clone(),
                            to: target.clone(),
                        });
                        produced.insert(target.clone(), (meta.shape.clone(), name.clone()));
                        ops.push(Op::Copy {
                            from: name.clone(),
                            to: target,
                        });
                    }),
                    Rule::Transform {
                        from,
                        to,
                        transform,
                    } => from.matches(name).map(|c| {
                        let target = to.fill(&c);
                        report.transformed.push(Transformed {
                            from: vec![name.clone()],
                            to: vec![target.clone()],
                            op: transform.describe(),
                        });
                        produced.insert(target.clone(), (meta.shape.clone(), name.clone()));
                        ops.push(Op::Transform {
                            from: name.clone(),
                            to: target,
                            transform: transform.clone(),
                        });
                    }),
                    Rule::Drop { pattern, reason } => pattern.matches(name).map(|_| {
                        report.dropped.push(Dropped {
                            tensor: name.clone(),
                            reason: reason.clone(),
                        });
                    }),
                    Rule::Split { from, into, axis } => from.matches(name).map(|c| {
                        let parts: Vec<(String, usize)> =
                            into.iter().map(|(p, n)| (p.fill(&c), *n)).collect();
                        let total: usize = into.iter().map(|(_, n)| n).sum();
                        let available = meta.shape.get(*axis).copied().unwrap_or(-1);
                        if available != total as i64 {
                            for (part, size) in &parts {
                                report.shape_mismatches.push(ShapeMismatch {
                                    parameter: part.clone(),
                                    source: name.clone(),
                                    expected: split_shape(&meta.shape, *axis, *size),
                                    found: meta.shape.clone(),
                                });
                            }
                            return;
                        }
                        let sizes: Vec<String> = parts.iter().map(|(_, n)| n.to_string()).collect();
                        report.transformed.push(Transformed {
                            from: vec![name.clone()],
                            to: parts.iter().map(|(p, _)| p.clone()).collect(),
                            op: format!("split(axis {axis}: {})", sizes.join(", ")),
                        });
                        for (part, size) in &parts {
                            produced.insert(
                                part.clone(),
                                (split_shape(&meta.shape, *axis, *size), name.clone()),
                            );
                        }
                        ops.push(Op::Split {
                            from: name.clone(),
                            parts,
                            axis: *axis,
                        });
                    }),
                    Rule::Stack { from, to, .. } => from.matches(name).map(|c| {
                        let expert = c.get(&'E').copied().unwrap_or(0);
                        stacks
                            .entry((index, to.fill(&c)))
                            .or_default()
                            .insert(expert, name.clone());
                    }),
                    Rule::Tie { .. } => None,
                };
                if hit.is_some() {
                    matched = true;
                    break;
                }
            }
            if !matched {
                report.unexpected.push(name.clone());
            }
        }

        for ((index, target), experts) in stacks {
            let Rule::Stack { from, count, .. } = &rules[index] else {
                continue;
            };
            let first = experts.values().next().cloned().unwrap_or_default();
            let absent: Vec<usize> = (0..*count).filter(|e| !experts.contains_key(e)).collect();
            if !absent.is_empty() {
                let mut captures = from.matches(&first).unwrap_or_default();
                for expert in absent {
                    captures.insert('E', expert);
                    report
                        .missing
                        .push(format!("{target} (needs {})", from.fill(&captures)));
                }
                continue;
            }
            let names: Vec<String> = experts.into_values().collect();
            let mut shape = vec![names.len() as i64];
            shape.extend(checkpoint[&names[0]].shape.iter());
            for name in &names[1..] {
                if checkpoint[name].shape != checkpoint[&names[0]].shape {
                    report.shape_mismatches.push(ShapeMismatch {
                        parameter: target.clone(),
                        source: name.clone(),
                        expected: checkpoint[&names[0]].shape.clone(),
                        found: checkpoint[name].shape.clone(),
                    });
                }
            }
            report.transformed.push(Transformed {
                from: names.clone(),
                to: vec![target.clone()],
                op: format!("stack({} experts)", names.len()),
            });
            produced.insert(target.clone(), (shape, names.join("+")));
            ops.push(Op::Stack {
                from: names,
                to: target,
            });
        }

        for rule in &rules {
            if let Rule::Tie { parameter, source } = rule {
                if expected.contains_key(parameter) && !produced.contains_key(parameter) {
                    if let Some((shape, _)) = produced.get(source).cloned() {
                        report.tied.push(Tied {
                            parameter: parameter.clone(),
                            source: source.clone(),
                        });
                        produced.insert(parameter.clone(), (shape, source.clone()));
                        ops.push(Op::Tie {
                            parameter: parameter.clone(),
                            source: source.clone(),
                        });
                    }
                }
            }
        }

        for (parameter, shape) in expected {
            match produced.get(parameter) {
                None => report.missing.push(parameter.clone()),
                Some((found, source)) if found != shape => {
                    report.shape_mismatches.push(ShapeMismatch {
                        parameter: parameter.clone(),
                        source: source.clone(),
                        expected: shape.clone(),
                        found: found.clone(),
                    })
                }
                Some(_) => {}
            }
        }
        for (parameter, (_, source)) in &produced {
            if !expected.contains_key(parameter) {
                report
                    .unexpected
                    .push(format!("{source} (maps to unknown parameter {parameter})"));
            }
        }
        report.sort();
        MappingPlan {
            ops,
            produced,
            report,
        }
    }

    fn export(&self, params: &BTreeMap<String, Array>) -> Result<BTreeMap<String, Array>> {
        let mut out = BTreeMap::new();
        let rules = self.effective_rules();
        'params: for (name, tensor) in params {
            for rule in &rules {
                match rule {
                    Rule::Rename { from, to } => {
                        if let Some(c) = to.matches(name) {
                            out.insert(from.fill(&c), tensor.clone());
                            continue 'params;
                        }
                    }
                    Rule::Transform {
                        from,
                        to,
                        transform,
                    } => {
                        if let Some(c) = to.matches(name) {
                            out.insert(from.fill(&c), transform.invert(tensor)?);
                            continue 'params;
                        }
                    }
                    Rule::Split { from, into, axis } => {
                        for (position, (part, _)) in into.iter().enumerate() {
                            let Some(c) = part.matches(name) else {
                                continue;
                            };
                            if position == 0 {
                                let pieces = gather_parts(params, into, &c, name)?;
                                let fused = mlx_rs::ops::concatenate(&pieces, *axis as i32)
                                    .context(|| format!("re-fusing {}", from.fill(&c)))?;
                                out.insert(from.fill(&c), fused);
                            }
                            continue 'params;
                        }
                    }
                    Rule::Stack { from, to, count } => {
                        if let Some(mut c) = to.matches(name) {
                            let experts = mlx_rs::ops::split_equal(tensor, *count as i32, 0)
                                .context(|| format!("un-stacking {name}"))?;
                            for (expert, piece) in experts.into_iter().enumerate() {
                                c.insert('E', expert);
                                let piece = mlx_rs::ops::squeeze_axes(&piece, &[0])
                                    .context(|| format!("un-stacking {name}"))?;
                                out.insert(from.fill(&c), piece);
                            }
                            continue 'params;
                        }
                    }
                    Rule::Drop { .. } | Rule::Tie { .. } => {}
                }
            }
            return Err(Error::Mapping(format!(
                "parameter {name} has no rule to export it under a checkpoint name"
            )));
        }
        Ok(out)
    }
}

fn gather_parts(
    params: &BTreeMap<String, Array>,
    into: &[(super::pattern::Pattern, usize)],
    captures: &Captures,
    first: &str,
) -> Result<Vec<Array>> {
    into.iter()
        .map(|(part, _)| {
            let name = part.fill(captures);
            params.get(&name).cloned().ok_or_else(|| {
                Error::Mapping(format!(
                    "cannot re-fuse {first}: part {name} is not among the parameters"
                ))
            })
        })
        .collect()
}
