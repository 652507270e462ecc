//! Writing a loaded model as an MLX-format model directory, the layout
//! mlx-lm reads: `config.json` (the source config plus a `quantization` block
//! when layers are quantized), the weights under the checkpoint's own names
//! (quantized layers as packed `weight` + `scales` + `biases`) in
//! `model.safetensors`, or in shards with `model.safetensors.index.json`
//! above a size limit, and the tokenizer files copied over. Every file is
//! written to a temporary name and renamed into place.

use crate::error::{Error, MlxContext, Result};
use crate::loader::{ComputeDtype, LoadedModel};
use mlx_rs::{Array, Dtype};
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// Tokenizer and generation files copied next to the weights.
const SIDE_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "generation_config.json",
    "chat_template.jinja",
];

/// How to write.
#[derive(Debug, Clone)]
pub struct SaveOptions {
    /// Cast float tensors to this dtype (packed weights stay `uint32`).
    pub dtype: Option<ComputeDtype>,
    /// Start a new shard once a shard would exceed this many bytes.
    pub max_shard_bytes: u64,
    /// The safetensors `format` metadata: `mlx` for MLX-format models, `pt`
    /// for a Hugging Face-format export.
    pub metadata_format: &'static str,
}

impl Default for SaveOptions {
    fn default() -> Self {
        Self {
            dtype: None,
            max_shard_bytes: 5 << 30,
            metadata_format: "mlx",
        }
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes `bytes` to `path` whole or not at all.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    crate::atomic::write_bytes(path, bytes).map_err(io(path))
}

/// Saves `tensors` as a safetensors file at `path`, whole or not at all.
pub fn save_safetensors_atomically<'a>(
    tensors: impl IntoIterator<Item = (&'a String, &'a Array)>,
    metadata: &HashMap<String, String>,
    path: &Path,
) -> Result<()> {
    crate::atomic::write_with(path, |temp| {
        Array::save_safetensors(tensors, metadata, temp)
    })
    .map_err(|e| Error::Io {
        path: path.to_path_buf(),
        source: std::io::Error::other(e.to_string()),
    })
}

fn tensor_bytes(array: &Array) -> u64 {
    array.size() as u64 * array.item_size() as u64
}

/// Writes `model` (loaded from `source_dir`) to `out_dir` in MLX format and
/// returns the files written.
pub fn save_mlx_model(
    model: &LoadedModel,
    source_dir: &Path,
    out_dir: &Path,
    options: &SaveOptions,
) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(out_dir).map_err(io(out_dir))?;
    let mut weights = model.export_weights()?;
    if let Some(dtype) = options.dtype {
        for (name, array) in weights.iter_mut() {
            if array.dtype() != Dtype::Uint32 && array.dtype() != dtype.dtype() {
                *array = array
                    .as_dtype(dtype.dtype())
                    .context(|| format!("casting {name}"))?;
            }
        }
    }
    let values: Vec<Array> = weights.values().cloned().collect();
    mlx_rs::transforms::eval(&values).context(|| "computing the exported weights".into())?;

    // Shards, in name order.
    let mut shards: Vec<BTreeMap<String, Array>> = vec![BTreeMap::new()];
    let mut current = 0u64;
    for (name, array) in weights {
        let size = tensor_bytes(&array);
        if current > 0 && current + size > options.max_shard_bytes {
            shards.push(BTreeMap::new());
            current = 0;
        }
        current += size;
        shards
            .last_mut()
            .expect("one shard at least")
            .insert(name, array);
    }
    let count = shards.len();
    let mut written = Vec::new();
    let mut weight_map = serde_json::Map::new();
    let mut total = 0u64;
    let metadata: HashMap<String, String> =
        [("format".to_owned(), options.metadata_format.to_owned())].into();
    for (index, shard) in shards.iter().enumerate() {
        let name = if count == 1 {
            "model.safetensors".to_owned()
        } else {
            format!("model-{:05}-of-{count:05}.safetensors", index + 1)
        };
        let path = out_dir.join(&name);
        save_safetensors_atomically(shard.iter(), &metadata, &path)?;
        for (tensor, array) in shard {
            weight_map.insert(tensor.clone(), json!(name));
            total += tensor_bytes(array);
        }
        written.push(path);
    }
    if count > 1 {
        let index = json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        let path = out_dir.join(crate::checkpoint::INDEX_FILE);
        write_atomic(
            &path,
            serde_json::to_string_pretty(&index)
                .unwrap_or_default()
                .as_bytes(),
        )?;
        written.push(path);
    }

    let mut config = model.source_config.clone();
    config.remove("quantization");
    config.remove("quantization_config");
    if let Some(block) = model.quantization.to_config_block() {
        config.insert("quantization".into(), block.clone());
        config.insert("quantization_config".into(), block);
    }
    let config_path = out_dir.join("config.json");
    write_atomic(
        &config_path,
        serde_json::to_string_pretty(&Value::Object(config))
            .unwrap_or_default()
            .as_bytes(),
    )?;
    written.push(config_path);

    for file in SIDE_FILES {
        let source = source_dir.join(file);
        if source.is_file() && source_dir != out_dir {
            let target = out_dir.join(file);
            let bytes = std::fs::read(&source).map_err(io(&source))?;
            write_atomic(&target, &bytes)?;
            written.push(target);
        }
    }
    Ok(written)
}

pub use crate::stored_dtype::{dtype_size, parse_npy_header};
