//! Checkpoints: a single `model.safetensors`, a sharded one described by
//! `model.safetensors.index.json`, loose `model*.safetensors` files, and,
//! when no safetensors are present, PyTorch `pytorch_model*.bin` archives
//! (with `pytorch_model.bin.index.json`; read without Python by a
//! restricted pickle reader) or NumPy `.npz` archives. Files are memory-mapped and their headers validated once; tensors
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

/// The bytes of one file (memory-mapped) or of one decompressed archive
/// entry.
enum ShardData {
    Mapped(Mmap),
    Owned(Vec<u8>),
}

impl std::ops::Deref for ShardData {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            ShardData::Mapped(map) => map,
            ShardData::Owned(bytes) => bytes,
        }
    }
}

struct Shard {
    path: PathBuf,
    map: ShardData,
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
        let torch_index = dir.join("pytorch_model.bin.index.json");
        if torch_index.is_file() {
            return Self::open_index(&torch_index);
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
            // PyTorch and NumPy archives, when no safetensors are present.
            files = std::fs::read_dir(dir)
                .map_err(|source| Error::Io {
                    path: dir.to_path_buf(),
                    source,
                })?
                .flatten()
                .map(|e| e.path())
                .filter(|p| {
                    let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
                    (name.starts_with("pytorch_model") && name.ends_with(".bin"))
                        || (name.ends_with(".npz")
                            && (name.starts_with("model") || name.starts_with("weights")))
                })
                .collect();
            files.sort();
        }
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
            checkpoint.add_file(path)?;
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
            checkpoint.add_file(&path)?;
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

    /// Adds a weights file of any supported kind, by its extension.
    fn add_file(&mut self, path: &Path) -> Result<()> {
        match path.extension().and_then(|e| e.to_str()) {
            Some("bin") | Some("pt") | Some("pth") => self.add_torch_shard(path),
            Some("npz") => self.add_npz_shard(path),
            _ => self.add_shard(path),
        }
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
            map: ShardData::Mapped(map),
        });
        Ok(())
    }

    fn insert(&mut self, name: String, location: Location, path: &Path) -> Result<()> {
        if let Some(previous) = self.tensors.insert(name.clone(), location) {
            return Err(Error::Archive {
                path: path.to_path_buf(),
                message: format!(
                    "tensor {name} is also in {}",
                    self.shards[previous.shard].path.display()
                ),
            });
        }
        Ok(())
    }

    /// Adds a PyTorch checkpoint (`torch.save` zip archive). Tensor data is
    /// read in place from the archive; the pickle is read by the restricted
    /// reader in [`crate::pickle`], which refuses anything but tensors.
    fn add_torch_shard(&mut self, path: &Path) -> Result<()> {
        let bad = |message: String| Error::Archive {
            path: path.to_path_buf(),
            message,
        };
        let file = File::open(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        // Safety: as in add_shard.
        let map = unsafe { Mmap::map(&file) }.map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let mut archive = zip::ZipArchive::new(std::io::Cursor::new(&map[..])).map_err(|e| {
            bad(format!(
                "not a PyTorch zip archive ({e}); legacy (pre-1.6) .bin files are not supported"
            ))
        })?;
        let pickle_name = archive
            .file_names()
            .find(|n| n.ends_with("data.pkl"))
            .map(str::to_owned)
            .ok_or_else(|| bad("no data.pkl in the archive".into()))?;
        let prefix = pickle_name.trim_end_matches("data.pkl").to_owned();
        if let Ok(mut entry) = archive.by_name(&format!("{prefix}byteorder")) {
            let mut order = String::new();
            std::io::Read::read_to_string(&mut entry, &mut order)
                .map_err(|e| bad(e.to_string()))?;
            if order.trim() != "little" {
                return Err(bad(format!(
                    "byte order {:?} is not supported",
                    order.trim()
                )));
            }
        }
        let pickle = read_entry(
            &mut archive
                .by_name(&pickle_name)
                .map_err(|e| bad(e.to_string()))?,
            map.len(),
        )
        .map_err(|m| bad(format!("{pickle_name}: {m}")))?;
        let tensors = crate::pickle::read_state_dict(&pickle, &path.display().to_string())?;
        let shard = self.shards.len();
        let mut locations = Vec::new();
        for (name, tensor) in tensors {
            let entry_name = format!("{prefix}data/{}", tensor.storage);
            let entry = archive
                .by_name(&entry_name)
                .map_err(|_| bad(format!("tensor {name}: storage {entry_name} is missing")))?;
            if entry.compression() != zip::CompressionMethod::Stored {
                return Err(bad(format!(
                    "tensor {name}: storage {entry_name} is compressed"
                )));
            }
            let item = crate::stored_dtype::dtype_size(&tensor.dtype).ok_or_else(|| {
                bad(format!(
                    "tensor {name}: dtype {} is not supported",
                    tensor.dtype
                ))
            })?;
            let expected = element_count(&tensor.shape).ok_or_else(|| {
                bad(format!(
                    "tensor {name}: shape {:?} is too large (a dimension past 2^31 or an element count that overflows)",
                    tensor.shape
                ))
            })?;
            let mut contiguous = vec![0; tensor.shape.len()];
            let mut step = 1usize;
            for i in (0..tensor.shape.len()).rev() {
                contiguous[i] = step;
                step = step.saturating_mul(tensor.shape[i]);
            }
            if expected > 1 && contiguous != tensor.stride {
                return Err(bad(format!(
                    "tensor {name} is a non-contiguous view (stride {:?}); save it with .contiguous()",
                    tensor.stride
                )));
            }
            let storage_start = usize::try_from(entry.data_start()).ok();
            let storage_end = storage_start
                .zip(usize::try_from(entry.size()).ok())
                .and_then(|(start, size)| start.checked_add(size));
            let span = storage_start.and_then(|base| {
                let start = base.checked_add(tensor.offset.checked_mul(item)?)?;
                Some((start, start.checked_add(expected.checked_mul(item)?)?))
            });
            let (start, end) = match (span, storage_end) {
                (Some((start, end)), Some(limit)) if end <= limit && end <= map.len() => {
                    (start, end)
                }
                _ => {
                    return Err(bad(format!(
                        "tensor {name} runs past its storage {entry_name}"
                    )))
                }
            };
            locations.push((
                name,
                Location {
                    shard,
                    start,
                    end,
                    meta: TensorMeta {
                        shape: tensor.shape.iter().map(|&d| d as i64).collect(),
                        dtype: tensor.dtype.clone(),
                    },
                },
            ));
        }
        drop(archive);
        self.shards.push(Shard {
            path: path.to_path_buf(),
            map: ShardData::Mapped(map),
        });
        for (name, location) in locations {
            self.insert(name, location, path)?;
        }
        Ok(())
    }

    /// Adds a NumPy `.npz` archive of `.npy` arrays (compressed or not).
    fn add_npz_shard(&mut self, path: &Path) -> Result<()> {
        let bad = |message: String| Error::Archive {
            path: path.to_path_buf(),
            message,
        };
        let bytes = std::fs::read(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let mut archive = zip::ZipArchive::new(std::io::Cursor::new(&bytes[..]))
            .map_err(|e| bad(format!("not an .npz archive: {e}")))?;
        for index in 0..archive.len() {
            let mut entry = archive.by_index(index).map_err(|e| bad(e.to_string()))?;
            let Some(name) = entry.name().strip_suffix(".npy").map(str::to_owned) else {
                continue;
            };
            let data =
                read_entry(&mut entry, bytes.len()).map_err(|m| bad(format!("{name}.npy: {m}")))?;
            let (header_len, dtype, shape) = crate::stored_dtype::parse_npy_header(&data)
                .map_err(|m| bad(format!("{name}.npy: {m}")))?;
            let item = crate::stored_dtype::dtype_size(&dtype).unwrap_or(1);
            let end = element_count(&shape)
                .and_then(|count| count.checked_mul(item))
                .and_then(|size| size.checked_add(header_len))
                .ok_or_else(|| bad(format!("{name}.npy: shape {shape:?} is too large")))?;
            if end > data.len() {
                return Err(bad(format!("{name}.npy is truncated")));
            }
            let shard = self.shards.len();
            self.shards.push(Shard {
                path: path.to_path_buf(),
                map: ShardData::Owned(data),
            });
            let location = Location {
                shard,
                start: header_len,
                end,
                meta: TensorMeta {
                    shape: shape.iter().map(|&d| d as i64).collect(),
                    dtype,
                },
            };
            self.insert(name, location, path)?;
        }
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
        self.read(name, &["U32", "U8", "I32", "F32", "F16", "BF16"])
    }

    /// Whether `name` is stored as F64 (NumPy's default), which MLX's CPU
    /// backend reads but `load` converts through.
    fn is_f64(&self, name: &str) -> bool {
        self.tensors
            .get(name)
            .is_some_and(|l| l.meta.dtype == "F64")
    }

    /// Loads a floating-point tensor `name` into MLX, cast to `dtype`.
    pub fn load(&self, name: &str, dtype: Dtype) -> Result<Array> {
        let accepted: &[&str] = if self.is_f64(name) {
            &["F64"]
        } else {
            &["F32", "F16", "BF16"]
        };
        let array = self.read(name, accepted)?;
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
        let dtype = crate::stored_dtype::StoredDtype::parse(stored)
            .map_or(Dtype::Uint8, crate::stored_dtype::StoredDtype::mlx);
        if !accepted.contains(&stored) {
            return Err(Error::UnsupportedDtype {
                path: shard.path.clone(),
                tensor: name.to_owned(),
                dtype: stored.to_owned(),
                expected: accepted.join(", "),
            });
        }
        let bytes = shard.map.get(location.start..location.end);
        let shape: Option<Vec<i32>> = location
            .meta
            .shape
            .iter()
            .map(|&d| i32::try_from(d).ok())
            .collect();
        let wanted = shape.as_ref().and_then(|shape| {
            let dims: Vec<usize> = shape.iter().map(|&d| d as usize).collect();
            element_count(&dims)?.checked_mul(crate::stored_dtype::dtype_size(stored)?)
        });
        let (Some(bytes), Some(shape)) = (bytes, shape) else {
            return Err(Error::Mapping(format!(
                "{}: tensor {name} (shape {:?}) lies outside the file",
                shard.path.display(),
                location.meta.shape
            )));
        };
        if wanted != Some(bytes.len()) {
            return Err(Error::Mapping(format!(
                "{}: tensor {name} has {} bytes for shape {:?} of {stored}",
                shard.path.display(),
                bytes.len(),
                location.meta.shape
            )));
        }
        // Safety: `bytes` holds exactly product(shape) elements of `dtype`
        // (verified just above), and MLX copies them before this borrow
        // ends.
        Ok(unsafe { Array::from_raw_data(bytes.as_ptr().cast(), &shape, dtype) })
    }
}

/// The number of elements of `shape`, when every dimension fits MLX's
/// 32-bit dimensions and the product does not overflow.
fn element_count(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |count, &d| {
        if d > i32::MAX as usize {
            None
        } else {
            count.checked_mul(d)
        }
    })
}

/// Reads a zip entry whole, trusting neither its declared size (zip64
/// sizes of 2^62 were pre-allocated) nor its compression (a deflate bomb):
/// at most the declared size is read, and never more than deflate's
/// largest ratio (1032:1) allows for an archive of `archive_len` bytes.
fn read_entry(
    entry: &mut zip::read::ZipFile<'_, impl std::io::Read>,
    archive_len: usize,
) -> std::result::Result<Vec<u8>, String> {
    let declared = usize::try_from(entry.size()).unwrap_or(usize::MAX);
    let limit = archive_len.saturating_mul(1032).saturating_add(1 << 20);
    if declared > limit {
        return Err(format!(
            "declares {declared} bytes, more than an archive of {archive_len} bytes can hold"
        ));
    }
    let mut data = Vec::with_capacity(declared.min(archive_len));
    std::io::Read::read_to_end(
        &mut std::io::Read::take(entry, declared as u64 + 1),
        &mut data,
    )
    .map_err(|e| e.to_string())?;
    if data.len() != declared {
        return Err(format!(
            "holds {} bytes where the archive declares {declared}",
            data.len()
        ));
    }
    Ok(data)
}
