//! Constructors for mlx-rs layers that start as lazily-evaluated zeros: a
//! model is built first and its weights come from the checkpoint, so random
//! initialisation would be wasted work.

use crate::error::{MlxContext, Result};
use mlx_rs::error::Exception;
use mlx_rs::macros::ModuleParameters;
use mlx_rs::module::{Module, Param};
use mlx_rs::Array;

pub use mlx_rs::nn::LayerNorm;

/// RMSNorm over the last axis, `x / rms(x) * (offset + weight)`: offset 0
/// is the usual norm, 1 Gemma's (its checkpoints store `weight - 1`; the
/// stored weight stays what is loaded and saved).
#[derive(Debug, Clone, ModuleParameters)]
pub struct RmsNorm {
    /// The stored scale.
    #[param]
    pub weight: Param<Array>,
    /// Added to the variance before the square root.
    pub eps: f32,
    /// Added to the stored scale.
    pub offset: f32,
}

impl Module<&Array> for RmsNorm {
    type Output = Array;
    type Error = Exception;

    fn forward(&mut self, x: &Array) -> std::result::Result<Array, Exception> {
        let weight = self.weight.as_ref();
        if self.offset == 0.0 {
            return mlx_rs::fast::rms_norm(x, Some(weight), self.eps);
        }
        let offset = Array::from_f32(self.offset).as_dtype(weight.dtype())?;
        mlx_rs::fast::rms_norm(x, Some(&weight.add(&offset)?), self.eps)
    }

    fn training_mode(&mut self, _mode: bool) {}
}

fn zeros(shape: &[i32]) -> Result<Array> {
    mlx_rs::ops::zeros::<f32>(shape).context(|| format!("allocating a {shape:?} parameter"))
}

/// An `RmsNorm` over `dims` features.
pub fn rms_norm(dims: usize, eps: f32) -> Result<RmsNorm> {
    Ok(RmsNorm {
        weight: Param::new(zeros(&[dims as i32])?),
        eps,
        offset: 0.0,
    })
}

/// A Gemma `RmsNorm` (scale `1 + weight`) over `dims` features.
pub fn offset_rms_norm(dims: usize, eps: f32, offset: f32) -> Result<RmsNorm> {
    Ok(RmsNorm {
        offset,
        ..rms_norm(dims, eps)?
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
