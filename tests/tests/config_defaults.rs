//! Every family's config fills absent keys with the values transformers
//! uses. `tests/fixtures/config-defaults.json` holds each transformers config
//! class's defaults (written by make_fixtures.py); a config holding only
//! `model_type` must parse, through the registry, to the same values.

use mlx_zoo::HfConfig;
use serde_json::Value;

/// Keys whose stored default differs from ours for a documented reason.
const EXPECTED_DIFFERENCES: &[(&str, &str)] = &[
    // transformers' Qwen2Config sets `sliding_window = None` whenever
    // `use_sliding_window` is false; we keep the window value and apply it
    // only when `use_sliding_window` is true, which is the same behaviour.
    ("qwen2", "sliding_window"),
    // transformers materialises `layer_types` from use_sliding_window and
    // max_window_layers; we derive the same per-layer windows on demand.
    ("qwen2", "layer_types"),
];

fn same(ours: &Value, theirs: &Value) -> bool {
    match (ours.as_f64(), theirs.as_f64()) {
        (Some(a), Some(b)) => (a - b).abs() <= 1e-6 * b.abs().max(1e-12),
        _ => ours == theirs,
    }
}

#[test]
fn absent_keys_default_like_transformers() {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/config-defaults.json");
    let all: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let registry = mlx_zoo::registry().unwrap();
    let mut compared = 0;
    for (model_type, defaults) in all.as_object().unwrap() {
        let theirs = HfConfig::from_value(defaults.clone()).unwrap().normalized();
        let minimal =
            HfConfig::from_value(serde_json::json!({ "model_type": model_type })).unwrap();
        let resolution = registry.resolve(&minimal).unwrap();
        let ours = resolution.prepare(&minimal).unwrap().config;
        for (key, value) in ours.as_object().unwrap() {
            let Some(expected) = theirs.get(key) else {
                continue;
            };
            if expected.is_null() && !value.is_null() {
                // transformers derives it later (e.g. head_dim); ours is resolved.
                continue;
            }
            if EXPECTED_DIFFERENCES.contains(&(model_type.as_str(), key.as_str())) {
                continue;
            }
            assert!(
                same(value, expected),
                "{model_type}: `{key}` defaults to {value} here but {expected} in transformers"
            );
            compared += 1;
        }
    }
    assert!(compared > 60, "only {compared} keys compared");
}
