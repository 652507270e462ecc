//! The rules of a mapping table. Each rule is data: it says how checkpoint
//! names relate to model parameters, and the same rule read backwards gives
//! the export direction.

use super::pattern::Pattern;
use crate::error::{MlxContext, Result};
use mlx_rs::Array;

/// A plugin's own tensor transformation for [`Transform::Custom`]: any
/// one-to-one change of layout or values a checkpoint format needs (a scale,
/// an offset, a permutation), given both ways so exports write the
/// checkpoint's layout back.
pub trait TensorTransform: std::fmt::Debug + Send + Sync {
    /// Checkpoint layout to model layout.
    fn apply(&self, tensor: &Array) -> Result<Array>;
    /// Model layout back to checkpoint layout.
    fn invert(&self, tensor: &Array) -> Result<Array>;
    /// A short description for the mapping report.
    fn describe(&self) -> String;
}

/// A tensor transformation that keeps a one-to-one name relation.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Transform {
    /// Meta's original LLaMA layout interleaves the two rotary halves of
    /// every head (`x0, y0, x1, y1, ...`); Hugging Face keeps them as two
    /// blocks. Loading permutes rows from the interleaved to the blocked
    /// order for a projection with `heads` heads.
    RotaryInterleavedToHalves {
        /// Number of heads in the projection's output.
        heads: usize,
    },
    /// A plugin's own transformation.
    Custom(std::sync::Arc<dyn TensorTransform>),
}

impl PartialEq for Transform {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (
                Transform::RotaryInterleavedToHalves { heads: a },
                Transform::RotaryInterleavedToHalves { heads: b },
            ) => a == b,
            (Transform::Custom(a), Transform::Custom(b)) => {
                std::sync::Arc::ptr_eq(a, b) || a.describe() == b.describe()
            }
            _ => false,
        }
    }
}

impl Transform {
    /// A plugin's transformation as a rule's transform.
    pub fn custom(transform: impl TensorTransform + 'static) -> Self {
        Transform::Custom(std::sync::Arc::new(transform))
    }

    /// Checkpoint layout to model layout.
    pub fn apply(&self, tensor: &Array) -> Result<Array> {
        match self {
            Transform::RotaryInterleavedToHalves { heads } => rotary_permute(tensor, *heads, true),
            Transform::Custom(t) => t.apply(tensor),
        }
    }

    /// Model layout back to checkpoint layout.
    pub fn invert(&self, tensor: &Array) -> Result<Array> {
        match self {
            Transform::RotaryInterleavedToHalves { heads } => rotary_permute(tensor, *heads, false),
            Transform::Custom(t) => t.invert(tensor),
        }
    }

    /// A short description for the report.
    pub fn describe(&self) -> String {
        match self {
            Transform::RotaryInterleavedToHalves { heads } => {
                format!("rotary interleaved -> halves ({heads} heads)")
            }
            Transform::Custom(t) => t.describe(),
        }
    }
}

fn rotary_permute(tensor: &Array, heads: usize, to_halves: bool) -> Result<Array> {
    let shape = tensor.shape().to_vec();
    let rows = shape.first().copied().unwrap_or(0);
    let heads = heads as i32;
    if shape.is_empty() || heads == 0 || rows % (2 * heads) != 0 {
        return Err(crate::error::Error::Mapping(format!(
            "cannot permute a tensor of shape {shape:?} for {heads} rotary heads: rows must divide by 2 x heads"
        )));
    }
    let half = rows / heads / 2;
    let rest: Vec<i32> = shape[1..].to_vec();
    let mut grouped = if to_halves {
        vec![heads, half, 2]
    } else {
        vec![heads, 2, half]
    };
    grouped.extend(&rest);
    let mut axes: Vec<i32> = vec![0, 2, 1];
    axes.extend((3..grouped.len() as i32).collect::<Vec<_>>());
    tensor
        .reshape(&grouped)
        .and_then(|t| t.transpose_axes(&axes))
        .and_then(|t| t.reshape(&shape))
        .context(|| "permuting rotary rows".into())
}

/// One rule of a mapping table.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Rule {
    /// Copy `from` to `to` unchanged.
    Rename {
        /// Checkpoint name template.
        from: Pattern,
        /// Parameter name template.
        to: Pattern,
    },
    /// Copy `from` to `to` through a transformation.
    Transform {
        /// Checkpoint name template.
        from: Pattern,
        /// Parameter name template.
        to: Pattern,
        /// The transformation.
        transform: Transform,
    },
    /// Do not load tensors matching `pattern`.
    Drop {
        /// Checkpoint name template.
        pattern: Pattern,
        /// Why, for the report.
        reason: String,
    },
    /// Split a fused tensor along `axis` into consecutive parts.
    Split {
        /// Checkpoint name template of the fused tensor.
        from: Pattern,
        /// Parameter templates with the size each takes along `axis`.
        into: Vec<(Pattern, usize)>,
        /// The axis to split.
        axis: usize,
    },
    /// Stack per-expert tensors (`{E}` in `from`) into one tensor with a
    /// leading expert axis.
    Stack {
        /// Checkpoint name template, containing `{E}`.
        from: Pattern,
        /// Parameter name template.
        to: Pattern,
        /// Number of experts.
        count: usize,
    },
    /// Fill `parameter` from `source` when the checkpoint does not provide it.
    Tie {
        /// The parameter to fill.
        parameter: String,
        /// The parameter whose tensor is reused.
        source: String,
    },
}

impl Rule {
    /// A rename.
    pub fn rename(from: &str, to: &str) -> Self {
        Rule::Rename {
            from: Pattern::new(from),
            to: Pattern::new(to),
        }
    }

    /// Names that stay as they are (`name -> name`).
    pub fn keep(name: &str) -> Self {
        Self::rename(name, name)
    }

    /// A transformed copy.
    pub fn transform(from: &str, to: &str, transform: Transform) -> Self {
        Rule::Transform {
            from: Pattern::new(from),
            to: Pattern::new(to),
            transform,
        }
    }

    /// A drop.
    pub fn drop(pattern: &str, reason: &str) -> Self {
        Rule::Drop {
            pattern: Pattern::new(pattern),
            reason: reason.to_owned(),
        }
    }

    /// A split along `axis` into parts of the given sizes.
    pub fn split(from: &str, into: &[(&str, usize)], axis: usize) -> Self {
        Rule::Split {
            from: Pattern::new(from),
            into: into.iter().map(|(p, n)| (Pattern::new(p), *n)).collect(),
            axis,
        }
    }

    /// A stack of `count` experts.
    pub fn stack(from: &str, to: &str, count: usize) -> Self {
        Rule::Stack {
            from: Pattern::new(from),
            to: Pattern::new(to),
            count,
        }
    }

    /// A tie.
    pub fn tie(parameter: &str, source: &str) -> Self {
        Rule::Tie {
            parameter: parameter.to_owned(),
            source: source.to_owned(),
        }
    }
}
