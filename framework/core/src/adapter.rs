//! The [`Adapter`] trait: a parameter-efficient change to a linear layer
//! (LoRA, DoRA, ...). An adapter declares the parameters it adds to a layer
//! of a given size, computes the adapted output from the base layer's, and
//! merges itself into the base weight for `fuse`. Implementations live in the
//! `adapters/` crates and register themselves like architectures do.

use crate::error::Result;
use mlx_rs::Array;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The settings shared by adapters of the LoRA family.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdapterSettings {
    /// Rank of the low-rank update.
    pub rank: usize,
    /// Scaling numerator (`alpha / rank`, or `alpha / sqrt(rank)` with rsLoRA).
    pub alpha: f32,
    /// Dropout on the adapter's input during training.
    pub dropout: f32,
    /// Use rsLoRA's `alpha / sqrt(rank)` scale.
    pub rslora: bool,
}

impl AdapterSettings {
    /// The factor applied to the low-rank update: `alpha / rank`, or
    /// `alpha / sqrt(rank)` with rsLoRA.
    pub fn scale(&self) -> f32 {
        if self.rslora {
            self.alpha / (self.rank as f32).sqrt()
        } else {
            self.alpha / self.rank as f32
        }
    }
}

/// The parameters an adapter added to one layer, by local name
/// (`lora_a`, `lora_b`, `magnitude`).
pub type AdapterParams = BTreeMap<String, Array>;

/// A kind of adapter.
pub trait Adapter: Send + Sync {
    /// A short unique name, e.g. `lora`.
    fn name(&self) -> &'static str;
    /// One line about the method.
    fn description(&self) -> &'static str;
    /// The parameters added to a linear layer whose float weight is
    /// `base_weight` (`[out, in]`), with their initial values.
    fn init(&self, base_weight: &Array, settings: &AdapterSettings) -> Result<AdapterParams>;
    /// Whether [`forward`](Self::forward) needs the base weight (DoRA's
    /// norm does; LoRA does not, which spares de-quantizing it).
    fn uses_base_weight(&self) -> bool {
        false
    }
    /// The adapted output (before the layer's bias), given the layer input
    /// `x`, the base layer's output without bias and, when
    /// [`uses_base_weight`](Self::uses_base_weight), its float weight.
    fn forward(
        &self,
        x: &Array,
        base_output: &Array,
        base_weight: Option<&Array>,
        params: &AdapterParams,
        settings: &AdapterSettings,
    ) -> Result<Array>;
    /// The adapted output of an expert stack ([`Linear::gather_forward`](crate::nn::Linear::gather_forward)):
    /// `x` is `[tokens, 1 or k, 1, in]`, `indices` `[tokens, k]`, and
    /// `base_output` `[tokens, k, 1, out]`. Methods without expert support
    /// refuse.
    fn gather_forward(
        &self,
        _x: &Array,
        _base_output: &Array,
        _indices: &Array,
        _params: &AdapterParams,
        _settings: &AdapterSettings,
    ) -> Result<Array> {
        Err(crate::error::Error::InvalidArgument(format!(
            "{} adapters do not support expert stacks",
            self.name()
        )))
    }
    /// The base weight with the adapter merged in.
    fn merge(
        &self,
        base_weight: &Array,
        params: &AdapterParams,
        settings: &AdapterSettings,
    ) -> Result<Array>;
}

/// Which linear layers get an adapter.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AdapterTargets {
    /// Module names or [`ModulePattern`](crate::module_pattern::ModulePattern)s
    /// (`q_proj`, `layers.*.mlp.down_proj`); empty means the architecture's
    /// default targets.
    #[serde(default)]
    pub modules: Vec<String>,
    /// Every linear layer of the blocks (PEFT's `all-linear`): not the
    /// output head, embedding tables or expert stacks.
    #[serde(default)]
    pub all_linear: bool,
    /// Only blocks whose index is in this inclusive range.
    #[serde(default)]
    pub layers: Option<(usize, usize)>,
}

/// The block index in a module path (`model.layers.3.mlp` -> 3).
pub fn layer_index(path: &str) -> Option<usize> {
    let parts: Vec<&str> = path.split('.').collect();
    parts
        .windows(2)
        .find(|w| w[0] == "layers" || w[0] == "h")
        .and_then(|w| w[1].parse().ok())
}

/// Attaches a fresh `method` adapter to the targeted linear layers of
/// `model`, freezes everything else (see [`freeze_all_but_adapters`]) and
/// returns their paths. A pattern that matches no layer, or a target that
/// is an expert stack, is an error.
pub fn attach_adapters(
    model: &mut dyn crate::CausalLm,
    method: std::sync::Arc<dyn Adapter>,
    settings: AdapterSettings,
    targets: &AdapterTargets,
    default_targets: &[&str],
) -> Result<Vec<String>> {
    use crate::error::Error;
    use crate::module_pattern::ModulePattern;
    let names: Vec<String> = if targets.modules.is_empty() && !targets.all_linear {
        default_targets.iter().map(|s| s.to_string()).collect()
    } else {
        targets.modules.clone()
    };
    let patterns = names
        .iter()
        .map(|n| ModulePattern::new(n))
        .collect::<Result<Vec<_>>>()?;
    let mut used = vec![false; patterns.len()];
    let mut attached = Vec::new();
    model.visit_linears(&mut |path, layer| {
        let in_range = match (targets.layers, layer_index(path)) {
            (None, _) => true,
            (Some((first, last)), Some(i)) => (first..=last).contains(&i),
            (Some(_), None) => false,
        };
        let is_block_linear = layer_index(path).is_some() && layer.weight.as_ref().ndim() == 2;
        let mut wanted = targets.all_linear && is_block_linear;
        for (index, pattern) in patterns.iter().enumerate() {
            if pattern.matches(path) {
                used[index] = true;
                wanted = true;
            }
        }
        if !(wanted && in_range) {
            return Ok(());
        }
        layer
            .attach_adapter(method.clone(), settings)
            .map_err(|e| Error::InvalidArgument(format!("{path}: {e}")))?;
        attached.push(path.to_owned());
        Ok(())
    })?;
    if let Some(index) = used.iter().position(|u| !u) {
        return Err(Error::InvalidArgument(format!(
            "adapter target {:?} matches no linear layer of the model",
            names[index]
        )));
    }
    if attached.is_empty() {
        return Err(Error::InvalidArgument(
            "no linear layer is targeted (check the layer range)".into(),
        ));
    }
    freeze_all_but_adapters(model)?;
    Ok(attached)
}

/// What [`fuse_adapters`] did to one layer.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FusedLayer {
    /// The layer.
    pub path: String,
    /// For a re-quantized layer: the share of the adapter's change to the
    /// weight that survives re-quantization (`|Q(W + dW) - Q(W)| / |dW|`);
    /// `None` for float layers.
    pub kept_fraction: Option<f32>,
}

fn frobenius(a: &Array) -> Result<f32> {
    use crate::error::MlxContext;
    Ok(a.square()
        .and_then(|s| s.sum(None))
        .and_then(|s| s.sqrt())
        .context(|| "measuring a weight change".into())?
        .item_exact::<f32>())
}

/// Merges every attached adapter into its layer's weight (in float32) and
/// detaches it. A quantized layer is de-quantized, merged and re-quantized
/// with `quantizer` at its own settings, and the share of the update that
/// survives is measured; with `dequantize` it stays in float instead.
pub fn fuse_adapters(
    model: &mut dyn crate::CausalLm,
    quantizer: Option<&dyn crate::Quantizer>,
    dequantize: bool,
) -> Result<Vec<FusedLayer>> {
    use crate::error::{Error, MlxContext};
    let mut fused = Vec::new();
    model.visit_linears(&mut |path, layer| {
        let Some(attached) = layer.adapter.take() else {
            return Ok(());
        };
        let params = layer.adapter_params();
        let ctx = || format!("fusing the adapter of {path}");
        let base = layer
            .float_weight()?
            .as_dtype(mlx_rs::Dtype::Float32)
            .context(ctx)?;
        let merged = attached.method.merge(&base, &params, &attached.settings)?;
        let mut kept_fraction = None;
        match (layer.quantization, dequantize) {
            (Some(settings), false) => {
                let quantizer = quantizer.ok_or_else(|| {
                    Error::InvalidArgument(format!(
                        "{path} is quantized: fusing needs a quantizer (or de-quantize)"
                    ))
                })?;
                let q = quantizer.quantize(&merged, settings)?;
                let requantized = quantizer.dequantize(&q)?;
                let change = frobenius(&merged.subtract(&base).context(ctx)?)?;
                let kept = frobenius(&requantized.subtract(&base).context(ctx)?)?;
                kept_fraction = Some(if change > 0.0 { kept / change } else { 1.0 });
                layer.set_quantized(q.packed, q.scales, q.biases, q.settings);
            }
            _ => {
                layer.weight = mlx_rs::module::Param::new(merged);
                layer.scales = mlx_rs::module::Param::new(None);
                layer.biases = mlx_rs::module::Param::new(None);
                layer.quantization = None;
            }
        }
        layer.lora_a = mlx_rs::module::Param::new(None);
        layer.lora_b = mlx_rs::module::Param::new(None);
        layer.magnitude = mlx_rs::module::Param::new(None);
        fused.push(FusedLayer {
            path: path.to_owned(),
            kept_fraction,
        });
        Ok(())
    })?;
    Ok(fused)
}

/// A fresh adapter to attach at load time: the method's registered name,
/// its settings and its targets (the seed's `lora_config`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdapterSpec {
    /// `lora` or `dora` (any registered adapter).
    pub method: String,
    /// Rank, alpha, dropout, rsLoRA.
    pub settings: AdapterSettings,
    /// Which layers.
    pub targets: AdapterTargets,
}

/// Freezes every parameter of `model` except the adapters' (`lora_a`,
/// `lora_b`, `magnitude`), so that `trainable_parameters` (what
/// value-and-grad and the optimizer see) is exactly the adapters.
pub fn freeze_all_but_adapters(model: &mut dyn crate::CausalLm) -> Result<()> {
    use mlx_rs::module::Parameter;
    model.freeze_parameters(true);
    model.visit_linears(&mut |_, layer| {
        if layer.adapter.is_some() {
            layer.lora_a.unfreeze(false);
            layer.lora_b.unfreeze(false);
            layer.magnitude.unfreeze(false);
        }
        Ok(())
    })
}

/// Whether any adapter attached to `model` applies dropout in training (its
/// random masks make each step's graph different).
pub fn adapter_dropout_in_use(model: &mut dyn crate::model::CausalLm) -> Result<bool> {
    let mut in_use = false;
    model.visit_linears(&mut |_, layer| {
        if let Some(attached) = layer.adapter.as_ref() {
            in_use |= attached.settings.dropout > 0.0;
        }
        Ok(())
    })?;
    Ok(in_use)
}

/// Switches every attached adapter of `model` into (`true`) or out of
/// training mode, where its dropout applies; returns how many layers carry
/// an adapter.
pub fn set_adapter_training(
    model: &mut dyn crate::model::CausalLm,
    training: bool,
) -> Result<usize> {
    let mut count = 0;
    model.visit_linears(&mut |_, layer| {
        if let Some(attached) = layer.adapter.as_mut() {
            attached.training = training;
            count += 1;
        }
        Ok(())
    })?;
    Ok(count)
}
