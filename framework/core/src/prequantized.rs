//! Pre-quantized Hugging Face checkpoints (GPTQ and AWQ, 4-bit, group-wise,
//! without act-order), repacked at load time into MLX's affine layout so the
//! rest of the loader sees an ordinary MLX-format quantized checkpoint.
//!
//! Both formats store 4-bit codes `q`, one zero point `z` and one scale `s`
//! per group of `group_size` inputs and output column, with
//! `w[o, i] = s * (q - z)`. MLX's affine layout stores `w = scale * q + bias`,
//! so `scale = s`, `bias = -s * z`, and the codes are re-packed eight to a
//! `uint32`, least significant first, along the input axis.
//!
//! * GPTQ (`qweight [in/8, out]` packed along the input: its transpose is
//!   MLX's packing already; `qzeros [in/g, out/8]` packed along the output;
//!   `scales [in/g, out]`; `g_idx [in]`). Checkpoints in the original
//!   ("v1") format store `z - 1`. Act-order checkpoints (`desc_act`, or a
//!   `g_idx` that is not `i / group_size`) are refused.
//! * AWQ GEMM (`qweight [in, out/8]` and `qzeros [in/g, out/8]` packed along
//!   the output in AWQ's interleaved order; `scales [in/g, out]`).

use crate::checkpoint::Checkpoint;
use crate::config::HfConfig;
use crate::error::{Error, Result};
use crate::mapping::TensorMeta;
use mlx_rs::{Array, Dtype};
use serde_json::Value;
use std::collections::BTreeMap;

/// Which pre-quantized format a checkpoint uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrequantizedFormat {
    /// GPTQ; `zero_offset` is 1 for the original format, which stores
    /// zero points minus one, and 0 for `gptq_v2`.
    Gptq {
        /// What to add to a stored zero point.
        zero_offset: i32,
    },
    /// AWQ, GEMM packing.
    Awq,
}

/// A pre-quantized checkpoint's settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Prequantized {
    /// The format.
    pub format: PrequantizedFormat,
    /// Inputs per group.
    pub group_size: usize,
}

/// AWQ's packing order: nibble `k` of a word holds output column
/// `8 * word + AWQ_ORDER[k]`.
const AWQ_ORDER: [usize; 8] = [0, 2, 4, 6, 1, 3, 5, 7];

/// Reads `quantization_config` and tells whether the checkpoint is GPTQ or
/// AWQ, refusing what cannot be repacked with an error naming the key.
pub fn detect(config: &HfConfig) -> Result<Option<Prequantized>> {
    let Some(block) = config.raw().get("quantization_config") else {
        return Ok(None);
    };
    let Some(method) = block.get("quant_method").and_then(Value::as_str) else {
        return Ok(None);
    };
    let key = |k: &str| format!("quantization_config.{k}");
    let bits = block.get("bits").and_then(Value::as_u64);
    if bits != Some(4) {
        return Err(Error::config(
            key("bits"),
            format!("{method} checkpoints load with 4 bits only, found {bits:?}"),
        ));
    }
    let group_size = match block.get("group_size").and_then(Value::as_i64) {
        Some(g) if g > 0 => g as usize,
        other => {
            return Err(Error::config(
                key("group_size"),
                format!(
                "expected a positive group size (per-channel -1 is not supported), found {other:?}"
            ),
            ))
        }
    };
    let format = match method {
        "gptq" => {
            if block.get("desc_act").and_then(Value::as_bool) == Some(true) {
                return Err(Error::config(
                    key("desc_act"),
                    "act-order GPTQ checkpoints (desc_act: true, permuted g_idx) cannot be repacked into groups of consecutive inputs",
                ));
            }
            let v2 = block.get("checkpoint_format").and_then(Value::as_str) == Some("gptq_v2");
            PrequantizedFormat::Gptq {
                zero_offset: if v2 { 0 } else { 1 },
            }
        }
        "awq" => {
            let version = block
                .get("version")
                .and_then(Value::as_str)
                .unwrap_or("gemm");
            if !version.eq_ignore_ascii_case("gemm") {
                return Err(Error::config(
                    key("version"),
                    format!("AWQ version {version:?} is not supported; expected \"gemm\""),
                ));
            }
            if block.get("zero_point").and_then(Value::as_bool) == Some(false) {
                return Err(Error::config(
                    key("zero_point"),
                    "AWQ without zero points is not supported",
                ));
            }
            PrequantizedFormat::Awq
        }
        other => {
            return Err(Error::config(
                key("quant_method"),
                format!(
                "{other:?} checkpoints cannot be loaded; expected gptq, awq or an MLX-format model"
            ),
            ))
        }
    };
    Ok(Some(Prequantized { format, group_size }))
}

fn int32s(checkpoint: &Checkpoint, name: &str) -> Result<(Vec<i32>, Vec<usize>)> {
    let array = checkpoint.load_raw(name)?;
    let shape: Vec<usize> = array.shape().iter().map(|&d| d as usize).collect();
    if array.dtype() != Dtype::Int32 {
        return Err(Error::Mapping(format!(
            "{name}: expected int32 packed values, found {:?}",
            array.dtype()
        )));
    }
    Ok((values_of(&array, name, &shape)?, shape))
}

fn floats(checkpoint: &Checkpoint, name: &str) -> Result<(Vec<f32>, Vec<usize>)> {
    let array = checkpoint.load(name, Dtype::Float32)?;
    let shape: Vec<usize> = array.shape().iter().map(|&d| d as usize).collect();
    Ok((values_of(&array, name, &shape)?, shape))
}

/// The elements of a loaded tensor; an empty one is an error naming it.
fn values_of<T: mlx_rs::ArrayElement + Clone>(
    array: &Array,
    name: &str,
    shape: &[usize],
) -> Result<Vec<T>> {
    array
        .try_as_slice::<T>()
        .ok()
        .filter(|values| !values.is_empty())
        .map(<[T]>::to_vec)
        .ok_or_else(|| Error::Mapping(format!("{name}: empty, shape {shape:?}")))
}

fn shape_error(prefix: &str, what: &str, expected: &[usize], found: &[usize]) -> Error {
    Error::Mapping(format!(
        "{prefix}.{what}: expected shape {expected:?}, found {found:?}"
    ))
}

/// The MLX-format tensors replacing one pre-quantized layer.
struct Repacked {
    packed: Vec<u32>,
    scales: Vec<f32>,
    biases: Vec<f32>,
    out: usize,
    input: usize,
    groups: usize,
}

fn repack_layer(checkpoint: &Checkpoint, prefix: &str, settings: Prequantized) -> Result<Repacked> {
    let (qweight, qshape) = int32s(checkpoint, &format!("{prefix}.qweight"))?;
    let (qzeros, zshape) = int32s(checkpoint, &format!("{prefix}.qzeros"))?;
    let (scales, sshape) = floats(checkpoint, &format!("{prefix}.scales"))?;
    if qshape.len() != 2 || sshape.len() != 2 {
        return Err(shape_error(prefix, "qweight", &[0, 0], &qshape));
    }
    let g = settings.group_size;
    if g == 0 {
        return Err(Error::Mapping(format!(
            "{prefix}: a group size of 0 cannot be repacked"
        )));
    }
    let (input, out) = match settings.format {
        PrequantizedFormat::Gptq { .. } => (qshape[0].saturating_mul(8), qshape[1]),
        PrequantizedFormat::Awq => (qshape[0], qshape[1].saturating_mul(8)),
    };
    // Eight 4-bit values share a packed word along both axes of the
    // repacked layout.
    if input == 0 || out == 0 || input % 8 != 0 || out % 8 != 0 {
        return Err(Error::Mapping(format!(
            "{prefix}.qweight: shape {qshape:?} gives {input} inputs and {out} outputs; both must be positive multiples of 8"
        )));
    }
    if input % g != 0 {
        return Err(Error::Mapping(format!(
            "{prefix}: {input} inputs do not divide into groups of {g}"
        )));
    }
    let groups = input / g;
    if sshape != [groups, out] {
        return Err(shape_error(prefix, "scales", &[groups, out], &sshape));
    }
    if zshape != [groups, out / 8] {
        return Err(shape_error(prefix, "qzeros", &[groups, out / 8], &zshape));
    }
    if let PrequantizedFormat::Gptq { .. } = settings.format {
        let name = format!("{prefix}.g_idx");
        if checkpoint.tensors().contains_key(&name) {
            let (g_idx, _) = int32s(checkpoint, &name)?;
            if g_idx.len() != input {
                return Err(Error::Mapping(format!(
                    "{name}: {} entries for {input} inputs",
                    g_idx.len()
                )));
            }
            if g_idx
                .iter()
                .enumerate()
                .any(|(i, &grp)| grp as usize != i / g)
            {
                return Err(Error::Mapping(format!(
                    "{name}: inputs are not in consecutive groups of {g} (act-order); such checkpoints cannot be repacked"
                )));
            }
        }
    }
    let nibble = |word: i32, k: usize| ((word as u32) >> (4 * k)) & 0xF;
    // Zero point of (group, output column).
    let zero = |grp: usize, o: usize| -> f32 {
        let word = qzeros[grp * (out / 8) + o / 8];
        match settings.format {
            // The original format stores zero - 1 in every nibble; adding
            // 1 to each nibble of the whole word (with carries, as
            // GPTQModel's v1 -> v2 conversion does) restores it, which also
            // reads a stored zero of 0 the way GPTQModel's writer meant it.
            PrequantizedFormat::Gptq { zero_offset: 1 } => {
                nibble((word as u32).wrapping_add(0x1111_1111) as i32, o % 8) as f32
            }
            PrequantizedFormat::Gptq { .. } => nibble(word, o % 8) as f32,
            PrequantizedFormat::Awq => {
                let k = AWQ_ORDER.iter().position(|&c| c == o % 8).unwrap_or(0);
                nibble(word, k) as f32
            }
        }
    };
    let mut packed = vec![0u32; out * input / 8];
    match settings.format {
        PrequantizedFormat::Gptq { .. } => {
            // qweight[r, o] packs inputs 8r..8r+7 of column o, LSB first:
            // MLX's word (o, r).
            for r in 0..input / 8 {
                for o in 0..out {
                    packed[o * (input / 8) + r] = qweight[r * out + o] as u32;
                }
            }
        }
        PrequantizedFormat::Awq => {
            for i in 0..input {
                for word in 0..out / 8 {
                    let value = qweight[i * (out / 8) + word];
                    for (k, &column) in AWQ_ORDER.iter().enumerate() {
                        let o = word * 8 + column;
                        packed[o * (input / 8) + i / 8] |= nibble(value, k) << (4 * (i % 8));
                    }
                }
            }
        }
    }
    let mut mlx_scales = vec![0f32; out * groups];
    let mut mlx_biases = vec![0f32; out * groups];
    for grp in 0..groups {
        for o in 0..out {
            let s = scales[grp * out + o];
            mlx_scales[o * groups + grp] = s;
            mlx_biases[o * groups + grp] = -s * zero(grp, o);
        }
    }
    Ok(Repacked {
        packed,
        scales: mlx_scales,
        biases: mlx_biases,
        out,
        input,
        groups,
    })
}

/// Tensors standing in for checkpoint tensors, with their metadata.
pub type Overlay = BTreeMap<String, (TensorMeta, Array)>;

/// Repacks every pre-quantized layer of `checkpoint`. Returns the tensors
/// that replace them (`<layer>.weight` packed, `.scales`, `.biases`, with
/// their metadata) and the names they replace.
pub fn repack(checkpoint: &Checkpoint, settings: Prequantized) -> Result<(Overlay, Vec<String>)> {
    let names = checkpoint.tensors();
    let mut overlay = BTreeMap::new();
    let mut replaced = Vec::new();
    for name in names.keys() {
        let Some(prefix) = name.strip_suffix(".qweight") else {
            continue;
        };
        let layer = repack_layer(checkpoint, prefix, settings)?;
        let meta = |shape: Vec<i64>, dtype: &str| TensorMeta {
            shape,
            dtype: dtype.to_owned(),
        };
        let (out, input, groups) = (layer.out as i64, layer.input as i64, layer.groups as i64);
        overlay.insert(
            format!("{prefix}.weight"),
            (
                meta(vec![out, input / 8], "U32"),
                Array::from_slice(&layer.packed, &[out as i32, (input / 8) as i32]),
            ),
        );
        overlay.insert(
            format!("{prefix}.scales"),
            (
                meta(vec![out, groups], "F32"),
                Array::from_slice(&layer.scales, &[out as i32, groups as i32]),
            ),
        );
        overlay.insert(
            format!("{prefix}.biases"),
            (
                meta(vec![out, groups], "F32"),
                Array::from_slice(&layer.biases, &[out as i32, groups as i32]),
            ),
        );
        for suffix in ["qweight", "qzeros", "scales", "g_idx"] {
            replaced.push(format!("{prefix}.{suffix}"));
        }
    }
    Ok((overlay, replaced))
}
