//! The shared parity harness: runs a fixture checkpoint through mlx-zoo and
//! compares the logits with the reference recorded next to it for the same
//! input ids: Hugging Face transformers' (`make_fixtures.py`) or mlx-lm's
//! for its quantized checkpoints (`make_mlx_fixtures.py`).
//! Family crates' tests call [`assert_parity`] on their fixtures.

#![warn(missing_docs)]

pub mod hub_server;
pub mod random_model;

use mlx_rs::Array;
use mlx_zoo::loader::{self, LoadOptions, LoadedModel};
use std::path::{Path, PathBuf};

/// Largest accepted absolute difference between our logits and
/// transformers' (float32).
pub const TOLERANCE: f32 = 1e-4;

/// The directory of fixture `case`.
pub fn fixture(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join("models")
        .join(case)
}

/// The reference recorded next to a fixture.
pub struct Reference {
    /// Input ids, `[batch, seq]`, as int32.
    pub input_ids: Array,
    /// Expected logits, flattened.
    pub logits: Vec<f32>,
    /// Shape of the logits.
    pub shape: Vec<i32>,
}

/// Reads `reference.safetensors` of fixture `case`.
pub fn reference(case: &str) -> Reference {
    let path = fixture(case).join("reference.safetensors");
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let tensors = safetensors::SafeTensors::deserialize(&bytes)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let ids = tensors.tensor("input_ids").expect("input_ids");
    let ids_shape: Vec<i32> = ids.shape().iter().map(|&d| d as i32).collect();
    let ids: Vec<i32> = match ids.dtype() {
        safetensors::Dtype::I64 => ids
            .data()
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")) as i32)
            .collect(),
        safetensors::Dtype::I32 => ids
            .data()
            .chunks_exact(4)
            .map(|c| i32::from_le_bytes(c.try_into().expect("4 bytes")))
            .collect(),
        other => panic!(
            "{}: input_ids are {other:?}; expected int64 (what transformers' tensors hold) or int32",
            path.display()
        ),
    };
    let logits = tensors.tensor("logits").expect("logits");
    assert_eq!(
        logits.dtype(),
        safetensors::Dtype::F32,
        "{}: logits must be float32",
        path.display()
    );
    let shape = logits.shape().iter().map(|&d| d as i32).collect();
    let logits = logits
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
        .collect();
    Reference {
        input_ids: Array::from_slice(&ids, &ids_shape),
        logits,
        shape,
    }
}

/// Loads fixture `case` with the built-in registry.
pub fn load(case: &str) -> LoadedModel {
    let registry = mlx_zoo::registry().expect("registry");
    loader::load(&registry, &fixture(case), &LoadOptions::default())
        .unwrap_or_else(|e| panic!("loading {case}: {e}"))
}

/// Adapter settings of rank `rank` with alpha = 2 x rank (a scale of 2),
/// no dropout and plain LoRA scaling: what most tests train with.
pub fn adapter_settings(rank: usize) -> mlx_zoo::adapter::AdapterSettings {
    mlx_zoo::adapter::AdapterSettings {
        rank,
        alpha: 2.0 * rank as f32,
        dropout: 0.0,
        rslora: false,
    }
}

/// Largest absolute difference between two equally long slices.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Runs fixture `case` on its reference input in one forward pass and
/// asserts its logits are within [`TOLERANCE`] of transformers'. Returns the
/// difference.
pub fn assert_parity(case: &str) -> f32 {
    let reference = reference(case);
    let mut loaded = load(case);
    let logits = loaded
        .model
        .forward(&reference.input_ids, None)
        .unwrap_or_else(|e| panic!("{case}: forward: {e}"));
    assert_eq!(
        logits.shape(),
        reference.shape.as_slice(),
        "{case}: logits shape"
    );
    let diff = max_abs_diff(logits.as_slice::<f32>(), &reference.logits);
    assert!(
        diff < TOLERANCE,
        "{case}: max abs diff {diff} against the reference exceeds {TOLERANCE}"
    );
    eprintln!("{case}: max abs diff against the reference {diff:e}");
    diff
}

/// A copy of fixture `case` in a new temporary directory (removed when the
/// returned guard drops), for tests that break or alter a checkpoint.
pub fn copy_fixture(case: &str) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().expect("temporary directory");
    let dir = tmp.path().join(case);
    std::fs::create_dir(&dir).expect("case directory");
    for entry in std::fs::read_dir(fixture(case)).expect("fixture directory") {
        let entry = entry.expect("fixture entry");
        std::fs::copy(entry.path(), dir.join(entry.file_name())).expect("copying a fixture file");
    }
    (tmp, dir)
}

/// Tensors of a safetensors file: name -> (dtype, shape, raw bytes).
pub type RawTensors = std::collections::BTreeMap<String, (safetensors::Dtype, Vec<usize>, Vec<u8>)>;

/// Rewrites the safetensors file at `path` after `edit` changed its tensors.
pub fn rewrite_safetensors(path: &Path, edit: impl FnOnce(&mut RawTensors)) {
    let bytes = std::fs::read(path).expect("reading safetensors");
    let parsed = safetensors::SafeTensors::deserialize(&bytes).expect("parsing safetensors");
    let mut tensors: RawTensors = parsed
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, (v.dtype(), v.shape().to_vec(), v.data().to_vec())))
        .collect();
    edit(&mut tensors);
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(n, (d, s, b))| {
            let view = safetensors::tensor::TensorView::new(*d, s.clone(), b).expect("tensor view");
            (n.clone(), view)
        })
        .collect();
    safetensors::serialize_to_file(views, None, path).expect("writing safetensors");
}

/// Runs fixture `case` with a KV cache, `prefix` tokens at once and then one
/// token at a time, and asserts the logits match transformers' one-pass
/// logits within [`TOLERANCE`]. Returns the difference.
pub fn assert_cached_parity(case: &str, prefix: i32) -> f32 {
    use mlx_rs::ops::indexing::IndexOp;
    let reference = reference(case);
    let mut loaded = load(case);
    let mut cache = loaded.model.new_cache();
    let seq = reference.shape[1];
    assert!(
        prefix > 0 && prefix < seq,
        "{case}: prefix {prefix} outside 1..{seq}"
    );
    let mut steps = vec![loaded
        .model
        .forward(&reference.input_ids.index((.., ..prefix)), Some(&mut cache))
        .unwrap_or_else(|e| panic!("{case}: prefix forward: {e}"))];
    for t in prefix..seq {
        let token = reference.input_ids.index((.., t..t + 1));
        steps.push(
            loaded
                .model
                .forward(&token, Some(&mut cache))
                .unwrap_or_else(|e| panic!("{case}: step {t}: {e}")),
        );
    }
    let logits = mlx_rs::ops::concatenate(&steps, 1).expect("concatenating steps");
    assert_eq!(
        logits.shape(),
        reference.shape.as_slice(),
        "{case}: logits shape"
    );
    let diff = max_abs_diff(logits.as_slice::<f32>(), &reference.logits);
    assert!(
        diff < TOLERANCE,
        "{case}: cached decoding differs from transformers by {diff}"
    );
    eprintln!("{case}: cached decoding, max abs diff against transformers {diff:e}");
    diff
}

/// Asserts that exporting the loaded parameters of fixture `case` gives back
/// exactly the checkpoint's tensor names and bytes (as float32).
pub fn assert_export_round_trips(case: &str) {
    fn bytes(array: &Array) -> Vec<u8> {
        let array = array.as_dtype(mlx_rs::Dtype::Float32).expect("cast");
        array
            .as_slice::<f32>()
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect()
    }
    let checkpoint = mlx_zoo::checkpoint::Checkpoint::open(&fixture(case)).expect("checkpoint");
    let original: std::collections::BTreeMap<String, Vec<u8>> = checkpoint
        .tensors()
        .into_keys()
        .map(|name| {
            let array = checkpoint
                .load(&name, mlx_rs::Dtype::Float32)
                .expect("tensor");
            (name, bytes(&array))
        })
        .collect();
    let exported: std::collections::BTreeMap<String, Vec<u8>> = load(case)
        .export_weights()
        .unwrap_or_else(|e| panic!("{case}: export: {e}"))
        .iter()
        .map(|(name, array)| (name.clone(), bytes(array)))
        .collect();
    assert_eq!(
        exported.keys().collect::<Vec<_>>(),
        original.keys().collect::<Vec<_>>(),
        "{case}: exported names"
    );
    for (name, data) in &original {
        assert!(
            exported[name] == *data,
            "{case}: {name} differs after export"
        );
    }
}

/// The mapping report of fixture `case`, for snapshots.
pub fn mapping_report(case: &str) -> mlx_zoo::MappingReport {
    let registry = mlx_zoo::registry().expect("registry");
    loader::inspect(&registry, &fixture(case))
        .unwrap_or_else(|e| panic!("inspecting {case}: {e}"))
        .report
}
