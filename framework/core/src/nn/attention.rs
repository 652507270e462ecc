//! Multi-head attention with grouped-query support (fewer key/value heads
//! than query heads), rotary embeddings and an optional KV cache, on MLX's
//! fused scaled-dot-product attention.

use super::kernels::{attention, AttentionKernelMask};
use super::layers::{layer_norm, rms_norm, LayerNorm, RmsNorm};
use super::linear::{linear, Linear};
use super::rope::Rope;
use crate::cache::LayerKv;
use crate::error::{Error, MlxContext, Result};
use crate::model::LinearVisitor;
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
    /// RMSNorm (with this epsilon) over each query and key head before the
    /// rotary embedding (Qwen3's and Gemma 3's `q_norm` / `k_norm`).
    pub qk_norm: Option<f32>,
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
    /// Per-head query RMSNorm, when configured.
    #[param]
    pub q_norm: Option<RmsNorm>,
    /// Per-head key RMSNorm, when configured.
    #[param]
    pub k_norm: Option<RmsNorm>,
    num_heads: i32,
    num_kv_heads: i32,
    head_dim: i32,
    scale: f32,
    rope: Rope,
    /// Scores soft-capped to `cap * tanh(scores / cap)` (Gemma 2).
    softcap: Option<f32>,
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
            qk_norm,
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
            q_norm: qk_norm.map(|eps| rms_norm(head_dim, eps)).transpose()?,
            k_norm: qk_norm.map(|eps| rms_norm(head_dim, eps)).transpose()?,
            num_heads: num_heads as i32,
            num_kv_heads: num_kv_heads as i32,
            head_dim: head_dim as i32,
            scale: (head_dim as f32).powf(-0.5),
            rope,
            softcap: None,
        })
    }

    /// Replaces the per-head q/k RMSNorms (for norms with an offset).
    pub fn with_qk_norm(mut self, norm: Option<super::layers::RmsNorm>) -> Self {
        self.q_norm = norm.clone();
        self.k_norm = norm;
        self
    }

    /// Scales the scores by `scale` instead of `head_dim^-0.5`, and
    /// soft-caps them when `softcap` is given.
    pub fn with_scores(mut self, scale: Option<f32>, softcap: Option<f32>) -> Self {
        if let Some(scale) = scale {
            self.scale = scale;
        }
        self.softcap = softcap;
        self
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
        let queries = match &mut self.q_norm {
            Some(norm) => norm.forward(&queries).context(ctx)?,
            None => queries,
        };
        let keys = match &mut self.k_norm {
            Some(norm) => norm.forward(&keys).context(ctx)?,
            None => keys,
        };
        let uncached = cache.is_none();
        let offset = cache.as_ref().map(|c| c.offset()).unwrap_or(0);
        let queries = self.rope.apply(&queries, offset)?;
        let keys = self.rope.apply(&keys, offset)?;
        let (keys, values) = match cache {
            Some(cache) => cache.update(keys, values)?,
            None => (keys, values),
        };

        let output = match (self.softcap, mask) {
            (Some(cap), mask) => {
                softcapped_attention(&queries, &keys, &values, self.scale, cap, mask)
            }
            (None, AttentionMask::None) => attention(
                &queries,
                &keys,
                &values,
                self.scale,
                AttentionKernelMask::None,
            ),
            (None, AttentionMask::Causal)
                if uncached && seq >= 2 * CAUSAL_CHUNK && crate::runtime::on_cpu() =>
            {
                chunked_causal_attention(&queries, &keys, &values, self.scale)
            }
            (None, AttentionMask::Causal) => attention(
                &queries,
                &keys,
                &values,
                self.scale,
                AttentionKernelMask::Causal,
            ),
            (None, AttentionMask::Additive(mask)) => attention(
                &queries,
                &keys,
                &values,
                self.scale,
                AttentionKernelMask::Array(mask),
            ),
        }?;
        let output = output
            .transpose_axes(&[0, 2, 1, 3])
            .and_then(|o| o.reshape(&[batch, seq, self.num_heads * self.head_dim]))
            .context(ctx)?;
        self.o_proj.forward(&output)
    }
}

/// Queries per chunk of [`chunked_causal_attention`] (at least).
const CAUSAL_CHUNK: i32 = 64;

/// `cap * tanh(x / cap)`.
pub fn softcap(x: &Array, cap: f32) -> Result<Array> {
    let cap = Array::from_f32(cap).as_dtype(x.dtype());
    cap.and_then(|cap| {
        x.divide(&cap)
            .and_then(|t| mlx_rs::ops::tanh(&t))
            .and_then(|t| t.multiply(&cap))
    })
    .context(|| "soft-capping".to_owned())
}

/// Attention with soft-capped scores, composed op by op as transformers'
/// eager Gemma 2 attention: `softmax(mask(cap * tanh(scale q k^T / cap))) v`
/// with the softmax in float32; grouped heads by reshaping the queries.
fn softcapped_attention(
    queries: &Array,
    keys: &Array,
    values: &Array,
    scale: f32,
    cap: f32,
    mask: &AttentionMask,
) -> Result<Array> {
    use mlx_rs::ops::indexing::{IndexOp, NewAxis};
    let ctx = || "computing soft-capped attention".to_owned();
    let (batch, heads, queries_len, dim) = (
        queries.shape()[0],
        queries.shape()[1],
        queries.shape()[2],
        queries.shape()[3],
    );
    let (kv_heads, keys_len) = (keys.shape()[1], keys.shape()[2]);
    let repeats = heads / kv_heads;
    let scale = Array::from_f32(scale)
        .as_dtype(queries.dtype())
        .context(ctx)?;
    let q = queries
        .multiply(&scale)
        .and_then(|q| q.reshape(&[batch, kv_heads, repeats, queries_len, dim]))
        .context(ctx)?;
    let k = keys.index((.., .., NewAxis, .., ..));
    let v = values.index((.., .., NewAxis, .., ..));
    let scores = mlx_rs::ops::matmul(&q, k.swap_axes(-1, -2).context(ctx)?).context(ctx)?;
    let scores = softcap(&scores, cap)?;
    let lowest = Array::from_f32(f32::MIN)
        .as_dtype(scores.dtype())
        .context(ctx)?;
    let scores = match mask {
        AttentionMask::None => scores,
        AttentionMask::Causal => {
            let q_pos = mlx_rs::ops::arange::<_, i32>(keys_len - queries_len, keys_len, None)
                .and_then(|a| a.reshape(&[queries_len, 1]))
                .context(ctx)?;
            let k_pos = mlx_rs::ops::arange::<_, i32>(0, keys_len, None).context(ctx)?;
            let allowed = q_pos.ge(&k_pos).context(ctx)?;
            mlx_rs::ops::select(&allowed, &scores, &lowest).context(ctx)?
        }
        AttentionMask::Additive(mask) => {
            // [batch or 1, heads or 1, queries, keys] -> grouped heads.
            let mask = if mask.ndim() == 4 && mask.shape()[1] == heads && repeats > 1 {
                mask.reshape(&[mask.shape()[0], kv_heads, repeats, queries_len, keys_len])
            } else if mask.ndim() == 4 {
                Ok(mask.index((.., .., NewAxis, .., ..)))
            } else {
                Ok(mask.clone())
            }
            .context(ctx)?;
            if mask.dtype() == mlx_rs::Dtype::Bool {
                mlx_rs::ops::select(&mask, &scores, &lowest).context(ctx)?
            } else {
                scores
                    .add(&mask.as_dtype(scores.dtype()).context(ctx)?)
                    .context(ctx)?
            }
        }
    };
    let weights = mlx_rs::ops::softmax_axis(
        &scores.as_dtype(mlx_rs::Dtype::Float32).context(ctx)?,
        -1,
        None,
    )
    .and_then(|w| w.as_dtype(values.dtype()))
    .context(ctx)?;
    mlx_rs::ops::matmul(&weights, &v)
        .and_then(|o| o.reshape(&[batch, heads, queries_len, dim]))
        .context(ctx)
}

/// Causal attention over a whole sequence, its queries taken in up to four
/// chunks that each attend only to the keys up to their own end: on the
/// CPU, MLX computes every score of the square and masks half of them, so
/// this skips 3/8 of the scores, their softmax and their backward pass
/// (four chunks). Chunk `i` ends at position `e` and sees keys `..e`; the
/// causal mask aligns queries to the end of the keys, which is exactly the
/// causal mask of the chunk's positions.
fn chunked_causal_attention(
    queries: &Array,
    keys: &Array,
    values: &Array,
    scale: f32,
) -> Result<Array> {
    let ctx = || "computing chunked causal attention".to_owned();
    let seq = queries.shape()[2];
    let chunks = (seq / CAUSAL_CHUNK).clamp(1, 4);
    let ends: Vec<i32> = (1..=chunks).map(|i| i * seq / chunks).collect();
    let query_chunks =
        mlx_rs::ops::split_at_indices(queries, &ends[..ends.len() - 1], 2).context(ctx)?;
    let mut outputs = Vec::with_capacity(query_chunks.len());
    for (chunk, &end) in query_chunks.iter().zip(&ends) {
        let (keys, values) = if end == seq {
            (keys.clone(), values.clone())
        } else {
            let prefix = |t: &Array| {
                mlx_rs::ops::split_at_indices(t, &[end], 2)
                    .map(|mut parts| parts.swap_remove(0))
                    .context(ctx)
            };
            (prefix(keys)?, prefix(values)?)
        };
        outputs.push(attention(
            chunk,
            &keys,
            &values,
            scale,
            AttentionKernelMask::Causal,
        )?);
    }
    mlx_rs::ops::concatenate(&outputs, 2).context(ctx)
}

#[cfg(test)]
mod tests {
    use super::*;
    use mlx_rs::fast::ScaledDotProductAttentionMask;

    /// The chunked computation (through the project's attention kernel)
    /// equals MLX's whole causal attention, values and gradients, with
    /// grouped-query heads.
    #[test]
    fn chunked_causal_attention_equals_the_whole_square() {
        let normal = |shape: &[i32], k: u64| {
            let key = mlx_rs::random::key(k).unwrap();
            mlx_rs::random::normal::<f32>(shape, None, None, &key).unwrap()
        };
        let (q, k, v) = (
            normal(&[2, 4, 200, 16], 1),
            normal(&[2, 2, 200, 16], 2),
            normal(&[2, 2, 200, 16], 3),
        );
        let whole = |args: &[Array]| -> std::result::Result<Vec<Array>, mlx_rs::error::Exception> {
            let out = mlx_rs::fast::scaled_dot_product_attention(
                &args[0],
                &args[1],
                &args[2],
                0.25,
                ScaledDotProductAttentionMask::Causal,
                None,
            )?;
            Ok(vec![out.square()?.sum(None)?, out])
        };
        let chunked =
            |args: &[Array]| -> std::result::Result<Vec<Array>, mlx_rs::error::Exception> {
                let out = chunked_causal_attention(&args[0], &args[1], &args[2], 0.25)
                    .map_err(|e| mlx_rs::error::Exception::custom(e.to_string()))?;
                Ok(vec![out.square()?.sum(None)?, out])
            };
        let inputs = [q, k, v];
        let mut a = mlx_rs::transforms::value_and_grad_with_argnums(whole, &[0, 1, 2]);
        let mut b = mlx_rs::transforms::value_and_grad_with_argnums(chunked, &[0, 1, 2]);
        let (va, ga) = a(&inputs).unwrap();
        let (vb, gb) = b(&inputs).unwrap();
        assert!(
            va[1].all_close(&vb[1], 1e-5, 1e-5, None).unwrap(),
            "outputs"
        );
        for (x, y) in ga.iter().zip(&gb) {
            assert!(x.all_close(y, 1e-4, 1e-5, None).unwrap(), "gradients");
        }
    }
}
