//! Training data: JSONL records (`{"text"}`, `{"prompt", "completion"}` or
//! `{"messages": [...]}` rendered with the tokenizer's chat template),
//! tokenized into [`Example`]s that know where their loss starts, truncated
//! to a length limit with a count of what was cut, and split into training
//! and validation sets.

use crate::error::{Result, TrainError};
use mlx_zoo_core::tokenizer::{ChatMessage, Tokenizer};
use serde::Deserialize;
use std::path::{Path, PathBuf};

/// One record of a JSONL data file.
#[derive(Debug, Clone, PartialEq)]
pub enum Record {
    /// Plain text; loss on every token.
    Text(String),
    /// A prompt and its completion; with prompt masking, loss on the
    /// completion only.
    Completion {
        /// The prompt.
        prompt: String,
        /// The completion.
        completion: String,
    },
    /// A conversation; with prompt masking, loss on the last message only.
    Chat(Vec<ChatMessage>),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRecord {
    text: Option<String>,
    prompt: Option<String>,
    completion: Option<String>,
    messages: Option<Vec<ChatMessage>>,
}

/// A tokenized training sequence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    /// Token ids, beginning-of-sequence and end-of-sequence tokens included.
    pub ids: Vec<u32>,
    /// Index of the first token that counts in the loss (0: all of them).
    pub loss_start: usize,
}

/// How records become examples.
#[derive(Debug, Clone, PartialEq)]
pub struct DataOptions {
    /// Longest sequence in tokens; longer ones are cut (and counted).
    pub max_seq_len: usize,
    /// Loss on completions (or the last chat message) only.
    pub mask_prompt: bool,
    /// Share of the records held out for validation when no `valid.jsonl`
    /// is given.
    pub valid_fraction: f32,
}

impl Default for DataOptions {
    fn default() -> Self {
        Self {
            max_seq_len: 512,
            mask_prompt: false,
            valid_fraction: 0.1,
        }
    }
}

/// Training and validation examples, with what tokenizing found.
#[derive(Debug, Clone)]
pub struct Dataset {
    /// Training examples.
    pub train: Vec<Example>,
    /// Validation examples (may be empty).
    pub valid: Vec<Example>,
    /// Examples cut to [`DataOptions::max_seq_len`].
    pub truncated: usize,
    /// Tokens counting in the loss, over the training set.
    pub train_loss_tokens: usize,
    /// Where the data came from.
    pub source: PathBuf,
}

/// Reads a JSONL file of records. Blank lines are skipped; any other line
/// must be one JSON object with exactly one of the accepted shapes.
pub fn read_records(path: &Path) -> Result<Vec<Record>> {
    let text = std::fs::read_to_string(path).map_err(TrainError::io(path))?;
    let mut records = Vec::new();
    for (index, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad = |reason: String| TrainError::BadRecord {
            path: path.to_path_buf(),
            line: index + 1,
            reason,
        };
        let raw: RawRecord = serde_json::from_str(line).map_err(|e| {
            bad(format!(
                "{e}; expected {{\"text\": ...}}, {{\"prompt\": ..., \"completion\": ...}} or {{\"messages\": [{{\"role\": ..., \"content\": ...}}]}}"
            ))
        })?;
        let record = match raw {
            RawRecord {
                text: Some(text),
                prompt: None,
                completion: None,
                messages: None,
            } => Record::Text(text),
            RawRecord {
                text: None,
                prompt: Some(prompt),
                completion: Some(completion),
                messages: None,
            } => Record::Completion { prompt, completion },
            RawRecord {
                text: None,
                prompt: None,
                completion: None,
                messages: Some(messages),
            } => {
                if messages.is_empty() {
                    return Err(bad("`messages` is empty".into()));
                }
                Record::Chat(messages)
            }
            RawRecord {
                prompt: Some(_),
                completion: None,
                ..
            } => return Err(bad("`prompt` without `completion`".into())),
            RawRecord {
                prompt: None,
                completion: Some(_),
                ..
            } => return Err(bad("`completion` without `prompt`".into())),
            _ => {
                return Err(bad(
                    "expected exactly one of `text`, `prompt` + `completion` or `messages`".into(),
                ))
            }
        };
        records.push(record);
    }
    Ok(records)
}

/// Tokenizes one record; returns the example and whether it was cut.
pub fn tokenize(
    record: &Record,
    tokenizer: &Tokenizer,
    options: &DataOptions,
) -> Result<(Example, bool)> {
    let eos = tokenizer.eos_ids().first().copied();
    let (mut ids, loss_start) = match record {
        Record::Text(text) => (tokenizer.encode(text, true)?, 0),
        Record::Completion { prompt, completion } => {
            let mut ids = tokenizer.encode(prompt, true)?;
            let start = ids.len();
            ids.extend(tokenizer.encode(completion, false)?);
            (ids, if options.mask_prompt { start } else { 0 })
        }
        Record::Chat(messages) => {
            let full = tokenizer.encode(&tokenizer.apply_chat_template(messages, false)?, false)?;
            let start = if options.mask_prompt {
                let prompt = tokenizer.encode(
                    &tokenizer.apply_chat_template(&messages[..messages.len() - 1], true)?,
                    false,
                )?;
                // The rendered prompt is a prefix of the rendered chat for
                // sane templates; where tokenization differs at the seam, the
                // loss starts after the common part.
                prompt.iter().zip(&full).take_while(|(a, b)| a == b).count()
            } else {
                0
            };
            (full, start)
        }
    };
    if let Some(eos) = eos {
        if ids.last() != Some(&eos) {
            ids.push(eos);
        }
    }
    let cut = ids.len() > options.max_seq_len;
    ids.truncate(options.max_seq_len);
    Ok((Example { ids, loss_start }, cut))
}

/// Loads a data directory (`train.jsonl`, optional `valid.jsonl`) or one
/// JSONL file (the last [`DataOptions::valid_fraction`] of its records
/// become the validation set).
pub fn load_dataset(path: &Path, tokenizer: &Tokenizer, options: &DataOptions) -> Result<Dataset> {
    if options.max_seq_len < 2 {
        return Err(TrainError::InvalidSetting(format!(
            "max_seq_len {} is below 2 tokens",
            options.max_seq_len
        )));
    }
    let (train_records, valid_records) = if path.is_dir() {
        let train = path.join("train.jsonl");
        if !train.is_file() {
            return Err(TrainError::NoData {
                path: path.to_path_buf(),
                reason: "no train.jsonl in this directory".into(),
            });
        }
        let valid = path.join("valid.jsonl");
        let valid = if valid.is_file() {
            read_records(&valid)?
        } else {
            Vec::new()
        };
        (read_records(&train)?, valid)
    } else {
        let mut records = read_records(path)?;
        let held =
            ((records.len() as f32) * options.valid_fraction.clamp(0.0, 0.5)).floor() as usize;
        let valid = records.split_off(records.len() - held);
        (records, valid)
    };
    if train_records.is_empty() {
        return Err(TrainError::NoData {
            path: path.to_path_buf(),
            reason: "no training records".into(),
        });
    }
    let mut truncated = 0;
    let mut convert = |records: &[Record]| -> Result<Vec<Example>> {
        records
            .iter()
            .map(|record| {
                let (example, cut) = tokenize(record, tokenizer, options)?;
                truncated += usize::from(cut);
                Ok(example)
            })
            .collect()
    };
    let train = convert(&train_records)?;
    let valid = convert(&valid_records)?;
    if truncated > 0 {
        tracing::warn!(
            "{truncated} of {} sequences were longer than {} tokens and were cut",
            train.len() + valid.len(),
            options.max_seq_len
        );
    }
    let train_loss_tokens = train.iter().map(loss_tokens).sum();
    if train_loss_tokens == 0 {
        return Err(TrainError::NoData {
            path: path.to_path_buf(),
            reason: "no token counts in the loss (every sequence is prompt only, or shorter than 2 tokens)".into(),
        });
    }
    Ok(Dataset {
        train,
        valid,
        truncated,
        train_loss_tokens,
        source: path.to_path_buf(),
    })
}

impl Dataset {
    /// Checks every token id against the model's vocabulary: a tokenizer
    /// with added tokens past the embedding table produced ids that MLX's
    /// CPU gather read out of bounds.
    pub fn check_vocabulary(&self, vocab_size: usize) -> Result<()> {
        for (split, examples) in [("training", &self.train), ("validation", &self.valid)] {
            for (index, example) in examples.iter().enumerate() {
                if let Some(&id) = example.ids.iter().find(|&&id| id as usize >= vocab_size) {
                    return Err(TrainError::NoData {
                        path: self.source.clone(),
                        reason: format!(
                            "{split} example {} has token id {id}, past the model's vocabulary \
                             of {vocab_size} (the tokenizer has tokens the embedding lacks: \
                             use the model's own tokenizer, or resize the embedding)",
                            index + 1
                        ),
                    });
                }
            }
        }
        Ok(())
    }
}

/// Targets of `example` that count in the loss.
pub fn loss_tokens(example: &Example) -> usize {
    example.ids.len().saturating_sub(example.loss_start.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_ids_past_the_vocabulary_are_named() {
        let example = |ids: Vec<u32>| Example { ids, loss_start: 0 };
        let data = Dataset {
            train: vec![example(vec![1, 2, 3]), example(vec![4, 130, 5])],
            valid: vec![],
            truncated: 0,
            train_loss_tokens: 4,
            source: PathBuf::from("data.jsonl"),
        };
        assert!(data.check_vocabulary(131).is_ok());
        let err = data.check_vocabulary(128).unwrap_err().to_string();
        assert!(
            err.contains("data.jsonl")
                && err.contains("training example 2 has token id 130")
                && err.contains("vocabulary of 128"),
            "{err}"
        );
    }
}
