//! The feed-forward blocks: SwiGLU (`down(act(gate(x)) * up(x))`, LLaMA and
//! most of its descendants) and the two-layer GELU MLP (`fc2(gelu(fc1(x)))`,
//! Phi-2).

use super::linear::{linear, Linear};
use crate::error::{Error, MlxContext, Result};
use crate::model::LinearVisitor;
use mlx_rs::macros::ModuleParameters;
use mlx_rs::Array;
use serde::{Deserialize, Serialize};

/// An activation named the way `hidden_act` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Activation {
    /// SiLU / swish.
    #[serde(alias = "swish")]
    Silu,
    /// Exact (erf) GELU.
    Gelu,
    /// tanh-approximated GELU (`gelu_new`, `gelu_pytorch_tanh`).
    #[serde(alias = "gelu_pytorch_tanh", alias = "gelu_fast")]
    GeluNew,
    /// ReLU.
    Relu,
}

impl Activation {
    /// Applies the activation.
    pub fn apply(self, x: &Array) -> Result<Array> {
        match self {
            Activation::Silu => return super::kernels::silu(x),
            Activation::Gelu => mlx_rs::nn::gelu(x),
            Activation::GeluNew => mlx_rs::nn::gelu_approximate(x),
            Activation::Relu => mlx_rs::nn::relu(x),
        }
        .context(|| format!("applying {self:?}"))
    }

    /// `act(gate) * up`, the gated MLPs' product; SiLU's runs as one
    /// fused kernel on a GPU.
    pub fn gated(self, gate: &Array, up: &Array) -> Result<Array> {
        match self {
            Activation::Silu => super::kernels::swiglu(gate, up),
            other => other
                .apply(gate)?
                .multiply(up)
                .context(|| format!("gating with {other:?}")),
        }
    }
}

/// The gated MLP: `down_proj(act(gate_proj(x)) * up_proj(x))`.
#[derive(Debug, Clone, ModuleParameters)]
pub struct SwiGlu {
    /// Gate projection.
    #[param]
    pub gate_proj: Linear,
    /// Up projection.
    #[param]
    pub up_proj: Linear,
    /// Down projection.
    #[param]
    pub down_proj: Linear,
    activation: Activation,
}

impl SwiGlu {
    /// A gated MLP of `hidden` -> `intermediate` -> `hidden`.
    pub fn new(
        hidden: usize,
        intermediate: usize,
        bias: bool,
        activation: Activation,
    ) -> Result<Self> {
        if intermediate == 0 {
            return Err(Error::InvalidArgument(
                "intermediate_size must be positive".into(),
            ));
        }
        Ok(Self {
            gate_proj: linear(hidden, intermediate, bias)?,
            up_proj: linear(hidden, intermediate, bias)?,
            down_proj: linear(intermediate, hidden, bias)?,
            activation,
        })
    }

    /// Visits `gate_proj`, `up_proj` and `down_proj` under `prefix`.
    pub fn visit_linears(&mut self, prefix: &str, visit: &mut LinearVisitor<'_>) -> Result<()> {
        visit(&format!("{prefix}.gate_proj"), &mut self.gate_proj)?;
        visit(&format!("{prefix}.up_proj"), &mut self.up_proj)?;
        visit(&format!("{prefix}.down_proj"), &mut self.down_proj)
    }

    /// Applies the block.
    pub fn forward(&mut self, x: &Array) -> Result<Array> {
        let gate = self.gate_proj.forward(x)?;
        let up = self.up_proj.forward(x)?;
        self.down_proj.forward(&self.activation.gated(&gate, &up)?)
    }
}

/// The two-layer MLP: `fc2(act(fc1(x)))`.
#[derive(Debug, Clone, ModuleParameters)]
pub struct GeluMlp {
    /// First projection.
    #[param]
    pub fc1: Linear,
    /// Second projection.
    #[param]
    pub fc2: Linear,
    activation: Activation,
}

impl GeluMlp {
    /// An MLP of `hidden` -> `intermediate` -> `hidden` with biases.
    pub fn new(hidden: usize, intermediate: usize, activation: Activation) -> Result<Self> {
        Ok(Self {
            fc1: linear(hidden, intermediate, true)?,
            fc2: linear(intermediate, hidden, true)?,
            activation,
        })
    }

    /// Visits `fc1` and `fc2` under `prefix`.
    pub fn visit_linears(&mut self, prefix: &str, visit: &mut LinearVisitor<'_>) -> Result<()> {
        visit(&format!("{prefix}.fc1"), &mut self.fc1)?;
        visit(&format!("{prefix}.fc2"), &mut self.fc2)
    }

    /// Applies the block.
    pub fn forward(&mut self, x: &Array) -> Result<Array> {
        let hidden = self.activation.apply(&self.fc1.forward(x)?)?;
        self.fc2.forward(&hidden)
    }
}
