//! The tokenizer wrapper on the fixture tokenizer (make_tokenizer_fixture.py,
//! written with Hugging Face `tokenizers`): the ids Python computed, the
//! round trip, and the special tokens from tokenizer_config.json.

use mlx_zoo::tokenizer::Tokenizer;
use std::path::Path;

fn tokenizer() -> Tokenizer {
    Tokenizer::from_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/tokenizer/char-128"))
        .unwrap()
}

#[test]
fn encodes_like_the_python_library_and_round_trips() {
    let t = tokenizer();
    // make_tokenizer_fixture.py prints these ids for "Hello, zoo!".
    assert_eq!(
        t.encode("Hello, zoo!", false).unwrap(),
        [43, 72, 79, 79, 82, 15, 3, 93, 82, 82, 4]
    );
    assert_eq!(t.encode("Hi", true).unwrap(), [1, 43, 76]);
    assert_eq!(t.decode(&[1, 43, 76, 2]).unwrap(), "Hi");
    assert_eq!(t.eos_ids(), [2]);
}

#[test]
fn a_directory_without_a_tokenizer_says_so() {
    let err = Tokenizer::from_dir(Path::new("/nonexistent"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("no tokenizer.json"), "{err}");
}

#[test]
fn chat_template_renders_like_transformers() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/tokenizer/char-128");
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("chat_expected.json")).unwrap())
            .unwrap();
    let messages: Vec<mlx_zoo::tokenizer::ChatMessage> =
        serde_json::from_value(expected["messages"].clone()).unwrap();
    let rendered = tokenizer().apply_chat_template(&messages, true).unwrap();
    assert_eq!(rendered, expected["rendered"].as_str().unwrap());
    let odd = vec![mlx_zoo::tokenizer::ChatMessage {
        role: "robot".into(),
        content: "beep".into(),
    }];
    let err = tokenizer()
        .apply_chat_template(&odd, true)
        .unwrap_err()
        .to_string();
    assert!(err.contains("unknown role robot"), "{err}");
}
