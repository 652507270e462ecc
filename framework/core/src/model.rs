//! The object-safe model interface a trainer holds (`Box<dyn CausalLm>`):
//! a forward pass over token ids with an optional KV cache, the parameters
//! (through mlx-rs's `ModuleParameters`, so value-and-grad and optimizers
//! work on it), and the model's dimensions.

use crate::cache::KvCache;
use crate::error::{Error, Result};
use mlx_rs::module::ModuleParameters;
use mlx_rs::Array;
use serde::{Deserialize, Serialize};

/// The dimensions every decoder-only model has.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelDims {
    /// Vocabulary size (rows of the output projection).
    pub vocab_size: usize,
    /// Model width.
    pub hidden_size: usize,
    /// Transformer blocks.
    pub num_layers: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads.
    pub num_kv_heads: usize,
    /// Features per head.
    pub head_dim: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Context length the model was configured for.
    pub max_position_embeddings: usize,
}

impl ModelDims {
    /// Weights in the attention and MLP projections and the output head of
    /// a dense decoder with these dimensions (no biases): what linear-layer
    /// quantization applies to.
    pub fn parameters_in_linears(&self) -> usize {
        let attention =
            self.hidden_size * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads);
        let mlp = 3 * self.hidden_size * self.intermediate_size;
        self.num_layers * (attention + mlp) + self.vocab_size * self.hidden_size
    }

    /// The checks every decoder's config needs, each naming its config key:
    /// sizes are positive and below generous limits, key/value heads divide
    /// query heads, heads divide
    /// the width (unless `head_dim` was given explicitly) and the head is
    /// even (rotary embeddings rotate pairs).
    pub fn check(&self, explicit_head_dim: bool) -> Result<()> {
        for (key, value) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_layers),
            ("num_attention_heads", self.num_heads),
            ("num_key_value_heads", self.num_kv_heads),
            ("head_dim", self.head_dim),
        ] {
            if value == 0 {
                return Err(Error::config(key, "must be positive"));
            }
        }
        // Far past any real model, and small enough that products of them
        // (weight sizes, parameter counts) cannot overflow: a config from a
        // hostile or corrupt file must not make the loader allocate for it.
        for (key, value, limit) in [
            ("vocab_size", self.vocab_size, 1usize << 24),
            ("hidden_size", self.hidden_size, 1 << 18),
            ("intermediate_size", self.intermediate_size, 1 << 20),
            ("num_hidden_layers", self.num_layers, 1 << 12),
            ("num_attention_heads", self.num_heads, 1 << 12),
            ("num_key_value_heads", self.num_kv_heads, 1 << 12),
            ("head_dim", self.head_dim, 1 << 12),
            (
                "max_position_embeddings",
                self.max_position_embeddings,
                1 << 30,
            ),
        ] {
            if value > limit {
                return Err(Error::config(
                    key,
                    format!("{value} is implausibly large (at most {limit})"),
                ));
            }
        }
        if !explicit_head_dim && self.hidden_size % self.num_heads != 0 {
            return Err(Error::config(
                "hidden_size",
                format!(
                    "{} is not divisible by num_attention_heads ({}) and no head_dim is given",
                    self.hidden_size, self.num_heads
                ),
            ));
        }
        if self.num_heads % self.num_kv_heads != 0 {
            return Err(Error::config(
                "num_key_value_heads",
                format!(
                    "{} does not divide num_attention_heads ({})",
                    self.num_kv_heads, self.num_heads
                ),
            ));
        }
        Ok(())
    }
}

/// A causal language model.
pub trait CausalLm: ModuleParameters + std::fmt::Debug {
    /// Logits of shape `[batch, seq, vocab]` for `tokens` of shape
    /// `[batch, seq]` (int32). With a cache, the tokens continue the cached
    /// sequence and their keys and values are appended to it.
    fn forward(&mut self, tokens: &Array, cache: Option<&mut KvCache>) -> Result<Array>;

    /// Logits for rows that pack several sequences back to back:
    /// `segments` (`[batch, seq]`, int32, like `tokens`) numbers the
    /// sequence of each token (padding gets a number of its own), and a
    /// token attends only to the earlier tokens of its own sequence, so each
    /// sequence gets the logits it would get alone. Models that cannot do
    /// it refuse.
    fn forward_packed(&mut self, tokens: &Array, segments: &Array) -> Result<Array> {
        let _ = (tokens, segments);
        Err(crate::error::Error::InvalidArgument(
            "this model does not support packed sequences".into(),
        ))
    }

    /// The model's dimensions.
    fn dims(&self) -> ModelDims;

    /// Turns gradient checkpointing on or off: with it, a forward pass
    /// without a cache keeps only each block's input for the backward pass
    /// and recomputes the block there (less memory, one more forward pass).
    /// Models that cannot do it refuse.
    fn set_gradient_checkpointing(&mut self, enabled: bool) -> Result<()> {
        if enabled {
            Err(crate::error::Error::InvalidArgument(
                "this model does not support gradient checkpointing".into(),
            ))
        } else {
            Ok(())
        }
    }

    /// Whether gradient checkpointing is on.
    fn gradient_checkpointing(&self) -> bool {
        false
    }

    /// Whether a forward pass draws random numbers (adapter dropout in
    /// training mode); checkpointed blocks then replay them.
    fn draws_random(&mut self) -> Result<bool> {
        let mut random = false;
        self.visit_linears(&mut |_, layer| {
            random |= layer.draws_random();
            Ok(())
        })?;
        Ok(random)
    }

    /// An empty cache sized for this model.
    fn new_cache(&self) -> KvCache {
        KvCache::new(self.dims().num_layers)
    }

    /// The sequence length past which cached keys go stale (their rotation
    /// depends on the total length, as with LongRoPE): a generator crossing
    /// it recomputes the whole sequence without the cache.
    fn cache_rebuild_after(&self) -> Option<usize> {
        None
    }

    /// Calls `visit` with the dotted path (as in parameter names, without
    /// `.weight`) and the layer of every [`Linear`](crate::nn::Linear) the
    /// model has, in a stable order. Quantizers and adapters work through it.
    fn visit_linears(&mut self, visit: &mut LinearVisitor<'_>) -> Result<()>;
}

/// The callback of [`CausalLm::visit_linears`].
pub type LinearVisitor<'a> = dyn FnMut(&str, &mut crate::nn::Linear) -> Result<()> + 'a;
