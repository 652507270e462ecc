//! Gemma 1, 2 and 3 (text) for mlx-zoo (reference: transformers'
//! `modeling_gemma.py`, `modeling_gemma2.py`, `modeling_gemma3.py`), all as
//! configuration of the core's decoder: RMSNorms scaling by `1 + weight`,
//! embeddings scaled by `sqrt(hidden_size)`, a tanh-GELU gated MLP and tied
//! embeddings (Gemma); norms around attention and the MLP, alternating
//! sliding-window and global layers, `query_pre_attn_scalar` and soft-capped
//! attention scores and logits (Gemma 2); per-head q/k norms and a rotary
//! base of their own for the sliding layers (Gemma 3). This crate is the
//! config and the weight-name table.

#![warn(missing_docs)]

use mlx_zoo_core::mapping::{MappingTable, TensorMeta, WeightMapper};
use mlx_zoo_core::nn::{
    decoder_rules, Activation, Decoder, DecoderConfig, DecoderOptions, Rope, RopeScaling,
};
use mlx_zoo_core::{Architecture, CausalLm, Error, ModelConfig, ModelDims, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;

/// Which Gemma.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Generation {
    One,
    Two,
    Three,
}

/// A Gemma 1, 2 or 3 (text) configuration; absent keys take transformers'
/// defaults of the 2B/2-2B/3-1B releases where they differ.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GemmaConfig {
    /// `gemma`, `gemma2` or `gemma3_text`.
    pub model_type: String,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Model width.
    pub hidden_size: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Decoder blocks.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads.
    pub num_key_value_heads: usize,
    /// Features per head.
    #[serde(default = "d::head_dim")]
    pub head_dim: usize,
    /// MLP activation (`hidden_activation`; Gemma 1's legacy `hidden_act`
    /// is ignored as transformers does).
    #[serde(default = "d::gelu_tanh")]
    pub hidden_activation: Activation,
    /// Context length.
    #[serde(default = "d::max_position_embeddings")]
    pub max_position_embeddings: usize,
    /// RMSNorm epsilon.
    #[serde(default = "d::rms_norm_eps")]
    pub rms_norm_eps: f32,
    /// RoPE base of global layers (top level in 4.x configs).
    #[serde(default = "d::rope_theta")]
    pub rope_theta: f32,
    /// RoPE scaling of global layers (4.x configs).
    #[serde(default)]
    pub rope_scaling: Option<RopeScaling>,
    /// Gemma 3 in transformers 5.x: one rope block per layer type.
    #[serde(default)]
    pub rope_parameters: Option<Value>,
    /// RoPE base of sliding layers (Gemma 3, 4.x configs).
    #[serde(default)]
    pub rope_local_base_freq: Option<f32>,
    /// Scores scale `query_pre_attn_scalar^-0.5` (Gemma 2 and 3).
    #[serde(default)]
    pub query_pre_attn_scalar: Option<f32>,
    /// The sliding window (Gemma 2 and 3).
    #[serde(default)]
    pub sliding_window: Option<usize>,
    /// Per-layer attention kinds (`sliding_attention` / `full_attention`).
    #[serde(default)]
    pub layer_types: Option<Vec<String>>,
    /// Gemma 3 without `layer_types`: every this many layers is global.
    #[serde(default = "d::pattern", alias = "_sliding_window_pattern")]
    pub sliding_window_pattern: usize,
    /// Attention scores soft-capping (Gemma 2).
    #[serde(default)]
    pub attn_logit_softcapping: Option<f32>,
    /// Output logits soft-capping (Gemma 2).
    #[serde(default)]
    pub final_logit_softcapping: Option<f32>,
    /// Biases on q/k/v/o.
    #[serde(default)]
    pub attention_bias: bool,
}

mod d {
    use mlx_zoo_core::nn::Activation;
    pub fn head_dim() -> usize {
        256
    }
    pub fn gelu_tanh() -> Activation {
        Activation::GeluNew
    }
    pub fn max_position_embeddings() -> usize {
        8192
    }
    pub fn rms_norm_eps() -> f32 {
        1e-6
    }
    pub fn rope_theta() -> f32 {
        10000.0
    }
    pub fn pattern() -> usize {
        6
    }
}

impl GemmaConfig {
    fn generation(&self) -> Generation {
        match self.model_type.as_str() {
            "gemma2" => Generation::Two,
            "gemma3_text" | "gemma3" => Generation::Three,
            _ => Generation::One,
        }
    }

    /// Whether layer `i` attends through the sliding window.
    fn slides(&self, i: usize) -> bool {
        match (&self.layer_types, self.generation()) {
            (Some(types), _) => types.get(i).is_some_and(|t| t == "sliding_attention"),
            (None, Generation::One) => false,
            (None, Generation::Two) => i % 2 == 0,
            (None, Generation::Three) => (i + 1) % self.sliding_window_pattern.max(1) != 0,
        }
    }

    /// The rope block of one layer type in 5.x `rope_parameters`: its base
    /// and scaling.
    fn rope_block(&self, kind: &str) -> Result<Option<(f32, Option<RopeScaling>)>> {
        let Some(block) = self.rope_parameters.as_ref().and_then(|p| p.get(kind)) else {
            return Ok(None);
        };
        let key = format!("rope_parameters.{kind}");
        let theta = block.get("rope_theta").and_then(Value::as_f64);
        let theta = theta.ok_or_else(|| Error::config(&key, "has no rope_theta"))? as f32;
        let default = matches!(
            block.get("rope_type").and_then(Value::as_str),
            None | Some("default")
        );
        let scaling = match default {
            true => None,
            false => Some(
                serde_json::from_value(block.clone())
                    .map_err(|e| Error::config(&key, e.to_string()))?,
            ),
        };
        Ok(Some((theta, scaling)))
    }

    /// The shared decoder's settings.
    pub fn decoder_config(&self) -> Result<DecoderConfig> {
        let generation = self.generation();
        let dims = self.dims();
        let rope = |theta: f32, scaling: Option<&RopeScaling>| {
            Rope::new(dims.head_dim, theta, scaling, self.max_position_embeddings)
        };
        let (global, local) = match (
            self.rope_block("full_attention")?,
            self.rope_block("sliding_attention")?,
        ) {
            (Some((theta, scaling)), local) => (rope(theta, scaling.as_ref())?, local),
            (None, local) => (rope(self.rope_theta, self.rope_scaling.as_ref())?, local),
        };
        let sliding_rope = match (generation, local) {
            (Generation::Three, Some((theta, scaling))) => Some(rope(theta, scaling.as_ref())?),
            (Generation::Three, None) => {
                Some(rope(self.rope_local_base_freq.unwrap_or(10000.0), None)?)
            }
            _ => None,
        };
        let later = generation != Generation::One;
        Ok(DecoderConfig {
            rope: global,
            sliding_windows: (0..dims.num_layers)
                .map(|i| self.sliding_window.filter(|_| later && self.slides(i)))
                .collect(),
            dims,
            rms_norm_eps: self.rms_norm_eps,
            qkv_bias: self.attention_bias,
            o_bias: self.attention_bias,
            mlp_bias: false,
            activation: self.hidden_activation,
            tie_word_embeddings: true,
            moe: None,
            options: DecoderOptions {
                qk_norm: generation == Generation::Three,
                norm_offset: 1.0,
                scale_embeddings: true,
                sandwich_norms: later,
                attention_scale: self
                    .query_pre_attn_scalar
                    .filter(|_| later)
                    .map(|s| s.powf(-0.5)),
                attention_softcap: self
                    .attn_logit_softcapping
                    .filter(|_| generation == Generation::Two),
                final_softcap: self.final_logit_softcapping.filter(|_| later),
                sliding_rope,
            },
        })
    }
}

impl ModelConfig for GemmaConfig {
    fn validate(&self) -> Result<()> {
        self.dims().check(false)?;
        if let Some(types) = &self.layer_types {
            if types.len() != self.num_hidden_layers {
                let found = format!(
                    "has {} entries for {} layers",
                    types.len(),
                    self.num_hidden_layers
                );
                return Err(Error::config("layer_types", found));
            }
        }
        self.decoder_config().map(|_| ())
    }

    fn dims(&self) -> ModelDims {
        ModelDims {
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            num_layers: self.num_hidden_layers,
            num_heads: self.num_attention_heads,
            num_kv_heads: self.num_key_value_heads,
            head_dim: self.head_dim,
            intermediate_size: self.intermediate_size,
            max_position_embeddings: self.max_position_embeddings,
        }
    }
}

macro_rules! gemma_architecture {
    ($arch:ident, $name:literal, $types:expr, $classes:expr, $description:literal) => {
        #[doc = $description]
        #[derive(Debug, Clone, Copy, Default)]
        pub struct $arch;

        impl Architecture for $arch {
            type Config = GemmaConfig;
            fn name(&self) -> &'static str {
                $name
            }
            fn description(&self) -> &'static str {
                $description
            }
            fn model_types(&self) -> &'static [&'static str] {
                $types
            }
            fn hf_architectures(&self) -> &'static [&'static str] {
                $classes
            }
            fn weight_mapper(
                &self,
                _: &GemmaConfig,
                _: &BTreeMap<String, TensorMeta>,
            ) -> Box<dyn WeightMapper> {
                Box::new(MappingTable::from_rules(decoder_rules(true)))
            }
            fn build(&self, config: &GemmaConfig) -> Result<Box<dyn CausalLm>> {
                Ok(Box::new(Decoder::new(&config.decoder_config()?)?))
            }
            fn default_adapter_targets(&self) -> &'static [&'static str] {
                &["q_proj", "v_proj"]
            }
        }
    };
}

gemma_architecture!(
    GemmaArchitecture,
    "gemma",
    &["gemma"],
    &["GemmaForCausalLM"],
    "Gemma 1: (1 + w) RMSNorms, sqrt(hidden) embedding scale, tanh-GELU gated MLP, tied embeddings"
);
gemma_architecture!(
    Gemma2Architecture,
    "gemma2",
    &["gemma2"],
    &["Gemma2ForCausalLM"],
    "Gemma 2: Gemma with sandwich norms, sliding/global layers and soft-capped scores and logits"
);
gemma_architecture!(
    Gemma3TextArchitecture,
    "gemma3_text",
    &["gemma3_text"],
    &["Gemma3ForCausalLM"],
    "Gemma 3 (text): Gemma 2's block with q/k norms and a local rotary base for sliding layers"
);

mlx_zoo_core::register_architecture!(GemmaArchitecture);
mlx_zoo_core::register_architecture!(Gemma2Architecture);
mlx_zoo_core::register_architecture!(Gemma3TextArchitecture);
