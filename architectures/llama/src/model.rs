//! The LLaMA network: embeddings, pre-norm decoder blocks (attention and
//! SwiGLU MLP, each with a residual), a final RMSNorm and the output
//! projection (or the embedding matrix, when tied). Parameter names match
//! Hugging Face's, so the Hugging Face mapping is the identity.

use crate::LlamaConfig;
use mlx_rs::macros::ModuleParameters;
use mlx_rs::module::Module;
use mlx_rs::Array;
use mlx_zoo_core::error::MlxContext;
use mlx_zoo_core::nn::{
    embedding, linear, rms_norm, Attention, AttentionConfig, AttentionMask, Embedding, Linear,
    RmsNorm, Rope, SwiGlu,
};
use mlx_zoo_core::{CausalLm, KvCache, ModelConfig, ModelDims, Result};

/// One decoder block.
#[derive(Debug, ModuleParameters)]
pub struct Block {
    /// Attention.
    #[param]
    pub self_attn: Attention,
    /// MLP.
    #[param]
    pub mlp: SwiGlu,
    /// Norm before attention.
    #[param]
    pub input_layernorm: RmsNorm,
    /// Norm before the MLP.
    #[param]
    pub post_attention_layernorm: RmsNorm,
}

/// The decoder stack.
#[derive(Debug, ModuleParameters)]
pub struct LlamaModel {
    /// Token embeddings.
    #[param]
    pub embed_tokens: Embedding,
    /// Decoder blocks.
    #[param]
    pub layers: Vec<Block>,
    /// Final norm.
    #[param]
    pub norm: RmsNorm,
}

/// A LLaMA causal language model.
#[derive(Debug, ModuleParameters)]
pub struct Llama {
    /// The decoder stack.
    #[param]
    pub model: LlamaModel,
    /// Output projection; `None` when tied to the embeddings.
    #[param]
    pub lm_head: Option<Linear>,
    dims: ModelDims,
}

impl Llama {
    /// Builds the model with zero placeholders for weights.
    pub fn new(config: &LlamaConfig) -> Result<Self> {
        let dims = config.dims();
        let rope = Rope::new(
            dims.head_dim,
            config.rope_theta,
            config.rope_scaling.as_ref(),
            config.max_position_embeddings,
        )?;
        let layers = (0..dims.num_layers)
            .map(|_| {
                Ok(Block {
                    self_attn: Attention::new(AttentionConfig {
                        hidden_size: dims.hidden_size,
                        num_heads: dims.num_heads,
                        num_kv_heads: dims.num_kv_heads,
                        head_dim: dims.head_dim,
                        qkv_bias: config.attention_bias,
                        o_bias: config.attention_bias,
                        rope: rope.clone(),
                    })?,
                    mlp: SwiGlu::new(
                        dims.hidden_size,
                        dims.intermediate_size,
                        config.mlp_bias,
                        config.hidden_act,
                    )?,
                    input_layernorm: rms_norm(dims.hidden_size, config.rms_norm_eps)?,
                    post_attention_layernorm: rms_norm(dims.hidden_size, config.rms_norm_eps)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            model: LlamaModel {
                embed_tokens: embedding(dims.vocab_size, dims.hidden_size)?,
                layers,
                norm: rms_norm(dims.hidden_size, config.rms_norm_eps)?,
            },
            lm_head: if config.tie_word_embeddings {
                None
            } else {
                Some(linear(dims.hidden_size, dims.vocab_size, false)?)
            },
            dims,
        })
    }
}

impl CausalLm for Llama {
    fn forward(&mut self, tokens: &Array, mut cache: Option<&mut KvCache>) -> Result<Array> {
        let ctx = || "running the llama model".to_owned();
        let mut h = self.model.embed_tokens.forward(tokens).context(ctx)?;
        let mask = if tokens.shape()[1] > 1 {
            AttentionMask::Causal
        } else {
            AttentionMask::None
        };
        for (i, layer) in self.model.layers.iter_mut().enumerate() {
            let layer_cache = cache.as_deref_mut().and_then(|c| c.layers_mut().get_mut(i));
            let normed = layer.input_layernorm.forward(&h).context(ctx)?;
            h += layer.self_attn.forward(&normed, &mask, layer_cache)?;
            let normed = layer.post_attention_layernorm.forward(&h).context(ctx)?;
            h += layer.mlp.forward(&normed)?;
        }
        let h = self.model.norm.forward(&h).context(ctx)?;
        match &mut self.lm_head {
            Some(head) => head.forward(&h).context(ctx),
            None => self.model.embed_tokens.as_linear(&h).context(ctx),
        }
    }

    fn dims(&self) -> ModelDims {
        self.dims.clone()
    }
}
