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
