//! Multi-head attention with grouped-query support (fewer key/value heads
//! than query heads), rotary embeddings and an optional KV cache, on MLX's
//! fused scaled-dot-product attention.

use super::layers::{layer_norm, LayerNorm};
use super::linear::{linear, Linear};
use super::rope::Rope;
use crate::cache::LayerKv;
use crate::error::{Error, MlxContext, Result};
use crate::model::LinearVisitor;
use mlx_rs::fast::ScaledDotProductAttentionMask;
use mlx_rs::macros::ModuleParameters;
use mlx_rs::module::Module;
use mlx_rs::Array;

/// Shape and options of an attention block.
#[derive(Debug, Clone)]
pub struct AttentionConfig {
    /// Model width.
    pub hidden_size: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads (equal to `num_heads` without GQA).
    pub num_kv_heads: usize,
    /// Features per head.
    pub head_dim: usize,
    /// Bias on the q/k/v projections.
    pub qkv_bias: bool,
    /// Bias on the output projection.
    pub o_bias: bool,
    /// The rotary embedding applied to queries and keys.
    pub rope: Rope,
    /// LayerNorm (with this epsilon) over each query and key head before the
    /// rotary embedding (Phi's `qk_layernorm`).
    pub qk_layernorm: Option<f32>,
}

/// Which positions a query may attend to.
#[derive(Debug, Clone)]
pub enum AttentionMask {
    /// Every key (single-token decoding).
    None,
    /// Keys at or before the query's position.
    Causal,
    /// An explicit mask broadcastable to `[batch, heads, queries, keys]`:
    /// boolean (true = may attend) or additive.
    Additive(Array),
}

/// The attention block (`q_proj`, `k_proj`, `v_proj`, `o_proj`).
#[derive(Debug, Clone, ModuleParameters)]
pub struct Attention {
    /// Query projection.
    #[param]
    pub q_proj: Linear,
    /// Key projection.
    #[param]
    pub k_proj: Linear,
    /// Value projection.
    #[param]
    pub v_proj: Linear,
    /// Output projection.
    #[param]
    pub o_proj: Linear,
    /// Per-head query norm, when configured.
    #[param]
    pub q_layernorm: Option<LayerNorm>,
    /// Per-head key norm, when configured.
    #[param]
    pub k_layernorm: Option<LayerNorm>,
    num_heads: i32,
    num_kv_heads: i32,
    head_dim: i32,
    scale: f32,
    rope: Rope,
}

impl Attention {
    /// Builds the block; weights start as zeros, to be loaded.
    pub fn new(config: AttentionConfig) -> Result<Self> {
        let AttentionConfig {
            hidden_size,
            num_heads,
            num_kv_heads,
            head_dim,
            qkv_bias,
            o_bias,
            rope,
            qk_layernorm,
        } = config;
        if num_kv_heads == 0 || num_heads % num_kv_heads != 0 {
            return Err(Error::InvalidArgument(format!(
                "num_attention_heads ({num_heads}) must be a multiple of num_key_value_heads ({num_kv_heads})"
            )));
        }
        Ok(Self {
            q_proj: linear(hidden_size, num_heads * head_dim, qkv_bias)?,
            k_proj: linear(hidden_size, num_kv_heads * head_dim, qkv_bias)?,
            v_proj: linear(hidden_size, num_kv_heads * head_dim, qkv_bias)?,
            o_proj: linear(num_heads * head_dim, hidden_size, o_bias)?,
            q_layernorm: qk_layernorm
                .map(|eps| layer_norm(head_dim, eps))
                .transpose()?,
            k_layernorm: qk_layernorm
                .map(|eps| layer_norm(head_dim, eps))
                .transpose()?,
            num_heads: num_heads as i32,
            num_kv_heads: num_kv_heads as i32,
            head_dim: head_dim as i32,
            scale: (head_dim as f32).powf(-0.5),
            rope,
        })
    }

    /// Visits `q_proj`, `k_proj`, `v_proj` and `o_proj` under `prefix`.
    pub fn visit_linears(&mut self, prefix: &str, visit: &mut LinearVisitor<'_>) -> Result<()> {
        visit(&format!("{prefix}.q_proj"), &mut self.q_proj)?;
        visit(&format!("{prefix}.k_proj"), &mut self.k_proj)?;
        visit(&format!("{prefix}.v_proj"), &mut self.v_proj)?;
        visit(&format!("{prefix}.o_proj"), &mut self.o_proj)
    }

    /// Attends over `x` of shape `[batch, seq, hidden]`, appending this
    /// call's keys and values to `cache` when one is given.
    pub fn forward(
        &mut self,
        x: &Array,
        mask: &AttentionMask,
        cache: Option<&mut LayerKv>,
    ) -> Result<Array> {
        let (batch, seq) = (x.shape()[0], x.shape()[1]);
        let heads = |t: Array, n: i32| {
            t.reshape(&[batch, seq, n, self.head_dim])
                .and_then(|t| t.transpose_axes(&[0, 2, 1, 3]))
        };
        let ctx = || "computing attention".to_owned();
        let queries = heads(self.q_proj.forward(x)?, self.num_heads).context(ctx)?;
        let keys = heads(self.k_proj.forward(x)?, self.num_kv_heads).context(ctx)?;
        let values = heads(self.v_proj.forward(x)?, self.num_kv_heads).context(ctx)?;

        let queries = match &mut self.q_layernorm {
            Some(norm) => norm.forward(&queries).context(ctx)?,
            None => queries,
        };
        let keys = match &mut self.k_layernorm {
            Some(norm) => norm.forward(&keys).context(ctx)?,
            None => keys,
        };
        let offset = cache.as_ref().map(|c| c.offset()).unwrap_or(0);
        let queries = self.rope.apply(&queries, offset)?;
        let keys = self.rope.apply(&keys, offset)?;
        let (keys, values) = match cache {
            Some(cache) => cache.update(keys, values)?,
            None => (keys, values),
        };

        let output = match mask {
            AttentionMask::None => mlx_rs::fast::scaled_dot_product_attention(
                &queries, &keys, &values, self.scale, None, None,
            ),
            AttentionMask::Causal => mlx_rs::fast::scaled_dot_product_attention(
                &queries,
                &keys,
                &values,
                self.scale,
                ScaledDotProductAttentionMask::Causal,
                None,
            ),
            AttentionMask::Additive(mask) => mlx_rs::fast::scaled_dot_product_attention(
                &queries,
                &keys,
                &values,
                self.scale,
                ScaledDotProductAttentionMask::Array(mask),
                None,
            ),
        }
        .context(ctx)?;
        let output = output
            .transpose_axes(&[0, 2, 1, 3])
            .and_then(|o| o.reshape(&[batch, seq, self.num_heads * self.head_dim]))
            .context(ctx)?;
        self.o_proj.forward(&output)
    }
}
