//! Weights in PyTorch `.bin` archives (single and sharded, read without
//! Python by a restricted pickle reader) and NumPy `.npz` archives give the
//! reference logits; a pickle that reaches for anything but tensors is
//! refused without running it.

use mlx_zoo_tests::{assert_parity, fixture};

#[test]
fn pytorch_bin_with_half_precision_tensors_matches_pytorch() {
    assert_parity("llama-gqa-bin");
}

#[test]
fn sharded_pytorch_bin_matches_transformers() {
    assert_parity("llama-gqa-sharded-bin");
}

#[test]
fn compressed_npz_matches_transformers() {
    assert_parity("llama-gqa-npz");
}

#[test]
fn a_pickle_calling_other_code_is_refused() {
    let registry = mlx_zoo::registry().unwrap();
    let err = mlx_zoo::loader::load(
        &registry,
        &fixture("llama-gqa-evil-bin"),
        &Default::default(),
    )
    .expect_err("the evil checkpoint must not load")
    .to_string();
    assert!(
        err.contains("pytorch_model.bin") && err.contains("refusing global"),
        "{err}"
    );
}

/// The llama-gqa fixture with its weights replaced by a `model.npz` holding
/// one `.npy` entry (`name`, raw bytes), stored or deflated.
fn npz_checkpoint(npy: &[u8], deflated: bool) -> (tempfile::TempDir, std::path::PathBuf) {
    let (tmp, dir) = mlx_zoo_tests::copy_fixture("llama-gqa");
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    let file = std::fs::File::create(dir.join("model.npz")).unwrap();
    let mut zip = zip::ZipWriter::new(file);
    let method = if deflated {
        zip::CompressionMethod::Deflated
    } else {
        zip::CompressionMethod::Stored
    };
    let options = zip::write::SimpleFileOptions::default().compression_method(method);
    zip.start_file("model.norm.weight.npy", options).unwrap();
    std::io::Write::write_all(&mut zip, npy).unwrap();
    zip.finish().unwrap();
    (tmp, dir)
}

/// A version-1 `.npy` of float32 with `shape` (a Python tuple) and `data`.
fn npy(shape: &str, data: &[u8]) -> Vec<u8> {
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape}, }}");
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    out
}

fn load_error(dir: &std::path::Path) -> String {
    let registry = mlx_zoo::registry().unwrap();
    match mlx_zoo::loader::load(&registry, dir, &Default::default()) {
        Ok(_) => panic!("{} loaded although it is broken", dir.display()),
        Err(e) => e.to_string(),
    }
}

/// A shape whose element count overflows (it wrapped past the length check
/// and an unsafe read over-read memory) or has a dimension past MLX's
/// 32-bit dimensions is refused, naming the array.
#[test]
fn npy_shapes_that_overflow_are_refused() {
    for shape in [
        "(4294967296, 4294967297)",
        "(18446744073709551615,)",
        "(3000000000,)",
    ] {
        let (_tmp, dir) = npz_checkpoint(&npy(shape, &[0; 64]), false);
        let err = load_error(&dir);
        assert!(
            err.contains("model.npz")
                && err.contains("model.norm.weight.npy")
                && err.contains("too large"),
            "{shape}: {err}"
        );
    }
    let (_tmp, dir) = npz_checkpoint(&npy("(64,)", &[0; 64]), true);
    let err = load_error(&dir);
    assert!(err.contains("model.norm.weight.npy is truncated"), "{err}");
}

/// A deflated entry is read no further than its declared size, and a
/// declared size no archive of this length can hold is refused before
/// anything is allocated.
#[test]
fn npz_entries_are_read_within_their_declared_size() {
    let (_tmp, dir) = npz_checkpoint(&npy("(64,)", &[0; 256]), true);
    // Patch the declared uncompressed size (central directory and local
    // header) to 2^31 - 1 bytes.
    let path = dir.join("model.npz");
    let mut bytes = std::fs::read(&path).unwrap();
    let data_len = (npy("(64,)", &[0; 256]).len() as u32).to_le_bytes();
    let huge = (i32::MAX as u32).to_le_bytes();
    let mut patched = 0;
    for at in 0..bytes.len() - 4 {
        if bytes[at..at + 4] == data_len {
            bytes[at..at + 4].copy_from_slice(&huge);
            patched += 1;
        }
    }
    assert!(patched >= 2, "found the size fields");
    std::fs::write(&path, &bytes).unwrap();
    let err = load_error(&dir);
    assert!(err.contains("model.npz"), "{err}");
    assert!(
        err.contains("more than an archive") || err.contains("where the archive declares"),
        "{err}"
    );
}
