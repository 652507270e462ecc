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
    with_layout(Some(serde_json::Value::String(template.to_owned())), &[])
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

/// The fixture tokenizer in a temporary directory with `config_template`
/// as tokenizer_config.json's `chat_template` (absent when `None`) and the
/// given extra files.
fn with_layout(
    config_template: Option<serde_json::Value>,
    files: &[(&str, &str)],
) -> (tempfile::TempDir, Tokenizer) {
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
    match config_template {
        Some(t) => config["chat_template"] = t,
        None => {
            config.as_object_mut().unwrap().remove("chat_template");
        }
    }
    std::fs::write(
        tmp.path().join("tokenizer_config.json"),
        serde_json::to_string(&config).unwrap(),
    )
    .unwrap();
    for (name, text) in files {
        let path = tmp.path().join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }
    let tokenizer = Tokenizer::from_dir(tmp.path()).unwrap();
    (tmp, tokenizer)
}

fn user(text: &str) -> Vec<mlx_zoo::tokenizer::ChatMessage> {
    vec![mlx_zoo::tokenizer::ChatMessage {
        role: "user".into(),
        content: text.into(),
    }]
}

/// Every layout checkpoints ship templates in, with transformers'
/// precedence: `chat_template.jinja` over `chat_template.json` over
/// tokenizer_config.json; lists of named templates (and
/// `additional_chat_templates/`) chosen by name.
#[test]
fn chat_templates_come_from_every_layout() {
    let one = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}";
    // chat_template.jinja alone (transformers 4.5x+ / 5.x writes it; the
    // config has no template): the case SmolLM2's converted GGUF hit.
    let (_dir, t) = with_layout(None, &[("chat_template.jinja", one)]);
    assert_eq!(
        t.apply_chat_template(&user("hi"), false).unwrap(),
        "<user>hi"
    );
    // The .jinja file wins over the config's string.
    let (_dir, t) = with_layout(
        Some(serde_json::json!("CONFIG")),
        &[("chat_template.jinja", "JINJA")],
    );
    assert_eq!(t.apply_chat_template(&user("x"), false).unwrap(), "JINJA");
    // chat_template.json over the config.
    let (_dir, t) = with_layout(
        Some(serde_json::json!("CONFIG")),
        &[("chat_template.json", r#"{"chat_template": "JSON"}"#)],
    );
    assert_eq!(t.apply_chat_template(&user("x"), false).unwrap(), "JSON");
    // A list of named templates: default unless another is asked for;
    // extra named templates from additional_chat_templates/.
    let (_dir, t) = with_layout(
        Some(serde_json::json!([
            {"name": "default", "template": "D"},
            {"name": "tool_use", "template": "T{{ tools is defined }}"}
        ])),
        &[("additional_chat_templates/rag.jinja", "R")],
    );
    assert_eq!(t.chat_template_names(), ["default", "rag", "tool_use"]);
    assert_eq!(t.apply_chat_template(&user("x"), false).unwrap(), "D");
    let named = |name| {
        t.apply_named_chat_template(&user("x"), false, Some(name))
            .map_err(|e| e.to_string())
    };
    assert_eq!(named("tool_use").unwrap(), "TFalse");
    assert_eq!(named("rag").unwrap(), "R");
    let missing = named("code").unwrap_err();
    assert!(
        missing.contains("no chat template named \"code\"")
            && missing.contains("default, rag, tool_use"),
        "{missing}"
    );
    // No template anywhere: the error says where it looked.
    let (_dir, t) = with_layout(None, &[]);
    let error = t
        .apply_chat_template(&user("x"), false)
        .unwrap_err()
        .to_string();
    assert!(error.contains("chat_template.jinja"), "{error}");
    // A malformed list names the file.
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/tokenizer/char-128");
    let tmp = tempfile::tempdir().unwrap();
    std::fs::copy(
        source.join("tokenizer.json"),
        tmp.path().join("tokenizer.json"),
    )
    .unwrap();
    std::fs::write(
        tmp.path().join("chat_template.json"),
        r#"{"chat_template": [{"name": "default"}]}"#,
    )
    .unwrap();
    let error = Tokenizer::from_dir(tmp.path()).unwrap_err().to_string();
    assert!(
        error.contains("chat_template.json") && error.contains("\"template\""),
        "{error}"
    );
}

/// `strftime_now` (Llama 3.1+ templates date their system prompt with it)
/// renders today's date.
#[test]
fn chat_templates_can_date_the_prompt() {
    let (_dir, t) = with_layout(
        Some(serde_json::json!("{{ strftime_now('%d %b %Y') }}")),
        &[],
    );
    let rendered = t.apply_chat_template(&user("x"), false).unwrap();
    let parts: Vec<&str> = rendered.split(' ').collect();
    assert_eq!(parts.len(), 3, "{rendered}");
    assert!(
        parts[0].len() == 2 && parts[0].parse::<u32>().is_ok(),
        "{rendered}"
    );
    assert!(
        ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]
            .contains(&parts[1]),
        "{rendered}"
    );
    assert!(parts[2].parse::<u32>().unwrap() >= 2026, "{rendered}");
}
