//! The model's tokenizer: Hugging Face `tokenizer.json` (read with the
//! `tokenizers` crate) plus the special tokens `tokenizer_config.json`
//! names, so text goes in and comes out and generation stops at the
//! end-of-sequence token.

use crate::error::{Error, Result};
use std::path::{Path, PathBuf};

/// One turn of a conversation.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The text.
    pub content: String,
}

/// A loaded tokenizer.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    path: PathBuf,
    bos: Option<u32>,
    eos: Vec<u32>,
    bos_text: String,
    eos_text: String,
    chat_template: Option<String>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("path", &self.path)
            .field("vocab", &self.inner.get_vocab_size(true))
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .finish()
    }
}

fn special(config: &serde_json::Value, key: &str) -> Option<String> {
    match config.get(key)? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => {
            o.get("content").and_then(|c| c.as_str()).map(str::to_owned)
        }
        _ => None,
    }
}

impl Tokenizer {
    /// Reads `tokenizer.json` (and `tokenizer_config.json`, when present)
    /// from `dir`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.is_file() {
            return Err(Error::InvalidArgument(format!(
                "{}: no tokenizer.json; give token ids instead, or point at a directory with the model's tokenizer",
                dir.display()
            )));
        }
        // The tokenizers crate panics on some malformed files (an `expect`
        // in its decoder deserialisation, found by fuzzing): a panic there
        // is a bad file, not a bug of ours.
        let parsed = std::panic::catch_unwind(|| tokenizers::Tokenizer::from_file(&path));
        let inner = match parsed {
            Ok(Ok(inner)) => inner,
            Ok(Err(e)) => {
                return Err(Error::Archive {
                    path: path.clone(),
                    message: format!("not a tokenizer this version reads: {e}"),
                })
            }
            Err(_) => {
                return Err(Error::Archive {
                    path: path.clone(),
                    message: "malformed tokenizer (the tokenizers library could not parse it)"
                        .into(),
                })
            }
        };
        let config_path = dir.join("tokenizer_config.json");
        let config: serde_json::Value = if config_path.is_file() {
            let text = std::fs::read_to_string(&config_path).map_err(|source| Error::Io {
                path: config_path.clone(),
                source,
            })?;
            serde_json::from_str(&text).map_err(|source| Error::Json {
                path: config_path.clone(),
                source,
            })?
        } else {
            serde_json::Value::Null
        };
        let id = |token: Option<String>| token.and_then(|t| inner.token_to_id(&t));
        let bos = id(special(&config, "bos_token"));
        let eos = id(special(&config, "eos_token")).into_iter().collect();
        let chat_template = match config.get("chat_template") {
            Some(serde_json::Value::String(t)) => Some(t.clone()),
            // A list of named templates: take "default".
            Some(serde_json::Value::Array(items)) => items
                .iter()
                .find(|i| i.get("name").and_then(|n| n.as_str()) == Some("default"))
                .and_then(|i| i.get("template"))
                .and_then(|t| t.as_str())
                .map(str::to_owned),
            _ => None,
        };
        Ok(Self {
            inner,
            path,
            bos,
            eos,
            bos_text: special(&config, "bos_token").unwrap_or_default(),
            eos_text: special(&config, "eos_token").unwrap_or_default(),
            chat_template,
        })
    }

    /// Token ids of `text`, with the beginning-of-sequence token in front
    /// when the tokenizer has one and `add_bos`.
    pub fn encode(&self, text: &str, add_bos: bool) -> Result<Vec<u32>> {
        let encoding = self.inner.encode(text, false).map_err(|e| {
            Error::InvalidArgument(format!(
                "{}: cannot encode the prompt: {e}",
                self.path.display()
            ))
        })?;
        let mut ids = Vec::with_capacity(encoding.len() + 1);
        if add_bos {
            ids.extend(self.bos);
        }
        ids.extend_from_slice(encoding.get_ids());
        Ok(ids)
    }

    /// Text of `ids`, special tokens left out.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, true).map_err(|e| {
            Error::InvalidArgument(format!(
                "{}: cannot decode tokens: {e}",
                self.path.display()
            ))
        })
    }

    /// Renders `messages` with the tokenizer's chat template (Jinja, with
    /// transformers' settings: trimmed blocks, `bos_token`, `eos_token`,
    /// `raise_exception`, `add_generation_prompt`).
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let template = self.chat_template.as_deref().ok_or_else(|| {
            Error::InvalidArgument(format!(
                "{}: tokenizer_config.json has no chat_template",
                self.path.display()
            ))
        })?;
        let mut env = minijinja::Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        // A hostile or broken template must not run away: instructions and
        // output are bounded (a real template renders a long conversation
        // in well under 1% of either).
        env.set_fuel(Some(TEMPLATE_FUEL));
        env.set_recursion_limit(TEMPLATE_RECURSION);
        env.add_function(
            "raise_exception",
            |message: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    message,
                ))
            },
        );
        let bad = |e: minijinja::Error| {
            Error::InvalidArgument(format!("{}: chat template: {e}", self.path.display()))
        };
        env.add_template("chat", template).map_err(bad)?;
        let mut out = CappedText::default();
        let chat = env.get_template("chat").map_err(bad)?;
        let rendered = chat
            .render_captured_to(
                minijinja::context! {
                    messages => messages,
                    add_generation_prompt => add_generation_prompt,
                    bos_token => self.bos_text,
                    eos_token => self.eos_text,
                },
                &mut out,
            )
            .map(drop);
        if out.overflowed {
            return Err(Error::InvalidArgument(format!(
                "{}: chat template: the rendered prompt exceeds {} MiB",
                self.path.display(),
                TEMPLATE_OUTPUT_LIMIT >> 20
            )));
        }
        rendered.map_err(|e| match e.kind() {
            minijinja::ErrorKind::OutOfFuel => Error::InvalidArgument(format!(
                "{}: chat template: stopped after {TEMPLATE_FUEL} instructions \
                 (a loop that runs away?)",
                self.path.display()
            )),
            _ => bad(e),
        })?;
        String::from_utf8(out.text).map_err(|_| {
            Error::InvalidArgument(format!(
                "{}: chat template: rendered text is not UTF-8",
                self.path.display()
            ))
        })
    }

    /// The end-of-sequence token ids.
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos
    }
}

/// Instructions a chat template may run (minijinja fuel): ChatML over a
/// thousand messages takes about 60k.
const TEMPLATE_FUEL: u64 = 10_000_000;
/// Nesting of template calls and includes.
const TEMPLATE_RECURSION: usize = 100;
/// The largest rendered prompt, in bytes.
const TEMPLATE_OUTPUT_LIMIT: usize = 64 << 20;

/// A writer that stops accepting text past [`TEMPLATE_OUTPUT_LIMIT`].
#[derive(Default)]
struct CappedText {
    text: Vec<u8>,
    overflowed: bool,
}

impl std::io::Write for CappedText {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.text.len() + buf.len() > TEMPLATE_OUTPUT_LIMIT {
            self.overflowed = true;
            return Err(std::io::Error::other("rendered prompt too long"));
        }
        self.text.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
