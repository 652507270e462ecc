//! Sparse mixture of experts (Mixtral style): a linear router scores the
//! experts per token, the top-k are kept and their scores renormalised, and
//! the token's output is the score-weighted sum of those experts' gated MLPs.
//! Expert weights are stacked along a leading expert axis and applied with
//! MLX's `gather_mm`, so only the chosen experts are computed.

use super::linear::{expert_linear, linear, Linear};
use super::mlp::Activation;
use crate::error::{Error, MlxContext, Result};
use crate::model::LinearVisitor;
use mlx_rs::macros::ModuleParameters;
use mlx_rs::Array;

/// The experts' gated MLPs: `down(act(gate(x)) * up(x))` per expert.
#[derive(Debug, Clone, ModuleParameters)]
pub struct SwitchGlu {
    /// Gate projections (Mixtral's `w1`).
    #[param]
    pub gate_proj: Linear,
    /// Up projections (Mixtral's `w3`).
    #[param]
    pub up_proj: Linear,
    /// Down projections (Mixtral's `w2`).
    #[param]
    pub down_proj: Linear,
    activation: Activation,
}

impl SwitchGlu {
    /// `experts` gated MLPs of `hidden` -> `intermediate` -> `hidden`.
    pub fn new(
        experts: usize,
        hidden: usize,
        intermediate: usize,
        activation: Activation,
    ) -> Result<Self> {
        Ok(Self {
            gate_proj: expert_linear(experts, hidden, intermediate)?,
            up_proj: expert_linear(experts, hidden, intermediate)?,
            down_proj: expert_linear(experts, intermediate, hidden)?,
            activation,
        })
    }

    /// Visits `gate_proj`, `up_proj` and `down_proj` under `prefix`.
    pub fn visit_linears(&mut self, prefix: &str, visit: &mut LinearVisitor<'_>) -> Result<()> {
        visit(&format!("{prefix}.gate_proj"), &mut self.gate_proj)?;
        visit(&format!("{prefix}.up_proj"), &mut self.up_proj)?;
        visit(&format!("{prefix}.down_proj"), &mut self.down_proj)
    }

    /// `x` is `[tokens, hidden]`, `indices` `[tokens, k]`; returns
    /// `[tokens, k, hidden]`.
    pub fn forward(&self, x: &Array, indices: &Array) -> Result<Array> {
        let ctx = || "computing the experts".to_owned();
        let (tokens, hidden) = (x.shape()[0], x.shape()[1]);
        let x = x.reshape(&[tokens, 1, 1, hidden]).context(ctx)?;
        let gate = self.gate_proj.gather_forward(&x, indices)?;
        let up = self.up_proj.gather_forward(&x, indices)?;
        let out = self
            .down_proj
            .gather_forward(&self.activation.gated(&gate, &up)?, indices)?;
        mlx_rs::ops::squeeze_axes(&out, &[-2]).context(ctx)
    }
}

/// The routed block: router `gate` plus the experts in `switch_mlp`.
#[derive(Debug, Clone, ModuleParameters)]
pub struct SparseMoe {
    /// The router: hidden -> one logit per expert.
    #[param]
    pub gate: Linear,
    /// The experts.
    #[param]
    pub switch_mlp: SwitchGlu,
    top_k: usize,
    normalize_top_k: bool,
}

impl SparseMoe {
    /// `experts` experts of which `top_k` run per token; `normalize_top_k`
    /// rescales the kept scores to sum to one (Mixtral does).
    pub fn new(
        experts: usize,
        top_k: usize,
        hidden: usize,
        intermediate: usize,
        activation: Activation,
        normalize_top_k: bool,
    ) -> Result<Self> {
        if top_k == 0 || top_k > experts {
            return Err(Error::InvalidArgument(format!(
                "num_experts_per_tok ({top_k}) must be between 1 and the number of experts ({experts})"
            )));
        }
        Ok(Self {
            gate: linear(hidden, experts, false)?,
            switch_mlp: SwitchGlu::new(experts, hidden, intermediate, activation)?,
            top_k,
            normalize_top_k,
        })
    }

    /// Applies the block to `x` of shape `[batch, seq, hidden]`.
    pub fn forward(&mut self, x: &Array) -> Result<Array> {
        let ctx = || "routing tokens to experts".to_owned();
        let shape = x.shape().to_vec();
        let hidden = shape[shape.len() - 1];
        let flat = x.reshape(&[-1, hidden]).context(ctx)?;
        let logits = self.gate.forward(&flat)?;
        let probs = mlx_rs::ops::softmax_axis(
            &logits.as_dtype(mlx_rs::Dtype::Float32).context(ctx)?,
            -1,
            None,
        )
        .context(ctx)?;
        let k = self.top_k as i32;
        let experts = probs.shape()[1];
        let order = mlx_rs::ops::argpartition_axis(&probs.negative().context(ctx)?, k - 1, -1)
            .context(ctx)?;
        // The choice of experts carries no gradient (MLX cannot
        // differentiate a gather with respect to its indices).
        let indices = mlx_rs::stop_gradient(
            mlx_rs::ops::split_at_indices(&order, &[k], -1)
                .context(ctx)?
                .swap_remove(0),
        )
        .context(ctx)?;
        debug_assert!(experts >= k);
        let mut scores =
            mlx_rs::ops::indexing::take_along_axis(&probs, &indices, -1).context(ctx)?;
        if self.normalize_top_k {
            let total = scores.sum_axis(-1, true).context(ctx)?;
            scores = scores.divide(&total).context(ctx)?;
        }
        let outputs = self.switch_mlp.forward(&flat, &indices)?;
        let scores = scores
            .as_dtype(outputs.dtype())
            .and_then(|s| s.expand_dims(-1))
            .context(ctx)?;
        let mixed = (outputs * scores).sum_axis(-2, false).context(ctx)?;
        mixed.reshape(&shape).context(ctx)
    }
}
