//! The linear layer every family uses. Its weight is either floating point
//! (`[out, in]`) or quantized in one of MLX's group-wise layouts: `weight`
//! packed into `uint32` words (`[out, in * bits / 32]`), one `scales` entry
//! (and for the affine mode one `biases` entry) per group of `group_size`
//! inputs (`[out, in / group]`), which is how mlx-lm names and stores a
//! quantized linear layer.
//!
//! The same type serves as an embedding table (`[vocab, dims]`, looked up
//! with [`Linear::embed`], and applied as the tied output projection with
//! [`Linear::forward`]) and as a stack of expert projections
//! (`[experts, out, in]`, applied with [`Linear::gather_forward`]), so
//! quantization and adapters reach every weight matrix through one type.
//!
//! On the CPU, MLX's quantized matmul is far slower than de-quantizing the
//! weight and running the float matmul through BLAS once a call has more
//! than a few rows; [`Linear::forward`] picks the faster path per call (see
//! [`set_dequantize_rows`]), so quantization keeps its memory win without
//! its CPU speed loss. On a GPU the quantized kernels are the fast path at
//! every size unless `ZOO_DEQUANTIZE_ROWS` says otherwise.

use super::kernels::{matvec, QuantizedWeight, MATVEC_MAX_ROWS};
use crate::adapter::{Adapter, AdapterParams, AdapterSettings};
use crate::error::{Error, MlxContext, Result};
use crate::quantize::{QuantSettings, Quantizer};
use mlx_rs::macros::ModuleParameters;
use mlx_rs::module::Param;
use mlx_rs::Array;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Calls with at least this many rows de-quantize then use the float
/// matmul; fewer rows use MLX's quantized matmul. Measured on a 2-core
/// x86_64 with OpenBLAS (`benches/quantized.rs`, 4-bit, group 64): for a
/// 2048x2048 layer the quantized matmul takes 3.6 / 7.4 / 14.1 ms at 1 / 2
/// / 4 rows, de-quantize+matmul 9.0 / 10.5 / 8.9 ms; for 1408x512 the two
/// tie at 2 rows. So from 3 rows on, de-quantizing wins, by 34x at 512 rows.
static DEQUANTIZE_ROWS: AtomicUsize = AtomicUsize::new(3);

/// Sets the row count from which quantized layers de-quantize their weight
/// and use the float matmul (`usize::MAX`: never; `0`: always).
pub fn set_dequantize_rows(rows: usize) {
    DEQUANTIZE_ROWS.store(rows, Ordering::Relaxed);
}

/// The current threshold of [`set_dequantize_rows`].
pub fn dequantize_rows() -> usize {
    DEQUANTIZE_ROWS.load(Ordering::Relaxed)
}

/// Rows from which a quantized layer on a GPU de-quantizes its weight and
/// runs the float matmul: on an H200, QLoRA on 4 x 512-token batches ran
/// 1.4-2x faster that way than through MLX's quantized matmul, which stays
/// the path for decoding and short prompts.
pub const GPU_DEQUANTIZE_ROWS: usize = 512;

/// The threshold that applies to a call on the current default device with
/// inputs of `dtype`: `ZOO_DEQUANTIZE_ROWS` when set (read once; `never` or
/// a row count), else [`dequantize_rows`] on the CPU and
/// [`GPU_DEQUANTIZE_ROWS`] on a GPU, except float32 inputs on a GPU, which
/// de-quantize from more than [`MATVEC_MAX_ROWS`] rows: MLX 0.32's CUDA
/// quantized matmul for float32 (its `qmm_sm90_*_float32_*` kernels) fails
/// to compile at run time on Hopper ("catastrophic error"; seen on an H200
/// for 4 and 8 bits), while its matrix-vector kernels for decoding work.
fn dequantize_rows_here(dtype: mlx_rs::Dtype) -> usize {
    static FROM_ENV: std::sync::OnceLock<Option<usize>> = std::sync::OnceLock::new();
    let from_env = FROM_ENV.get_or_init(|| {
        let value = std::env::var("ZOO_DEQUANTIZE_ROWS").ok()?;
        match value.trim() {
            "never" => Some(usize::MAX),
            rows => match rows.parse() {
                Ok(rows) => Some(rows),
                Err(_) => {
                    tracing::warn!(
                        value,
                        "ZOO_DEQUANTIZE_ROWS is not a row count or `never`; ignored"
                    );
                    None
                }
            },
        }
    });
    match from_env {
        Some(rows) => *rows,
        None if crate::runtime::on_cpu() => dequantize_rows(),
        None if dtype == mlx_rs::Dtype::Float32 => MATVEC_MAX_ROWS + 1,
        None => GPU_DEQUANTIZE_ROWS,
    }
}

/// A linear layer, float or affine-quantized.
#[derive(Debug, Clone, ModuleParameters)]
pub struct Linear {
    /// `[out, in]` floats, or `[out, in * bits / 32]` packed `uint32`.
    #[param]
    pub weight: Param<Array>,
    /// Optional `[out]` bias.
    #[param]
    pub bias: Param<Option<Array>>,
    /// Per-group scales when quantized.
    #[param]
    pub scales: Param<Option<Array>>,
    /// Per-group offsets when quantized.
    #[param]
    pub biases: Param<Option<Array>>,
    /// The quantization of `weight`, if any.
    pub quantization: Option<QuantSettings>,
    /// Low-rank adapter input projection `[in, rank]` (mlx-lm's layout).
    #[param]
    pub lora_a: Param<Option<Array>>,
    /// Low-rank adapter output projection `[rank, out]`.
    #[param]
    pub lora_b: Param<Option<Array>>,
    /// Per-output magnitude `[out]` of weight-decomposed adapters (DoRA).
    #[param]
    pub magnitude: Param<Option<Array>>,
    /// The adapter attached to this layer, if any.
    pub adapter: Option<AttachedAdapter>,
}

/// An adapter method attached to a [`Linear`] with its settings; its
/// parameters live in the layer's `lora_a`, `lora_b` and `magnitude` slots.
#[derive(Clone)]
pub struct AttachedAdapter {
    /// The method (`lora`, `dora`, ...).
    pub method: std::sync::Arc<dyn Adapter>,
    /// Rank, scaling and dropout.
    pub settings: AdapterSettings,
    /// Training mode: dropout (if any) applies to the adapter's input.
    pub training: bool,
}

impl std::fmt::Debug for AttachedAdapter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AttachedAdapter")
            .field("method", &self.method.name())
            .field("settings", &self.settings)
            .finish()
    }
}

/// What an adapter sees of the layer's input `x`: in training, with
/// dropout, a random share zeroed and the rest scaled up (PEFT's placement:
/// dropout on the adapter's input only, the base path sees all of `x`).
fn adapter_input(attached: &AttachedAdapter, x: &Array) -> Result<Array> {
    let dropout = attached.settings.dropout;
    if !(attached.training && dropout > 0.0) {
        return Ok(x.clone());
    }
    let ctx = || "applying adapter dropout".to_owned();
    let keep = Array::from_f32(1.0 - dropout);
    let mask = mlx_rs::random::bernoulli(&keep, x.shape(), None)
        .and_then(|m| m.as_dtype(x.dtype()))
        .context(ctx)?;
    x.multiply(&mask).and_then(|d| d.divide(&keep)).context(ctx)
}

/// The embedding table type: a [`Linear`] of `[vocab, dims]`.
pub type Embedding = Linear;

/// An embedding table of `vocab` rows of `dims` features (lazy zeros).
pub fn embedding(vocab: usize, dims: usize) -> Result<Embedding> {
    linear(dims, vocab, false)
}

/// A stack of `experts` float projections of `input` -> `output` features
/// (lazy zeros), applied with [`Linear::gather_forward`].
pub fn expert_linear(experts: usize, input: usize, output: usize) -> Result<Linear> {
    let shape = [experts as i32, output as i32, input as i32];
    Ok(Linear {
        weight: Param::new(
            mlx_rs::ops::zeros::<f32>(&shape)
                .context(|| format!("allocating {shape:?} expert weights"))?,
        ),
        bias: Param::new(None),
        scales: Param::new(None),
        biases: Param::new(None),
        quantization: None,
        lora_a: Param::new(None),
        lora_b: Param::new(None),
        magnitude: Param::new(None),
        adapter: None,
    })
}

/// A float layer of `input` -> `output` features whose weights start as
/// (lazy) zeros, to be loaded.
pub fn linear(input: usize, output: usize, bias: bool) -> Result<Linear> {
    let zeros = |shape: &[i32]| {
        mlx_rs::ops::zeros::<f32>(shape).context(|| format!("allocating a {shape:?} parameter"))
    };
    Ok(Linear {
        weight: Param::new(zeros(&[output as i32, input as i32])?),
        bias: Param::new(if bias {
            Some(zeros(&[output as i32])?)
        } else {
            None
        }),
        scales: Param::new(None),
        biases: Param::new(None),
        quantization: None,
        lora_a: Param::new(None),
        lora_b: Param::new(None),
        magnitude: Param::new(None),
        adapter: None,
    })
}

impl Linear {
    /// Output features (rows of the weight, or of each expert's weight).
    pub fn output_dims(&self) -> usize {
        let shape = self.weight.as_ref().shape();
        shape[shape.len() - 2] as usize
    }

    /// Leading dimensions before `[out, in]` (`[experts]` for expert stacks).
    fn leading(&self) -> Vec<i32> {
        let shape = self.weight.as_ref().shape();
        shape[..shape.len() - 2].to_vec()
    }

    /// Input features.
    pub fn input_dims(&self) -> usize {
        let shape = self.weight.as_ref().shape();
        let stored = shape[shape.len() - 1] as usize;
        match self.quantization {
            Some(q) => stored * 32 / q.bits as usize,
            None => stored,
        }
    }

    /// Whether the weight is quantized.
    pub fn is_quantized(&self) -> bool {
        self.quantization.is_some()
    }

    /// The weight as floats (de-quantized when needed).
    pub fn float_weight(&self) -> Result<Array> {
        match self.quantization {
            None => Ok(self.weight.as_ref().clone()),
            Some(q) => crate::quantize::ops::dequantize(
                self.weight.as_ref(),
                self.scales_array()?,
                self.biases.as_ref().as_ref(),
                q,
            ),
        }
    }

    fn scales_array(&self) -> Result<&Array> {
        self.scales
            .as_ref()
            .as_ref()
            .ok_or_else(|| Error::InvalidArgument("a quantized layer has no scales".into()))
    }

    /// Replaces the float weight by its quantization with `quantizer`,
    /// which must produce MLX's affine layout (the only one MLX's kernels
    /// run). The input size must divide by the group size.
    pub fn quantize_with(
        &mut self,
        quantizer: &dyn Quantizer,
        settings: QuantSettings,
    ) -> Result<()> {
        if self.is_quantized() {
            return Err(Error::InvalidArgument(
                "the layer is already quantized".into(),
            ));
        }
        settings.check_input(self.input_dims())?;
        let q = quantizer.quantize(self.weight.as_ref(), settings)?;
        self.set_quantized(q.packed, q.scales, q.biases, q.settings);
        Ok(())
    }

    /// Installs an already quantized weight.
    pub fn set_quantized(
        &mut self,
        packed: Array,
        scales: Array,
        biases: Option<Array>,
        settings: QuantSettings,
    ) {
        self.weight = Param::new(packed);
        self.scales = Param::new(Some(scales));
        self.biases = Param::new(biases);
        self.quantization = Some(settings);
    }

    /// Turns the layer into a quantized one with zero placeholders of the
    /// right shapes, to be filled from a quantized checkpoint.
    pub fn quantized_placeholder(&mut self, settings: QuantSettings) -> Result<()> {
        let (output, input) = (self.output_dims() as i32, self.input_dims());
        settings.check_input(input)?;
        let packed_cols = (input * settings.bits as usize / 32) as i32;
        let groups = (input / settings.group_size) as i32;
        let ctx = || "allocating quantized placeholders".to_owned();
        let shape = |last: i32| {
            let mut shape = self.leading();
            shape.extend([output, last]);
            shape
        };
        let packed = mlx_rs::ops::zeros::<u32>(&shape(packed_cols)).context(ctx)?;
        // The floating-point modes store 8-bit scales (E8M0 or E4M3).
        let scales = match settings.mode.has_biases() {
            true => mlx_rs::ops::zeros::<f32>(&shape(groups)),
            false => mlx_rs::ops::zeros::<u8>(&shape(groups)),
        }
        .context(ctx)?;
        let biases = match settings.mode.has_biases() {
            true => Some(mlx_rs::ops::zeros::<f32>(&shape(groups)).context(ctx)?),
            false => None,
        };
        self.set_quantized(packed, scales, biases, settings);
        Ok(())
    }

    /// Looks up rows of an embedding table for token ids of any shape,
    /// giving `[..., dims]`.
    pub fn embed(&self, ids: &Array) -> Result<Array> {
        let ctx = || "looking up embeddings".to_owned();
        let rows = self.weight.as_ref().take_axis(ids, 0).context(ctx)?;
        match self.quantization {
            None => Ok(rows),
            Some(q) => {
                let scales = self.scales_array()?.take_axis(ids, 0).context(ctx)?;
                let biases = match self.biases.as_ref() {
                    Some(b) => Some(b.take_axis(ids, 0).context(ctx)?),
                    None => None,
                };
                crate::quantize::ops::dequantize(&rows, &scales, biases.as_ref(), q)
            }
        }
    }

    /// Applies the experts chosen by `indices` (`[tokens, k]`) of an expert
    /// stack to `x` (`[tokens, 1, 1, in]` or `[tokens, k, 1, in]`), giving
    /// `[tokens, k, 1, out]`.
    pub fn gather_forward(&self, x: &Array, indices: &Array) -> Result<Array> {
        let output = self.base_gather_forward(x, indices)?;
        match &self.adapter {
            None => Ok(output),
            Some(attached) => attached.method.gather_forward(
                &adapter_input(attached, x)?,
                &output,
                indices,
                &self.adapter_params(),
                &attached.settings,
            ),
        }
    }

    fn base_gather_forward(&self, x: &Array, indices: &Array) -> Result<Array> {
        let ctx = || "applying the selected experts".to_owned();
        match self.quantization {
            None => {
                let weight = self.weight.as_ref().swap_axes(-1, -2).context(ctx)?;
                mlx_rs::ops::gather_mm(x, &weight, None, indices, None).context(ctx)
            }
            Some(q) => crate::quantize::ops::gather_qmm(
                x,
                self.weight.as_ref(),
                self.scales_array()?,
                self.biases.as_ref().as_ref(),
                indices,
                true,
                q,
                false,
            ),
        }
    }

    /// The adapter parameters by the names [`Adapter`]s use.
    pub fn adapter_params(&self) -> AdapterParams {
        let mut params = AdapterParams::new();
        for (name, slot) in [
            ("lora_a", &self.lora_a),
            ("lora_b", &self.lora_b),
            ("magnitude", &self.magnitude),
        ] {
            if let Some(value) = slot.as_ref() {
                params.insert(name.to_owned(), value.clone());
            }
        }
        params
    }

    /// Attaches `method` with freshly initialised parameters.
    pub fn attach_adapter(
        &mut self,
        method: std::sync::Arc<dyn Adapter>,
        settings: AdapterSettings,
    ) -> Result<()> {
        let params = method.init(&self.float_weight()?, &settings)?;
        self.set_adapter(method, settings, params)
    }

    /// Attaches `method` with the given parameters (`lora_a`, `lora_b`,
    /// `magnitude`).
    pub fn set_adapter(
        &mut self,
        method: std::sync::Arc<dyn Adapter>,
        settings: AdapterSettings,
        mut params: AdapterParams,
    ) -> Result<()> {
        self.lora_a = Param::new(params.remove("lora_a"));
        self.lora_b = Param::new(params.remove("lora_b"));
        self.magnitude = Param::new(params.remove("magnitude"));
        if let Some(extra) = params.keys().next() {
            return Err(Error::InvalidArgument(format!(
                "adapter parameter {extra:?} has no slot in a linear layer (lora_a, lora_b, magnitude)"
            )));
        }
        self.adapter = Some(AttachedAdapter {
            method,
            settings,
            training: false,
        });
        Ok(())
    }

    /// Whether [`Linear::forward`] draws random numbers (adapter dropout in
    /// training mode).
    pub fn draws_random(&self) -> bool {
        self.adapter
            .as_ref()
            .is_some_and(|attached| attached.training && attached.settings.dropout > 0.0)
    }

    /// `x @ weight.T + bias`, with the attached adapter's change.
    pub fn forward(&self, x: &Array) -> Result<Array> {
        let ctx = || "applying a linear layer".to_owned();
        let output = self.base_forward(x)?;
        let output = match &self.adapter {
            None => output,
            Some(attached) => {
                let weight = if attached.method.uses_base_weight() {
                    Some(self.float_weight()?)
                } else {
                    None
                };
                attached.method.forward(
                    &adapter_input(attached, x)?,
                    &output,
                    weight.as_ref(),
                    &self.adapter_params(),
                    &attached.settings,
                )?
            }
        };
        match self.bias.as_ref() {
            Some(bias) => output.add(bias).context(ctx),
            None => Ok(output),
        }
    }

    /// `x @ weight.T`, choosing the quantized path per call.
    fn base_forward(&self, x: &Array) -> Result<Array> {
        let ctx = || "applying a linear layer".to_owned();
        let rows: usize = x.shape()[..x.ndim() - 1]
            .iter()
            .map(|&d| d as usize)
            .product();
        let output = match self.quantization {
            None if rows <= MATVEC_MAX_ROWS => matvec(x, self.weight.as_ref(), None)?,
            None => mlx_rs::ops::matmul(x, self.weight.as_ref().t()).context(ctx)?,
            Some(_) if rows >= dequantize_rows_here(x.dtype()) => {
                let weight = self.float_weight()?.as_dtype(x.dtype()).context(ctx)?;
                mlx_rs::ops::matmul(x, weight.t()).context(ctx)?
            }
            Some(q) if q.mode != crate::quantize::QuantMode::Affine => {
                crate::quantize::ops::quantized_matmul(
                    x,
                    self.weight.as_ref(),
                    self.scales_array()?,
                    None,
                    true,
                    q,
                )?
            }
            Some(q) => matvec(
                x,
                self.weight.as_ref(),
                Some(QuantizedWeight {
                    scales: self.scales_array()?,
                    biases: self.biases.as_ref().as_ref(),
                    bits: q.bits as i32,
                    group_size: q.group_size as i32,
                }),
            )?,
        };
        Ok(output)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantized_forward_paths_agree() {
        let key = mlx_rs::random::key(7).unwrap();
        let w = mlx_rs::random::normal::<f32>(&[16, 64], None, None, &key).unwrap();
        let x = mlx_rs::random::normal::<f32>(&[3, 64], None, None, &key).unwrap();
        let mut layer = linear(64, 16, false).unwrap();
        layer.weight = Param::new(w.clone());
        let float = layer.forward(&x).unwrap();
        let (packed, scales, biases) = mlx_rs::ops::quantize(&w, 32, 8).unwrap();
        let settings = QuantSettings::affine(8, 32);
        layer.set_quantized(packed, scales, Some(biases), settings);
        assert_eq!(layer.input_dims(), 64);
        set_dequantize_rows(usize::MAX);
        let via_qmm = layer.forward(&x).unwrap();
        set_dequantize_rows(0);
        let via_dequant = layer.forward(&x).unwrap();
        set_dequantize_rows(3);
        let diff = |a: &Array, b: &Array| {
            a.as_slice::<f32>()
                .iter()
                .zip(b.as_slice::<f32>())
                .map(|(p, q)| (p - q).abs())
                .fold(0.0f32, f32::max)
        };
        assert!(diff(&via_qmm, &via_dequant) < 1e-4);
        // 8-bit groups of 32 stay close to, but are not, the float result.
        let error = diff(&via_qmm, &float);
        assert!(error < 0.3 && error > 0.0, "{error}");
    }

    #[test]
    fn indivisible_input_is_refused() {
        let mut layer = linear(48, 4, false).unwrap();
        let err = layer
            .quantized_placeholder(QuantSettings::affine(4, 32))
            .unwrap_err();
        assert!(err.to_string().contains("48"), "{err}");
    }
}
