//! A memory plan for a training run, from the model's config and checkpoint
//! headers alone (nothing is loaded): the weights as they will sit in memory
//! (float32, or quantized with their scales and biases), the adapters, their
//! gradients and optimizer state, and the activations a backward pass keeps
//! for a batch of a given size and length (all blocks', or with gradient
//! checkpointing each block's input and one block's activations). `zoo plan` prints it; the CLI
//! test compares it with the peak MLX reports for the same run.

use crate::optim::OptimizerKind;
use mlx_zoo_core::loader::Inspection;
use mlx_zoo_core::quantize::QuantSettings;
use serde::Serialize;

/// What a run trains.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum PlanMethod {
    /// Every parameter.
    Full,
    /// LoRA (or DoRA, with its magnitude vectors) of this rank.
    Adapter {
        /// The rank.
        rank: usize,
        /// DoRA adds a magnitude vector per layer.
        dora: bool,
    },
}

/// The run to plan.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PlanSettings {
    /// What trains.
    pub method: PlanMethod,
    /// Quantize the base at load with these settings.
    pub quantization: Option<QuantSettings>,
    /// Adapter targets: module names matched at the end of layer paths.
    pub targets: Vec<String>,
    /// Sequences per micro-batch.
    pub batch_size: usize,
    /// Tokens per sequence.
    pub seq_len: usize,
    /// The optimizer (its state per trainable parameter).
    pub optimizer: OptimizerKind,
    /// Blocks recompute their activations in the backward pass.
    pub grad_checkpoint: bool,
}

/// The estimate, in bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MemoryPlan {
    /// Model weights in memory.
    pub weights: u64,
    /// Adapter parameters.
    pub adapters: u64,
    /// Gradients of the trainable parameters.
    pub gradients: u64,
    /// Optimizer state.
    pub optimizer: u64,
    /// Activations kept for the backward pass, logits included.
    pub activations: u64,
    /// All of the above: the expected peak.
    pub total: u64,
    /// Parameters that train.
    pub trainable_parameters: u64,
    /// Layers given adapters.
    pub adapted_layers: usize,
}

const F32: u64 = 4;

/// Plans `settings` for the model `inspection` describes.
pub fn plan(inspection: &Inspection, settings: &PlanSettings) -> MemoryPlan {
    let dims = &inspection.dims;
    let mut linear_parameters = 0u64;
    let mut weights = 0u64;
    let mut adapter_parameters = 0u64;
    let mut optimizer_slots = 0u64;
    let mut adapted_layers = 0usize;
    let mut adapted_rank_floats = 0u64;
    for layer in &inspection.layers {
        let (input, output, experts) = (
            layer.input as u64,
            layer.output as u64,
            layer.experts as u64,
        );
        let count = input * output * experts;
        linear_parameters += count;
        weights += match (layer.quantization, settings.quantization) {
            // Already quantized in the checkpoint: as stored.
            (Some(_), _) => layer.bytes,
            (None, Some(q)) if input % q.group_size as u64 == 0 => {
                count * q.bits as u64 / 8 + 2 * count / q.group_size as u64 * F32
            }
            _ => count * F32,
        };
        if let PlanMethod::Adapter { rank, dora } = settings.method {
            let targeted = settings
                .targets
                .iter()
                .any(|t| layer.path == *t || layer.path.ends_with(&format!(".{t}")));
            if targeted {
                let rank = rank as u64;
                adapted_layers += 1;
                adapter_parameters +=
                    experts * (rank * (input + output) + if dora { output } else { 0 });
                optimizer_slots += experts * (2 * rank + input + output);
                adapted_rank_floats += experts.min(2) * rank;
            }
        }
    }
    let other_parameters = inspection.parameters.saturating_sub(linear_parameters);
    weights += other_parameters * F32;
    let trainable = match settings.method {
        PlanMethod::Full => {
            optimizer_slots = inspection
                .layers
                .iter()
                .map(|l| (l.input + l.output) as u64 * l.experts as u64)
                .sum::<u64>()
                + other_parameters;
            inspection.parameters
        }
        PlanMethod::Adapter { .. } => adapter_parameters,
    };
    let optimizer = match settings.optimizer {
        OptimizerKind::AdamW => 2 * trainable * F32,
        OptimizerKind::Sgd => trainable * F32,
        OptimizerKind::Adafactor => optimizer_slots * F32,
    };
    // What one block's backward keeps per token (float32): norm inputs and
    // outputs, residuals, q/k/v before and after RoPE, attention output,
    // the MLP's gate, up, activation and product; plus attention
    // probabilities per head and key (the fused softmax differentiates from
    // its output, so the scores are freed as soon as it has run), and each
    // adapter's x @ A.
    let tokens = (settings.batch_size * settings.seq_len) as u64;
    let (h, i) = (dims.hidden_size as u64, dims.intermediate_size as u64);
    let q = (dims.num_heads * dims.head_dim) as u64;
    let kv = (dims.num_kv_heads * dims.head_dim) as u64;
    let per_token = 8 * h + 2 * (q + 2 * kv) + 4 * i;
    let attention = dims.num_heads as u64 * settings.seq_len as u64;
    let blocks = dims.num_layers as u64;
    let adapters_per_token = adapted_rank_floats;
    let logits = 3 * dims.vocab_size as u64;
    // Checkpointed blocks keep only their input; one block at a time holds
    // its activations while it is recomputed for its backward pass, plus
    // that backward pass's temporaries (about half as much again now that
    // softmax and SiLU differentiate in one fused pass each).
    let kept_blocks = if settings.grad_checkpoint {
        blocks * h + (per_token + attention) * 3 / 2 + adapters_per_token.div_ceil(blocks.max(1))
    } else {
        blocks * (per_token + attention) + adapters_per_token
    };
    let activations = tokens * (kept_blocks + logits + h) * F32;
    let adapters = adapter_parameters * F32;
    let gradients = trainable * F32;
    MemoryPlan {
        weights,
        adapters,
        gradients,
        optimizer,
        activations,
        total: weights + adapters + gradients + optimizer + activations,
        trainable_parameters: trainable,
        adapted_layers,
    }
}
