//! The tokenizer a GGUF file carries in its metadata, as a Hugging Face
//! tokenizer: `tokenizer.ggml.model` `gpt2` (byte-level BPE with merges,
//! the tokenizer of SmolLM2, Qwen2, Llama 3 and most recent models) becomes
//! the `tokenizer.json` transformers builds from the same file (its
//! `GGUFGPTConverter`): the vocabulary in GPT-2's byte-level spelling, the
//! merges, byte-level pre-tokenization (split as Llama 3's or Qwen2's
//! vocabulary was learnt when `tokenizer.ggml.pre` names them) and decoding,
//! control tokens (type 3) as special tokens and user-defined ones (type 4)
//! as added tokens. `llama` (SentencePiece: pieces and scores, no merges)
//! becomes the byte-fallback BPE transformers' `LlamaTokenizer` builds, its
//! merges recovered from the scores. The beginning-of-sequence token goes in
//! front of texts as `tokenizer.ggml.add_bos_token` says (absent: yes for
//! SentencePiece, no for byte-level, as llama.cpp reads it); the end of
//! sequence and the chat template (`tokenizer.chat_template`) come along.

use crate::error::{Error, Result};
use crate::gguf::GgufFile;
use serde_json::{json, Value};
use std::collections::{BTreeSet, HashMap};
use std::path::Path;

/// llama.cpp's token type of control tokens (`LLAMA_TOKEN_TYPE_CONTROL`).
const CONTROL: i64 = 3;
/// llama.cpp's token type of the unknown token.
const UNKNOWN: i64 = 2;
/// llama.cpp's token type of user-defined tokens (added, not special).
const USER_DEFINED: i64 = 4;

/// The splitting regex of the vocabularies whose `tokenizer.ggml.pre` names
/// one other than GPT-2's (Llama 3's, Qwen2's), as transformers maps them;
/// other names keep the byte-level pre-tokenizer's own GPT-2 split.
fn split_regex(pre: &str) -> Option<&'static str> {
    const LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const QWEN2: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    match pre {
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "smaug-bpe" | "dbrx" => Some(LLAMA3),
        "qwen2" | "deepseek-r1-qwen" | "megrez" => Some(QWEN2),
        _ => None,
    }
}

/// What [`from_gguf`] reads besides the tokenizer itself.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufTokenizer {
    /// The `tokenizer.json` document.
    pub tokenizer_json: Value,
    /// The beginning-of-sequence token (the chat template's `bos_token`).
    pub bos: Option<String>,
    /// Whether the file asks for it in front of every text
    /// (`tokenizer.ggml.add_bos_token`; when absent, true for SentencePiece
    /// and false for byte-level vocabularies).
    pub add_bos: bool,
    /// The end-of-sequence token.
    pub eos: Option<String>,
    /// The chat template, when the file has one.
    pub chat_template: Option<String>,
}

/// GPT-2's byte-to-character table: printable bytes stand for themselves,
/// the others for characters from U+0100 on.
fn byte_level_chars() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut extra = 0u32;
    for byte in 0..=255u32 {
        let printable =
            (0x21..=0x7E).contains(&byte) || (0xA1..=0xAC).contains(&byte) || byte >= 0xAE;
        table[byte as usize] = if printable {
            char::from_u32(byte).expect("a Latin-1 code point")
        } else {
            extra += 1;
            char::from_u32(255 + extra).expect("a code point below U+0200")
        };
    }
    table
}

/// Reads the tokenizer of the GGUF file at `path`.
pub fn from_gguf(path: &Path) -> Result<GgufTokenizer> {
    let file = GgufFile::open(path)?;
    from_file(&file)
}

/// [`from_gguf`] of an opened file.
pub fn from_file(file: &GgufFile) -> Result<GgufTokenizer> {
    let bad = |key: &str, message: String| Error::Config {
        file: file.path().display().to_string(),
        key: key.to_string(),
        message,
    };
    let model = file
        .get("tokenizer.ggml.model")
        .and_then(Value::as_str)
        .ok_or_else(|| {
            bad(
                "tokenizer.ggml.model",
                "missing: the file carries no tokenizer; give token ids or --tokenizer DIR".into(),
            )
        })?;
    if model != "gpt2" && model != "llama" {
        return Err(bad(
            "tokenizer.ggml.model",
            format!("`{model}`: only byte-level BPE (`gpt2`) and SentencePiece (`llama`) tokenizers are read from GGUF files; give --tokenizer DIR with the model's tokenizer.json"),
        ));
    }
    let strings = |key: &str| -> Result<Vec<String>> {
        let items = file
            .get(key)
            .and_then(Value::as_array)
            .ok_or_else(|| bad(key, "missing or not an array".into()))?;
        items
            .iter()
            .enumerate()
            .map(|(i, v)| {
                v.as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| bad(key, format!("entry {i} is not a string")))
            })
            .collect()
    };
    let tokens = strings("tokenizer.ggml.tokens")?;
    let types: Vec<i64> = match file.get("tokenizer.ggml.token_type") {
        Some(Value::Array(items)) => items.iter().map(|v| v.as_i64().unwrap_or(1)).collect(),
        _ => Vec::new(),
    };
    let tokenizer_json = if model == "llama" {
        let scores: Vec<f64> = file
            .get("tokenizer.ggml.scores")
            .and_then(Value::as_array)
            .ok_or_else(|| {
                bad(
                    "tokenizer.ggml.scores",
                    "missing or not an array: a SentencePiece vocabulary needs its scores".into(),
                )
            })?
            .iter()
            .map(|v| v.as_f64().unwrap_or(0.0))
            .collect();
        if scores.len() != tokens.len() {
            return Err(bad(
                "tokenizer.ggml.scores",
                format!("{} scores for {} tokens", scores.len(), tokens.len()),
            ));
        }
        sentencepiece_json(&tokens, &scores, &types)
    } else {
        let merges = strings("tokenizer.ggml.merges")?;
        byte_level_json(&tokens, &merges, &types, file)
            .map_err(|(key, message)| bad(key, message))?
    };
    let token_of = |key: &str| -> Result<Option<String>> {
        match file.get(key).and_then(Value::as_u64) {
            None => Ok(None),
            Some(id) => tokens.get(id as usize).cloned().map(Some).ok_or_else(|| {
                bad(
                    key,
                    format!("token {id} is past the {} tokens", tokens.len()),
                )
            }),
        }
    };
    // Without the flag, llama.cpp (and transformers) put BOS in front of a
    // SentencePiece vocabulary's texts, not of a byte-level one's.
    let add_bos = file
        .get("tokenizer.ggml.add_bos_token")
        .and_then(Value::as_bool)
        .unwrap_or(model == "llama");
    Ok(GgufTokenizer {
        tokenizer_json,
        bos: token_of("tokenizer.ggml.bos_token_id")?,
        add_bos,
        eos: token_of("tokenizer.ggml.eos_token_id")?,
        chat_template: file
            .get("tokenizer.chat_template")
            .and_then(Value::as_str)
            .map(str::to_owned),
    })
}

/// The byte-level BPE document (transformers' `byte_level_tokenizer` plus
/// its special and split handling); an error names the key and the fault.
fn byte_level_json(
    tokens: &[String],
    merges: &[String],
    types: &[i64],
    file: &GgufFile,
) -> std::result::Result<Value, (&'static str, String)> {
    let alphabet = byte_level_chars();
    let in_alphabet: BTreeSet<char> = alphabet.iter().copied().collect();
    let spelled = |token: &str| -> String {
        if token.chars().all(|c| in_alphabet.contains(&c)) {
            token.to_owned()
        } else {
            token.bytes().map(|b| alphabet[b as usize]).collect()
        }
    };
    let mut vocab = serde_json::Map::new();
    let mut ids: HashMap<String, usize> = HashMap::new();
    for (id, token) in tokens.iter().enumerate() {
        let key = spelled(token);
        ids.insert(key.clone(), id);
        vocab.insert(key, json!(id));
    }
    let mut merge_pairs = Vec::with_capacity(merges.len());
    for (i, merge) in merges.iter().enumerate() {
        let (left, right) = merge.split_once(' ').ok_or_else(|| {
            (
                "tokenizer.ggml.merges",
                format!("entry {i} `{merge}` is not two tokens separated by a space"),
            )
        })?;
        for piece in [left, right] {
            if !ids.contains_key(piece) {
                return Err((
                    "tokenizer.ggml.merges",
                    format!("entry {i} `{merge}` names `{piece}`, which is not in tokenizer.ggml.tokens"),
                ));
            }
        }
        merge_pairs.push(json!([left, right]));
    }
    // Control tokens (in the byte alphabet: one outside it is a byte
    // sequence llama.cpp mislabelled) stay whole as special tokens;
    // user-defined ones stay whole as plain added tokens.
    let added: Vec<Value> = tokens
        .iter()
        .zip(types)
        .enumerate()
        .filter_map(|(id, (token, kind))| {
            let special = match *kind {
                CONTROL if token.chars().all(|c| in_alphabet.contains(&c)) => true,
                USER_DEFINED => false,
                _ => return None,
            };
            Some(
                json!({"id": id, "content": token, "single_word": false, "lstrip": false,
                        "rstrip": false, "normalized": false, "special": special}),
            )
        })
        .collect();
    let byte_level = |add_prefix_space: bool, trim_offsets: bool, use_regex: bool| {
        json!({"type": "ByteLevel", "add_prefix_space": add_prefix_space,
               "trim_offsets": trim_offsets, "use_regex": use_regex})
    };
    let pre = file
        .get("tokenizer.ggml.pre")
        .and_then(Value::as_str)
        .unwrap_or("default");
    let pre_tokenizer = match split_regex(pre) {
        Some(regex) => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": false},
            byte_level(false, true, false),
        ]}),
        None => byte_level(false, true, true),
    };
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": byte_level(true, false, true),
        "decoder": byte_level(true, true, true),
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null,
            "continuing_subword_prefix": "", "end_of_word_suffix": "",
            "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab, "merges": merge_pairs,
        },
    }))
}

/// The SentencePiece document, as transformers builds it from a GGUF file
/// (`LlamaTokenizer` over the file's vocabulary): a BPE with byte fallback
/// whose merges are recovered from the scores (every split of a token into
/// two vocabulary pieces, ranked by the token's score, then by the pieces'
/// lengths, longest first), `▁` prepended to the first word only, no
/// normalizer; control and unknown tokens special.
fn sentencepiece_json(tokens: &[String], scores: &[f64], types: &[i64]) -> Value {
    // Python dict semantics: a repeated token keeps its first position in
    // the iteration order and its last id and score.
    let mut ids: HashMap<&str, usize> = HashMap::new();
    let mut score_of: HashMap<&str, f64> = HashMap::new();
    let mut order: Vec<&str> = Vec::new();
    for (id, token) in tokens.iter().enumerate() {
        if ids.insert(token, id).is_none() {
            order.push(token);
        }
        score_of.insert(token, scores[id]);
    }
    let mut merges: Vec<(&str, &str, f64)> = Vec::new();
    for merge in &order {
        let score = score_of[merge];
        let mut local: Vec<(&str, &str, f64)> = merge
            .char_indices()
            .skip(1)
            .map(|(at, _)| merge.split_at(at))
            .filter(|(l, r)| ids.contains_key(l) && ids.contains_key(r))
            .map(|(l, r)| (l, r, score))
            .collect();
        local.sort_by_key(|(l, r, _)| (ids[l], ids[r]));
        merges.extend(local);
    }
    let key = |m: &(&str, &str, f64)| (m.2, m.0.chars().count(), m.1.chars().count());
    // Stable, descending: equal keys keep their order, as Python's
    // `sorted(..., reverse=True)` does.
    merges.sort_by(|a, b| {
        let (ka, kb) = (key(a), key(b));
        kb.0.total_cmp(&ka.0)
            .then(kb.1.cmp(&ka.1))
            .then(kb.2.cmp(&ka.2))
    });
    let mut vocab = serde_json::Map::new();
    for (id, token) in tokens.iter().enumerate() {
        vocab.insert(token.clone(), json!(id));
    }
    let added: Vec<Value> = tokens
        .iter()
        .zip(types)
        .enumerate()
        .filter(|(_, (_, kind))| matches!(**kind, CONTROL | UNKNOWN))
        .map(|(id, (token, _))| {
            json!({"id": id, "content": token, "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "Metaspace", "replacement": "\u{2581}", "prepend_scheme": "first", "split": false},
        "post_processor": null,
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0},
        ]},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null,
            "continuing_subword_prefix": null, "end_of_word_suffix": null,
            "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
            "vocab": vocab,
            "merges": merges.iter().map(|(l, r, _)| json!([l, r])).collect::<Vec<_>>(),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_byte_table_is_gpt2_s() {
        let table = byte_level_chars();
        assert_eq!(table[b'a' as usize], 'a');
        assert_eq!(table[b' ' as usize], 'Ġ');
        assert_eq!(table[b'\n' as usize], 'Ċ');
        assert_eq!(table[0], 'Ā');
        let distinct: BTreeSet<char> = table.iter().copied().collect();
        assert_eq!(distinct.len(), 256);
    }
}
