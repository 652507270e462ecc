//! Llama checkpoints of any size with seeded random weights, written as
//! `config.json` + `model.safetensors`, for tests that need shapes the
//! transformers fixtures do not have (wider heads, more tokens, more
//! memory).

use std::collections::BTreeMap;
use std::path::Path;

/// The shape of a random llama (a mistral when `sliding_window` is set).
#[derive(Debug, Clone)]
pub struct RandomLlama {
    /// Model width.
    pub hidden: i32,
    /// Query heads.
    pub heads: i32,
    /// Key/value heads.
    pub kv_heads: i32,
    /// Features per head.
    pub head_dim: i32,
    /// MLP width.
    pub intermediate: i32,
    /// Vocabulary size.
    pub vocab: i32,
    /// Blocks.
    pub layers: i32,
    /// Sliding attention window (written as a mistral config).
    pub sliding_window: Option<usize>,
}

impl RandomLlama {
    /// Writes the config and the weights (seeded: the same on every run)
    /// into `dir`.
    pub fn write(&self, dir: &Path) {
        let model_type = if self.sliding_window.is_some() {
            "mistral"
        } else {
            "llama"
        };
        let config = serde_json::json!({
            "model_type": model_type,
            "hidden_size": self.hidden,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "vocab_size": self.vocab,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "max_position_embeddings": 512,
            "tie_word_embeddings": false,
            "sliding_window": self.sliding_window,
        });
        std::fs::write(dir.join("config.json"), config.to_string()).expect("writing config.json");
        let mut next = 0;
        let mut random = |shape: &[i32], scale: f32| {
            next += 1;
            let key = mlx_rs::random::key(next).expect("a key");
            mlx_rs::random::normal::<f32>(shape, 0.0, scale, &key).expect("random weights")
        };
        let ones = |n: i32| mlx_rs::ops::ones::<f32>(&[n]).expect("ones");
        let (hidden, vocab) = (self.hidden, self.vocab);
        let (q, kv) = (self.heads * self.head_dim, self.kv_heads * self.head_dim);
        let mut tensors = BTreeMap::new();
        tensors.insert(
            "model.embed_tokens.weight".to_string(),
            random(&[vocab, hidden], 1.0),
        );
        tensors.insert("lm_head.weight".to_string(), random(&[vocab, hidden], 0.2));
        tensors.insert("model.norm.weight".to_string(), ones(hidden));
        for l in 0..self.layers {
            let p = format!("model.layers.{l}");
            for (name, shape) in [
                ("self_attn.q_proj", [q, hidden]),
                ("self_attn.k_proj", [kv, hidden]),
                ("self_attn.v_proj", [kv, hidden]),
                ("self_attn.o_proj", [hidden, q]),
                ("mlp.gate_proj", [self.intermediate, hidden]),
                ("mlp.up_proj", [self.intermediate, hidden]),
                ("mlp.down_proj", [hidden, self.intermediate]),
            ] {
                tensors.insert(format!("{p}.{name}.weight"), random(&shape, 0.15));
            }
            for norm in ["input_layernorm", "post_attention_layernorm"] {
                tensors.insert(format!("{p}.{norm}.weight"), ones(hidden));
            }
        }
        mlx_rs::Array::save_safetensors(tensors, None, dir.join("model.safetensors"))
            .expect("writing model.safetensors");
    }
}
