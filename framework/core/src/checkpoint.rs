//! Safetensors checkpoints: a single `model.safetensors`, a sharded one
//! described by `model.safetensors.index.json`, or loose `model*.safetensors`
//! files. Files are memory-mapped and their headers validated once; tensors
//! are then copied straight from the map into MLX and cast to the compute
//! dtype, so no file is read twice.

use crate::error::{Error, MlxContext, Result};
use crate::mapping::TensorMeta;
use memmap2::Mmap;
use mlx_rs::{Array, Dtype};
use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::path::{Path, PathBuf};

/// The index file of a sharded checkpoint.
pub const INDEX_FILE: &str = "model.safetensors.index.json";
/// The single-file checkpoint.
pub const SINGLE_FILE: &str = "model.safetensors";

struct Shard {
    path: PathBuf,
    map: Mmap,
}

#[derive(Debug, Clone)]
struct Location {
    shard: usize,
    start: usize,
    end: usize,
    meta: TensorMeta,
}

/// An opened checkpoint.
pub struct Checkpoint {
    shards: Vec<Shard>,
    tensors: BTreeMap<String, Location>,
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint")
            .field("files", &self.files())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl Checkpoint {
    /// Opens the weights in `dir`.
    pub fn open(dir: &Path) -> Result<Self> {
        let index = dir.join(INDEX_FILE);
        if index.is_file() {
            return Self::open_index(&index);
        }
        let single = dir.join(SINGLE_FILE);
        if single.is_file() {
            return Self::open_files(&[single]);
        }
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|source| Error::Io {
                path: dir.to_path_buf(),
                source,
            })?
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
                name.ends_with(".safetensors")
                    && (name.starts_with("model") || name.starts_with("consolidated"))
            })
            .collect();
        files.sort();
        if files.is_empty() {
            return Err(Error::NoWeights {
                dir: dir.to_path_buf(),
            });
        }
        Self::open_files(&files)
    }

    /// Opens the given safetensors files as one checkpoint. A tensor present
    /// in two files is an error.
    pub fn open_files(files: &[PathBuf]) -> Result<Self> {
        let mut checkpoint = Self {
            shards: Vec::new(),
            tensors: BTreeMap::new(),
        };
        for path in files {
            checkpoint.add_shard(path)?;
        }
        Ok(checkpoint)
    }

    fn open_index(index: &Path) -> Result<Self> {
        let dir = index.parent().unwrap_or(Path::new("."));
        let text = std::fs::read_to_string(index).map_err(|source| Error::Io {
            path: index.to_path_buf(),
            source,
        })?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|source| Error::Json {
                path: index.to_path_buf(),
                source,
            })?;
        let bad = |message: String| Error::ShardIndex {
            path: index.to_path_buf(),
            message,
        };
        let weight_map = json
            .get("weight_map")
            .and_then(|w| w.as_object())
            .ok_or_else(|| {
                bad("expected an object `weight_map` of tensor name -> shard file".into())
            })?;
        let mut wanted: BTreeMap<String, String> = BTreeMap::new();
        for (tensor, shard) in weight_map {
            let shard = shard
                .as_str()
                .ok_or_else(|| bad(format!("weight_map[{tensor:?}] is not a file name")))?;
            if shard.contains('/') || shard.contains("..") {
                return Err(bad(format!(
                    "weight_map[{tensor:?}] = {shard:?} is not a plain file name"
                )));
            }
            wanted.insert(tensor.clone(), shard.to_owned());
        }
        let shard_names: BTreeSet<&String> = wanted.values().collect();
        let mut checkpoint = Self {
            shards: Vec::new(),
            tensors: BTreeMap::new(),
        };
        for name in &shard_names {
            let path = dir.join(name.as_str());
            if !path.is_file() {
                let users = wanted.values().filter(|s| s == name).count();
                return Err(bad(format!(
                    "points to shard {name} ({users} tensors), which does not exist in {}",
                    dir.display()
                )));
            }
            checkpoint.add_shard(&path)?;
        }
        for (tensor, shard) in &wanted {
            match checkpoint.tensors.get(tensor) {
                None => {
                    return Err(bad(format!(
                        "lists tensor {tensor} in {shard}, which does not contain it"
                    )))
                }
                Some(location) => {
                    let actual = &checkpoint.shards[location.shard].path;
                    if actual.file_name().and_then(|n| n.to_str()) != Some(shard.as_str()) {
                        return Err(bad(format!(
                            "lists tensor {tensor} in {shard}, but it is in {}",
                            actual.display()
                        )));
                    }
                }
            }
        }
        if let Some(extra) = checkpoint.tensors.keys().find(|t| !wanted.contains_key(*t)) {
            let shard = &checkpoint.shards[checkpoint.tensors[extra].shard].path;
            return Err(bad(format!(
                "does not list tensor {extra}, which {} contains",
                shard.display()
            )));
        }
        Ok(checkpoint)
    }

    fn add_shard(&mut self, path: &Path) -> Result<()> {
        let file = File::open(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        // Safety: the map is read-only and lives as long as the checkpoint;
        // a file truncated underneath us is the caller's race.
        let map = unsafe { Mmap::map(&file) }.map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let invalid = |message: String| Error::Safetensors {
            path: path.to_path_buf(),
            message,
        };
        let parsed =
            safetensors::SafeTensors::deserialize(&map).map_err(|e| invalid(e.to_string()))?;
        let shard = self.shards.len();
        let base = map.as_ptr() as usize;
        for (name, view) in parsed.tensors() {
            let start = view.data().as_ptr() as usize - base;
            let location = Location {
                shard,
                start,
                end: start + view.data().len(),
                meta: TensorMeta {
                    shape: view.shape().iter().map(|&d| d as i64).collect(),
                    dtype: format!("{:?}", view.dtype()),
                },
            };
            if let Some(previous) = self.tensors.insert(name.clone(), location) {
                return Err(invalid(format!(
                    "tensor {name} is also in {}",
                    self.shards[previous.shard].path.display()
                )));
            }
        }
        drop(parsed);
        self.shards.push(Shard {
            path: path.to_path_buf(),
            map,
        });
        Ok(())
    }

    /// The files making up the checkpoint.
    pub fn files(&self) -> Vec<PathBuf> {
        self.shards.iter().map(|s| s.path.clone()).collect()
    }

    /// Every tensor's name, shape and dtype.
    pub fn tensors(&self) -> BTreeMap<String, TensorMeta> {
        self.tensors
            .iter()
            .map(|(name, loc)| (name.clone(), loc.meta.clone()))
            .collect()
    }

    /// Loads `name` into MLX in its stored dtype (packed quantized weights
    /// are `U32`, GPTQ/AWQ ones `I32`).
    pub fn load_raw(&self, name: &str) -> Result<Array> {
        self.read(name, &["U32", "I32", "F32", "F16", "BF16"])
    }

    /// Loads a floating-point tensor `name` into MLX, cast to `dtype`.
    pub fn load(&self, name: &str, dtype: Dtype) -> Result<Array> {
        let array = self.read(name, &["F32", "F16", "BF16"])?;
        if array.dtype() == dtype {
            Ok(array)
        } else {
            array
                .as_dtype(dtype)
                .context(|| format!("casting {name} to {dtype:?}"))
        }
    }

    /// Copies tensor `name` out of its file, refusing dtypes not in
    /// `accepted`.
    fn read(&self, name: &str, accepted: &[&str]) -> Result<Array> {
        let location = self
            .tensors
            .get(name)
            .ok_or_else(|| Error::Mapping(format!("tensor {name} is not in the checkpoint")))?;
        let shard = &self.shards[location.shard];
        let stored = location.meta.dtype.as_str();
        let dtype = match stored {
            "U32" => Dtype::Uint32,
            "I32" => Dtype::Int32,
            "F32" => Dtype::Float32,
            "F16" => Dtype::Float16,
            "BF16" => Dtype::Bfloat16,
            _ => Dtype::Uint8,
        };
        if !accepted.contains(&stored) {
            return Err(Error::UnsupportedDtype {
                path: shard.path.clone(),
                tensor: name.to_owned(),
                dtype: stored.to_owned(),
                expected: accepted.join(", "),
            });
        }
        let bytes = &shard.map[location.start..location.end];
        let shape: Vec<i32> = location.meta.shape.iter().map(|&d| d as i32).collect();
        // Safety: `bytes` holds exactly product(shape) elements of `dtype`
        // (checked by safetensors when the file was opened), and MLX copies
        // them before this borrow ends.
        Ok(unsafe { Array::from_raw_data(bytes.as_ptr().cast(), &shape, dtype) })
    }
}
