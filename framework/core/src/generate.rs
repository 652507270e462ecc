//! Token generation: the prompt is processed in chunks into a KV cache, then
//! tokens are produced one at a time by greedy or sampled decoding
//! (temperature, top-k, top-p, min-p, repetition penalty, seed), stopping
//! at a stop token or a token budget. [`generate`] returns an iterator, so
//! callers stream tokens as they come.

use crate::cache::KvCache;
use crate::error::{Error, MlxContext, Result};
use crate::model::CausalLm;
use mlx_rs::Array;
use serde::{Deserialize, Serialize};
use std::time::{Duration, Instant};

/// How the next token is chosen from the logits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sampling {
    /// 0 means greedy (argmax); otherwise logits are divided by it.
    pub temperature: f32,
    /// Keep the smallest set of tokens whose probability reaches this (1: off).
    pub top_p: f32,
    /// Keep this many most likely tokens (0: off).
    pub top_k: usize,
    /// Drop tokens less likely than this fraction of the most likely (0: off).
    pub min_p: f32,
    /// transformers' repetition penalty on tokens already seen (1: off).
    pub repetition_penalty: f32,
    /// Seed of the sampler (sampling only).
    pub seed: u64,
}

impl Default for Sampling {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            seed: 0,
        }
    }
}

/// What to generate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerateOptions {
    /// Most new tokens.
    pub max_tokens: usize,
    /// Token choice.
    pub sampling: Sampling,
    /// Generation ends when one of these is produced (it is not returned).
    pub stop_tokens: Vec<u32>,
    /// Prompt tokens per forward pass while filling the cache.
    pub prefill_chunk: usize,
    /// Store the KV cache affine-quantized with these settings (mlx-lm's
    /// `--kv-bits`/`--kv-group-size`); `None` keeps it in the compute dtype.
    pub kv_quantization: Option<crate::quantize::QuantSettings>,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        Self {
            max_tokens: 64,
            sampling: Sampling::default(),
            stop_tokens: Vec::new(),
            prefill_chunk: 512,
            kv_quantization: None,
        }
    }
}

/// The model's cache, quantized as the options ask.
fn new_cache(model: &dyn CausalLm, options: &GenerateOptions) -> Result<KvCache> {
    let mut cache = model.new_cache();
    if let Some(settings) = options.kv_quantization {
        cache.set_quantized(settings)?;
    }
    Ok(cache)
}

/// Timings of a generation, for tokens-per-second figures.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct GenerationStats {
    /// Prompt tokens processed.
    pub prompt_tokens: usize,
    /// Time spent on the prompt.
    pub prompt_time: Duration,
    /// Tokens generated.
    pub generated_tokens: usize,
    /// Time spent generating them.
    pub generation_time: Duration,
}

impl GenerationStats {
    /// Prompt tokens per second.
    pub fn prompt_tps(&self) -> f64 {
        self.prompt_tokens as f64 / self.prompt_time.as_secs_f64().max(1e-9)
    }

    /// Generated tokens per second.
    pub fn generation_tps(&self) -> f64 {
        self.generated_tokens as f64 / self.generation_time.as_secs_f64().max(1e-9)
    }
}

/// The logits of the next position: read back, or still being computed
/// (greedy decoding runs one forward pass ahead, see [`Generation::next`]).
enum NextLogits {
    Host(Vec<f32>),
    Device(Array),
}

/// A running generation; iterate it for the new tokens.
pub struct Generation<'m> {
    model: &'m mut dyn CausalLm,
    cache: KvCache,
    options: GenerateOptions,
    history: Vec<u32>,
    next_logits: Option<NextLogits>,
    rng: u64,
    done: bool,
    stats: GenerationStats,
}

impl std::fmt::Debug for Generation<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Generation")
            .field("tokens", &self.history.len())
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

/// The last position's logits as a lazy float32 `[vocab]` row.
fn last_row(logits: &Array) -> Result<Array> {
    use mlx_rs::ops::indexing::IndexOp;
    let last = logits.shape()[1] - 1;
    logits
        .index((0, last, ..))
        .as_dtype(mlx_rs::Dtype::Float32)
        .context(|| "reading logits".into())
}

/// Evaluates a logits row and copies it to the host.
fn read_row(row: &Array) -> Result<Vec<f32>> {
    row.eval().context(|| "computing logits".into())?;
    Ok(row.as_slice::<f32>().to_vec())
}

fn last_logits(logits: &Array) -> Result<Vec<f32>> {
    read_row(&last_row(logits)?)
}

/// Starts generating after `prompt` (token ids, batch of one).
pub fn generate<'m>(
    model: &'m mut dyn CausalLm,
    prompt: &[u32],
    options: GenerateOptions,
) -> Result<Generation<'m>> {
    if prompt.is_empty() {
        return Err(Error::InvalidArgument("the prompt has no tokens".into()));
    }
    let vocab = model.dims().vocab_size;
    if let Some(bad) = prompt.iter().find(|&&t| t as usize >= vocab) {
        return Err(Error::InvalidArgument(format!(
            "prompt token {bad} is outside the vocabulary [0, {vocab})"
        )));
    }
    let s = &options.sampling;
    if s.temperature < 0.0
        || !(0.0..=1.0).contains(&s.top_p)
        || !(0.0..=1.0).contains(&s.min_p)
        || s.repetition_penalty <= 0.0
    {
        return Err(Error::InvalidArgument(format!(
            "invalid sampling settings {s:?}: temperature >= 0, top_p and min_p in [0, 1], repetition_penalty > 0"
        )));
    }
    let mut cache = new_cache(&*model, &options)?;
    let started = Instant::now();
    let mut logits = None;
    // A prompt crossing the length where cached keys go stale is processed
    // in one pass, so every position gets the rotation of the full length.
    let chunk = match model.cache_rebuild_after() {
        Some(limit) if prompt.len() > limit => prompt.len(),
        _ => options.prefill_chunk.max(1),
    };
    for chunk in prompt.chunks(chunk) {
        let ids: Vec<i32> = chunk.iter().map(|&t| t as i32).collect();
        let input = Array::from_slice(&ids, &[1, ids.len() as i32]);
        logits = Some(model.forward(&input, Some(&mut cache))?);
    }
    let next_logits = match &logits {
        Some(l) => Some(NextLogits::Host(last_logits(l)?)),
        None => None,
    };
    let stats = GenerationStats {
        prompt_tokens: prompt.len(),
        prompt_time: started.elapsed(),
        ..Default::default()
    };
    let rng = options.sampling.seed ^ 0x9E37_79B9_7F4A_7C15;
    Ok(Generation {
        model,
        cache,
        options,
        history: prompt.to_vec(),
        next_logits,
        rng,
        done: false,
        stats,
    })
}

impl Generation<'_> {
    /// Timings so far.
    pub fn stats(&self) -> &GenerationStats {
        &self.stats
    }

    /// The logits the next token will be chosen from (waiting for them when
    /// greedy decoding is computing them ahead); `None` once generation is
    /// over, or when computing them failed (the next call to `next` then
    /// returns the error).
    pub fn next_logits(&mut self) -> Option<&[f32]> {
        if let Some(NextLogits::Device(row)) = &self.next_logits {
            match read_row(row) {
                Ok(values) => self.next_logits = Some(NextLogits::Host(values)),
                Err(_) => return None,
            }
        }
        match &self.next_logits {
            Some(NextLogits::Host(values)) => Some(values),
            _ => None,
        }
    }

    /// Greedy decoding without a repetition penalty chooses the token on
    /// the device, so the next forward pass can be built and started before
    /// the token is read back (as mlx-lm does): building the graph of one
    /// step overlaps computing the previous one. Models that rebuild their
    /// cache at some length decode step by step.
    fn runs_ahead(&self) -> bool {
        let s = &self.options.sampling;
        s.temperature == 0.0
            && s.repetition_penalty == 1.0
            && self.model.cache_rebuild_after().is_none()
    }

    /// One step of the run-ahead greedy decoding: the token chosen from
    /// `logits` on the device, the next forward pass started from it.
    fn next_ahead(&mut self, logits: NextLogits) -> Result<Option<u32>> {
        let token = match logits {
            NextLogits::Host(values) => Array::from_int(argmax(&values) as i32),
            NextLogits::Device(row) => mlx_rs::ops::indexing::argmax_axis(&row, 0, None)
                .and_then(|t| t.as_dtype(mlx_rs::Dtype::Int32))
                .context(|| "choosing the next token".into())?,
        };
        if self.stats.generated_tokens + 1 < self.options.max_tokens {
            let input = token
                .reshape(&[1, 1])
                .context(|| "feeding the chosen token".into())?;
            let row = last_row(&self.model.forward(&input, Some(&mut self.cache))?)?;
            mlx_rs::transforms::async_eval([&row]).context(|| "computing logits".into())?;
            self.next_logits = Some(NextLogits::Device(row));
        }
        token.eval().context(|| "choosing the next token".into())?;
        let token = token.item_exact::<i32>() as u32;
        if self.options.stop_tokens.contains(&token) {
            return Ok(None);
        }
        self.history.push(token);
        self.stats.generated_tokens += 1;
        Ok(Some(token))
    }

    fn uniform(&mut self) -> f64 {
        // splitmix64
        self.rng = self.rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    }

    fn choose(&mut self, mut logits: Vec<f32>) -> u32 {
        let s = self.options.sampling.clone();
        if s.repetition_penalty != 1.0 {
            let mut seen = self.history.clone();
            seen.sort_unstable();
            seen.dedup();
            for t in seen {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l = if *l > 0.0 {
                        *l / s.repetition_penalty
                    } else {
                        *l * s.repetition_penalty
                    };
                }
            }
        }
        if s.temperature == 0.0 {
            return argmax(&logits);
        }
        let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let mut candidates: Vec<(u32, f64)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u32, (((l - max) / s.temperature) as f64).exp()))
            .collect();
        candidates.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if s.top_k > 0 {
            candidates.truncate(s.top_k);
        }
        if s.min_p > 0.0 {
            let floor = candidates[0].1 * s.min_p as f64;
            candidates.retain(|c| c.1 >= floor);
        }
        let total: f64 = candidates.iter().map(|c| c.1).sum();
        if s.top_p < 1.0 {
            let mut kept = 0.0;
            let mut cut = candidates.len();
            for (i, c) in candidates.iter().enumerate() {
                kept += c.1 / total;
                if kept >= s.top_p as f64 {
                    cut = i + 1;
                    break;
                }
            }
            candidates.truncate(cut);
        }
        let total: f64 = candidates.iter().map(|c| c.1).sum();
        let mut target = self.uniform() * total;
        for (token, weight) in &candidates {
            if target < *weight {
                return *token;
            }
            target -= weight;
        }
        candidates.last().map(|c| c.0).unwrap_or(0)
    }
}

/// The index of the largest value (the first on ties, like torch).
fn argmax(values: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in values.iter().enumerate() {
        if *v > values[best] {
            best = i;
        }
    }
    best as u32
}

impl Iterator for Generation<'_> {
    type Item = Result<u32>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done || self.stats.generated_tokens >= self.options.max_tokens {
            return None;
        }
        let started = Instant::now();
        let logits = self.next_logits.take()?;
        if self.runs_ahead() {
            let step = self.next_ahead(logits);
            self.stats.generation_time += started.elapsed();
            return match step {
                Ok(Some(token)) => Some(Ok(token)),
                Ok(None) => {
                    self.done = true;
                    None
                }
                Err(e) => {
                    self.done = true;
                    Some(Err(e))
                }
            };
        }
        let logits = match logits {
            NextLogits::Host(values) => values,
            NextLogits::Device(row) => match read_row(&row) {
                Ok(values) => values,
                Err(e) => {
                    self.done = true;
                    return Some(Err(e));
                }
            },
        };
        let token = self.choose(logits);
        if self.options.stop_tokens.contains(&token) {
            self.done = true;
            return None;
        }
        self.history.push(token);
        self.stats.generated_tokens += 1;
        if self.stats.generated_tokens < self.options.max_tokens {
            // Crossing the length past which cached keys go stale: rebuild
            // the cache from the whole sequence, as transformers does.
            let rebuild = self
                .model
                .cache_rebuild_after()
                .is_some_and(|limit| self.history.len() == limit + 1);
            let ids: Vec<i32> = if rebuild {
                match new_cache(&*self.model, &self.options) {
                    Ok(cache) => self.cache = cache,
                    Err(e) => return Some(Err(e)),
                }
                self.history.iter().map(|&t| t as i32).collect()
            } else {
                vec![token as i32]
            };
            let input = Array::from_slice(&ids, &[1, ids.len() as i32]);
            match self
                .model
                .forward(&input, Some(&mut self.cache))
                .and_then(|l| last_logits(&l))
            {
                Ok(next) => self.next_logits = Some(NextLogits::Host(next)),
                Err(e) => {
                    self.done = true;
                    return Some(Err(e));
                }
            }
        }
        self.stats.generation_time += started.elapsed();
        Some(Ok(token))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argmax_takes_the_first_maximum() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, 2.0]), 1);
    }
}
