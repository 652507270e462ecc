//! GGUF files written by llama.cpp's gguf-py (make_gguf_fixtures.py) from
//! the float `llama-gqa` fixture: the float file gives transformers'
//! logits, and every quantized layer (Q8_0, Q4_0, Q4_1) repacks into MLX's
//! affine layout that de-quantizes to exactly what gguf-py de-quantizes; the
//! tokenizer a GGUF file carries encodes as transformers' GGUF tokenizer.

use mlx_rs::Array;
use mlx_zoo::loader::{self, LoadOptions};
use mlx_zoo_tests::{fixture, reference};
use std::path::PathBuf;

fn gguf(name: &str) -> PathBuf {
    fixture("gguf").join(format!("llama-gqa-{name}.gguf"))
}

fn logits_diff(name: &str) -> f32 {
    let registry = mlx_zoo::registry().unwrap();
    let mut loaded = loader::load(&registry, &gguf(name), &LoadOptions::default()).unwrap();
    assert_eq!(loaded.architecture, "llama");
    let r = reference("llama-gqa");
    let out = loaded.model.forward(&r.input_ids, None).unwrap();
    out.as_slice::<f32>()
        .iter()
        .zip(&r.logits)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max)
}

#[test]
fn a_float_gguf_matches_transformers() {
    let f32_diff = logits_diff("f32");
    assert!(f32_diff < 1e-4, "F32 GGUF: {f32_diff}");
    // F16 rounds every weight to 11 significant bits.
    let f16_diff = logits_diff("f16");
    assert!(f16_diff < 2e-2, "F16 GGUF: {f16_diff}");
}

/// A qwen2 GGUF (biases, tied embeddings, rows not permuted) gives
/// transformers' logits of the qwen2 fixture.
#[test]
fn a_qwen2_gguf_matches_transformers() {
    let registry = mlx_zoo::registry().unwrap();
    let path = fixture("gguf").join("qwen2-f32.gguf");
    let mut loaded = loader::load(&registry, &path, &LoadOptions::default()).unwrap();
    assert_eq!(loaded.architecture, "qwen2");
    let r = reference("qwen2");
    let out = loaded.model.forward(&r.input_ids, None).unwrap();
    let worst = out
        .as_slice::<f32>()
        .iter()
        .zip(&r.logits)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(worst < 1e-4, "qwen2 GGUF: {worst}");
}

/// llama.cpp's `permute` (half-split rotary rows -> interleaved), written
/// as the converter writes it, to compare in the file's own layout.
fn permute(w: &Array, heads: i32) -> Array {
    let (rows, cols) = (w.shape()[0], w.shape()[1]);
    w.reshape(&[heads, 2, rows / heads / 2, cols])
        .unwrap()
        .swap_axes(1, 2)
        .unwrap()
        .reshape(&[rows, cols])
        .unwrap()
}

#[test]
fn quantized_ggufs_repack_exactly() {
    let registry = mlx_zoo::registry().unwrap();
    let expected =
        Array::load_safetensors(fixture("gguf").join("dequantized.safetensors")).unwrap();
    for (name, bits) in [("q8_0", 8), ("q4_0", 4), ("q4_1", 4)] {
        let mut loaded = loader::load(&registry, &gguf(name), &LoadOptions::default()).unwrap();
        assert_eq!(loaded.quantization.quantized.len(), 16, "{name}");
        assert!(loaded
            .quantization
            .quantized
            .values()
            .all(|s| s.bits == bits && s.group_size == 32));
        let mut checked = 0;
        loaded
            .model
            .visit_linears(&mut |path, layer| {
                let gguf_name = match path {
                    "model.embed_tokens" => "token_embd.weight".to_owned(),
                    "lm_head" => "output.weight".to_owned(),
                    _ => {
                        let parts: Vec<&str> = path.split('.').collect();
                        let part = match parts[3..].join(".").as_str() {
                            "self_attn.q_proj" => "attn_q",
                            "self_attn.k_proj" => "attn_k",
                            "self_attn.v_proj" => "attn_v",
                            "self_attn.o_proj" => "attn_output",
                            "mlp.gate_proj" => "ffn_gate",
                            "mlp.up_proj" => "ffn_up",
                            "mlp.down_proj" => "ffn_down",
                            other => panic!("unexpected layer {other}"),
                        };
                        format!("blk.{}.{part}.weight", parts[2])
                    }
                };
                let mut ours = layer.float_weight().unwrap();
                if path.ends_with("q_proj") {
                    ours = permute(&ours, 4);
                } else if path.ends_with("k_proj") {
                    ours = permute(&ours, 2);
                }
                let theirs = &expected[&format!("llama-gqa-{name}/{gguf_name}")];
                assert_eq!(ours.shape(), theirs.shape(), "{name} {path}");
                let same = mlx_rs::ops::array_eq(&ours, theirs, false)
                    .unwrap()
                    .item_exact::<bool>();
                assert!(same, "{name} {path}: not what gguf-py de-quantizes");
                checked += 1;
                Ok(())
            })
            .unwrap();
        assert_eq!(checked, 16, "{name}");
        // The quantized model still computes the float model's logits
        // approximately (8-bit closely).
        let diff = logits_diff(name);
        let bound = if bits == 8 { 0.1 } else { 1.0 };
        assert!(diff < bound, "{name}: logits differ by {diff}");
    }
}

#[test]
fn broken_ggufs_are_refused_with_the_file_and_reason() {
    let tmp = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(gguf("q4_0")).unwrap();
    let registry = mlx_zoo::registry().unwrap();
    // Cut inside the tensor data: the last tensor runs past the end.
    let cut = tmp.path().join("cut.gguf");
    std::fs::write(&cut, &bytes[..bytes.len() - 100]).unwrap();
    let error = loader::load(&registry, &cut, &LoadOptions::default())
        .err()
        .unwrap()
        .to_string();
    assert!(
        error.contains("cut.gguf") && error.contains("run past the end of the file"),
        "{error}"
    );
    // Cut inside the header.
    let head = tmp.path().join("head.gguf");
    std::fs::write(&head, &bytes[..40]).unwrap();
    let error = loader::load(&registry, &head, &LoadOptions::default())
        .err()
        .unwrap()
        .to_string();
    assert!(
        error.contains("head.gguf") && error.contains("GGUF at byte"),
        "{error}"
    );
}

/// K-quants, on random blocks (gguf-py de-quantizes them but does not
/// write them): Q4_K repacks into MLX's affine layout exactly (8 groups of
/// 32 per block, scale `d * sc`, bias `-dmin * m`), Q6_K (16-value scales,
/// no affine group of 32) de-quantizes as llama.cpp does; both equal
/// gguf-py's de-quantization bit for bit.
#[test]
fn k_quants_repack_or_dequantize_exactly() {
    use mlx_zoo::gguf::{affine_tensor, tensor_values, GgufFile};
    let file = GgufFile::open(&fixture("gguf").join("kquants.gguf")).unwrap();
    let expected =
        Array::load_safetensors(fixture("gguf").join("dequantized.safetensors")).unwrap();
    let tensor = |name: &str| file.tensors.iter().find(|t| t.name == name).unwrap();
    let q4k = tensor("q4_k");
    let (packed, scales, biases, bits) = affine_tensor(&file, q4k).unwrap().unwrap();
    assert_eq!(bits, 4);
    let ours = mlx_rs::ops::dequantize(&packed, &scales, Some(&biases), 32, 4).unwrap();
    let theirs = &expected["kquants/q4_k"];
    assert_eq!(ours.shape(), theirs.shape());
    assert!(
        mlx_rs::ops::array_eq(&ours, theirs, false)
            .unwrap()
            .item_exact::<bool>(),
        "Q4_K repacked differs from gguf-py"
    );
    let q6k = tensor("q6_k");
    assert!(affine_tensor(&file, q6k).unwrap().is_none());
    let values = tensor_values(&file, q6k).unwrap();
    assert_eq!(
        values.as_slice(),
        expected["kquants/q6_k"].as_slice::<f32>()
    );
}

/// The tokenizer a GGUF file carries (SmolLM2's byte-level BPE, its
/// metadata copied into a tensorless file): the same ids as transformers'
/// GGUF tokenizer on a varied corpus (unicode, whitespace runs, special
/// tokens glued to text), the end-of-sequence token, no BOS (the file's
/// add_bos_token is false) and the chat template.
#[test]
fn a_gguf_tokenizer_encodes_as_transformers_does() {
    let dir = fixture("gguf");
    let tokenizer =
        mlx_zoo::tokenizer::Tokenizer::from_path(&dir.join("smollm2-tokenizer.gguf")).unwrap();
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("smollm2-tokenizer.json")).unwrap())
            .unwrap();
    let cases = expected["cases"].as_array().unwrap();
    assert!(cases.len() >= 12);
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let want: Vec<u32> = case["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let got = tokenizer.encode(text, true).unwrap();
        assert_eq!(got, want, "{text:?}");
        if !text.contains("<|") {
            assert_eq!(
                tokenizer.decode(&got).unwrap(),
                text,
                "round trip of {text:?}"
            );
        }
    }
    assert_eq!(tokenizer.eos_ids(), &[2]);
    let chat = tokenizer
        .apply_chat_template(
            &[mlx_zoo::tokenizer::ChatMessage {
                role: "user".into(),
                content: "What is the capital of France?".into(),
            }],
            true,
        )
        .unwrap();
    assert!(
        chat.ends_with(
            "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
        ),
        "{chat}"
    );
}

/// A SentencePiece GGUF tokenizer (a 600-piece BPE model with byte
/// fallback, trained by make_gguf_spm_tokenizer_fixture.py and written as
/// llama.cpp writes one: pieces, scores and types, no merges): the same ids
/// as transformers, whose merges it recovers from the scores the same way;
/// BOS in front (the file's add_bos_token).
#[test]
fn a_sentencepiece_gguf_tokenizer_encodes_as_transformers_does() {
    let dir = fixture("gguf");
    let tokenizer =
        mlx_zoo::tokenizer::Tokenizer::from_path(&dir.join("spm-tokenizer.gguf")).unwrap();
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("spm-tokenizer.json")).unwrap())
            .unwrap();
    let cases = expected["cases"].as_array().unwrap();
    assert!(cases.len() >= 10);
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let want: Vec<u32> = case["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let got = tokenizer.encode(text, false).unwrap();
        assert_eq!(got, want, "{text:?}");
        assert_eq!(tokenizer.encode(text, true).unwrap()[0], 1, "BOS in front");
    }
    assert_eq!(tokenizer.eos_ids(), &[2]);
    let ids = tokenizer.encode("naïve café 🙂", false).unwrap();
    assert_eq!(tokenizer.decode(&ids).unwrap(), "naïve café 🙂");
}

/// A GGUF file without tokenizer metadata is refused with the key named.
#[test]
fn gguf_files_without_a_tokenizer_are_refused_by_key() {
    let error =
        mlx_zoo::tokenizer::Tokenizer::from_path(&fixture("gguf").join("llama-gqa-f32.gguf"))
            .unwrap_err()
            .to_string();
    assert!(error.contains("tokenizer.ggml.model"), "{error}");
}
