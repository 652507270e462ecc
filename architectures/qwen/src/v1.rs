//! The original Qwen (`model_type` `qwen`, class `QWenLMHeadModel`), which
//! shipped as remote code (`modeling_qwen.py`) rather than in transformers.
//!
//! A pre-norm decoder with RMSNorm whose attention projects queries, keys and
//! values with one fused, biased `c_attn` and whose MLP is
//! `c_proj(w1(x) * silu(w2(x)))`: the gate is `w2`, the opposite of llama's
//! naming, and `intermediate_size` is twice the MLP width. Two inference-time
//! options extend the context past the training length `seq_length`:
//!
//! * `use_dynamic_ntk`: at prefill, with `n` positions,
//!   `alpha = max(2^ceil(log2(n / seq_length) + 1) - 1, 1)` and the rotary
//!   base becomes `base * alpha^(d / (d - 2))`; decoding with a cache keeps
//!   the prefill's alpha, as the reference code does.
//! * `use_logn_attn`: the query at 0-based position `p` is multiplied by
//!   `ln(p + 1) / ln(seq_length)` when `p + 1 > seq_length`.
//!
//! Parameters keep Qwen's own names, so the mapping is the identity.

use mlx_rs::macros::ModuleParameters;
use mlx_rs::module::Module;
use mlx_rs::Array;
use mlx_zoo_core::cache::LayerKv;
use mlx_zoo_core::error::MlxContext;
use mlx_zoo_core::mapping::{MappingTable, Rule, TensorMeta, WeightMapper};
use mlx_zoo_core::model::LinearVisitor;
use mlx_zoo_core::nn::RmsNorm;
use mlx_zoo_core::nn::{
    self, causal_mask, checkpointed, embedding, linear, rms_norm, AttentionKernelMask,
    AttentionMask, Embedding, Linear, Rope,
};
use mlx_zoo_core::{Architecture, CausalLm, Error, KvCache, ModelConfig, ModelDims, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// An original-Qwen configuration, with the reference code's defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QwenConfig {
    /// Vocabulary size.
    #[serde(default = "defaults::vocab_size")]
    pub vocab_size: usize,
    /// Model width.
    #[serde(default = "defaults::hidden_size")]
    pub hidden_size: usize,
    /// Twice the MLP width (each of `w1` and `w2` has half).
    #[serde(default = "defaults::intermediate_size")]
    pub intermediate_size: usize,
    /// Blocks.
    #[serde(default = "defaults::num_layers")]
    pub num_hidden_layers: usize,
    /// Heads.
    #[serde(default = "defaults::num_heads")]
    pub num_attention_heads: usize,
    /// Features per head; defaults to `hidden_size / num_attention_heads`.
    #[serde(default)]
    pub kv_channels: Option<usize>,
    /// RMSNorm epsilon.
    #[serde(default = "defaults::layer_norm_epsilon")]
    pub layer_norm_epsilon: f32,
    /// Fraction of each head that is rotated.
    #[serde(default = "defaults::rotary_pct")]
    pub rotary_pct: f32,
    /// Rotary base.
    #[serde(default = "defaults::rotary_emb_base")]
    pub rotary_emb_base: f32,
    /// The training context.
    #[serde(default = "defaults::seq_length")]
    pub seq_length: usize,
    /// Context length.
    #[serde(default = "defaults::max_position_embeddings")]
    pub max_position_embeddings: usize,
    /// Dynamic NTK rotary scaling past `seq_length`.
    #[serde(default = "defaults::yes")]
    pub use_dynamic_ntk: bool,
    /// log-n query scaling past `seq_length`.
    #[serde(default = "defaults::yes")]
    pub use_logn_attn: bool,
    /// No bias on `c_proj` and the MLP (`c_attn` always has one).
    #[serde(default = "defaults::yes")]
    pub no_bias: bool,
    /// Output projection shares the embedding matrix.
    #[serde(default)]
    pub tie_word_embeddings: bool,
}

mod defaults {
    pub fn vocab_size() -> usize {
        151936
    }
    pub fn hidden_size() -> usize {
        4096
    }
    pub fn intermediate_size() -> usize {
        22016
    }
    pub fn num_layers() -> usize {
        32
    }
    pub fn num_heads() -> usize {
        32
    }
    pub fn layer_norm_epsilon() -> f32 {
        1e-6
    }
    pub fn rotary_pct() -> f32 {
        1.0
    }
    pub fn rotary_emb_base() -> f32 {
        10000.0
    }
    pub fn seq_length() -> usize {
        2048
    }
    pub fn max_position_embeddings() -> usize {
        8192
    }
    pub fn yes() -> bool {
        true
    }
}

impl QwenConfig {
    fn head_dim(&self) -> usize {
        self.kv_channels
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// Rotated features per head.
    pub fn rotary_dims(&self) -> usize {
        (self.head_dim() as f32 * self.rotary_pct) as usize
    }

    /// The dynamic-NTK alpha for a prefill of `positions` tokens.
    pub fn ntk_alpha(&self, positions: usize) -> f32 {
        if !self.use_dynamic_ntk {
            return 1.0;
        }
        let context = (positions as f64 / self.seq_length as f64).log2() + 1.0;
        let alpha = 2f64.powf(context.ceil()) - 1.0;
        alpha.max(1.0) as f32
    }
}

impl ModelConfig for QwenConfig {
    fn resolve_defaults(&mut self) {
        self.kv_channels = Some(self.head_dim());
    }

    fn validate(&self) -> Result<()> {
        if self.seq_length == 0 {
            return Err(Error::config("seq_length", "must be positive"));
        }
        if self.intermediate_size == 0 || self.intermediate_size % 2 != 0 {
            return Err(Error::config(
                "intermediate_size",
                format!(
                    "{} must be positive and even (it is twice the MLP width)",
                    self.intermediate_size
                ),
            ));
        }
        self.dims().check(true)?;
        let rotary = self.rotary_dims();
        if rotary == 0 || rotary % 2 != 0 {
            return Err(Error::config(
                "rotary_pct",
                format!("gives {rotary} rotary dims; expected an even, positive number"),
            ));
        }
        Ok(())
    }

    fn dims(&self) -> ModelDims {
        ModelDims {
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            num_layers: self.num_hidden_layers,
            num_heads: self.num_attention_heads,
            num_kv_heads: self.num_attention_heads,
            head_dim: self.head_dim(),
            intermediate_size: self.intermediate_size / 2,
            max_position_embeddings: self.max_position_embeddings,
        }
    }
}

/// Qwen's attention: fused `c_attn`, output `c_proj`.
#[derive(Debug, Clone, ModuleParameters)]
pub struct QwenAttention {
    /// Fused query/key/value projection (with bias).
    #[param]
    pub c_attn: Linear,
    /// Output projection.
    #[param]
    pub c_proj: Linear,
}

/// Qwen's MLP: `c_proj(w1(x) * silu(w2(x)))`.
#[derive(Debug, Clone, ModuleParameters)]
pub struct QwenMlp {
    /// Up projection.
    #[param]
    pub w1: Linear,
    /// Gate projection.
    #[param]
    pub w2: Linear,
    /// Down projection.
    #[param]
    pub c_proj: Linear,
}

/// One block.
#[derive(Debug, Clone, ModuleParameters)]
pub struct QwenBlock {
    /// Norm before attention.
    #[param]
    pub ln_1: RmsNorm,
    /// Attention.
    #[param]
    pub attn: QwenAttention,
    /// Norm before the MLP.
    #[param]
    pub ln_2: RmsNorm,
    /// MLP.
    #[param]
    pub mlp: QwenMlp,
}

/// What every block of one forward pass shares.
#[derive(Debug, Clone)]
struct BlockInputs {
    rope: Rope,
    logn: Option<Array>,
    mask: AttentionMask,
    dims: ModelDims,
}

impl QwenBlock {
    /// `h + attn(ln_1(h))`, then `+ mlp(ln_2(.))`.
    fn forward(
        &mut self,
        h: &Array,
        shared: &BlockInputs,
        cache: Option<&mut LayerKv>,
    ) -> Result<Array> {
        let ctx = || "running a qwen block".to_owned();
        let normed = self.ln_1.forward(h).context(ctx)?;
        let h = h + attention(
            &mut self.attn,
            &normed,
            &shared.rope,
            shared.logn.as_ref(),
            &shared.mask,
            cache,
            &shared.dims,
        )?;
        let normed = self.ln_2.forward(&h).context(ctx)?;
        let up = self.mlp.w1.forward(&normed)?;
        let gate = self.mlp.w2.forward(&normed)?;
        Ok(h + self.mlp.c_proj.forward(&nn::swiglu(&gate, &up)?)?)
    }
}

/// The stack under `transformer.`.
#[derive(Debug, ModuleParameters)]
pub struct QwenStack {
    /// Token embeddings.
    #[param]
    pub wte: Embedding,
    /// Blocks.
    #[param]
    pub h: Vec<QwenBlock>,
    /// Final norm.
    #[param]
    pub ln_f: RmsNorm,
}

/// An original-Qwen causal language model.
#[derive(Debug, ModuleParameters)]
pub struct Qwen {
    /// The stack.
    #[param]
    pub transformer: QwenStack,
    /// Output projection; `None` when tied.
    #[param]
    pub lm_head: Option<Linear>,
    config: QwenConfig,
    /// The dynamic-NTK alpha chosen at the last prefill.
    prefill_alpha: f32,
    gradient_checkpointing: bool,
}

impl Qwen {
    /// Builds the model with zero placeholders for weights.
    pub fn new(config: &QwenConfig) -> Result<Self> {
        let d = config.dims();
        let projection = d.num_heads * d.head_dim;
        let bias = !config.no_bias;
        let blocks = (0..d.num_layers)
            .map(|_| {
                Ok(QwenBlock {
                    ln_1: rms_norm(d.hidden_size, config.layer_norm_epsilon)?,
                    attn: QwenAttention {
                        c_attn: linear(d.hidden_size, 3 * projection, true)?,
                        c_proj: linear(projection, d.hidden_size, bias)?,
                    },
                    ln_2: rms_norm(d.hidden_size, config.layer_norm_epsilon)?,
                    mlp: QwenMlp {
                        w1: linear(d.hidden_size, d.intermediate_size, bias)?,
                        w2: linear(d.hidden_size, d.intermediate_size, bias)?,
                        c_proj: linear(d.intermediate_size, d.hidden_size, bias)?,
                    },
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            transformer: QwenStack {
                wte: embedding(d.vocab_size, d.hidden_size)?,
                h: blocks,
                ln_f: rms_norm(d.hidden_size, config.layer_norm_epsilon)?,
            },
            lm_head: if config.tie_word_embeddings {
                None
            } else {
                Some(linear(d.hidden_size, d.vocab_size, false)?)
            },
            config: config.clone(),
            prefill_alpha: 1.0,
            gradient_checkpointing: false,
        })
    }

    /// `[1, 1, queries, 1]` query multipliers for log-n scaling, or `None`
    /// when every multiplier is one.
    fn logn_scale(&self, offset: usize, queries: usize) -> Option<Array> {
        let limit = self.config.seq_length;
        if !self.config.use_logn_attn || offset + queries <= limit {
            return None;
        }
        let scale: Vec<f32> = (offset..offset + queries)
            .map(|p| {
                if p + 1 > limit {
                    ((p + 1) as f64).ln() as f32 / (limit as f64).ln() as f32
                } else {
                    1.0
                }
            })
            .collect();
        Some(Array::from_slice(&scale, &[1, 1, queries as i32, 1]))
    }
}

fn attention(
    block: &mut QwenAttention,
    x: &Array,
    rope: &Rope,
    logn: Option<&Array>,
    mask: &AttentionMask,
    cache: Option<&mut LayerKv>,
    dims: &ModelDims,
) -> Result<Array> {
    let ctx = || "computing Qwen attention".to_owned();
    let (batch, seq) = (x.shape()[0], x.shape()[1]);
    let (heads, head_dim) = (dims.num_heads as i32, dims.head_dim as i32);
    let fused = block.c_attn.forward(x)?;
    let parts = mlx_rs::ops::split_equal(&fused, 3, -1).context(ctx)?;
    let to_heads = |t: &Array| {
        t.reshape(&[batch, seq, heads, head_dim])
            .and_then(|t| t.transpose_axes(&[0, 2, 1, 3]))
            .context(ctx)
    };
    let (queries, keys, values) = (
        to_heads(&parts[0])?,
        to_heads(&parts[1])?,
        to_heads(&parts[2])?,
    );
    let offset = cache.as_ref().map(|c| c.offset()).unwrap_or(0);
    let mut queries = rope.apply(&queries, offset)?;
    let keys = rope.apply(&keys, offset)?;
    if let Some(logn) = logn {
        let logn = logn.as_dtype(queries.dtype()).context(ctx)?;
        queries = queries.multiply(&logn).context(ctx)?;
    }
    let (keys, values) = match cache {
        Some(cache) => cache.update(keys, values)?,
        None => (keys, values),
    };
    let scale = (dims.head_dim as f32).powf(-0.5);
    let output = match mask {
        AttentionMask::Causal => {
            nn::attention(&queries, &keys, &values, scale, AttentionKernelMask::Causal)
        }
        _ => nn::attention(&queries, &keys, &values, scale, AttentionKernelMask::None),
    }?;
    let output = output
        .transpose_axes(&[0, 2, 1, 3])
        .and_then(|o| o.reshape(&[batch, seq, heads * head_dim]))
        .context(ctx)?;
    block.c_proj.forward(&output)
}

impl CausalLm for Qwen {
    fn forward(&mut self, tokens: &Array, mut cache: Option<&mut KvCache>) -> Result<Array> {
        let ctx = || "running the qwen model".to_owned();
        let dims = self.config.dims();
        let queries = tokens.shape()[1] as usize;
        let offset = cache.as_ref().map(|c| c.offset()).unwrap_or(0) as usize;
        if offset == 0 {
            self.prefill_alpha = self.config.ntk_alpha(queries);
        }
        let rotary = self.config.rotary_dims();
        let base = self.config.rotary_emb_base
            * self
                .prefill_alpha
                .powf(rotary as f32 / (rotary as f32 - 2.0));
        let rope = Rope::new(rotary, base, None, self.config.max_position_embeddings)?;
        let logn = self.logn_scale(offset, queries);
        let shared = BlockInputs {
            rope,
            logn,
            mask: causal_mask(queries, offset, None)?,
            dims,
        };
        let checkpoint = self.gradient_checkpointing && cache.is_none();
        let random = checkpoint && self.draws_random()?;
        let mut h = self.transformer.wte.embed(tokens)?;
        for (i, block) in self.transformer.h.iter_mut().enumerate() {
            h = if checkpoint {
                let shared = shared.clone();
                checkpointed(block, &[h], random, move |block, inputs| {
                    Ok(vec![block.forward(&inputs[0], &shared, None)?])
                })?
                .remove(0)
            } else {
                let layer_cache = cache.as_deref_mut().and_then(|c| c.layers_mut().get_mut(i));
                block.forward(&h, &shared, layer_cache)?
            };
        }
        let h = self.transformer.ln_f.forward(&h).context(ctx)?;
        match &mut self.lm_head {
            Some(head) => head.forward(&h),
            None => self.transformer.wte.forward(&h),
        }
    }

    fn dims(&self) -> ModelDims {
        self.config.dims()
    }

    fn set_gradient_checkpointing(&mut self, enabled: bool) -> Result<()> {
        self.gradient_checkpointing = enabled;
        Ok(())
    }

    fn gradient_checkpointing(&self) -> bool {
        self.gradient_checkpointing
    }

    fn visit_linears(&mut self, visit: &mut LinearVisitor<'_>) -> Result<()> {
        for (i, block) in self.transformer.h.iter_mut().enumerate() {
            let prefix = format!("transformer.h.{i}");
            visit(&format!("{prefix}.attn.c_attn"), &mut block.attn.c_attn)?;
            visit(&format!("{prefix}.attn.c_proj"), &mut block.attn.c_proj)?;
            visit(&format!("{prefix}.mlp.w1"), &mut block.mlp.w1)?;
            visit(&format!("{prefix}.mlp.w2"), &mut block.mlp.w2)?;
            visit(&format!("{prefix}.mlp.c_proj"), &mut block.mlp.c_proj)?;
        }
        visit("transformer.wte", &mut self.transformer.wte)?;
        if let Some(head) = &mut self.lm_head {
            visit("lm_head", head)?;
        }
        Ok(())
    }
}

/// Per-block parameters, relative to `transformer.h.{L}.`.
const BLOCK: &[&str] = &[
    "ln_1.weight",
    "attn.c_attn.weight",
    "attn.c_attn.bias",
    "attn.c_proj.weight",
    "attn.c_proj.bias",
    "ln_2.weight",
    "mlp.w1.weight",
    "mlp.w1.bias",
    "mlp.w2.weight",
    "mlp.w2.bias",
    "mlp.c_proj.weight",
    "mlp.c_proj.bias",
];

/// The original Qwen family.
#[derive(Debug, Clone, Copy, Default)]
pub struct QwenArchitecture;

impl Architecture for QwenArchitecture {
    type Config = QwenConfig;

    fn name(&self) -> &'static str {
        "qwen"
    }

    fn description(&self) -> &'static str {
        "Qwen (v1, remote code): fused c_attn with bias, w2-gated SwiGLU, dynamic NTK, log-n attention"
    }

    fn model_types(&self) -> &'static [&'static str] {
        &["qwen"]
    }

    fn hf_architectures(&self) -> &'static [&'static str] {
        &["QWenLMHeadModel"]
    }

    fn weight_mapper(
        &self,
        config: &QwenConfig,
        _checkpoint: &BTreeMap<String, TensorMeta>,
    ) -> Box<dyn WeightMapper> {
        let mut rules = vec![
            Rule::drop(
                "transformer.h.{L}.attn.rotary_emb.inv_freq",
                "recomputed from the config",
            ),
            Rule::keep("transformer.wte.weight"),
            Rule::keep("transformer.ln_f.weight"),
        ];
        rules.extend(
            BLOCK
                .iter()
                .map(|p| Rule::keep(&format!("transformer.h.{{L}}.{p}"))),
        );
        if config.tie_word_embeddings {
            rules.push(Rule::drop(
                "lm_head.weight",
                "tie_word_embeddings: the output projection reuses transformer.wte.weight",
            ));
        } else {
            rules.push(Rule::keep("lm_head.weight"));
            rules.push(Rule::tie("lm_head.weight", "transformer.wte.weight"));
        }
        Box::new(MappingTable::from_rules(rules))
    }

    fn build(&self, config: &QwenConfig) -> Result<Box<dyn CausalLm>> {
        Ok(Box::new(Qwen::new(config)?))
    }

    fn default_adapter_targets(&self) -> &'static [&'static str] {
        &["c_attn"]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mlx_zoo_core::HfConfig;

    fn config(seq_length: usize) -> QwenConfig {
        HfConfig::from_value(serde_json::json!({"model_type": "qwen", "seq_length": seq_length}))
            .unwrap()
            .parse()
            .unwrap()
    }

    #[test]
    fn ntk_alpha_follows_the_reference_formula() {
        let c = config(8);
        assert_eq!(c.ntk_alpha(8), 1.0);
        assert_eq!(c.ntk_alpha(4), 1.0);
        assert_eq!(c.ntk_alpha(9), 3.0);
        assert_eq!(c.ntk_alpha(16), 3.0);
        assert_eq!(c.ntk_alpha(20), 7.0);
    }
}
