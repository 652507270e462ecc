//! Constructors for mlx-rs layers that start as lazily-evaluated zeros: a
//! model is built first and its weights come from the checkpoint, so random
//! initialisation would be wasted work.

use crate::error::{MlxContext, Result};
use mlx_rs::module::Param;
use mlx_rs::Array;

pub use mlx_rs::nn::{LayerNorm, RmsNorm};

fn zeros(shape: &[i32]) -> Result<Array> {
    mlx_rs::ops::zeros::<f32>(shape).context(|| format!("allocating a {shape:?} parameter"))
}

/// An `RmsNorm` over `dims` features.
pub fn rms_norm(dims: usize, eps: f32) -> Result<RmsNorm> {
    Ok(RmsNorm {
        weight: Param::new(zeros(&[dims as i32])?),
        eps,
    })
}

/// A `LayerNorm` over `dims` features with weight and bias.
pub fn layer_norm(dims: usize, eps: f32) -> Result<LayerNorm> {
    Ok(LayerNorm {
        dimensions: dims as i32,
        eps,
        weight: Param::new(Some(zeros(&[dims as i32])?)),
        bias: Param::new(Some(zeros(&[dims as i32])?)),
    })
}
