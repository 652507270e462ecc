//! The mapping report: a plain, serializable value saying what happened to
//! every checkpoint tensor and every model parameter. The loader refuses a
//! report that is not clean (unless told otherwise), `zoo inspect` prints it,
//! and tests snapshot it with insta.

use serde::{Deserialize, Serialize};

/// A tensor copied under a (possibly identical) new name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Renamed {
    /// Checkpoint name.
    pub from: String,
    /// Model parameter.
    pub to: String,
}

/// Tensors that went through a transformation (split, stack, permute).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transformed {
    /// Checkpoint names.
    pub from: Vec<String>,
    /// Model parameters.
    pub to: Vec<String>,
    /// What was done, e.g. `split(axis 0: 64, 32, 32)`.
    pub op: String,
}

/// A parameter filled from another parameter's tensor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tied {
    /// The parameter that was filled.
    pub parameter: String,
    /// Where its value came from.
    pub source: String,
}

/// A checkpoint tensor deliberately not loaded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dropped {
    /// Checkpoint name.
    pub tensor: String,
    /// Why.
    pub reason: String,
}

/// A tensor whose shape is not the parameter's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShapeMismatch {
    /// The model parameter.
    pub parameter: String,
    /// The checkpoint tensor(s) it came from.
    pub source: String,
    /// The parameter's shape.
    pub expected: Vec<i64>,
    /// The shape the checkpoint provides.
    pub found: Vec<i64>,
}

/// Everything the mapping did, sorted for stable snapshots.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MappingReport {
    /// Tensors copied under a model name.
    pub mapped: Vec<Renamed>,
    /// Tensors transformed on the way.
    pub transformed: Vec<Transformed>,
    /// Parameters tied to another parameter.
    pub tied: Vec<Tied>,
    /// Checkpoint tensors not loaded, on purpose.
    pub dropped: Vec<Dropped>,
    /// Model parameters nothing in the checkpoint provides.
    pub missing: Vec<String>,
    /// Checkpoint tensors no rule accounts for.
    pub unexpected: Vec<String>,
    /// Parameters whose source has another shape.
    pub shape_mismatches: Vec<ShapeMismatch>,
}

impl MappingReport {
    /// No missing or unexpected tensors and no shape mismatches.
    pub fn is_clean(&self) -> bool {
        self.missing.is_empty() && self.unexpected.is_empty() && self.shape_mismatches.is_empty()
    }

    /// One line of counts, e.g. `21 mapped, 0 transformed, 1 tied, 2 dropped`.
    pub fn counts(&self) -> String {
        format!(
            "{} mapped, {} transformed, {} tied, {} dropped, {} missing, {} unexpected, {} shape mismatches",
            self.mapped.len(),
            self.transformed.len(),
            self.tied.len(),
            self.dropped.len(),
            self.missing.len(),
            self.unexpected.len(),
            self.shape_mismatches.len()
        )
    }

    /// A readable account of the problems, listing up to `limit` names per
    /// kind; empty when the report is clean.
    pub fn problems(&self, limit: usize) -> String {
        fn list(items: Vec<String>, limit: usize) -> String {
            let more = items.len().saturating_sub(limit);
            let mut text = items.into_iter().take(limit).collect::<Vec<_>>().join(", ");
            if more > 0 {
                text.push_str(&format!(" (+{more} more)"));
            }
            text
        }
        let mut lines = Vec::new();
        if !self.missing.is_empty() {
            lines.push(format!(
                "missing from the checkpoint: {}",
                list(self.missing.clone(), limit)
            ));
        }
        if !self.unexpected.is_empty() {
            lines.push(format!(
                "unexpected in the checkpoint: {}",
                list(self.unexpected.clone(), limit)
            ));
        }
        if !self.shape_mismatches.is_empty() {
            let items = self
                .shape_mismatches
                .iter()
                .map(|m| {
                    format!(
                        "{} (from {}): expected {:?}, found {:?}",
                        m.parameter, m.source, m.expected, m.found
                    )
                })
                .collect();
            lines.push(format!("shape mismatches: {}", list(items, limit)));
        }
        lines.join("\n")
    }

    pub(crate) fn sort(&mut self) {
        self.mapped.sort_by(|a, b| a.to.cmp(&b.to));
        self.transformed.sort_by(|a, b| a.to.cmp(&b.to));
        self.tied.sort_by(|a, b| a.parameter.cmp(&b.parameter));
        self.dropped.sort_by(|a, b| a.tensor.cmp(&b.tensor));
        self.missing.sort();
        self.unexpected.sort();
        self.shape_mismatches
            .sort_by(|a, b| a.parameter.cmp(&b.parameter));
    }
}
