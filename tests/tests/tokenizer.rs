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

/// The fixture tokenizer with `template` as its chat template, in a
/// temporary directory.
fn with_template(template: &str) -> (tempfile::TempDir, Tokenizer) {
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/tokenizer/char-128");
    let tmp = tempfile::tempdir().unwrap();
    std::fs::copy(
        source.join("tokenizer.json"),
        tmp.path().join("tokenizer.json"),
    )
    .unwrap();
    let mut config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(source.join("tokenizer_config.json")).unwrap(),
    )
    .unwrap();
    config["chat_template"] = serde_json::Value::String(template.to_owned());
    std::fs::write(
        tmp.path().join("tokenizer_config.json"),
        serde_json::to_string(&config).unwrap(),
    )
    .unwrap();
    let tokenizer = Tokenizer::from_dir(tmp.path()).unwrap();
    (tmp, tokenizer)
}

/// Hostile templates stop with an error naming the tokenizer folder within
/// a few seconds instead of running forever or filling memory.
#[test]
fn runaway_chat_templates_stop_with_a_clear_error() {
    let messages = vec![mlx_zoo::tokenizer::ChatMessage {
        role: "user".into(),
        content: "hi".into(),
    }];
    for (template, expected) in [
        (
            "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
            "instructions",
        ),
        (
            "{% for i in range(1000) %}{{ 'x' * 100000000 }}{% endfor %}",
            "exceeds 64 MiB",
        ),
        (
            "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
            "chat template",
        ),
    ] {
        let (tmp, tokenizer) = with_template(template);
        let started = std::time::Instant::now();
        let err = tokenizer
            .apply_chat_template(&messages, true)
            .unwrap_err()
            .to_string();
        let seconds = started.elapsed().as_secs_f32();
        assert!(err.contains(expected), "{template}: {err}");
        assert!(
            err.contains(&tmp.path().display().to_string()),
            "{template}: the error names the folder: {err}"
        );
        assert!(seconds < 5.0, "{template}: took {seconds} s");
    }
}
