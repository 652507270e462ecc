//! The `zoo` binary end to end: its listings are snapshotted, `logits`
//! writes what transformers computed, and bad input fails cleanly.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn zoo(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_zoo"))
        .args(args)
        .env_remove("ZOO_LOG")
        .output()
        .expect("running zoo")
}

fn fixture(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/models")
        .join(case)
}

fn stdout(output: &Output) -> String {
    assert!(
        output.status.success(),
        "zoo failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout.clone()).unwrap()
}

#[test]
fn archs_listing() {
    insta::assert_snapshot!(stdout(&zoo(&["archs"])));
}

#[test]
fn archs_json_listing() {
    let json: serde_json::Value =
        serde_json::from_str(&stdout(&zoo(&["archs", "--json"]))).unwrap();
    insta::assert_yaml_snapshot!(json);
}

#[test]
fn info_names_the_blas() {
    let json: serde_json::Value = serde_json::from_str(&stdout(&zoo(&["info", "--json"]))).unwrap();
    assert_eq!(json["mlx_version"], "0.32.2");
    assert!(json["blas"]["name"].is_string());
}

#[test]
fn inspect_explains_the_choice() {
    let out = stdout(&zoo(&["inspect", fixture("llama-meta").to_str().unwrap()]));
    assert!(
        out.contains("architecture  llama (model_type \"llama\" (priority 100))"),
        "{out}"
    );
    assert!(
        out.contains("rotary interleaved -> halves (4 heads)"),
        "{out}"
    );
    assert!(out.contains("0 missing, 0 unexpected"), "{out}");
}

fn read_npy_f32(path: &Path) -> (String, Vec<f32>) {
    let bytes = std::fs::read(path).unwrap();
    assert_eq!(&bytes[..8], b"\x93NUMPY\x01\x00");
    let header_len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    let header = String::from_utf8(bytes[10..10 + header_len].to_vec()).unwrap();
    let data = bytes[10 + header_len..]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    (header, data)
}

#[test]
fn logits_match_transformers() {
    let reference =
        mlx_rs::Array::load_safetensors(fixture("llama-gqa").join("reference.safetensors"))
            .unwrap();
    let ids = reference["input_ids"]
        .as_dtype(mlx_rs::Dtype::Int32)
        .unwrap();
    let rows: Vec<Vec<i32>> = ids
        .as_slice::<i32>()
        .chunks(ids.shape()[1] as usize)
        .map(<[i32]>::to_vec)
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("ids.json");
    std::fs::write(&tokens, serde_json::to_string(&rows).unwrap()).unwrap();
    let out = dir.path().join("logits.npy");
    let result = zoo(&[
        "logits",
        fixture("llama-gqa").to_str().unwrap(),
        "--tokens",
        tokens.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    stdout(&result);
    let (header, data) = read_npy_f32(&out);
    assert!(header.contains("'shape': (2, 12, 128)"), "{header}");
    let expected = reference["logits"].as_slice::<f32>();
    let diff = data
        .iter()
        .zip(expected)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max);
    assert!(diff < 1e-4, "max abs diff {diff}");
}

#[test]
fn ragged_tokens_are_refused_without_writing_output() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("ids.json");
    std::fs::write(&tokens, "[[1, 2, 3], [4, 5]]").unwrap();
    let out = dir.path().join("logits.npy");
    let result = zoo(&[
        "logits",
        fixture("llama-gqa").to_str().unwrap(),
        "--tokens",
        tokens.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(!result.status.success());
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert!(
        stderr.contains("sequence 1 has 2 ids but sequence 0 has 3"),
        "{stderr}"
    );
    assert!(!out.exists());
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        1,
        "no temporary file left"
    );
}

#[test]
fn missing_model_directory_is_named() {
    let result = zoo(&["inspect", "/nonexistent/model"]);
    assert!(!result.status.success());
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert!(stderr.contains("/nonexistent/model"), "{stderr}");
}

#[test]
fn demo_runs_on_the_bundled_model() {
    let out = stdout(&zoo(&["demo", "--tiny"]));
    assert!(out.contains("(match)"), "{out}");
    assert!(out.contains("greedy continuation"), "{out}");
    // The training stages: the sentence is learned, survives 4-bit
    // quantization, and QLoRA teaches the answers.
    assert!(
        out.contains(r#"after:  "the zoo " -> "keeps llamas, mistrals, phis and qwens.""#),
        "{out}"
    );
    assert!(
        out.contains(r#"4-bit: "the zoo " -> "keeps llamas, mistrals, phis and qwens.""#),
        "{out}"
    );
    assert!(out.contains("4 of 4 answers right"), "{out}");
}

#[test]
fn inspect_and_logits_work_for_every_family() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("ids.json");
    std::fs::write(&tokens, "[[1, 2, 3, 4], [5, 6, 7, 8]]").unwrap();
    for (case, architecture) in [
        ("llama-gqa", "llama"),
        ("mistral-sliding", "mistral"),
        ("mixtral-moe", "mixtral"),
        ("phi2", "phi"),
        ("phi2-msft", "phi"),
        ("phi3-longrope", "phi3"),
        ("qwen2", "qwen2"),
        ("qwen-v1", "qwen"),
        ("llama-gqa-q4", "llama"),
        ("mixtral-moe-q4", "mixtral"),
        ("llama-gqa-gptq", "llama"),
        ("llama-gqa-awq", "llama"),
    ] {
        let model = fixture(case);
        let json: serde_json::Value = serde_json::from_str(&stdout(&zoo(&[
            "inspect",
            model.to_str().unwrap(),
            "--json",
        ])))
        .unwrap();
        assert_eq!(json["architecture"], architecture, "{case}");
        assert_eq!(json["report"]["missing"], serde_json::json!([]), "{case}");
        let out = dir.path().join(format!("{case}.npy"));
        stdout(&zoo(&[
            "logits",
            model.to_str().unwrap(),
            "--tokens",
            tokens.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ]));
        let (header, data) = read_npy_f32(&out);
        assert!(header.contains("'shape': (2, 4, 128)"), "{case}: {header}");
        assert!(
            data.iter().all(|v| v.is_finite()),
            "{case}: non-finite logits"
        );
    }
}

#[test]
fn inspect_lists_each_layer_with_its_quantization_and_size() {
    let out = stdout(&zoo(&[
        "inspect",
        fixture("llama-gqa-mixed").to_str().unwrap(),
        "--layers",
    ]));
    assert!(out.contains("quantization  "), "{out}");
    let line = out
        .lines()
        .find(|l| l.contains("model.layers.0.self_attn.v_proj"))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(
        line.contains("6 bits, group 32") && line.contains("2.0 KiB"),
        "{line}"
    );
    let kept = out
        .lines()
        .find(|l| l.contains("model.layers.0.self_attn.o_proj") && l.contains("KiB"))
        .unwrap();
    assert!(kept.contains("full precision"), "{kept}");
}

#[test]
fn fuse_and_convert_adapter_write_loadable_models_and_adapters() {
    let dir = tempfile::tempdir().unwrap();
    let adapters = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/adapters");
    let fused = dir.path().join("fused");
    let out = stdout(&zoo(&[
        "fuse",
        fixture("llama-gqa-q4").to_str().unwrap(),
        "--adapter",
        adapters.join("mlxlm-lora-llama-q4").to_str().unwrap(),
        "--out",
        fused.to_str().unwrap(),
    ]));
    assert!(out.contains("fused a lora adapter into 4 layers"), "{out}");
    assert!(out.contains("re-quantization keeps"), "{out}");
    stdout(&zoo(&["inspect", fused.to_str().unwrap()]));
    let converted = dir.path().join("peft");
    let out = stdout(&zoo(&[
        "convert-adapter",
        adapters.join("mlxlm-lora-llama").to_str().unwrap(),
        "--model",
        fixture("llama-gqa").to_str().unwrap(),
        "--to",
        "peft",
        "--out",
        converted.to_str().unwrap(),
    ]));
    assert!(out.contains("as peft"), "{out}");
    assert!(converted.join("adapter_model.safetensors").is_file());
    let bad = zoo(&[
        "logits",
        fixture("llama-gqa").to_str().unwrap(),
        "--adapter",
        dir.path().to_str().unwrap(),
        "--tokens",
        "/nonexistent.json",
        "--out",
        dir.path().join("x.npy").to_str().unwrap(),
    ]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("no adapter found"));
}

#[test]
fn generate_streams_greedy_tokens_and_reports_speed_as_json() {
    let out = stdout(&zoo(&[
        "generate",
        fixture("llama-gqa").to_str().unwrap(),
        "--prompt-ids",
        "68,47,91,6,42,102",
        "--max-tokens",
        "10",
        "--json",
    ]));
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    // transformers' greedy continuation (tests/fixtures/generation.safetensors).
    assert_eq!(
        json["generated_ids"],
        serde_json::json!([61, 21, 31, 12, 107, 47, 44, 85, 125, 14])
    );
    assert_eq!(json["prompt_tokens"], 6);
    assert!(json["generation_tokens_per_second"].as_f64().unwrap() > 0.0);
    let plain = stdout(&zoo(&[
        "generate",
        fixture("llama-gqa").to_str().unwrap(),
        "--prompt-ids",
        "68,47,91,6,42,102",
        "--max-tokens",
        "3",
    ]));
    assert_eq!(plain.trim(), "61 21 31");
    let bad = zoo(&[
        "generate",
        fixture("llama-gqa").to_str().unwrap(),
        "--prompt-ids",
        "1,999",
    ]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("outside the vocabulary"));
}

#[test]
fn exit_codes_tell_bad_input_from_bad_usage() {
    assert_eq!(
        zoo(&["inspect", "/nonexistent/model"]).status.code(),
        Some(1)
    );
    assert_eq!(zoo(&["inspect"]).status.code(), Some(2));
    assert_eq!(zoo(&["no-such-command"]).status.code(), Some(2));
}

#[test]
fn generate_takes_text_and_stops_at_a_stop_string() {
    let tokenizer =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tokenizer/char-128");
    let model = fixture("llama-gqa");
    let run = |extra: &[&str]| {
        let mut args = vec![
            "generate",
            model.to_str().unwrap(),
            "--tokenizer",
            tokenizer.to_str().unwrap(),
            "--prompt",
            "Hello",
            "--max-tokens",
            "12",
            "--json",
        ];
        args.extend_from_slice(extra);
        serde_json::from_str::<serde_json::Value>(&stdout(&zoo(&args))).unwrap()
    };
    let full = run(&[]);
    assert_eq!(
        full["prompt_ids"],
        serde_json::json!([1, 43, 72, 79, 79, 82])
    );
    let text = full["text"].as_str().unwrap().to_owned();
    assert!(!text.is_empty(), "{full}");
    // Stop at the third character of the full continuation.
    let stop: String = text.chars().skip(2).take(1).collect();
    let cut = run(&["--stop", &stop]);
    let cut_text = cut["text"].as_str().unwrap();
    assert!(
        text.starts_with(cut_text) && !cut_text.contains(&stop),
        "{cut_text:?} vs {text:?}"
    );
    assert!(cut["generated_tokens"].as_u64().unwrap() < 12);
}

#[test]
fn generate_renders_the_chat_template() {
    let tokenizer =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tokenizer/char-128");
    let out = stdout(&zoo(&[
        "generate",
        fixture("llama-gqa").to_str().unwrap(),
        "--tokenizer",
        tokenizer.to_str().unwrap(),
        "--system",
        "Be brief. ",
        "--chat",
        "Hi zoo!",
        "--max-tokens",
        "2",
        "--json",
    ]));
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    // "<s>SYSTEM: Be brief.\nUSER: Hi zoo!\nASSISTANT:" as transformers renders it, tokenized.
    let ids: Vec<u64> = json["prompt_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    let expected = mlx_zoo::tokenizer::Tokenizer::from_dir(&tokenizer)
        .unwrap()
        .encode("<s>SYSTEM: Be brief.\nUSER: Hi zoo!\nASSISTANT:", false)
        .unwrap();
    assert_eq!(ids[0], 1, "bos from the template");
    assert_eq!(ids, expected.iter().map(|&t| t as u64).collect::<Vec<_>>());
}

/// `zoo` with the hub environment pointing at a loopback server.
fn zoo_hub(args: &[&str], endpoint: &str, home: &Path, offline: bool) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_zoo"));
    command
        .args(args)
        .env_remove("ZOO_LOG")
        .env_remove("HF_TOKEN")
        .env_remove("HF_HUB_CACHE")
        .env("HF_ENDPOINT", endpoint)
        .env("HF_HOME", home);
    if offline {
        command.env("HF_HUB_OFFLINE", "1");
    } else {
        command.env_remove("HF_HUB_OFFLINE");
    }
    command.output().expect("running zoo")
}

#[test]
fn model_arguments_may_be_hub_repo_ids() {
    use mlx_zoo_tests::hub_server::{HubServer, ServedRepo};
    let home = tempfile::tempdir().unwrap();
    let server = HubServer::start(vec![ServedRepo::from_dir(
        "zoo-test/tiny-llama",
        &fixture("llama-sharded"),
    )]);
    let endpoint = server.endpoint.clone();
    let fetched = zoo_hub(
        &["inspect", "zoo-test/tiny-llama"],
        &endpoint,
        home.path(),
        false,
    );
    let out = stdout(&fetched);
    let stderr = String::from_utf8_lossy(&fetched.stderr);
    assert!(out.contains("architecture  llama"), "{out}");
    assert!(
        stderr.contains("zoo-test/tiny-llama: commit") && stderr.contains("downloaded"),
        "{stderr}"
    );
    assert!(home
        .path()
        .join("hub/models--zoo-test--tiny-llama/refs/main")
        .is_file());

    drop(server);
    let offline = zoo_hub(
        &["inspect", "zoo-test/tiny-llama@main"],
        &endpoint,
        home.path(),
        true,
    );
    assert!(stdout(&offline).contains("architecture  llama"));
    assert!(String::from_utf8_lossy(&offline.stderr).contains("from the cache (offline)"));

    let missing = zoo_hub(&["inspect", "zoo-test/other"], &endpoint, home.path(), true);
    assert_eq!(missing.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert!(
        stderr.contains("zoo-test/other@main is not in the cache")
            && stderr.contains("HF_HUB_OFFLINE"),
        "{stderr}"
    );
}

fn tokenizer_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tokenizer/char-128")
}

/// Writes the small sums data set the fine-tuning tests train on.
fn write_sums(path: &Path) {
    let lines: Vec<String> = (0..24)
        .map(|i| serde_json::json!({"prompt": format!("{}+{}=", i % 7, i % 5), "completion": format!("{}", i % 7 + i % 5)}).to_string())
        .collect();
    std::fs::write(path, lines.join("\n")).unwrap();
}

/// `zoo -q finetune` on the llama fixture with the fixture tokenizer,
/// `data` into `out`, at the settings the fine-tuning tests share.
fn finetune_args(data: &Path, out: &Path) -> Vec<String> {
    let (model, tokenizer) = (fixture("llama-gqa"), tokenizer_dir());
    [
        "-q",
        "finetune",
        model.to_str().unwrap(),
        "--tokenizer",
        tokenizer.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--lr",
        "5e-3",
        "--lora-rank",
        "4",
        "--batch-size",
        "4",
    ]
    .map(String::from)
    .to_vec()
}

/// Losses per step from a run's metrics.jsonl.
fn step_losses(out: &Path) -> Vec<(u64, f64)> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v.get("loss").is_some())
        .map(|v| (v["step"].as_u64().unwrap(), v["loss"].as_f64().unwrap()))
        .collect()
}

#[test]
fn finetune_trains_resumes_and_writes_adapters_in_both_formats() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data.jsonl");
    write_sums(&data);
    let model = fixture("llama-gqa");
    let run = |out: &Path, extra: &[&str]| {
        let mut args = finetune_args(&data, out);
        args.extend(["--iters", "6", "--mask-prompt", "--save-every", "3"].map(String::from));
        args.extend(extra.iter().map(|a| a.to_string()));
        zoo(&args.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let straight = dir.path().join("straight");
    let out = stdout(&run(&straight, &[]));
    assert!(out.contains("trained 6 steps"), "{out}");
    for file in [
        "adapters/adapters.safetensors",
        "adapters/adapter_config.json",
        "peft/adapter_model.safetensors",
        "peft/adapter_config.json",
        "summary.json",
    ] {
        assert!(straight.join(file).is_file(), "{file} missing");
    }
    let expected = step_losses(&straight);
    assert_eq!(expected.len(), 6);

    // Resume the step-3 checkpoint in another directory: steps 4-6 repeat.
    let resumed = dir.path().join("resumed");
    let checkpoint = straight.join("checkpoints/step-000003");
    stdout(&run(&resumed, &["--resume", checkpoint.to_str().unwrap()]));
    assert_eq!(step_losses(&resumed), expected[3..]);

    // The trained adapter, in either format, changes the logits the same way.
    let ids = dir.path().join("ids.json");
    std::fs::write(&ids, "[[1, 50, 43, 51, 61]]").unwrap();
    let logits = |adapter: &Path, name: &str| {
        let out = dir.path().join(name);
        stdout(&zoo(&[
            "logits",
            model.to_str().unwrap(),
            "--tokens",
            ids.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--adapter",
            adapter.to_str().unwrap(),
        ]));
        read_npy_f32(&out).1
    };
    let mlx_lm = logits(&straight.join("adapters"), "a.npy");
    let peft = logits(&straight.join("peft"), "b.npy");
    let diff = mlx_lm
        .iter()
        .zip(&peft)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(diff < 1e-5, "{diff}");

    // Packed rows, gradient checkpointing and one stream change how the
    // work is done, not what is learnt: the same losses.
    let packed = dir.path().join("packed");
    let flags = ["--pack", "--grad-checkpoint", "--streams", "1"];
    stdout(&run(&packed, &flags));
    let packed_losses = step_losses(&packed);
    assert_eq!(packed_losses.len(), expected.len());
    for (a, b) in expected.iter().zip(&packed_losses) {
        assert_eq!(a.0, b.0);
        assert!(
            (a.1 - b.1).abs() < 1e-3,
            "{expected:?} vs {packed_losses:?}"
        );
    }

    let bad = run(&dir.path().join("bad"), &["--decay", "wavy"]);
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--decay wavy"));
    let bad = run(&dir.path().join("bad-streams"), &["--streams", "0"]);
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("streams"));
}

/// Peak memory `zoo finetune` measured against what `zoo plan` predicted,
/// for LoRA, QLoRA and full fine-tuning, and LoRA with gradient
/// checkpointing (whose peak must also be the lower), on a batch where
/// activations dominate.
#[test]
fn plan_predicts_the_measured_peak() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data.jsonl");
    let lines: Vec<String> = (0..16)
        .map(|i| serde_json::json!({"text": format!("{i} ").repeat(100)}).to_string())
        .collect();
    std::fs::write(&data, lines.join("\n")).unwrap();
    let model = fixture("llama-gqa");
    let tokenizer = tokenizer_dir();
    let mut peaks = std::collections::BTreeMap::new();
    for (kind, checkpoint) in [
        ("lora", false),
        ("qlora", false),
        ("full", false),
        ("lora", true),
    ] {
        let mut common = vec![
            "--train-type",
            kind,
            "--q-bits",
            "4",
            "--q-group-size",
            "32",
            "--lora-rank",
            "8",
            "--lora-targets",
            "q_proj,k_proj,v_proj,o_proj",
            "--batch-size",
            "8",
            "--max-seq-len",
            "128",
        ];
        if checkpoint {
            common.push("--grad-checkpoint");
        }
        let kind = format!("{kind}{}", if checkpoint { "+checkpoint" } else { "" });
        let mut plan_args = vec!["plan", model.to_str().unwrap(), "--json"];
        plan_args.extend_from_slice(&common);
        let plan: serde_json::Value = serde_json::from_str(&stdout(&zoo(&plan_args))).unwrap();
        let estimate = plan["estimate"]["total"].as_f64().unwrap();
        let out = dir.path().join(&kind);
        let mut run_args = vec![
            "-q",
            "finetune",
            model.to_str().unwrap(),
            "--tokenizer",
            tokenizer.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--iters",
            "2",
            // The plan is of one stream; concurrent shards peak lower.
            "--streams",
            "1",
        ];
        run_args.extend_from_slice(&common);
        stdout(&zoo(&run_args));
        let peak = std::fs::read_to_string(out.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .filter_map(|l| {
                serde_json::from_str::<serde_json::Value>(l)
                    .ok()?
                    .get("peak_memory")?
                    .as_f64()
            })
            .fold(0f64, f64::max);
        let ratio = peak / estimate;
        eprintln!("{kind}: estimate {estimate} measured {peak} ratio {ratio:.2}");
        assert!(
            (0.67..1.5).contains(&ratio),
            "{kind}: measured peak {peak} against the plan's {estimate}"
        );
        peaks.insert(kind, peak);
    }
    assert!(
        peaks["lora+checkpoint"] < 0.85 * peaks["lora"],
        "checkpointing does not lower the peak: {peaks:?}"
    );
}

/// A panic (a bug) ends with status 3 and an "internal error" line asking
/// for a report, not Rust's status 101 and raw panic message.
#[test]
fn a_panic_is_reported_as_an_internal_error() {
    let output = Command::new(env!("CARGO_BIN_EXE_zoo"))
        .arg("archs")
        .env("ZOO_DEBUG_PANIC", "1")
        .env_remove("RUST_BACKTRACE")
        .output()
        .expect("running zoo");
    assert_eq!(output.status.code(), Some(3));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("internal error (a bug in zoo")
            && stderr.contains("ZOO_DEBUG_PANIC is set")
            && stderr.contains("Please report it"),
        "{stderr}"
    );
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// `convert` writes its output whole or not at all: a non-empty --out is
/// refused without --force; --force replaces it leaving nothing of the old
/// output (a sharded model's index and shards); a write that fails (a file
/// size limit, as a full disk) leaves the previous output as it was and no
/// staging folder behind.
#[test]
fn convert_output_is_all_or_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let model = fixture("llama-gqa");
    let convert = |extra: &[&str]| {
        let mut args = vec![
            "-q",
            "convert",
            model.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        zoo(&args)
    };
    stdout(&convert(&["--max-shard-mib", "0"]));
    let sharded = files_in(&out);
    assert!(
        sharded.iter().any(|f| f == "model.safetensors.index.json"),
        "{sharded:?}"
    );

    let refused = convert(&[]);
    assert_eq!(refused.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("is not empty; pass --force"), "{stderr}");
    assert_eq!(files_in(&out), sharded);

    stdout(&convert(&["--force"]));
    let replaced = files_in(&out);
    assert!(
        replaced.iter().any(|f| f == "model.safetensors"),
        "{replaced:?}"
    );
    assert!(
        !replaced
            .iter()
            .any(|f| f.contains("index") || f.contains("-of-")),
        "stale shards survived: {replaced:?}"
    );

    // 64 KiB of file size allowed: the weights cannot be written.
    let limited = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "ulimit -f 64; exec '{}' -q convert '{}' --out '{}' --force --dtype f32",
            env!("CARGO_BIN_EXE_zoo"),
            model.display(),
            out.display()
        ))
        .output()
        .unwrap();
    assert_eq!(limited.status.code(), Some(1), "{limited:?}");
    let stderr = String::from_utf8_lossy(&limited.stderr);
    assert!(
        stderr.contains("writing") || stderr.contains("too large"),
        "{stderr}"
    );
    assert_eq!(files_in(&out), replaced, "the previous output is intact");
    assert_eq!(
        files_in(dir.path()),
        ["out"],
        "no staging folder is left beside --out"
    );
}

/// `zoo finetune` killed with SIGKILL at 20 moments of a run (start-up,
/// mid-step, while checkpoints and metrics lines are written) and resumed
/// from its newest checkpoint repeats the uninterrupted run's losses
/// exactly, each step once in metrics.jsonl, with no torn line; there is
/// always a complete checkpoint to resume from once the first was written.
#[test]
fn finetune_killed_at_random_moments_resumes_to_the_same_losses() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data.jsonl");
    write_sums(&data);
    let command = |out: &Path, resume: Option<&Path>| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_zoo"));
        command.args(finetune_args(&data, out)).args([
            "--iters",
            "10",
            "--save-every",
            "1",
            "--streams",
            "1",
        ]);
        if let Some(checkpoint) = resume {
            command.args(["--resume", checkpoint.to_str().unwrap()]);
        }
        command.env_remove("ZOO_LOG");
        command
    };
    let straight = dir.path().join("straight");
    let started = std::time::Instant::now();
    let done = command(&straight, None).output().unwrap();
    assert!(done.status.success(), "{done:?}");
    let run_time = started.elapsed();
    let expected = step_losses(&straight);
    assert_eq!(expected.len(), 10);

    let newest_checkpoint = |out: &Path| -> Option<PathBuf> {
        let mut steps: Vec<PathBuf> = std::fs::read_dir(out.join("checkpoints"))
            .ok()?
            .map(|e| e.unwrap().path())
            .filter(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("step-"))
            })
            .collect();
        steps.sort();
        steps.pop()
    };
    let mut resumed_from_checkpoint = 0;
    for round in 0..20u32 {
        let out = dir.path().join(format!("killed-{round}"));
        // The first rounds die during start-up and the first step; the
        // others once metrics.jsonl holds 1 to 10 lines, a few
        // milliseconds later (mid-step, or while a checkpoint or a line is
        // written), whatever the machine's speed.
        let mut child = command(&out, None).spawn().unwrap();
        let delay = if round < 4 {
            run_time.mul_f64(f64::from(round) / 40.0)
        } else {
            let lines = ((round - 4) % 10 + 1) as usize;
            let waited = std::time::Instant::now();
            while std::fs::read_to_string(out.join("metrics.jsonl"))
                .map_or(0, |t| t.lines().count())
                < lines
                && waited.elapsed() < std::time::Duration::from_secs(60)
                && child.try_wait().unwrap().is_none()
            {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            std::time::Duration::from_millis(u64::from(round % 4))
        };
        std::thread::sleep(delay);
        let _ = child.kill();
        let _ = child.wait();
        let checkpoint = newest_checkpoint(&out);
        resumed_from_checkpoint += usize::from(checkpoint.is_some());
        if let Some(checkpoint) = &checkpoint {
            for file in [
                "trainable.safetensors",
                "optimizer.safetensors",
                "trainer.json",
            ] {
                assert!(
                    checkpoint.join(file).is_file(),
                    "round {round}: {} lacks {file}",
                    checkpoint.display()
                );
            }
        }
        let resumed = command(&out, checkpoint.as_deref()).output().unwrap();
        assert!(resumed.status.success(), "round {round}: {resumed:?}");
        let text = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
        assert!(text.ends_with('\n'), "round {round}: torn last line");
        assert_eq!(
            step_losses(&out),
            expected,
            "round {round} (killed after {delay:?}, resumed from {checkpoint:?})"
        );
    }
    // The moments cover both sides of the first checkpoint.
    eprintln!("{resumed_from_checkpoint} of 20 rounds resumed from a checkpoint");
    assert!(
        resumed_from_checkpoint >= 10,
        "{resumed_from_checkpoint} of 20 rounds resumed from a checkpoint"
    );
}

/// `zoo launch -n 2 -- ARGS` (2 ranks over MLX's ring on loopback).
fn zoo_launch(ranks: usize, args: &[String]) -> Output {
    let mut all = vec![
        "launch".to_string(),
        "-n".into(),
        ranks.to_string(),
        "--".into(),
    ];
    all.extend(args.iter().cloned());
    zoo(&all.iter().map(String::as_str).collect::<Vec<_>>())
}

/// Every tensor of two safetensors files: the largest difference.
fn max_tensor_diff(a: &Path, b: &Path) -> f32 {
    let a = mlx_rs::Array::load_safetensors(a).unwrap();
    let b = mlx_rs::Array::load_safetensors(b).unwrap();
    assert_eq!(a.len(), b.len());
    let values = |t: &mlx_rs::Array| {
        let t = t.as_dtype(mlx_rs::Dtype::Float32).unwrap();
        t.as_slice::<f32>().to_vec()
    };
    a.iter()
        .map(|(name, x)| mlx_zoo_tests::max_abs_diff(&values(x), &values(&b[name])))
        .fold(0f32, f32::max)
}

/// Two ranks with the global batch split between them make the updates one
/// process makes with the whole batch: the same losses within 1e-5 over 5
/// steps and the same adapter, for LoRA (also accumulating, packed and
/// recomputing activations), QLoRA, DoRA and full fine-tuning; only rank 0
/// writes.
#[test]
fn two_ranks_train_like_one_process_with_the_whole_batch() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data.jsonl");
    write_sums(&data);
    let cases: [(&str, &[&str]); 5] = [
        ("lora", &[]),
        ("qlora", &["--train-type", "qlora"]),
        ("dora", &["--train-type", "dora"]),
        (
            "lora-accum-packed",
            &["--grad-accum", "2", "--pack", "--grad-checkpoint"],
        ),
        ("full", &["--train-type", "full"]),
    ];
    for (name, extra) in cases {
        let run = |out: &Path| {
            let mut args = finetune_args(&data, out);
            args.extend(["--iters", "5", "--mask-prompt", "--decay", "constant"].map(String::from));
            args.extend(extra.iter().map(|a| a.to_string()));
            args
        };
        let single = dir.path().join(format!("{name}-1"));
        stdout(&zoo(&run(&single)
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>()));
        let ranks = dir.path().join(format!("{name}-2"));
        let launched = zoo_launch(2, &run(&ranks));
        let text = stdout(&launched);
        let err = String::from_utf8_lossy(&launched.stderr);
        assert!(err.contains("zoo launch: 2 ranks over ring"), "{err}");
        assert!(text.contains("[rank 0] trained 5 steps"), "{text}");
        assert!(
            !text.contains("[rank 1] trained"),
            "rank 1 reported: {text}"
        );
        let (one, two) = (step_losses(&single), step_losses(&ranks));
        assert_eq!(one.len(), 5, "{name}");
        assert_eq!(two.len(), 5, "{name}");
        for (a, b) in one.iter().zip(&two) {
            assert!((a.1 - b.1).abs() < 1e-5, "{name}: {one:?} vs {two:?}");
        }
        let metrics = std::fs::read_to_string(ranks.join("metrics.jsonl")).unwrap();
        assert!(metrics.contains("\"comm_bytes\""), "{metrics}");
        let trained = if name == "full" {
            "model/model.safetensors"
        } else {
            "adapters/adapters.safetensors"
        };
        let diff = max_tensor_diff(&single.join(trained), &ranks.join(trained));
        assert!(diff < 1e-4, "{name}: adapters differ by {diff}");
    }
}

/// A checkpoint written by 2 ranks resumes in 1 process (the batch size is
/// global, the data position too): the same losses as the 2-rank run.
#[test]
fn a_two_rank_checkpoint_resumes_in_one_process() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data.jsonl");
    write_sums(&data);
    let two = dir.path().join("two");
    let mut args = finetune_args(&data, &two);
    args.extend(["--iters", "6", "--mask-prompt", "--save-every", "3"].map(String::from));
    stdout(&zoo_launch(2, &args));
    let losses = step_losses(&two);
    let one = dir.path().join("one");
    let checkpoint = two.join("checkpoints/step-000003");
    let mut args = finetune_args(&data, &one);
    args.extend(["--iters", "6", "--mask-prompt", "--save-every", "3"].map(String::from));
    args.extend([
        "--resume".to_string(),
        checkpoint.to_str().unwrap().to_string(),
    ]);
    stdout(&zoo(&args.iter().map(String::as_str).collect::<Vec<_>>()));
    let resumed = step_losses(&one);
    assert_eq!(resumed.len(), 3);
    for (a, b) in losses[3..].iter().zip(&resumed) {
        assert_eq!(a.0, b.0);
        assert!((a.1 - b.1).abs() < 1e-5, "{losses:?} vs {resumed:?}");
    }
}

/// A global batch the ranks cannot split is refused by name, and a rank
/// that dies stops the run within seconds with the rank and status named.
#[test]
fn launch_reports_bad_splits_and_dead_ranks() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data.jsonl");
    write_sums(&data);
    let mut args = finetune_args(&data, &dir.path().join("odd"));
    let batch = args.iter().position(|a| a == "--batch-size").unwrap();
    args[batch + 1] = "3".into();
    args.extend(["--iters", "2"].map(String::from));
    let odd = zoo_launch(2, &args);
    assert_eq!(odd.status.code(), Some(1));
    let err = String::from_utf8_lossy(&odd.stderr);
    assert!(
        err.contains("batch size 3") && err.contains("2 ranks"),
        "{err}"
    );
    assert!(err.contains("zoo launch: rank"), "{err}");

    // A long run; rank 1 is killed once rank 0 has logged a step.
    let out = dir.path().join("long");
    let mut args = finetune_args(&data, &out);
    args.extend(["--iters", "100000", "--save-every", "0"].map(String::from));
    let mut all = vec!["launch".to_string(), "-n".into(), "2".into(), "--".into()];
    all.extend(args);
    let mut child = Command::new(env!("CARGO_BIN_EXE_zoo"))
        .args(&all)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (sender, lines) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if sender.send(line).is_err() {
                break;
            }
        }
    });
    let pid_line = lines
        .recv_timeout(std::time::Duration::from_secs(60))
        .into_iter()
        .chain(lines.iter())
        .find(|l| l.contains("rank 1 pid"))
        .unwrap();
    let pid: i32 = pid_line
        .rsplit("rank 1 pid ")
        .next()
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let started = std::time::Instant::now();
    while !out.join("metrics.jsonl").is_file()
        || std::fs::read_to_string(out.join("metrics.jsonl"))
            .unwrap()
            .is_empty()
    {
        assert!(started.elapsed().as_secs() < 60, "no step logged");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // SAFETY: signalling a process this test started (through zoo launch).
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let killed = std::time::Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(killed.elapsed().as_secs() < 20, "zoo launch did not stop");
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let rest: Vec<String> = lines.try_iter().collect();
    assert_eq!(status.code(), Some(137), "{rest:?}");
    assert!(
        rest.iter()
            .any(|l| l
                .contains("rank 1 exited with status 137 (signal 9); stopping the other ranks")),
        "{rest:?}"
    );
}

/// `zoo launch --hostfile` starts one rank per host through the ssh
/// program (here a stand-in that runs the command locally), in the same
/// folder, with the ring's hostfile written on the "remote" side.
#[test]
fn launch_over_ssh_runs_one_rank_per_host() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data.jsonl");
    write_sums(&data);
    let ssh = dir.path().join("fake-ssh");
    std::fs::write(
        &ssh,
        "#!/bin/sh\n# fake-ssh HOST COMMAND: runs COMMAND here\nexec sh -c \"$2\"\n",
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&ssh, std::fs::Permissions::from_mode(0o755)).unwrap();
    let hosts = dir.path().join("hosts.json");
    std::fs::write(
        &hosts,
        r#"[{"ssh": "mac1", "ips": ["127.0.0.1"]}, {"ssh": "me@mac2", "ips": ["127.0.0.1"]}]"#,
    )
    .unwrap();
    // Two consecutive free ports for the ring.
    let port = (20000..60000u16)
        .step_by(7)
        .find(|&p| {
            std::net::TcpListener::bind(("127.0.0.1", p)).is_ok()
                && std::net::TcpListener::bind(("127.0.0.1", p + 1)).is_ok()
        })
        .unwrap();
    let out = dir.path().join("run");
    let mut args: Vec<String> = [
        "launch",
        "--hostfile",
        hosts.to_str().unwrap(),
        "--ssh",
        ssh.to_str().unwrap(),
        "--port",
        &port.to_string(),
        "--",
    ]
    .map(String::from)
    .to_vec();
    args.extend(finetune_args(&data, &out));
    args.extend(["--iters", "3"].map(String::from));
    let launched = zoo(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let text = stdout(&launched);
    let err = String::from_utf8_lossy(&launched.stderr);
    assert!(err.contains("2 ranks over ring on mac1, me@mac2"), "{err}");
    assert!(text.contains("[rank 0] trained 3 steps"), "{text}");
    assert_eq!(step_losses(&out).len(), 3);
}
