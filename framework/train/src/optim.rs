//! The optimizers a run can use, behind one type: mlx-rs's AdamW, SGD (with
//! momentum) and Adafactor, with the learning rate set per step by the
//! schedule and the state saved to and restored from safetensors.

use crate::error::{Result, TrainError};
use mlx_rs::builder::Builder as _;
use mlx_rs::module::{FlattenedModuleParam, ModuleParameters};
use mlx_rs::optimizers::{
    Adafactor, AdafactorBuilder, AdamW, AdamWBuilder, Optimizer as _, OptimizerState as _, Sgd,
    SgdBuilder,
};
use mlx_rs::{Array, Dtype};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;
use std::rc::Rc;

/// Which optimizer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    /// Adam with decoupled weight decay (betas 0.9/0.999, eps 1e-8).
    AdamW,
    /// Stochastic gradient descent with momentum 0.9.
    Sgd,
    /// Adafactor with the given learning rate (no relative step).
    Adafactor,
}

impl std::str::FromStr for OptimizerKind {
    type Err = TrainError;

    fn from_str(text: &str) -> Result<Self> {
        match text.to_ascii_lowercase().as_str() {
            "adamw" => Ok(Self::AdamW),
            "sgd" => Ok(Self::Sgd),
            "adafactor" => Ok(Self::Adafactor),
            other => Err(TrainError::InvalidSetting(format!(
                "optimizer `{other}`: expected adamw, sgd or adafactor"
            ))),
        }
    }
}

/// A configured optimizer with its state.
pub struct Optimizer {
    kind: OptimizerKind,
    inner: Inner,
}

enum Inner {
    AdamW(AdamW),
    Sgd(Sgd),
    Adafactor(Box<Adafactor>),
}

impl Optimizer {
    /// A fresh optimizer (empty state).
    pub fn new(kind: OptimizerKind, lr: f32, weight_decay: f32) -> Result<Self> {
        let inner = match kind {
            OptimizerKind::AdamW => Inner::AdamW(
                AdamWBuilder::new(lr)
                    .weight_decay(weight_decay)
                    .build()
                    .map_err(|e| TrainError::InvalidSetting(format!("adamw: {e:?}")))?,
            ),
            OptimizerKind::Sgd => Inner::Sgd(
                SgdBuilder::new(lr)
                    .momentum(0.9)
                    .weight_decay(weight_decay)
                    .build()
                    .map_err(|e| TrainError::InvalidSetting(format!("sgd: {e:?}")))?,
            ),
            OptimizerKind::Adafactor => Inner::Adafactor(Box::new(
                AdafactorBuilder::new()
                    .lr(Some(lr))
                    .relative_step(false)
                    .scale_parameter(false)
                    .weight_decay(weight_decay)
                    .build()
                    .map_err(|e| TrainError::InvalidSetting(format!("adafactor: {e:?}")))?,
            )),
        };
        Ok(Self { kind, inner })
    }

    /// Which optimizer this is.
    pub fn kind(&self) -> OptimizerKind {
        self.kind
    }

    /// Sets the learning rate for the next update.
    pub fn set_lr(&mut self, lr: f32) {
        match &mut self.inner {
            Inner::AdamW(o) => o.lr = Array::from_f32(lr),
            Inner::Sgd(o) => o.lr = lr,
            Inner::Adafactor(o) => o.lr = Some(lr),
        }
    }

    /// Applies `gradients` to the model's parameters of the same names.
    /// Parameters keep their dtype: the optimizers' float32 constants and
    /// state would otherwise turn a bfloat16 parameter float32 at its first
    /// update (the state itself stays float32).
    pub fn update<M: ModuleParameters>(
        &mut self,
        model: &mut M,
        gradients: &FlattenedModuleParam,
    ) -> Result<()> {
        let dtypes: HashMap<Rc<str>, Dtype> = model
            .trainable_parameters()
            .flatten()
            .into_iter()
            .map(|(name, array)| (name, array.dtype()))
            .collect();
        match &mut self.inner {
            Inner::AdamW(o) => o.update(model, gradients)?,
            Inner::Sgd(o) => o.update(model, gradients)?,
            Inner::Adafactor(o) => o.update(model, gradients)?,
        }
        let mut restored = FlattenedModuleParam::new();
        for (name, array) in model.trainable_parameters().flatten() {
            match dtypes.get(&name) {
                Some(&dtype) if dtype != array.dtype() => {
                    restored.insert(name, array.as_dtype(dtype)?);
                }
                _ => {}
            }
        }
        if !restored.is_empty() {
            model.update_flattened(restored);
        }
        Ok(())
    }

    /// The state arrays (to evaluate after an update).
    pub fn state_arrays(&mut self) -> Result<Vec<Array>> {
        let arrays = match &mut self.inner {
            Inner::AdamW(o) => o.state_mut().flatten().map(collect),
            Inner::Sgd(o) => o.state_mut().flatten().map(collect),
            Inner::Adafactor(o) => o.state_mut().flatten().map(collect),
        };
        arrays.map_err(|e| TrainError::Mlx(e.into()))
    }

    /// Writes the state to a safetensors file.
    pub fn save_state(&mut self, path: &Path) -> Result<()> {
        let saved = match &mut self.inner {
            Inner::AdamW(o) => o.state_mut().save_safetensors(path),
            Inner::Sgd(o) => o.state_mut().save_safetensors(path),
            Inner::Adafactor(o) => o.state_mut().save_safetensors(path),
        };
        saved.map_err(|e| TrainError::BadCheckpoint {
            path: path.to_path_buf(),
            reason: format!("cannot write the optimizer state: {e}"),
        })
    }

    /// Restores the state from a safetensors file written by
    /// [`Optimizer::save_state`].
    pub fn load_state(&mut self, path: &Path) -> Result<()> {
        let loaded = match &mut self.inner {
            Inner::AdamW(o) => o.state_mut().load_safetensors(path),
            Inner::Sgd(o) => o.state_mut().load_safetensors(path),
            Inner::Adafactor(o) => o.state_mut().load_safetensors(path),
        };
        loaded.map_err(|e| TrainError::BadCheckpoint {
            path: path.to_path_buf(),
            reason: format!("cannot read the optimizer state: {e}"),
        })
    }
}

fn collect(entries: Vec<(std::rc::Rc<str>, &Array)>) -> Vec<Array> {
    entries.into_iter().map(|(_, a)| a.clone()).collect()
}
