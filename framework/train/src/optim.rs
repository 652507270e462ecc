//! The optimizers a run can use, behind one type: mlx-rs's AdamW, SGD (with
//! momentum) and Adafactor, with the learning rate set per step by the
//! schedule and the state saved to and restored from safetensors.

use crate::compiled::CompiledFunction;
use crate::error::{Result, TrainError};
use mlx_rs::builder::Builder as _;
use mlx_rs::error::Exception;
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

/// A configured optimizer with its state. Cloning is cheap (arrays are
/// shared, not copied): a clone is a snapshot to go back to.
#[derive(Clone)]
pub struct Optimizer {
    kind: OptimizerKind,
    inner: Inner,
}

#[derive(Clone)]
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

    /// Everything of a step after the gradients as one compiled graph (AdamW
    /// only; `None` for the other optimizers, which update uncompiled):
    /// the token-weighted gradient `sums` divided by `loss_tokens`, their
    /// global norm, clipping to `max_grad_norm`, and AdamW's update with the
    /// rate set by [`Optimizer::set_lr`] (an input of the graph, so the
    /// schedule needs no new trace). The arithmetic is mlx-rs's AdamW, op
    /// for op; parameters keep their dtype. Returns the norm before
    /// clipping, lazily, with the parameters and state updated lazily.
    pub fn compiled_step<M: ModuleParameters>(
        &mut self,
        function: &CompiledFunction,
        model: &mut M,
        sums: &FlattenedModuleParam,
        loss_tokens: f32,
        max_grad_norm: Option<f32>,
    ) -> Result<Option<Array>> {
        let Inner::AdamW(adamw) = &mut self.inner else {
            return Ok(None);
        };
        let mut names: Vec<Rc<str>> = sums.keys().cloned().collect();
        names.sort();
        let params = model.trainable_parameters().flatten();
        let mut inputs = vec![Array::from_f32(loss_tokens), adamw.lr.clone()];
        for name in &names {
            let param = params.get(name).ok_or_else(|| {
                TrainError::InvalidSetting(format!("a gradient for {name}, which does not train"))
            })?;
            let (m, v) = adamw
                .state
                .get(name)
                .cloned()
                .unwrap_or_else(|| (Array::from_f32(0.0), Array::from_f32(0.0)));
            inputs.extend([sums[name].clone(), (*param).clone(), m, v]);
        }
        drop(params);
        let constants = AdamWConstants {
            betas: adamw.betas.clone(),
            eps: adamw.eps.clone(),
            weight_decay: adamw.weight_decay.clone(),
            max_grad_norm,
        };
        let mut body = |t: &[Array]| constants.traced_step(t);
        let outputs = function.call(&mut body, &inputs)?;
        if outputs.len() != 1 + 3 * names.len() {
            return Err(TrainError::InvalidSetting(format!(
                "the compiled update returned {} arrays, expected {}",
                outputs.len(),
                1 + 3 * names.len()
            )));
        }
        let mut outputs = outputs.into_iter();
        let norm = outputs.next().expect("length checked above");
        let mut updated = FlattenedModuleParam::new();
        for name in names {
            let (p, m, v) = match (outputs.next(), outputs.next(), outputs.next()) {
                (Some(p), Some(m), Some(v)) => (p, m, v),
                _ => unreachable!("length checked above"),
            };
            updated.insert(name.clone(), p);
            adamw.state.insert(name, (m, v));
        }
        model.update_flattened(updated);
        Ok(Some(norm))
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

/// AdamW's settings that a compiled update reads as constants.
struct AdamWConstants {
    betas: (Array, Array),
    eps: Array,
    weight_decay: Array,
    max_grad_norm: Option<f32>,
}

impl AdamWConstants {
    /// The traced update: inputs `[loss_tokens, lr, (sum, param, m, v)...]`
    /// in name order; outputs `[norm, (param, m, v)...]`.
    fn traced_step(&self, t: &[Array]) -> std::result::Result<Vec<Array>, Exception> {
        let (total, lr) = (&t[0], &t[1]);
        let groups: Vec<&[Array]> = t[2..].chunks(4).collect();
        let grads = groups
            .iter()
            .map(|g| g[0].divide(total))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let norm = norm_of(grads.iter())?;
        let scale = self
            .max_grad_norm
            .map(|max| clip_scale(&norm, max))
            .transpose()?;
        let (b1, b2) = &self.betas;
        let one = Array::from_f32(1.0);
        let one_minus_b1 = one.subtract(b1)?;
        let one_minus_b2 = one.subtract(b2)?;
        let one_minus_lr_wd = one.subtract(lr.multiply(&self.weight_decay)?)?;
        let mut outputs = vec![norm.clone()];
        for (group, grad) in groups.iter().zip(grads) {
            let (param, m, v) = (&group[1], &group[2], &group[3]);
            let grad = match &scale {
                Some(scale) => grad.multiply(scale)?,
                None => grad,
            };
            let decayed = param.multiply(&one_minus_lr_wd)?;
            let new_m = b1.multiply(m)?.add(&one_minus_b1.multiply(&grad)?)?;
            let new_v = b2
                .multiply(v)?
                .add(&one_minus_b2.multiply(grad.square()?)?)?;
            let step = lr.multiply(new_m.divide(new_v.sqrt()?.add(&self.eps)?)?)?;
            let new_param = decayed.subtract(&step)?.as_dtype(param.dtype())?;
            outputs.extend([new_param, new_m, new_v]);
        }
        Ok(outputs)
    }
}

/// The L2 norm of `gradients` together, summed in the order given (callers
/// pass name order: a resumed run must repeat the same rounding).
pub(crate) fn norm_of<'a>(
    gradients: impl IntoIterator<Item = &'a Array>,
) -> std::result::Result<Array, Exception> {
    let mut squares = Array::from_f32(0.0);
    for gradient in gradients {
        squares = squares.add(&gradient.square()?.sum(None)?)?;
    }
    squares.sqrt()
}

/// The factor that clips gradients of global norm `norm` to `max`, in the
/// graph (no host round trip): exactly 1 at or below the bound.
pub(crate) fn clip_scale(norm: &Array, max: f32) -> std::result::Result<Array, Exception> {
    let bound = Array::from_f32(max);
    let clipped = bound.divide(norm.add(Array::from_f32(1e-6))?)?;
    mlx_rs::ops::select(norm.gt(&bound)?, &clipped, Array::from_f32(1.0))
}
