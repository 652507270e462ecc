//! The model's tokenizer: Hugging Face `tokenizer.json` (read with the
//! `tokenizers` crate) plus the special tokens `tokenizer_config.json`
//! names, so text goes in and comes out and generation stops at the
//! end-of-sequence token; and the chat templates, from every layout
//! checkpoints ship them in (see [`Tokenizer::from_dir`]).

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
    /// Chat templates by name (`default` when a checkpoint has one).
    chat_templates: std::collections::BTreeMap<String, String>,
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
    /// The tokenizer of a model path: a directory's `tokenizer.json`
    /// ([`Tokenizer::from_dir`]) or a GGUF file's metadata
    /// ([`Tokenizer::from_gguf`]).
    pub fn from_path(path: &Path) -> Result<Self> {
        let is_gguf = path.is_file()
            && path
                .extension()
                .is_some_and(|e| e.eq_ignore_ascii_case("gguf"));
        if is_gguf {
            Self::from_gguf(path)
        } else {
            Self::from_dir(path)
        }
    }

    /// The tokenizer a GGUF file carries (see [`crate::gguf_tokenizer`]).
    pub fn from_gguf(path: &Path) -> Result<Self> {
        let read = crate::gguf_tokenizer::from_gguf(path)?;
        let text = read.tokenizer_json.to_string();
        let inner = text
            .parse::<tokenizers::Tokenizer>()
            .map_err(|e| Error::Archive {
                path: path.to_path_buf(),
                message: format!("its tokenizer metadata does not make a tokenizer: {e}"),
            })?;
        let id = |token: &Option<String>| token.as_deref().and_then(|t| inner.token_to_id(t));
        let bos = if read.add_bos { id(&read.bos) } else { None };
        let eos = id(&read.eos).into_iter().collect();
        let chat_templates = read
            .chat_template
            .map(|t| ("default".to_owned(), t))
            .into_iter()
            .collect();
        Ok(Self {
            inner,
            path: path.to_path_buf(),
            bos,
            eos,
            bos_text: read.bos.unwrap_or_default(),
            eos_text: read.eos.unwrap_or_default(),
            chat_templates,
        })
    }

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
        let chat_templates = chat_templates(dir, &config)?;
        Ok(Self {
            inner,
            path,
            bos,
            eos,
            bos_text: special(&config, "bos_token").unwrap_or_default(),
            eos_text: special(&config, "eos_token").unwrap_or_default(),
            chat_templates,
        })
    }

    /// The names of the chat templates the checkpoint ships (`default`
    /// first when present).
    pub fn chat_template_names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.chat_templates.keys().map(String::as_str).collect();
        names.sort_by_key(|n| (*n != "default", *n));
        names
    }

    /// Uses `template` (Jinja text, e.g. read from a file) as the default
    /// chat template.
    pub fn set_chat_template(&mut self, template: String) {
        self.chat_templates.insert("default".into(), template);
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
        self.apply_named_chat_template(messages, add_generation_prompt, None)
    }

    /// [`Self::apply_chat_template`] with the template called `name`
    /// (`None`: `default`, or the only one there is), as transformers'
    /// `chat_template=NAME`.
    pub fn apply_named_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        name: Option<&str>,
    ) -> Result<String> {
        let dir = self
            .path
            .parent()
            .map(|d| d.display().to_string())
            .unwrap_or_default();
        let template = match name {
            Some(name) => self.chat_templates.get(name).ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "{dir}: no chat template named {name:?} (the checkpoint has: {})",
                    self.chat_template_names().join(", ")
                ))
            })?,
            None => match (
                self.chat_templates.get("default"),
                self.chat_templates.len(),
            ) {
                (Some(t), _) => t,
                (None, 1) => self.chat_templates.values().next().expect("one template"),
                (None, 0) => {
                    return Err(Error::InvalidArgument(format!(
                        "{dir}: no chat template (looked for chat_template.jinja, \
                         chat_template.json and tokenizer_config.json's chat_template)"
                    )))
                }
                (None, _) => {
                    return Err(Error::InvalidArgument(format!(
                        "{dir}: several chat templates and none is `default`; choose one of: {}",
                        self.chat_template_names().join(", ")
                    )))
                }
            },
        };
        let mut env = minijinja::Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        // A hostile or broken template must not run away: instructions and
        // output are bounded (a real template renders a long conversation
        // in well under 1% of either).
        env.set_fuel(Some(TEMPLATE_FUEL));
        env.set_recursion_limit(TEMPLATE_RECURSION);
        env.add_function("strftime_now", |format: String| strftime_now(&format));
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
                    tools => minijinja::Value::UNDEFINED,
                    documents => minijinja::Value::UNDEFINED,
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

/// The chat templates of a checkpoint directory, by name, in transformers'
/// order of precedence: `tokenizer_config.json`'s `chat_template` (a string,
/// or a list of `{"name", "template"}`), then `chat_template.json`
/// (`{"chat_template": ...}`, same forms), then `chat_template.jinja` (the
/// file transformers 4.5x+ writes) as `default`, and
/// `additional_chat_templates/NAME.jinja` by name; later sources replace
/// earlier ones of the same name.
fn chat_templates(
    dir: &Path,
    config: &serde_json::Value,
) -> Result<std::collections::BTreeMap<String, String>> {
    let mut templates = std::collections::BTreeMap::new();
    let mut add_value = |value: Option<&serde_json::Value>, file: &Path| -> Result<()> {
        match value {
            None | Some(serde_json::Value::Null) => Ok(()),
            Some(serde_json::Value::String(text)) => {
                templates.insert("default".to_owned(), text.clone());
                Ok(())
            }
            Some(serde_json::Value::Array(items)) => {
                for item in items {
                    let name = item.get("name").and_then(|n| n.as_str());
                    let text = item.get("template").and_then(|t| t.as_str());
                    match (name, text) {
                        (Some(name), Some(text)) => {
                            templates.insert(name.to_owned(), text.to_owned());
                        }
                        _ => {
                            return Err(Error::InvalidArgument(format!(
                                "{}: chat_template list entries need a \"name\" and a \"template\" string, found {item}",
                                file.display()
                            )))
                        }
                    }
                }
                Ok(())
            }
            Some(other) => Err(Error::InvalidArgument(format!(
                "{}: chat_template must be a string or a list of named templates, found {}",
                file.display(),
                match other {
                    serde_json::Value::Object(_) => "an object",
                    serde_json::Value::Number(_) => "a number",
                    _ => "a boolean",
                }
            ))),
        }
    };
    add_value(
        config.get("chat_template"),
        &dir.join("tokenizer_config.json"),
    )?;
    let json_path = dir.join("chat_template.json");
    if json_path.is_file() {
        let text = read_text(&json_path)?;
        let value: serde_json::Value =
            serde_json::from_str(&text).map_err(|source| Error::Json {
                path: json_path.clone(),
                source,
            })?;
        add_value(value.get("chat_template"), &json_path)?;
    }
    let jinja = dir.join("chat_template.jinja");
    if jinja.is_file() {
        templates.insert("default".to_owned(), read_text(&jinja)?);
    }
    let extra = dir.join("additional_chat_templates");
    if extra.is_dir() {
        let entries = std::fs::read_dir(&extra).map_err(|source| Error::Io {
            path: extra.clone(),
            source,
        })?;
        for entry in entries.flatten() {
            let path = entry.path();
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".jinja"));
            if let Some(name) = name {
                templates.insert(name.to_owned(), read_text(&path)?);
            }
        }
    }
    Ok(templates)
}

/// A template file's text, with its path in any error.
fn read_text(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// transformers' `strftime_now(format)`: the current UTC time formatted
/// with the common `strftime` codes (`%Y %y %m %d %e %B %b %A %a %H %M %S %j %%`;
/// others stay as written). Llama 3.1+ templates put today's date in the
/// system prompt with it.
fn strftime_now(format: &str) -> String {
    let seconds = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    format_utc(seconds, format)
}

/// [`strftime_now`] for a given Unix time.
fn format_utc(seconds: u64, format: &str) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = [
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
        "Monday",
        "Tuesday",
        "Wednesday",
    ];
    let days = (seconds / 86_400) as i64;
    let second_of_day = seconds % 86_400;
    // Howard Hinnant's civil-from-days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    let cumulative = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let day_of_year = cumulative[(month - 1) as usize] + day + i64::from(leap && month > 2);
    let weekday = DAYS[(days.rem_euclid(7)) as usize];
    let month_name = MONTHS[(month - 1) as usize];
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('Y') => out.push_str(&year.to_string()),
            Some('y') => out.push_str(&format!("{:02}", year % 100)),
            Some('m') => out.push_str(&format!("{month:02}")),
            Some('d') => out.push_str(&format!("{day:02}")),
            Some('e') => out.push_str(&format!("{day:>2}")),
            Some('B') => out.push_str(month_name),
            Some('b') => out.push_str(&month_name[..3]),
            Some('A') => out.push_str(weekday),
            Some('a') => out.push_str(&weekday[..3]),
            Some('H') => out.push_str(&format!("{:02}", second_of_day / 3600)),
            Some('M') => out.push_str(&format!("{:02}", second_of_day / 60 % 60)),
            Some('S') => out.push_str(&format!("{:02}", second_of_day % 60)),
            Some('j') => out.push_str(&format!("{day_of_year:03}")),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
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

#[cfg(test)]
mod tests {
    use super::format_utc;

    #[test]
    fn strftime_codes_format_as_python_does() {
        // Python's datetime.strftime gives these for the same instants.
        let f = "%d %b %Y %A %a %j %H:%M:%S %y %B %e %% %Q";
        assert_eq!(
            format_utc(0, f),
            "01 Jan 1970 Thursday Thu 001 00:00:00 70 January  1 % %Q"
        );
        assert_eq!(
            format_utc(1_796_300_000, f),
            "03 Dec 2026 Thursday Thu 337 12:13:20 26 December  3 % %Q"
        );
        assert_eq!(
            format_utc(951_868_800, f),
            "01 Mar 2000 Wednesday Wed 061 00:00:00 00 March  1 % %Q"
        );
    }
}
