//! GGUF files, llama.cpp's format (v2 and v3): the header, metadata and
//! tensor table are parsed with every count, length, offset and size checked
//! against the memory-mapped file, and a model is turned into what the
//! loader reads from a Hugging Face folder: a `config.json` value made from
//! the metadata and tensors under Hugging Face names. Float types (F32, F16,
//! BF16) load as floats; Q8_0, Q4_0, Q4_1 and Q4_K are repacked exactly into
//! MLX's affine layout (group 32: Q8_0's `d * q` as codes `q + 128` with
//! scale `d` and bias `-128 d`, Q4_0's `d * (q - 8)` as scale `d` and bias
//! `-8 d`, Q4_1's `d * q + m` as scale `d` and bias `m`, Q4_K's
//! `d * sc * q - dmin * m` per 32 as scale `d * sc` and bias `-dmin * m`), so
//! the quantized matmul computes the same products; Q6_K, whose 16-value
//! scales fit no affine group, is de-quantized to floats. llama.cpp's converter stores the query and
//! key rows of llama models in the interleaved rotary order; their rows are
//! put back. Families: llama (and what llama.cpp writes as llama, such as
//! SmolLM2 and Mistral) and qwen2; other architectures and types are
//! refused by name.

use crate::error::{Error, Result};
use crate::mapping::TensorMeta;
use mlx_rs::Array;
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// `GGUF` read as a little-endian `u32`.
const MAGIC: u32 = 0x4655_4747;
/// The most metadata entries or tensors a file may declare.
const MAX_COUNT: u64 = 1 << 24;
/// The longest string a file may hold (a chat template or a merge list
/// entry is far shorter).
const MAX_STRING: u64 = 1 << 26;

/// One tensor's entry in the table.
#[derive(Debug, Clone)]
pub struct GgufTensor {
    /// Its GGUF name (`blk.0.attn_q.weight`).
    pub name: String,
    /// Dimensions, innermost first (ggml's `ne`).
    pub dims: Vec<u64>,
    /// ggml type id.
    pub kind: u32,
    /// Offset of its data from the start of the data section.
    pub offset: u64,
}

/// A parsed GGUF file, memory-mapped.
pub struct GgufFile {
    path: PathBuf,
    map: memmap2::Mmap,
    /// Format version (2 or 3).
    pub version: u32,
    /// The metadata, values as JSON.
    pub metadata: BTreeMap<String, Value>,
    /// The tensor table.
    pub tensors: Vec<GgufTensor>,
    data_start: usize,
}

/// A ggml type this reader handles: its name, elements per block and
/// bytes per block.
fn type_info(kind: u32) -> Option<(&'static str, u64, u64)> {
    Some(match kind {
        0 => ("F32", 1, 4),
        1 => ("F16", 1, 2),
        2 => ("Q4_0", 32, 18),
        3 => ("Q4_1", 32, 20),
        8 => ("Q8_0", 32, 34),
        12 => ("Q4_K", 256, 144),
        14 => ("Q6_K", 256, 210),
        30 => ("BF16", 1, 2),
        _ => return None,
    })
}

/// ggml's names of the types this reader refuses, for the error.
fn type_name(kind: u32) -> String {
    const NAMES: [&str; 31] = [
        "F32", "F16", "Q4_0", "Q4_1", "Q4_2", "Q4_3", "Q5_0", "Q5_1", "Q8_0", "Q8_1", "Q2_K",
        "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_K", "IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ1_S", "IQ4_NL",
        "IQ3_S", "IQ2_S", "IQ4_XS", "I8", "I16", "I32", "I64", "F64", "IQ1_M", "BF16",
    ];
    NAMES
        .get(kind as usize)
        .map(|n| n.to_string())
        .unwrap_or_else(|| format!("type {kind}"))
}

/// A bounds-checked reader over the file's bytes.
struct Cursor<'a> {
    bytes: &'a [u8],
    at: usize,
    path: &'a Path,
}

impl Cursor<'_> {
    fn bad(&self, what: String) -> Error {
        Error::Archive {
            path: self.path.to_path_buf(),
            message: format!("GGUF at byte {}: {what}", self.at),
        }
    }

    fn take(&mut self, n: u64) -> Result<&[u8]> {
        let end = (self.at as u64)
            .checked_add(n)
            .filter(|&e| e <= self.bytes.len() as u64)
            .ok_or_else(|| self.bad(format!("{n} bytes run past the end of the file")))?;
        let slice = &self.bytes[self.at..end as usize];
        self.at = end as usize;
        Ok(slice)
    }

    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }

    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }

    fn count(&mut self, what: &str) -> Result<u64> {
        let n = self.u64()?;
        if n > MAX_COUNT {
            return Err(self.bad(format!("{what} count {n} exceeds {MAX_COUNT}")));
        }
        Ok(n)
    }

    fn string(&mut self) -> Result<String> {
        let n = self.u64()?;
        if n > MAX_STRING {
            return Err(self.bad(format!("a string of {n} bytes exceeds {MAX_STRING}")));
        }
        let bytes = self.take(n)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| self.bad("a string is not UTF-8".into()))
    }

    fn value(&mut self, kind: u32, depth: usize) -> Result<Value> {
        let number = |bytes: &[u8]| bytes.to_vec();
        Ok(match kind {
            0 => json!(self.take(1)?[0]),
            1 => json!(self.take(1)?[0] as i8),
            2 => json!(u16::from_le_bytes(
                number(self.take(2)?).try_into().expect("2")
            )),
            3 => json!(i16::from_le_bytes(
                number(self.take(2)?).try_into().expect("2")
            )),
            4 => json!(self.u32()?),
            5 => json!(self.u32()? as i32),
            6 => json!(f32::from_le_bytes(self.u32()?.to_le_bytes())),
            7 => json!(self.take(1)?[0] != 0),
            8 => json!(self.string()?),
            9 => {
                if depth > 2 {
                    return Err(self.bad("arrays nested deeper than 2".into()));
                }
                let inner = self.u32()?;
                let n = self.count("array")?;
                let mut items = Vec::with_capacity(n.min(1 << 16) as usize);
                for _ in 0..n {
                    items.push(self.value(inner, depth + 1)?);
                }
                Value::Array(items)
            }
            10 => json!(self.u64()?),
            11 => json!(self.u64()? as i64),
            12 => json!(f64::from_le_bytes(self.u64()?.to_le_bytes())),
            other => return Err(self.bad(format!("unknown metadata value type {other}"))),
        })
    }
}

impl GgufFile {
    /// Maps and parses `path`.
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        // SAFETY: the map is read-only and lives with `self`; a file changed
        // underneath is the same hazard every mmap-based reader accepts.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let (version, metadata, tensors, data_start) = {
            let mut c = Cursor {
                bytes: &map,
                at: 0,
                path,
            };
            if c.u32()? != MAGIC {
                return Err(c.bad("not a GGUF file (no GGUF magic)".into()));
            }
            let version = c.u32()?;
            if !(2..=3).contains(&version) {
                return Err(c.bad(format!("version {version}; expected 2 or 3")));
            }
            let tensor_count = c.count("tensor")?;
            let kv_count = c.count("metadata")?;
            let mut metadata = BTreeMap::new();
            for _ in 0..kv_count {
                let key = c.string()?;
                let kind = c.u32()?;
                let value = c.value(kind, 0)?;
                metadata.insert(key, value);
            }
            let mut tensors = Vec::with_capacity(tensor_count as usize);
            for _ in 0..tensor_count {
                let name = c.string()?;
                let n_dims = c.u32()?;
                if n_dims == 0 || n_dims > 4 {
                    return Err(c.bad(format!("tensor {name}: {n_dims} dimensions (1 to 4)")));
                }
                let dims = (0..n_dims).map(|_| c.u64()).collect::<Result<Vec<_>>>()?;
                let kind = c.u32()?;
                let offset = c.u64()?;
                tensors.push(GgufTensor {
                    name,
                    dims,
                    kind,
                    offset,
                });
            }
            let alignment = metadata
                .get("general.alignment")
                .and_then(Value::as_u64)
                .unwrap_or(32);
            if alignment == 0 || !alignment.is_power_of_two() || alignment > 1 << 16 {
                return Err(c.bad(format!(
                    "general.alignment {alignment} is not a power of two"
                )));
            }
            let data_start = (c.at as u64).div_ceil(alignment) * alignment;
            (version, metadata, tensors, data_start)
        };
        let gguf = Self {
            path: path.to_path_buf(),
            map,
            version,
            metadata,
            tensors,
            data_start: data_start as usize,
        };
        for tensor in &gguf.tensors {
            gguf.bytes_of(tensor)?;
        }
        Ok(gguf)
    }

    fn bad(&self, message: String) -> Error {
        Error::Archive {
            path: self.path.clone(),
            message,
        }
    }

    /// The tensor's data, checked against its type and the file's end.
    fn bytes_of(&self, tensor: &GgufTensor) -> Result<&[u8]> {
        let name = &tensor.name;
        let (_, block, block_bytes) = type_info(tensor.kind).ok_or_else(|| {
            self.bad(format!(
                "tensor {name} is {}; this reader takes F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K and Q6_K",
                type_name(tensor.kind)
            ))
        })?;
        let elements = tensor
            .dims
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d))
            .filter(|&n| n > 0)
            .ok_or_else(|| self.bad(format!("tensor {name}: dimensions {:?}", tensor.dims)))?;
        if tensor.dims[0] % block != 0 {
            return Err(self.bad(format!(
                "tensor {name}: rows of {} values do not divide into blocks of {block}",
                tensor.dims[0]
            )));
        }
        let size = elements / block * block_bytes;
        let start = (self.data_start as u64).checked_add(tensor.offset);
        let end = start.and_then(|s| s.checked_add(size));
        match (start, end) {
            (Some(s), Some(e)) if e <= self.map.len() as u64 => {
                Ok(&self.map[s as usize..e as usize])
            }
            _ => Err(self.bad(format!(
                "tensor {name}: {size} bytes at offset {} run past the end of the file",
                tensor.offset
            ))),
        }
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A metadata value.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    fn number(&self, key: &str) -> Result<f64> {
        self.get(key)
            .and_then(Value::as_f64)
            .ok_or_else(|| self.bad(format!("metadata {key} is missing or not a number")))
    }
}

/// llama.cpp's per-layer tensor names and the Hugging Face names they are.
const LLAMA_LAYER: [(&str, &str); 9] = [
    ("attn_norm", "input_layernorm"),
    ("attn_q", "self_attn.q_proj"),
    ("attn_k", "self_attn.k_proj"),
    ("attn_v", "self_attn.v_proj"),
    ("attn_output", "self_attn.o_proj"),
    ("ffn_norm", "post_attention_layernorm"),
    ("ffn_gate", "mlp.gate_proj"),
    ("ffn_up", "mlp.up_proj"),
    ("ffn_down", "mlp.down_proj"),
];

/// The Hugging Face name of a llama GGUF tensor.
fn llama_name(name: &str) -> Option<String> {
    let (stem, suffix) = name.rsplit_once('.')?;
    let hf = match stem {
        "token_embd" => "model.embed_tokens".to_owned(),
        "output_norm" => "model.norm".to_owned(),
        "output" => "lm_head".to_owned(),
        _ => {
            let rest = stem.strip_prefix("blk.")?;
            let (layer, part) = rest.split_once('.')?;
            let layer: usize = layer.parse().ok()?;
            let (_, hf) = LLAMA_LAYER.iter().find(|(g, _)| *g == part)?;
            format!("model.layers.{layer}.{hf}")
        }
    };
    Some(format!("{hf}.{suffix}"))
}

/// The rows of a llama.cpp-permuted q/k projection in Hugging Face's
/// half-split order: HF row `h*d + i*d/2 + j` is GGUF row `h*d + 2j + i`.
fn unpermuted_rows(rows: usize, heads: usize) -> Result<Vec<u32>> {
    if heads == 0 || rows % (2 * heads) != 0 {
        return Err(Error::InvalidArgument(format!(
            "{rows} rows do not split into {heads} heads of rotary pairs"
        )));
    }
    let per_head = rows / heads;
    let half = per_head / 2;
    Ok((0..rows)
        .map(|r| {
            let (h, within) = (r / per_head, r % per_head);
            let (i, j) = (within / half, within % half);
            (h * per_head + 2 * j + i) as u32
        })
        .collect())
}

fn f16_at(bytes: &[u8], at: usize) -> f32 {
    half_to_f32(u16::from_le_bytes([bytes[at], bytes[at + 1]]))
}

/// IEEE half to float, exactly.
fn half_to_f32(h: u16) -> f32 {
    let sign = if h & 0x8000 != 0 { -1.0f32 } else { 1.0 };
    let exponent = ((h >> 10) & 0x1f) as i32;
    let mantissa = (h & 0x3ff) as f32;
    match exponent {
        0 => sign * mantissa * 2f32.powi(-24),
        31 if mantissa == 0.0 => sign * f32::INFINITY,
        31 => f32::NAN,
        e => sign * (1.0 + mantissa / 1024.0) * 2f32.powi(e - 15),
    }
}

/// A quantized tensor repacked into MLX's affine layout: packed codes,
/// scales and biases, `[rows, cols * bits / 32]` and `[rows, cols / 32]`.
struct Repacked {
    packed: Vec<u32>,
    scales: Vec<f32>,
    biases: Vec<f32>,
    bits: u32,
}

/// Q4_K's 6-bit scale and min of sub-block `j` (llama.cpp's
/// `get_scale_min_k4`).
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0f) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// The affine groups of 32 in one block of `kind`: codes, scale, bias.
fn affine_groups(kind: u32, block: &[u8], out: &mut Vec<([u32; 32], f32, f32)>) {
    let mut codes = [0u32; 32];
    match kind {
        8 => {
            for (k, code) in codes.iter_mut().enumerate() {
                *code = (block[2 + k] as i8 as i32 + 128) as u32;
            }
            let d = f16_at(block, 0);
            out.push((codes, d, -128.0 * d));
        }
        2 | 3 => {
            let start = if kind == 2 { 2 } else { 4 };
            for j in 0..16 {
                codes[j] = (block[start + j] & 0x0f) as u32;
                codes[j + 16] = (block[start + j] >> 4) as u32;
            }
            let d = f16_at(block, 0);
            let bias = if kind == 2 {
                -8.0 * d
            } else {
                f16_at(block, 2)
            };
            out.push((codes, d, bias));
        }
        // Q4_K: 256 values in 8 groups of 32, each `d * sc * q - dmin * m`.
        12 => {
            let (d, dmin) = (f16_at(block, 0), f16_at(block, 2));
            let (scales, qs) = (&block[4..16], &block[16..144]);
            for chunk in 0..4 {
                let q = &qs[32 * chunk..32 * chunk + 32];
                for (half, shift) in [(0, 0), (1, 4)] {
                    let (sc, m) = scale_min_k4(2 * chunk + half, scales);
                    for (l, code) in codes.iter_mut().enumerate() {
                        *code = ((q[l] >> shift) & 0x0f) as u32;
                    }
                    out.push((codes, d * sc as f32, -(dmin * m as f32)));
                }
            }
        }
        _ => unreachable!("affine_groups is called for Q8_0, Q4_0, Q4_1 and Q4_K"),
    }
}

fn repack(kind: u32, bytes: &[u8], rows: usize, cols: usize) -> Repacked {
    let (_, block_values, block_bytes) = type_info(kind).expect("checked when opened");
    let blocks = rows * cols / block_values as usize;
    let bits = if kind == 8 { 8 } else { 4 };
    let groups = rows * cols / 32;
    let mut out = Repacked {
        packed: Vec::with_capacity(groups * bits as usize),
        scales: Vec::with_capacity(groups),
        biases: Vec::with_capacity(groups),
        bits,
    };
    let mut found = Vec::with_capacity(8);
    for b in 0..blocks {
        let block = &bytes[b * block_bytes as usize..(b + 1) * block_bytes as usize];
        found.clear();
        affine_groups(kind, block, &mut found);
        for (codes, scale, bias) in &found {
            out.scales.push(*scale);
            out.biases.push(*bias);
            let per_word = (32 / bits) as usize;
            for word in codes.chunks(per_word) {
                out.packed.push(
                    word.iter()
                        .enumerate()
                        .fold(0u32, |acc, (k, &c)| acc | (c << (bits as usize * k))),
                );
            }
        }
    }
    out
}

/// Q6_K de-quantized (its 16-value sub-blocks have scales of their own, so
/// no group of 32 is affine): llama.cpp's `dequantize_row_q6_K`.
fn dequantize_q6_k(bytes: &[u8]) -> Vec<f32> {
    let mut out = Vec::with_capacity(bytes.len() / 210 * 256);
    for block in bytes.chunks_exact(210) {
        let (ql, qh, scales) = (&block[..128], &block[128..192], &block[192..208]);
        let d = f16_at(block, 208);
        let mut values = [0f32; 256];
        for n in 0..2 {
            let (ql, qh, sc) = (&ql[64 * n..], &qh[32 * n..], &scales[8 * n..]);
            for l in 0..32 {
                let is = l / 16;
                let q = |low: u8, high: u8| ((low | (high << 4)) as i8 - 32) as f32;
                let q1 = q(ql[l] & 0x0f, qh[l] & 3);
                let q2 = q(ql[l + 32] & 0x0f, (qh[l] >> 2) & 3);
                let q3 = q(ql[l] >> 4, (qh[l] >> 4) & 3);
                let q4 = q(ql[l + 32] >> 4, (qh[l] >> 6) & 3);
                let y = &mut values[128 * n..];
                y[l] = d * sc[is] as i8 as f32 * q1;
                y[l + 32] = d * sc[is + 2] as i8 as f32 * q2;
                y[l + 64] = d * sc[is + 4] as i8 as f32 * q3;
                y[l + 96] = d * sc[is + 6] as i8 as f32 * q4;
            }
        }
        out.extend_from_slice(&values);
    }
    out
}

/// A tensor's values as floats, `[rows, cols]` flattened: float types as
/// stored, quantized ones de-quantized as llama.cpp does (for tests and
/// for types MLX has no exact layout for).
pub fn tensor_values(file: &GgufFile, tensor: &GgufTensor) -> Result<Vec<f32>> {
    let bytes = file.bytes_of(tensor)?;
    Ok(match tensor.kind {
        0 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().expect("4")))
            .collect(),
        1 => bytes.chunks_exact(2).map(|c| f16_at(c, 0)).collect(),
        30 => bytes
            .chunks_exact(2)
            .map(|c| f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16))
            .collect(),
        14 => dequantize_q6_k(bytes),
        kind => {
            let (_, block_values, block_bytes) = type_info(kind).expect("checked when opened");
            let mut values =
                Vec::with_capacity(bytes.len() / block_bytes as usize * block_values as usize);
            let mut groups = Vec::with_capacity(8);
            for block in bytes.chunks_exact(block_bytes as usize) {
                groups.clear();
                affine_groups(kind, block, &mut groups);
                for (codes, scale, bias) in &groups {
                    values.extend(codes.iter().map(|&c| scale * c as f32 + bias));
                }
            }
            values
        }
    })
}

/// A quantized tensor in MLX's affine layout (`[rows, cols]` as
/// `[rows, cols * bits / 32]` codes, `[rows, cols / 32]` scales and biases)
/// and its bits, for the types that repack exactly (Q8_0, Q4_0, Q4_1,
/// Q4_K); `None` for the others.
pub fn affine_tensor(
    file: &GgufFile,
    tensor: &GgufTensor,
) -> Result<Option<(Array, Array, Array, u32)>> {
    if !matches!(tensor.kind, 2 | 3 | 8 | 12) {
        return Ok(None);
    }
    let bytes = file.bytes_of(tensor)?;
    let cols = tensor.dims[0] as usize;
    let rows = (tensor.dims.iter().product::<u64>() / tensor.dims[0]) as usize;
    let r = repack(tensor.kind, bytes, rows, cols);
    let words = (cols as u32 * r.bits / 32) as i32;
    let groups = (cols / 32) as i32;
    Ok(Some((
        Array::from_slice(&r.packed, &[rows as i32, words]),
        Array::from_slice(&r.scales, &[rows as i32, groups]),
        Array::from_slice(&r.biases, &[rows as i32, groups]),
        r.bits,
    )))
}

/// Tensors by Hugging Face name with their metadata.
pub type GgufTensors = BTreeMap<String, (TensorMeta, Array)>;

/// The model in a llama or qwen2 GGUF file as the loader reads a Hugging Face
/// folder: its `config.json` (with a `quantization` block when tensors are
/// quantized) and every tensor under its Hugging Face name (quantized ones
/// as `.weight` codes, `.scales` and `.biases`).
pub fn read_model(path: &Path) -> Result<(Value, GgufTensors)> {
    let gguf = GgufFile::open(path)?;
    let arch = gguf
        .get("general.architecture")
        .and_then(Value::as_str)
        .unwrap_or("<missing>")
        .to_owned();
    // llama.cpp permutes llama's query and key rows; qwen2 keeps
    // transformers' order and adds q/k/v biases under the same names.
    let (model_type, class, permuted) = match arch.as_str() {
        "llama" => ("llama", "LlamaForCausalLM", true),
        "qwen2" => ("qwen2", "Qwen2ForCausalLM", false),
        _ => {
            return Err(gguf.bad(format!(
                "general.architecture {arch:?}: this reader takes llama and qwen2 GGUF files so far"
            )))
        }
    };
    let key = |k: &str| format!("{arch}.{k}");
    let heads = gguf.number(&key("attention.head_count"))? as usize;
    let kv_heads = gguf
        .get(&key("attention.head_count_kv"))
        .and_then(Value::as_u64)
        .map(|n| n as usize)
        .unwrap_or(heads);
    let hidden = gguf.number(&key("embedding_length"))? as usize;
    let mut tensors = BTreeMap::new();
    let mut quantized_bits = Vec::new();
    for tensor in &gguf.tensors {
        if tensor.name == "rope_freqs.weight" {
            return Err(
                gguf.bad("rope_freqs.weight (Llama 3.1 frequency factors) is not read yet".into())
            );
        }
        let hf = llama_name(&tensor.name)
            .ok_or_else(|| gguf.bad(format!("tensor {} has no llama equivalent", tensor.name)))?;
        let cols = tensor.dims[0] as usize;
        let rows = (tensor.dims.iter().product::<u64>() / tensor.dims[0]) as usize;
        let shape: Vec<i64> = tensor.dims.iter().rev().map(|&d| d as i64).collect();
        let rotary_heads = if !permuted {
            None
        } else if hf.ends_with("q_proj.weight") {
            Some(heads)
        } else if hf.ends_with("k_proj.weight") {
            Some(kv_heads)
        } else {
            None
        };
        let order = rotary_heads
            .map(|h| unpermuted_rows(rows, h))
            .transpose()
            .map_err(|e| gguf.bad(format!("tensor {}: {e}", tensor.name)))?
            .map(|o| Array::from_slice(&o, &[rows as i32]));
        let rows_in_order = |a: Array| -> Result<Array> {
            Ok(match &order {
                Some(o) => a.take_axis(o, 0)?,
                None => a,
            })
        };
        let dims: Vec<i32> = shape.iter().map(|&d| d as i32).collect();
        match tensor.kind {
            0 | 1 | 30 | 14 => {
                let values = tensor_values(&gguf, tensor)?;
                let array = rows_in_order(Array::from_slice(&values, &dims))?;
                let meta = TensorMeta {
                    shape,
                    dtype: "F32".into(),
                };
                tensors.insert(hf, (meta, array));
            }
            _ => {
                let (packed, scales, biases, bits) = affine_tensor(&gguf, tensor)?
                    .expect("float and Q6_K tensors are handled above");
                quantized_bits.push(bits);
                let stem = hf.strip_suffix(".weight").unwrap_or(&hf).to_owned();
                let words = (cols as u32 * bits / 32) as i32;
                let groups = (cols / 32) as i32;
                let packed = rows_in_order(packed)?;
                let scales = rows_in_order(scales)?;
                let biases = rows_in_order(biases)?;
                let meta = |dtype: &str, last: i32| TensorMeta {
                    shape: vec![rows as i64, last as i64],
                    dtype: dtype.into(),
                };
                tensors.insert(format!("{stem}.weight"), (meta("U32", words), packed));
                tensors.insert(format!("{stem}.scales"), (meta("F32", groups), scales));
                tensors.insert(format!("{stem}.biases"), (meta("F32", groups), biases));
            }
        }
    }
    let vocab = gguf
        .get(&key("vocab_size"))
        .and_then(Value::as_u64)
        .or_else(|| {
            gguf.get("tokenizer.ggml.tokens")
                .and_then(Value::as_array)
                .map(|t| t.len() as u64)
        })
        .ok_or_else(|| gguf.bad("no llama.vocab_size and no tokenizer.ggml.tokens".into()))?;
    let mut config = Map::new();
    config.insert("architectures".into(), json!([class]));
    config.insert("model_type".into(), json!(model_type));
    config.insert("vocab_size".into(), json!(vocab));
    config.insert("hidden_size".into(), json!(hidden));
    config.insert(
        "intermediate_size".into(),
        json!(gguf.number(&key("feed_forward_length"))? as u64),
    );
    config.insert(
        "num_hidden_layers".into(),
        json!(gguf.number(&key("block_count"))? as u64),
    );
    config.insert("num_attention_heads".into(), json!(heads));
    config.insert("num_key_value_heads".into(), json!(kv_heads));
    config.insert(
        "max_position_embeddings".into(),
        json!(gguf.number(&key("context_length"))? as u64),
    );
    config.insert(
        "rms_norm_eps".into(),
        json!(gguf.number(&key("attention.layer_norm_rms_epsilon"))?),
    );
    config.insert(
        "rope_theta".into(),
        json!(gguf
            .get(&key("rope.freq_base"))
            .and_then(Value::as_f64)
            .unwrap_or(10000.0)),
    );
    if let Some(dims) = gguf
        .get(&key("rope.dimension_count"))
        .and_then(Value::as_u64)
    {
        if dims as usize * heads != hidden {
            config.insert("head_dim".into(), json!(dims));
        }
    }
    if let Some(kind) = gguf.get(&key("rope.scaling.type")).and_then(Value::as_str) {
        if kind != "none" {
            let factor = gguf.number(&key("rope.scaling.factor"))?;
            config.insert(
                "rope_scaling".into(),
                json!({"rope_type": kind, "factor": factor}),
            );
        }
    }
    config.insert(
        "tie_word_embeddings".into(),
        json!(!tensors.contains_key("lm_head.weight") && !tensors.contains_key("lm_head.scales")),
    );
    if let Some(&bits) = quantized_bits.iter().max() {
        config.insert(
            "quantization".into(),
            json!({"group_size": 32, "bits": bits, "mode": "affine"}),
        );
    }
    Ok((Value::Object(config), tensors))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_floats_convert_exactly() {
        assert_eq!(half_to_f32(0x3c00), 1.0);
        assert_eq!(half_to_f32(0xc000), -2.0);
        assert_eq!(half_to_f32(0x0001), 2f32.powi(-24));
        assert_eq!(half_to_f32(0x7bff), 65504.0);
        assert!(half_to_f32(0x7e00).is_nan());
    }

    #[test]
    fn unpermuting_inverts_llama_cpp_permute() {
        // 2 heads of 4 rows: GGUF (interleaved) rows 0..8 hold HF rows
        // 0, 2, 1, 3 | 4, 6, 5, 7.
        assert_eq!(unpermuted_rows(8, 2).unwrap(), [0, 2, 1, 3, 4, 6, 5, 7]);
        assert!(unpermuted_rows(6, 2).is_err());
    }

    #[test]
    fn truncated_and_foreign_files_are_refused_with_the_reason() {
        let dir = std::env::temp_dir().join(format!("zoo-gguf-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("bad.gguf");
        std::fs::write(&path, b"GGML....").unwrap();
        let e = GgufFile::open(&path).err().unwrap().to_string();
        assert!(e.contains("no GGUF magic"), "{e}");
        let mut header = b"GGUF".to_vec();
        header.extend(3u32.to_le_bytes());
        header.extend(1u64.to_le_bytes());
        header.extend(u64::MAX.to_le_bytes());
        std::fs::write(&path, &header).unwrap();
        let e = GgufFile::open(&path).err().unwrap().to_string();
        assert!(e.contains("metadata count"), "{e}");
        std::fs::remove_dir_all(&dir).ok();
    }
}
