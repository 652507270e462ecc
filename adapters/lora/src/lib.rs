//! LoRA and DoRA as adapter plugins.
//!
//! Both add a low-rank update to a linear layer of weight `W` (`[out, in]`,
//! float or de-quantized): `lora_a` (`[in, r]`) and `lora_b` (`[r, out]`),
//! in mlx-lm's layout, scaled by `alpha / r` (or `alpha / sqrt(r)` with
//! rsLoRA).
//!
//! * LoRA (Hu et al. 2021): `y = x W^T + s (x A) B`.
//! * DoRA (Liu et al. 2024): the updated weight `W' = W + s (A B)^T` is
//!   split into a per-output magnitude `m` (trained, initialised to the
//!   row norms of `W`) and a direction: `y = m / |W'|_row * (x W^T + s (x A)
//!   B)`, with the norm treated as a constant in the backward pass, as PEFT
//!   and mlx-lm do.
//!
//! The layer's own bias is added after the adapter.

#![warn(missing_docs)]

pub mod formats;

use mlx_rs::Array;
use mlx_zoo_core::adapter::{AdapterParams, AdapterSettings};
use mlx_zoo_core::error::MlxContext;
use mlx_zoo_core::{Adapter, Error, Result};

fn param<'a>(params: &'a AdapterParams, name: &str, method: &str) -> Result<&'a Array> {
    params
        .get(name)
        .ok_or_else(|| Error::InvalidArgument(format!("a {method} layer has no {name}")))
}

/// `lora_a` ~ U(-1/sqrt(in), 1/sqrt(in)) and `lora_b` = 0, so a fresh
/// adapter changes nothing. A `[out, in]` weight gets `[in, r]` / `[r, out]`;
/// an `[experts, out, in]` stack gets mlx-lm's switch layout, `[experts, r,
/// in]` / `[experts, out, r]`.
fn init_low_rank(base_weight: &Array, settings: &AdapterSettings) -> Result<AdapterParams> {
    let shape = base_weight.shape();
    if settings.rank == 0 {
        return Err(Error::InvalidArgument(
            "the adapter rank must be positive".into(),
        ));
    }
    let rank = settings.rank as i32;
    let ctx = || "initialising an adapter".to_owned();
    let (a_shape, b_shape) = match *shape {
        [output, input] => (vec![input, rank], vec![rank, output]),
        [experts, output, input] => (vec![experts, rank, input], vec![experts, output, rank]),
        _ => {
            return Err(Error::InvalidArgument(format!(
                "low-rank adapters apply to [out, in] weights or [experts, out, in] stacks, got {shape:?}"
            )))
        }
    };
    let bound = 1.0 / (shape[shape.len() - 1] as f32).sqrt();
    let a = mlx_rs::random::uniform::<_, f32>(-bound, bound, &a_shape, None).context(ctx)?;
    let b = mlx_rs::ops::zeros::<f32>(&b_shape).context(ctx)?;
    Ok([("lora_a".to_owned(), a), ("lora_b".to_owned(), b)].into())
}

/// `s * (x A) B`.
fn low_rank_update(
    x: &Array,
    params: &AdapterParams,
    settings: &AdapterSettings,
    method: &str,
) -> Result<Array> {
    let ctx = || format!("applying a {method} update");
    let a = param(params, "lora_a", method)?;
    let b = param(params, "lora_b", method)?;
    let z = mlx_rs::ops::matmul(x, a)
        .and_then(|h| mlx_rs::ops::matmul(&h, b))
        .context(ctx)?;
    let scale = Array::from_f32(settings.scale())
        .as_dtype(z.dtype())
        .context(ctx)?;
    // The factors stay float32 (master weights) while the update joins the
    // input's dtype, as PEFT and mlx-lm do: a float32 update added to a
    // bfloat16 layer would turn the whole residual stream float32.
    z.multiply(&scale)
        .and_then(|z| z.as_dtype(x.dtype()))
        .context(ctx)
}

/// `W + s (A B)^T`.
fn merged_weight(
    base_weight: &Array,
    params: &AdapterParams,
    settings: &AdapterSettings,
    method: &str,
) -> Result<Array> {
    let ctx = || format!("merging a {method} adapter");
    let a = param(params, "lora_a", method)?;
    let b = param(params, "lora_b", method)?;
    // Per expert `B[e] A[e]` for a stack (switch layout), else `(A B)^T`.
    let delta = if base_weight.ndim() == 3 {
        mlx_rs::ops::matmul(b, a).context(ctx)?
    } else {
        mlx_rs::ops::matmul(a, b).context(ctx)?.t()
    };
    let scale = Array::from_f32(settings.scale());
    let delta = delta.multiply(&scale).context(ctx)?;
    base_weight
        .add(delta.as_dtype(base_weight.dtype()).context(ctx)?)
        .context(ctx)
}

/// Low-rank adaptation.
#[derive(Debug, Clone, Copy, Default)]
pub struct Lora;

impl Adapter for Lora {
    fn name(&self) -> &'static str {
        "lora"
    }

    fn description(&self) -> &'static str {
        "LoRA: y = x W^T + (alpha/r) (x A) B (rsLoRA: alpha/sqrt(r))"
    }

    fn init(&self, base_weight: &Array, settings: &AdapterSettings) -> Result<AdapterParams> {
        init_low_rank(base_weight, settings)
    }

    fn forward(
        &self,
        x: &Array,
        base_output: &Array,
        _base_weight: Option<&Array>,
        params: &AdapterParams,
        settings: &AdapterSettings,
    ) -> Result<Array> {
        let update = low_rank_update(x, params, settings, "LoRA")?;
        base_output
            .add(&update)
            .context(|| "adding the LoRA update".into())
    }

    fn gather_forward(
        &self,
        x: &Array,
        base_output: &Array,
        indices: &Array,
        params: &AdapterParams,
        settings: &AdapterSettings,
    ) -> Result<Array> {
        let ctx = || "applying a LoRA update to experts".to_owned();
        let a = param(params, "lora_a", "LoRA")?
            .swap_axes(-1, -2)
            .context(ctx)?;
        let b = param(params, "lora_b", "LoRA")?
            .swap_axes(-1, -2)
            .context(ctx)?;
        let z = mlx_rs::ops::gather_mm(x, &a, None, indices, None)
            .and_then(|z| mlx_rs::ops::gather_mm(&z, &b, None, indices, None))
            .context(ctx)?;
        let scale = Array::from_f32(settings.scale())
            .as_dtype(z.dtype())
            .context(ctx)?;
        let update = z
            .multiply(&scale)
            .and_then(|z| z.as_dtype(x.dtype()))
            .context(ctx)?;
        base_output.add(&update).context(ctx)
    }

    fn merge(
        &self,
        base_weight: &Array,
        params: &AdapterParams,
        settings: &AdapterSettings,
    ) -> Result<Array> {
        merged_weight(base_weight, params, settings, "LoRA")
    }
}

/// Weight-decomposed low-rank adaptation.
#[derive(Debug, Clone, Copy, Default)]
pub struct Dora;

fn row_norms(weight: &Array) -> Result<Array> {
    weight
        .square()
        .and_then(|w| w.sum_axis(-1, false))
        .and_then(|w| w.sqrt())
        .context(|| "computing weight norms".into())
}

impl Adapter for Dora {
    fn name(&self) -> &'static str {
        "dora"
    }

    fn description(&self) -> &'static str {
        "DoRA: y = m / |W + s (AB)^T|_row * (x W^T + s (x A) B)"
    }

    fn uses_base_weight(&self) -> bool {
        true
    }

    fn init(&self, base_weight: &Array, settings: &AdapterSettings) -> Result<AdapterParams> {
        if base_weight.ndim() != 2 {
            return Err(Error::InvalidArgument(
                "DoRA adapters do not support expert stacks".into(),
            ));
        }
        let mut params = init_low_rank(base_weight, settings)?;
        params.insert(
            "magnitude".to_owned(),
            row_norms(
                &base_weight
                    .as_dtype(mlx_rs::Dtype::Float32)
                    .context(|| "casting".into())?,
            )?,
        );
        Ok(params)
    }

    fn forward(
        &self,
        x: &Array,
        base_output: &Array,
        base_weight: Option<&Array>,
        params: &AdapterParams,
        settings: &AdapterSettings,
    ) -> Result<Array> {
        let ctx = || "applying a DoRA update".to_owned();
        let weight = base_weight
            .ok_or_else(|| Error::InvalidArgument("DoRA needs the base weight".into()))?;
        let magnitude = param(params, "magnitude", "DoRA")?;
        let adapted = merged_weight(weight, params, settings, "DoRA")?;
        let norms = mlx_rs::stop_gradient(&row_norms(&adapted)?).context(ctx)?;
        let update = low_rank_update(x, params, settings, "DoRA")?;
        let combined = base_output.add(&update).context(ctx)?;
        let factor = magnitude.divide(&norms).context(ctx)?;
        combined
            .multiply(factor.as_dtype(combined.dtype()).context(ctx)?)
            .context(ctx)
    }

    fn merge(
        &self,
        base_weight: &Array,
        params: &AdapterParams,
        settings: &AdapterSettings,
    ) -> Result<Array> {
        let ctx = || "merging a DoRA adapter".to_owned();
        let adapted = merged_weight(base_weight, params, settings, "DoRA")?;
        let magnitude = param(params, "magnitude", "DoRA")?;
        let factor = magnitude
            .divide(&row_norms(&adapted)?)
            .and_then(|f| f.expand_dims(-1))
            .context(ctx)?;
        adapted.multiply(&factor).context(ctx)
    }
}

mlx_zoo_core::register_adapter!(Lora);
mlx_zoo_core::register_adapter!(Dora);

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(rslora: bool) -> AdapterSettings {
        AdapterSettings {
            rank: 4,
            alpha: 8.0,
            dropout: 0.0,
            rslora,
        }
    }

    fn random(shape: &[i32], seed: u64) -> Array {
        let key = mlx_rs::random::key(seed).unwrap();
        mlx_rs::random::normal::<f32>(shape, None, None, &key).unwrap()
    }

    fn max_diff(a: &Array, b: &Array) -> f32 {
        a.as_slice::<f32>()
            .iter()
            .zip(b.as_slice::<f32>())
            .map(|(p, q)| (p - q).abs())
            .fold(0.0, f32::max)
    }

    fn trained(method: &dyn Adapter, w: &Array, s: &AdapterSettings) -> AdapterParams {
        let mut params = method.init(w, s).unwrap();
        params.insert("lora_b".into(), random(&[4, 16], 9));
        params
    }

    #[test]
    fn fresh_adapters_change_nothing() {
        let (w, x) = (random(&[16, 32], 1), random(&[3, 32], 2));
        let base = mlx_rs::ops::matmul(&x, w.t()).unwrap();
        for method in [&Lora as &dyn Adapter, &Dora] {
            let params = method.init(&w, &settings(false)).unwrap();
            let out = method
                .forward(&x, &base, Some(&w), &params, &settings(false))
                .unwrap();
            assert!(max_diff(&out, &base) < 1e-5, "{}", method.name());
        }
    }

    #[test]
    fn merged_weight_equals_the_adapted_forward() {
        let (w, x) = (random(&[16, 32], 3), random(&[5, 32], 4));
        let base = mlx_rs::ops::matmul(&x, w.t()).unwrap();
        for rslora in [false, true] {
            for method in [&Lora as &dyn Adapter, &Dora] {
                let s = settings(rslora);
                let params = trained(method, &w, &s);
                let adapted = method.forward(&x, &base, Some(&w), &params, &s).unwrap();
                assert!(
                    max_diff(&adapted, &base) > 1e-2,
                    "{} changes nothing",
                    method.name()
                );
                let merged = method.merge(&w, &params, &s).unwrap();
                let fused = mlx_rs::ops::matmul(&x, merged.t()).unwrap();
                assert!(
                    max_diff(&adapted, &fused) < 1e-4,
                    "{} rslora={rslora}",
                    method.name()
                );
            }
        }
    }

    #[test]
    fn rslora_scales_by_the_square_root_of_the_rank() {
        assert_eq!(settings(false).scale(), 2.0);
        assert_eq!(settings(true).scale(), 4.0);
    }
}
