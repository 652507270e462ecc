//! The pre-norm decoder most open LLMs share (LLaMA, Mistral, Mixtral,
//! Qwen2, Phi-3, ...): token embeddings; blocks of
//! `h += attn(norm(h)); h += mlp(norm(h))` with RMSNorm, grouped-query
//! attention and either a SwiGLU MLP or a sparse mixture of experts; a final
//! RMSNorm; and an output projection or the tied embedding matrix.
//!
//! Parameter paths follow Hugging Face's llama naming (`model.layers.N.
//! self_attn.q_proj.weight`, `mlp.gate_proj`, or `block_sparse_moe.gate`
//! and `block_sparse_moe.switch_mlp.*` for experts), so a family built on
//! it maps Hugging Face checkpoints mostly by keeping names.

use super::attention::{softcap, Attention, AttentionConfig, AttentionMask};
use super::layers::{offset_rms_norm, RmsNorm};
use super::linear::{embedding, linear, Embedding, Linear};
use super::mask::{causal_mask_stored, segment_mask};
use super::mlp::{Activation, SwiGlu};
use super::moe::SparseMoe;
use super::recompute::checkpointed;
use super::rope::Rope;
use crate::cache::{KvCache, LayerKv};
use crate::error::{Error, MlxContext, Result};
use crate::model::{CausalLm, LinearVisitor, ModelDims};
use mlx_rs::macros::ModuleParameters;
use mlx_rs::module::Module;
use mlx_rs::Array;

/// Mixture-of-experts settings.
#[derive(Debug, Clone, PartialEq)]
pub struct MoeConfig {
    /// Number of experts.
    pub experts: usize,
    /// Experts run per token.
    pub top_k: usize,
    /// Renormalise the kept router scores to sum to one.
    pub normalize_top_k: bool,
}

/// Everything a [`Decoder`] is built from.
#[derive(Debug, Clone)]
pub struct DecoderConfig {
    /// Dimensions.
    pub dims: ModelDims,
    /// Rotary embedding (with its scaling and rotated dims).
    pub rope: Rope,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f32,
    /// Bias on q/k/v.
    pub qkv_bias: bool,
    /// Bias on the attention output projection.
    pub o_bias: bool,
    /// Bias on the MLP projections.
    pub mlp_bias: bool,
    /// MLP activation.
    pub activation: Activation,
    /// Output projection shares the embedding matrix.
    pub tie_word_embeddings: bool,
    /// Sliding attention window of each layer (`None`: full attention).
    pub sliding_windows: Vec<Option<usize>>,
    /// Experts instead of a dense MLP.
    pub moe: Option<MoeConfig>,
    /// The variants real families need beyond LLaMA's block.
    pub options: DecoderOptions,
}

/// Variations of the decoder that families select by configuration; the
/// default is LLaMA's block.
#[derive(Debug, Clone, Default)]
pub struct DecoderOptions {
    /// RMSNorm over each query and key head before the rotary embedding
    /// (`self_attn.q_norm` / `k_norm`: Qwen3, Gemma 3).
    pub qk_norm: bool,
    /// Added to every RMSNorm's stored scale (Gemma: 1, the norms scale by
    /// `1 + weight`).
    pub norm_offset: f32,
    /// Multiply the embeddings by `sqrt(hidden_size)` (Gemma).
    pub scale_embeddings: bool,
    /// Norms after attention and around the MLP as well (Gemma 2 and 3):
    /// `h + post_attention_layernorm(attn(input_layernorm(h)))`, then
    /// `h + post_feedforward_layernorm(mlp(pre_feedforward_layernorm(h)))`.
    pub sandwich_norms: bool,
    /// Attention scores' scale instead of `head_dim^-0.5` (Gemma 2 and 3:
    /// `query_pre_attn_scalar^-0.5`).
    pub attention_scale: Option<f32>,
    /// Attention scores soft-capped to `cap * tanh(scores / cap)` before
    /// the mask (Gemma 2).
    pub attention_softcap: Option<f32>,
    /// Output logits soft-capped the same way (Gemma 2).
    pub final_softcap: Option<f32>,
    /// The rotary embedding of sliding-window layers, when it differs from
    /// the global one (Gemma 3's local base).
    pub sliding_rope: Option<Rope>,
}

/// One block.
#[derive(Debug, Clone, ModuleParameters)]
pub struct DecoderBlock {
    /// Attention.
    #[param]
    pub self_attn: Attention,
    /// Dense MLP (absent in expert blocks).
    #[param]
    pub mlp: Option<SwiGlu>,
    /// Experts (absent in dense blocks).
    #[param]
    pub block_sparse_moe: Option<SparseMoe>,
    /// Norm before attention.
    #[param]
    pub input_layernorm: RmsNorm,
    /// Norm before the MLP (after attention, with sandwich norms).
    #[param]
    pub post_attention_layernorm: RmsNorm,
    /// Norm before the MLP, with sandwich norms.
    #[param]
    pub pre_feedforward_layernorm: Option<RmsNorm>,
    /// Norm after the MLP, with sandwich norms.
    #[param]
    pub post_feedforward_layernorm: Option<RmsNorm>,
    window: Option<usize>,
}

/// The stack under `model.`.
#[derive(Debug, ModuleParameters)]
pub struct DecoderStack {
    /// Token embeddings.
    #[param]
    pub embed_tokens: Embedding,
    /// Blocks.
    #[param]
    pub layers: Vec<DecoderBlock>,
    /// Final norm.
    #[param]
    pub norm: RmsNorm,
}

/// A pre-norm decoder language model.
#[derive(Debug, ModuleParameters)]
pub struct Decoder {
    /// The stack.
    #[param]
    pub model: DecoderStack,
    /// Output projection; `None` when tied to the embeddings.
    #[param]
    pub lm_head: Option<Linear>,
    dims: ModelDims,
    rebuild_after: Option<usize>,
    packable_up_to: Option<usize>,
    gradient_checkpointing: bool,
    embedding_scale: Option<f32>,
    final_softcap: Option<f32>,
}

impl DecoderBlock {
    /// `h + attn(norm(h))`, then `+ mlp(norm(.))`, for `h` of shape
    /// `[batch, seq, hidden]`.
    pub fn forward(
        &mut self,
        h: &Array,
        mask: &AttentionMask,
        cache: Option<&mut LayerKv>,
    ) -> Result<Array> {
        let ctx = || "running a decoder block".to_owned();
        let normed = self.input_layernorm.forward(h).context(ctx)?;
        let attended = self.self_attn.forward(&normed, mask, cache)?;
        let (h, normed) = match &mut self.pre_feedforward_layernorm {
            Some(pre) => {
                let h = h + self
                    .post_attention_layernorm
                    .forward(&attended)
                    .context(ctx)?;
                let normed = pre.forward(&h).context(ctx)?;
                (h, normed)
            }
            None => {
                let h = h + attended;
                let normed = self.post_attention_layernorm.forward(&h).context(ctx)?;
                (h, normed)
            }
        };
        let fed = match (&mut self.mlp, &mut self.block_sparse_moe) {
            (Some(mlp), _) => mlp.forward(&normed)?,
            (None, Some(moe)) => moe.forward(&normed)?,
            (None, None) => unreachable!("a block has a dense MLP or experts"),
        };
        let fed = match &mut self.post_feedforward_layernorm {
            Some(post) => post.forward(&fed).context(ctx)?,
            None => fed,
        };
        Ok(h + fed)
    }

    /// The block's forward pass under gradient checkpointing: only `h` is
    /// kept for the backward pass, which recomputes the rest (drawing the
    /// same random numbers when `random`).
    pub fn forward_checkpointed(
        &mut self,
        h: &Array,
        mask: &AttentionMask,
        random: bool,
    ) -> Result<Array> {
        let mask = mask.clone();
        let outputs = checkpointed(
            self,
            std::slice::from_ref(h),
            random,
            move |block, inputs| Ok(vec![block.forward(&inputs[0], &mask, None)?]),
        )?;
        Ok(outputs.into_iter().next().expect("one output per input"))
    }

    /// Visits the block's linear layers under `prefix` (`self_attn.*`,
    /// `mlp.*` or `block_sparse_moe.*`).
    pub fn visit_linears(&mut self, prefix: &str, visit: &mut LinearVisitor<'_>) -> Result<()> {
        self.self_attn
            .visit_linears(&format!("{prefix}.self_attn"), visit)?;
        if let Some(mlp) = &mut self.mlp {
            mlp.visit_linears(&format!("{prefix}.mlp"), visit)?;
        }
        if let Some(moe) = &mut self.block_sparse_moe {
            visit(&format!("{prefix}.block_sparse_moe.gate"), &mut moe.gate)?;
            moe.switch_mlp
                .visit_linears(&format!("{prefix}.block_sparse_moe.switch_mlp"), visit)?;
        }
        Ok(())
    }
}

impl Decoder {
    /// Builds the model with zero placeholders for weights.
    pub fn new(config: &DecoderConfig) -> Result<Self> {
        let dims = &config.dims;
        let options = &config.options;
        let norm = |width: usize| offset_rms_norm(width, config.rms_norm_eps, options.norm_offset);
        if config.sliding_windows.len() != dims.num_layers {
            return Err(Error::InvalidArgument(format!(
                "{} sliding-window entries for {} layers",
                config.sliding_windows.len(),
                dims.num_layers
            )));
        }
        let layers = config
            .sliding_windows
            .iter()
            .map(|&window| {
                let (mlp, moe) = match &config.moe {
                    None => (
                        Some(SwiGlu::new(
                            dims.hidden_size,
                            dims.intermediate_size,
                            config.mlp_bias,
                            config.activation,
                        )?),
                        None,
                    ),
                    Some(moe) => (
                        None,
                        Some(SparseMoe::new(
                            moe.experts,
                            moe.top_k,
                            dims.hidden_size,
                            dims.intermediate_size,
                            config.activation,
                            moe.normalize_top_k,
                        )?),
                    ),
                };
                let rope = match (&options.sliding_rope, window) {
                    (Some(local), Some(_)) => local.clone(),
                    _ => config.rope.clone(),
                };
                let sandwich = || {
                    options
                        .sandwich_norms
                        .then(|| norm(dims.hidden_size))
                        .transpose()
                };
                Ok(DecoderBlock {
                    self_attn: Attention::new(AttentionConfig {
                        hidden_size: dims.hidden_size,
                        num_heads: dims.num_heads,
                        num_kv_heads: dims.num_kv_heads,
                        head_dim: dims.head_dim,
                        qkv_bias: config.qkv_bias,
                        o_bias: config.o_bias,
                        rope,
                        qk_layernorm: None,
                        qk_norm: None,
                    })?
                    .with_qk_norm(options.qk_norm.then(|| norm(dims.head_dim)).transpose()?)
                    .with_scores(options.attention_scale, options.attention_softcap),
                    mlp,
                    block_sparse_moe: moe,
                    input_layernorm: norm(dims.hidden_size)?,
                    post_attention_layernorm: norm(dims.hidden_size)?,
                    pre_feedforward_layernorm: sandwich()?,
                    post_feedforward_layernorm: sandwich()?,
                    window,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            model: DecoderStack {
                embed_tokens: embedding(dims.vocab_size, dims.hidden_size)?,
                layers,
                norm: norm(dims.hidden_size)?,
            },
            lm_head: if config.tie_word_embeddings {
                None
            } else {
                Some(linear(dims.hidden_size, dims.vocab_size, false)?)
            },
            dims: dims.clone(),
            rebuild_after: config.rope.rotation_changes_after(),
            packable_up_to: config.rope.length_independent_up_to(),
            gradient_checkpointing: false,
            embedding_scale: options
                .scale_embeddings
                .then(|| (dims.hidden_size as f32).sqrt()),
            final_softcap: options.final_softcap,
        })
    }
}

impl Decoder {
    /// The forward pass: continuing `cache`, or over packed rows when
    /// `segments` numbers their sequences.
    fn run(
        &mut self,
        tokens: &Array,
        mut cache: Option<&mut KvCache>,
        segments: Option<&Array>,
    ) -> Result<Array> {
        let ctx = || "running the decoder".to_owned();
        let queries = tokens.shape()[1] as usize;
        let offset = cache.as_ref().map(|c| c.offset()).unwrap_or(0) as usize;
        let mut h = self.model.embed_tokens.embed(tokens)?;
        if let Some(scale) = self.embedding_scale {
            // transformers casts the factor to the embeddings' dtype first.
            let scale = Array::from_f32(scale).as_dtype(h.dtype()).context(ctx)?;
            h = h.multiply(&scale).context(ctx)?;
        }
        let checkpoint = self.gradient_checkpointing && cache.is_none();
        let random = checkpoint && self.draws_random()?;
        let mut masks: Vec<((Option<usize>, usize), AttentionMask)> = Vec::new();
        for (i, layer) in self.model.layers.iter_mut().enumerate() {
            let layer_cache = cache.as_deref_mut().and_then(|c| c.layers_mut().get_mut(i));
            let stored = layer_cache.as_ref().map(|c| c.stored()).unwrap_or(0);
            let key = (layer.window, stored);
            let mask = match masks.iter().find(|(k, _)| *k == key) {
                Some((_, mask)) => mask.clone(),
                None => {
                    let mask = match segments {
                        Some(segments) => segment_mask(segments, layer.window)?,
                        None => causal_mask_stored(queries, offset, stored, layer.window)?,
                    };
                    masks.push((key, mask.clone()));
                    mask
                }
            };
            h = if checkpoint {
                layer.forward_checkpointed(&h, &mask, random)?
            } else {
                layer.forward(&h, &mask, layer_cache)?
            };
        }
        let h = self.model.norm.forward(&h).context(ctx)?;
        let logits = match &mut self.lm_head {
            Some(head) => head.forward(&h),
            None => self.model.embed_tokens.forward(&h),
        }?;
        match self.final_softcap {
            Some(cap) => softcap(&logits, cap),
            None => Ok(logits),
        }
    }
}

/// Checks packed rows: `segments` shaped like `tokens`, and rows no longer
/// than `packable_up_to` (past it the rotary embedding depends on the row's
/// length, and a packed sequence would rotate differently than alone).
pub fn check_packable(
    tokens: &Array,
    segments: &Array,
    packable_up_to: Option<usize>,
) -> Result<()> {
    if segments.shape() != tokens.shape() {
        return Err(Error::InvalidArgument(format!(
            "segment ids of shape {:?} for tokens of shape {:?}",
            segments.shape(),
            tokens.shape()
        )));
    }
    let row = tokens.shape().get(1).copied().unwrap_or(0) as usize;
    match packable_up_to {
        Some(limit) if row > limit => Err(Error::InvalidArgument(format!(
            "packed rows of {row} tokens exceed {limit}, past which this model's rotary scaling \
             depends on the sequence length; pack into rows of at most {limit} tokens"
        ))),
        _ => Ok(()),
    }
}

impl CausalLm for Decoder {
    fn forward(&mut self, tokens: &Array, cache: Option<&mut KvCache>) -> Result<Array> {
        self.run(tokens, cache, None)
    }

    fn forward_packed(&mut self, tokens: &Array, segments: &Array) -> Result<Array> {
        check_packable(tokens, segments, self.packable_up_to)?;
        self.run(tokens, None, Some(segments))
    }

    fn dims(&self) -> ModelDims {
        self.dims.clone()
    }

    fn cache_rebuild_after(&self) -> Option<usize> {
        self.rebuild_after
    }

    fn set_gradient_checkpointing(&mut self, enabled: bool) -> Result<()> {
        self.gradient_checkpointing = enabled;
        Ok(())
    }

    fn gradient_checkpointing(&self) -> bool {
        self.gradient_checkpointing
    }

    fn new_cache(&self) -> KvCache {
        let windows: Vec<Option<usize>> = self.model.layers.iter().map(|l| l.window).collect();
        KvCache::with_windows(&windows)
    }

    fn visit_linears(&mut self, visit: &mut LinearVisitor<'_>) -> Result<()> {
        for (i, layer) in self.model.layers.iter_mut().enumerate() {
            layer.visit_linears(&format!("model.layers.{i}"), visit)?;
        }
        visit("model.embed_tokens", &mut self.model.embed_tokens)?;
        if let Some(head) = &mut self.lm_head {
            visit("lm_head", head)?;
        }
        Ok(())
    }
}

/// The mapping rules of a Hugging Face checkpoint onto a [`Decoder`]:
/// every parameter keeps its name, rotary caches are dropped, and the output
/// projection is dropped (tied config) or tied to the embeddings when the
/// checkpoint lacks it. Families put their own rules (renames, splits,
/// expert stacks) in front; the first matching rule wins.
pub fn decoder_rules(tie_word_embeddings: bool) -> Vec<crate::mapping::Rule> {
    use crate::mapping::Rule;
    const LAYER: &[&str] = &[
        "self_attn.q_proj.weight",
        "self_attn.q_proj.bias",
        "self_attn.k_proj.weight",
        "self_attn.k_proj.bias",
        "self_attn.v_proj.weight",
        "self_attn.v_proj.bias",
        "self_attn.o_proj.weight",
        "self_attn.o_proj.bias",
        "self_attn.q_norm.weight",
        "self_attn.k_norm.weight",
        "mlp.gate_proj.weight",
        "mlp.gate_proj.bias",
        "mlp.up_proj.weight",
        "mlp.up_proj.bias",
        "mlp.down_proj.weight",
        "mlp.down_proj.bias",
        "block_sparse_moe.gate.weight",
        "input_layernorm.weight",
        "post_attention_layernorm.weight",
        "pre_feedforward_layernorm.weight",
        "post_feedforward_layernorm.weight",
    ];
    let mut rules = vec![
        Rule::drop(
            "model.layers.{L}.self_attn.rotary_emb.inv_freq",
            "recomputed from the config",
        ),
        Rule::keep("model.embed_tokens.weight"),
        Rule::keep("model.norm.weight"),
    ];
    rules.extend(
        LAYER
            .iter()
            .map(|p| Rule::keep(&format!("model.layers.{{L}}.{p}"))),
    );
    rules.extend(output_rules(tie_word_embeddings, "lm_head.weight"));
    rules
}

/// How a checkpoint's output projection named `checkpoint_name` maps: dropped
/// with the reason when the config ties it to the embeddings, else renamed to
/// `lm_head.weight` and tied to the embeddings when absent.
pub fn output_rules(tie_word_embeddings: bool, checkpoint_name: &str) -> Vec<crate::mapping::Rule> {
    use crate::mapping::Rule;
    if tie_word_embeddings {
        vec![Rule::drop(
            checkpoint_name,
            "tie_word_embeddings: the output projection reuses model.embed_tokens.weight",
        )]
    } else {
        vec![
            Rule::rename(checkpoint_name, "lm_head.weight"),
            Rule::tie("lm_head.weight", "model.embed_tokens.weight"),
        ]
    }
}
