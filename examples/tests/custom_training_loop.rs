//! Runs the custom training loop example on the fixture llama: its loss
//! falls and the trained adapter answers the question it was taught.

#[allow(dead_code)]
#[path = "../custom_training_loop.rs"]
mod example;

use std::path::PathBuf;

#[test]
fn the_example_teaches_the_fixture_llama_a_colour() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures");
    let outcome = example::run(
        &root.join("models/llama-gqa"),
        &root.join("tokenizer/char-128"),
        200,
    )
    .unwrap();
    assert!(
        outcome.last_loss < 0.1 * outcome.first_loss,
        "loss {} -> {}",
        outcome.first_loss,
        outcome.last_loss
    );
    assert_ne!(outcome.before.trim(), "blue");
    assert_eq!(outcome.after.trim(), "blue", "after training");
}
