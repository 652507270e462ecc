//! Structure-aware fuzzing of every reader, on stable Rust with proptest:
//! each harness takes a valid file from the fixtures, applies a few
//! mutations (flipped or overwritten bytes, biased towards headers;
//! truncation; inserted bytes; numbers in text replaced by extreme ones;
//! nesting deepened) and runs the reader, which must return `Ok` or a typed
//! error and never panic. A bounded run is part of `cargo test`
//! (`ZOO_FUZZ_CASES` per harness, default 48); `scripts/fuzz PARSER
//! MINUTES` runs long campaigns, and proptest keeps any failing input under
//! `tests/proptest-regressions/` so that it is replayed first from then on.

use mlx_zoo::loader::{self, LoadOptions};
use mlx_zoo_tests::{copy_fixture, fixture};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};

/// One edit of a file.
#[derive(Debug, Clone)]
enum Mutation {
    /// XOR a byte at a position (taken modulo the length, or modulo the
    /// first 4 KiB when `header` is set).
    Flip { at: usize, mask: u8, header: bool },
    /// Overwrite with 0x00, 0xFF, 0x7F or 0x80.
    Set { at: usize, value: u8, header: bool },
    /// Cut the file at a position.
    Truncate { at: usize },
    /// Insert bytes.
    Insert { at: usize, bytes: Vec<u8> },
    /// Replace the n-th run of ASCII digits with an extreme number.
    Number { nth: usize, value: &'static str },
    /// Repeat a slice (deepens nesting in JSON and pickles).
    Repeat { at: usize, len: usize, times: usize },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 1u8.., any::<bool>()).prop_map(|(at, mask, header)| Mutation::Flip {
            at,
            mask,
            header
        }),
        (
            any::<usize>(),
            prop::sample::select(vec![0u8, 0xFF, 0x7F, 0x80]),
            any::<bool>()
        )
            .prop_map(|(at, value, header)| Mutation::Set { at, value, header }),
        any::<usize>().prop_map(|at| Mutation::Truncate { at }),
        (any::<usize>(), prop::collection::vec(any::<u8>(), 1..16))
            .prop_map(|(at, bytes)| Mutation::Insert { at, bytes }),
        (
            0usize..64,
            prop::sample::select(vec![
                "0",
                "-1",
                "4294967296",
                "18446744073709551615",
                "99999999999999999999999",
                "1e308",
                "2147483648"
            ])
        )
            .prop_map(|(nth, value)| Mutation::Number { nth, value }),
        (any::<usize>(), 1usize..8, 2usize..64).prop_map(|(at, len, times)| Mutation::Repeat {
            at,
            len,
            times
        }),
    ]
}

fn apply(seed: &[u8], mutations: &[Mutation]) -> Vec<u8> {
    let mut data = seed.to_vec();
    for m in mutations {
        if data.is_empty() {
            break;
        }
        let place = |at: usize, header: bool, len: usize| {
            if header {
                at % len.min(4096)
            } else {
                at % len
            }
        };
        match m {
            Mutation::Flip { at, mask, header } => {
                let i = place(*at, *header, data.len());
                data[i] ^= mask;
            }
            Mutation::Set { at, value, header } => {
                let i = place(*at, *header, data.len());
                data[i] = *value;
            }
            Mutation::Truncate { at } => data.truncate(at % data.len()),
            Mutation::Insert { at, bytes } => {
                let i = at % data.len();
                data.splice(i..i, bytes.iter().copied());
            }
            Mutation::Number { nth, value } => {
                let runs: Vec<(usize, usize)> = digit_runs(&data);
                if let Some(&(start, end)) = runs.get(nth % runs.len().max(1)) {
                    data.splice(start..end, value.bytes());
                }
            }
            Mutation::Repeat { at, len, times } => {
                let start = at % data.len();
                let end = (start + len).min(data.len());
                let chunk = data[start..end].to_vec();
                let repeated: Vec<u8> = chunk
                    .iter()
                    .copied()
                    .cycle()
                    .take(chunk.len() * times)
                    .collect();
                data.splice(start..end, repeated);
            }
        }
    }
    data
}

fn digit_runs(data: &[u8]) -> Vec<(usize, usize)> {
    let mut runs = Vec::new();
    let mut start = None;
    for (i, b) in data.iter().enumerate().take(1 << 16) {
        match (b.is_ascii_digit(), start) {
            (true, None) => start = Some(i),
            (false, Some(s)) => {
                runs.push((s, i));
                start = None;
            }
            _ => {}
        }
    }
    runs
}

fn cases() -> u32 {
    std::env::var("ZOO_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(48)
}

/// Seconds a campaign runs (`ZOO_FUZZ_SECONDS`, set by `scripts/fuzz`):
/// batches of [`cases`] repeat until then. Unset: one batch.
fn seconds() -> Option<f32> {
    std::env::var("ZOO_FUZZ_SECONDS").ok()?.parse().ok()
}

/// Runs `target` on mutations of `seed`; every call must return without
/// a panic. Reports the executions.
fn fuzz(name: &str, seed: &[u8], target: impl Fn(&[u8])) {
    let runs = AtomicUsize::new(0);
    let started = std::time::Instant::now();
    loop {
        let mut runner = TestRunner::new(Config {
            cases: cases(),
            failure_persistence: Some(Box::new(
                proptest::test_runner::FileFailurePersistence::Direct(concat!(
                    env!("CARGO_MANIFEST_DIR"),
                    "/proptest-regressions/fuzz.txt"
                )),
            )),
            ..Config::default()
        });
        let result = runner.run(&prop::collection::vec(mutation(), 1..6), |mutations| {
            let data = apply(seed, &mutations);
            runs.fetch_add(1, Ordering::Relaxed);
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| target(&data)));
            prop_assert!(
                outcome.is_ok(),
                "{name}: the reader panicked on {} bytes",
                data.len()
            );
            Ok(())
        });
        if let Err(e) = result {
            panic!("{name}: {e}");
        }
        if seconds().is_none_or(|limit| started.elapsed().as_secs_f32() >= limit) {
            break;
        }
    }
    eprintln!(
        "fuzz {name}: {} executions in {:.1} s",
        runs.load(Ordering::Relaxed),
        started.elapsed().as_secs_f32()
    );
}

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A fixture copy whose `file` is replaced by `data`, loaded.
fn load_with(case: &str, file: &str, data: &[u8]) {
    let (_tmp, dir) = copy_fixture(case);
    std::fs::write(dir.join(file), data).unwrap();
    let registry = mlx_zoo::registry().unwrap();
    let _ = loader::load(&registry, &dir, &LoadOptions::default());
}

#[test]
fn fuzz_npy_header() {
    let (_tmp, dir) = copy_fixture("llama-gqa-npz");
    let bytes = read(&dir.join("model.npz"));
    let mut archive = zip::ZipArchive::new(std::io::Cursor::new(bytes)).unwrap();
    let mut seed = Vec::new();
    std::io::Read::read_to_end(&mut archive.by_index(0).unwrap(), &mut seed).unwrap();
    seed.truncate(256);
    fuzz("npy header", &seed, |data| {
        let _ = mlx_zoo::export::parse_npy_header(data);
    });
}

#[test]
fn fuzz_pickle() {
    let bytes = read(&fixture("llama-gqa-bin").join("pytorch_model.bin"));
    let mut archive = zip::ZipArchive::new(std::io::Cursor::new(bytes)).unwrap();
    let name = archive
        .file_names()
        .find(|n| n.ends_with("data.pkl"))
        .unwrap()
        .to_owned();
    let mut seed = Vec::new();
    std::io::Read::read_to_end(&mut archive.by_name(&name).unwrap(), &mut seed).unwrap();
    fuzz("pickle", &seed, |data| {
        let _ = mlx_zoo::pickle::read_state_dict(data, "data.pkl");
    });
}

/// Fuzzes the weights file `file` of fixture `case` through the loader.
fn fuzz_weights(name: &str, case: &str, file: &str) {
    let seed = read(&fixture(case).join(file));
    fuzz(name, &seed, |data| load_with(case, file, data));
}

#[test]
fn fuzz_safetensors_checkpoint() {
    fuzz_weights("safetensors", "llama-gqa", "model.safetensors");
}

#[test]
fn fuzz_pytorch_bin_archive() {
    fuzz_weights("pytorch .bin", "llama-gqa-bin", "pytorch_model.bin");
}

#[test]
fn fuzz_npz_archive() {
    fuzz_weights("npz", "llama-gqa-npz", "model.npz");
}

#[test]
fn fuzz_configs_of_every_family() {
    for case in [
        "llama-gqa",
        "mixtral-moe",
        "phi2",
        "phi3-longrope",
        "qwen2",
        "qwen-v1",
        "llama-gqa-q4",
        "llama-gqa-gptq",
    ] {
        let seed = read(&fixture(case).join("config.json"));
        fuzz(&format!("{case} config.json"), &seed, |data| {
            let (_tmp, dir) = copy_fixture(case);
            std::fs::write(dir.join("config.json"), data).unwrap();
            let registry = mlx_zoo::registry().unwrap();
            let _ = loader::inspect(&registry, &dir);
        });
    }
}

#[test]
fn fuzz_tokenizer_files_and_chat_template() {
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/tokenizer/char-128");
    for file in ["tokenizer_config.json", "tokenizer.json"] {
        let seed = read(&source.join(file));
        fuzz(file, &seed, |data| {
            let tmp = tempfile::tempdir().unwrap();
            for other in ["tokenizer_config.json", "tokenizer.json"] {
                std::fs::copy(source.join(other), tmp.path().join(other)).unwrap();
            }
            std::fs::write(tmp.path().join(file), data).unwrap();
            if let Ok(tokenizer) = mlx_zoo::tokenizer::Tokenizer::from_dir(tmp.path()) {
                let _ = tokenizer.encode("Hello, zoo!", true);
                let _ = tokenizer.apply_chat_template(
                    &[mlx_zoo::tokenizer::ChatMessage {
                        role: "user".into(),
                        content: "hi".into(),
                    }],
                    true,
                );
            }
        });
    }
}

#[test]
fn fuzz_training_jsonl() {
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/tokenizer/char-128");
    let tokenizer = mlx_zoo::tokenizer::Tokenizer::from_dir(&source).unwrap();
    let seed: Vec<u8> = (0..12)
        .map(|i| {
            format!(
                "{}\n",
                serde_json::json!({"prompt": format!("{i}+1="), "completion": format!("{}", i + 1)})
            )
        })
        .chain(std::iter::once(
            "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}, {\"role\": \"assistant\", \"content\": \"yo\"}]}\n{\"text\": \"plain\"}\n".to_owned(),
        ))
        .collect::<String>()
        .into_bytes();
    fuzz("training jsonl", &seed, |data| {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("data.jsonl");
        std::fs::write(&path, data).unwrap();
        let _ = mlx_zoo::train::load_dataset(&path, &tokenizer, &Default::default());
    });
}

#[test]
fn fuzz_adapters() {
    for (case, file) in [
        ("peft-lora-llama", "adapter_config.json"),
        ("peft-lora-llama", "adapter_model.safetensors"),
        ("mlxlm-lora-llama", "adapter_config.json"),
        ("mlxlm-lora-llama", "adapters.safetensors"),
    ] {
        let source = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fixtures/adapters")
            .join(case);
        let seed = read(&source.join(file));
        fuzz(&format!("{case} {file}"), &seed, |data| {
            let tmp = tempfile::tempdir().unwrap();
            for entry in std::fs::read_dir(&source).unwrap() {
                let entry = entry.unwrap();
                std::fs::copy(entry.path(), tmp.path().join(entry.file_name())).unwrap();
            }
            std::fs::write(tmp.path().join(file), data).unwrap();
            let mut loaded = mlx_zoo_tests::load("llama-gqa");
            let _ = mlx_zoo::lora::formats::load_adapter(&mut loaded, tmp.path());
        });
    }
}
