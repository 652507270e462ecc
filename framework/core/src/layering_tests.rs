//! The core's modules sit in layers, and a module may use only its own
//! layer and the ones below: the file formats know nothing of models, and
//! models nothing of loading or exporting. The test reads the sources for
//! `crate::<module>` references (the import cycle checkpoint -> export ->
//! loader -> checkpoint was one such upward reference).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Layer of each top-level module, lowest first.
const LAYERS: &[&[&str]] = &[
    // Plain data and files: no MLX model in sight.
    &[
        "error",
        "mlx_error",
        "atomic",
        "stored_dtype",
        "pickle",
        "config",
        "module_pattern",
        "mapping",
    ],
    // Checkpoint readers.
    &["checkpoint", "prequantized", "gguf", "gguf_tokenizer"],
    // Models and what runs them.
    &[
        "nn",
        "model",
        "adapter",
        "quantize",
        "cache",
        "runtime",
        "generate",
        "architecture",
        "registry",
        "tokenizer",
    ],
    // Loading a checkpoint into a model, and writing one out.
    &["loader", "export"],
];

/// `module -> modules it references`, from every file under `src`.
fn references() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut found: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut stack = vec![src.clone()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let relative = path.strip_prefix(&src).unwrap();
            let first = relative.components().next().unwrap();
            let module = first
                .as_os_str()
                .to_string_lossy()
                .trim_end_matches(".rs")
                .to_string();
            if module == "lib" || module == "layering_tests" {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            let refs = found.entry(module.clone()).or_default();
            for (at, _) in text.match_indices("crate::") {
                let rest = &text[at + "crate::".len()..];
                if let Some(group) = rest.strip_prefix('{') {
                    // `crate::{a::X, b}`: the first name of each item.
                    let end = group.find('}').unwrap_or(group.len());
                    for item in group[..end].split(',') {
                        let name: String = item
                            .trim()
                            .chars()
                            .take_while(|c| c.is_alphanumeric() || *c == '_')
                            .collect();
                        if !name.is_empty() && name != module {
                            refs.insert(name);
                        }
                    }
                } else {
                    let name: String = rest
                        .chars()
                        .take_while(|c| c.is_alphanumeric() || *c == '_')
                        .collect();
                    if !name.is_empty() && name != module {
                        refs.insert(name);
                    }
                }
            }
        }
    }
    found
}

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|layer| layer.contains(&module))
}

#[test]
fn modules_use_only_their_layer_and_below() {
    let references = references();
    let mut upward = Vec::new();
    for (module, refs) in &references {
        let Some(own) = layer_of(module) else {
            panic!("module {module} has no layer in LAYERS: add it");
        };
        for target in refs {
            // Items of lib.rs (macros, re-exports) are not modules.
            if let Some(layer) = layer_of(target) {
                if layer > own {
                    upward.push(format!(
                        "{module} (layer {own}) -> {target} (layer {layer})"
                    ));
                }
            }
        }
    }
    assert!(upward.is_empty(), "upward references: {upward:#?}");
}

#[test]
fn the_file_layers_have_no_cycles() {
    let references = references();
    let lower: BTreeSet<&str> = LAYERS[..2].iter().flat_map(|l| l.iter().copied()).collect();
    // Depth-first search for a back edge among the two lowest layers.
    fn visit<'a>(
        module: &'a str,
        references: &'a BTreeMap<String, BTreeSet<String>>,
        lower: &BTreeSet<&str>,
        path: &mut Vec<&'a str>,
        done: &mut BTreeSet<&'a str>,
    ) {
        if done.contains(module) {
            return;
        }
        assert!(
            !path.contains(&module),
            "import cycle: {path:?} -> {module}"
        );
        path.push(module);
        if let Some(refs) = references.get(module) {
            for target in refs {
                if lower.contains(target.as_str()) {
                    visit(target, references, lower, path, done);
                }
            }
        }
        path.pop();
        done.insert(module);
    }
    let mut done = BTreeSet::new();
    for module in &lower {
        visit(module, &references, &lower, &mut Vec::new(), &mut done);
    }
}
