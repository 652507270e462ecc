//! Batches: examples padded to the longest in the batch, or packed several
//! to a row with segment ids that keep them apart; inputs and targets
//! shifted by one, and a loss mask that is 1 exactly where a target counts
//! (past the prompt, before the padding). [`BatchOrder`] walks the training
//! set in a seeded shuffled order, epoch after epoch, and its position is
//! part of a checkpoint so a resumed run sees the same batches.

use crate::data::Example;
use crate::error::{Result, TrainError};
use mlx_rs::Array;
use serde::{Deserialize, Serialize};

/// One batch, ready for the model.
#[derive(Debug, Clone)]
pub struct Batch {
    /// `[batch, seq]` int32: the tokens fed to the model.
    pub inputs: Array,
    /// `[batch, seq]` int32: the token each position should predict.
    pub targets: Array,
    /// `[batch, seq]` float32: 1 where the target counts in the loss.
    pub mask: Array,
    /// Number of targets counting in the loss.
    pub loss_tokens: usize,
    /// `[batch, seq]` int32 for packed rows: which example each position
    /// belongs to (`-1` on padding); the model keeps examples apart.
    pub segments: Option<Array>,
}

/// `batch` with its sequence length rounded up to a multiple of `multiple`
/// (more padding, masked out: the loss is unchanged), so a compiled step
/// meets few shapes. Packed batches are returned as they are.
pub fn pad_batch(batch: Batch, multiple: usize, pad_id: u32) -> Result<Batch> {
    let shape = batch.inputs.shape().to_vec();
    let seq = shape.get(1).copied().unwrap_or(0) as usize;
    let padded = seq.div_ceil(multiple.max(1)) * multiple.max(1);
    if batch.segments.is_some() || padded == seq || shape.len() != 2 {
        return Ok(batch);
    }
    let extra = (padded - seq) as i32;
    let widths: &[(i32, i32)] = &[(0, 0), (0, extra)];
    let pad = |array: &Array, value: Array| {
        mlx_rs::ops::pad(array, widths, value, None)
            .map_err(|e| TrainError::InvalidSetting(format!("padding a batch: {e}")))
    };
    Ok(Batch {
        inputs: pad(&batch.inputs, Array::from_int(pad_id as i32))?,
        targets: pad(&batch.targets, Array::from_int(pad_id as i32))?,
        mask: pad(&batch.mask, Array::from_f32(0.0))?,
        loss_tokens: batch.loss_tokens,
        segments: None,
    })
}

/// Builds a batch from examples, padding with `pad_id` (masked out).
pub fn make_batch(examples: &[&Example], pad_id: u32) -> Result<Batch> {
    let longest = examples.iter().map(|e| e.ids.len()).max().unwrap_or(0);
    if examples.is_empty() || longest < 2 {
        return Err(TrainError::InvalidSetting(
            "a batch needs at least one example of 2 or more tokens".into(),
        ));
    }
    let seq = longest - 1;
    let rows = examples.len();
    let mut inputs = vec![pad_id as i32; rows * seq];
    let mut targets = vec![pad_id as i32; rows * seq];
    let mut mask = vec![0f32; rows * seq];
    let mut loss_tokens = 0;
    for (row, example) in examples.iter().enumerate() {
        let ids = &example.ids;
        for t in 0..ids.len().saturating_sub(1) {
            inputs[row * seq + t] = ids[t] as i32;
            targets[row * seq + t] = ids[t + 1] as i32;
            if t + 1 >= example.loss_start {
                mask[row * seq + t] = 1.0;
                loss_tokens += 1;
            }
        }
    }
    let shape = [rows as i32, seq as i32];
    Ok(Batch {
        inputs: Array::from_slice(&inputs, &shape),
        targets: Array::from_slice(&targets, &shape),
        mask: Array::from_slice(&mask, &shape),
        loss_tokens,
        segments: None,
    })
}

/// Packs examples into as few rows of at most `capacity` positions as
/// first-fit by decreasing length finds (an example of `n` tokens takes
/// `n - 1` positions), padding rows to the fullest. `segments` tells the
/// model which positions belong together; the loss is that of
/// [`make_batch`] on the same examples, on fewer positions.
pub fn make_packed_batch(examples: &[&Example], pad_id: u32, capacity: usize) -> Result<Batch> {
    let positions = |e: &Example| e.ids.len().saturating_sub(1);
    if let Some(long) = examples.iter().find(|e| positions(e) > capacity) {
        return Err(TrainError::InvalidSetting(format!(
            "an example of {} tokens does not fit packed rows of {capacity} positions",
            long.ids.len()
        )));
    }
    let mut by_length: Vec<&Example> = examples
        .iter()
        .copied()
        .filter(|e| positions(e) > 0)
        .collect();
    if by_length.is_empty() {
        return Err(TrainError::InvalidSetting(
            "a batch needs at least one example of 2 or more tokens".into(),
        ));
    }
    by_length.sort_by_key(|e| std::cmp::Reverse(positions(e)));
    let mut rows: Vec<(usize, Vec<&Example>)> = Vec::new();
    for example in by_length {
        let need = positions(example);
        match rows.iter_mut().find(|(used, _)| used + need <= capacity) {
            Some((used, members)) => {
                *used += need;
                members.push(example);
            }
            None => rows.push((need, vec![example])),
        }
    }
    let seq = rows.iter().map(|(used, _)| *used).max().unwrap_or(0);
    let cells = rows.len() * seq;
    let mut inputs = vec![pad_id as i32; cells];
    let mut targets = vec![pad_id as i32; cells];
    let mut mask = vec![0f32; cells];
    let mut segments = vec![-1i32; cells];
    let mut loss_tokens = 0;
    for (row, (_, members)) in rows.iter().enumerate() {
        let mut at = row * seq;
        for (segment, example) in members.iter().enumerate() {
            let ids = &example.ids;
            for t in 0..ids.len() - 1 {
                inputs[at] = ids[t] as i32;
                targets[at] = ids[t + 1] as i32;
                segments[at] = segment as i32;
                if t + 1 >= example.loss_start {
                    mask[at] = 1.0;
                    loss_tokens += 1;
                }
                at += 1;
            }
        }
    }
    let shape = [rows.len() as i32, seq as i32];
    Ok(Batch {
        inputs: Array::from_slice(&inputs, &shape),
        targets: Array::from_slice(&targets, &shape),
        mask: Array::from_slice(&mask, &shape),
        loss_tokens,
        segments: Some(Array::from_slice(&segments, &shape)),
    })
}

/// Where a [`BatchOrder`] stands: saved in checkpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchPosition {
    /// Completed passes over the training set.
    pub epoch: u64,
    /// Examples of this epoch already handed out.
    pub offset: usize,
    /// The seed the run started from.
    pub seed: u64,
}

/// A seeded, shuffled walk over `len` examples in batches.
#[derive(Debug, Clone)]
pub struct BatchOrder {
    len: usize,
    batch_size: usize,
    order: Vec<usize>,
    position: BatchPosition,
}

impl BatchOrder {
    /// Starts at the beginning of epoch 0.
    pub fn new(len: usize, batch_size: usize, seed: u64) -> Result<Self> {
        Self::at(
            len,
            batch_size,
            BatchPosition {
                epoch: 0,
                offset: 0,
                seed,
            },
        )
    }

    /// Continues from a saved position.
    pub fn at(len: usize, batch_size: usize, position: BatchPosition) -> Result<Self> {
        if len == 0 || batch_size == 0 {
            return Err(TrainError::InvalidSetting(format!(
                "cannot batch {len} examples by {batch_size}"
            )));
        }
        if position.offset > len {
            return Err(TrainError::InvalidSetting(format!(
                "a data position at example {} of a {len}-example set",
                position.offset
            )));
        }
        Ok(Self {
            len,
            batch_size,
            order: shuffled(len, position.seed, position.epoch),
            position,
        })
    }

    /// Number of examples walked over.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there are no examples (never: construction refuses it).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The current position.
    pub fn position(&self) -> BatchPosition {
        self.position
    }

    /// Indices of the next batch. Batches never straddle epochs: the last
    /// one of an epoch may be smaller, unless the set is smaller than a
    /// batch (then every batch is the whole set).
    pub fn next_indices(&mut self) -> Vec<usize> {
        if self.position.offset >= self.len {
            self.position.epoch += 1;
            self.position.offset = 0;
            self.order = shuffled(self.len, self.position.seed, self.position.epoch);
        }
        let start = self.position.offset;
        let end = (start + self.batch_size).min(self.len);
        self.position.offset = end;
        self.order[start..end].to_vec()
    }
}

/// A permutation of `0..len` determined by `seed` and `epoch`
/// (Fisher-Yates with SplitMix64).
fn shuffled(len: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut state = seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let mut next = move || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    let mut order: Vec<usize> = (0..len).collect();
    for i in (1..len).rev() {
        let j = (next() % (i as u64 + 1)) as usize;
        order.swap(i, j);
    }
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_cover_completions_and_skip_padding() {
        let a = Example {
            ids: vec![1, 10, 11, 12, 2],
            loss_start: 3,
        };
        let b = Example {
            ids: vec![1, 20, 2],
            loss_start: 0,
        };
        let batch = make_batch(&[&a, &b], 0).unwrap();
        assert_eq!(batch.inputs.shape(), &[2, 4]);
        assert_eq!(
            batch.inputs.as_slice::<i32>(),
            &[1, 10, 11, 12, 1, 20, 0, 0]
        );
        assert_eq!(
            batch.targets.as_slice::<i32>(),
            &[10, 11, 12, 2, 20, 2, 0, 0]
        );
        // a: targets 12 and 2 (ids[3..]) count; b: every real target.
        assert_eq!(
            batch.mask.as_slice::<f32>(),
            &[0., 0., 1., 1., 1., 1., 0., 0.]
        );
        assert_eq!(batch.loss_tokens, 4);
    }

    #[test]
    fn packing_fills_rows_longest_first_and_keeps_examples_apart() {
        let example = |len: usize, base: u32, loss_start: usize| Example {
            ids: (0..len as u32).map(|i| base + i).collect(),
            loss_start,
        };
        let (a, b, c) = (example(4, 10, 0), example(6, 20, 3), example(3, 30, 0));
        // Positions: a 3, b 5, c 2. Rows of 8: [b, a], [c].
        let batch = make_packed_batch(&[&a, &b, &c], 0, 8).unwrap();
        assert_eq!(batch.inputs.shape(), &[2, 8]);
        assert_eq!(
            batch.inputs.as_slice::<i32>(),
            &[20, 21, 22, 23, 24, 10, 11, 12, 30, 31, 0, 0, 0, 0, 0, 0]
        );
        assert_eq!(
            batch.targets.as_slice::<i32>(),
            &[21, 22, 23, 24, 25, 11, 12, 13, 31, 32, 0, 0, 0, 0, 0, 0]
        );
        assert_eq!(
            batch.segments.as_ref().unwrap().as_slice::<i32>(),
            &[0, 0, 0, 0, 0, 1, 1, 1, 0, 0, -1, -1, -1, -1, -1, -1]
        );
        // b counts from its 3rd target on; a and c wholly.
        assert_eq!(
            batch.mask.as_slice::<f32>(),
            &[0., 0., 1., 1., 1., 1., 1., 1., 1., 1., 0., 0., 0., 0., 0., 0.]
        );
        let padded = make_batch(&[&a, &b, &c], 0).unwrap();
        assert_eq!(batch.loss_tokens, padded.loss_tokens);
        let err = make_packed_batch(&[&a, &b], 0, 4).unwrap_err();
        assert!(err.to_string().contains("6 tokens"), "{err}");
    }

    #[test]
    fn the_order_is_a_seeded_permutation_that_resumes() {
        let mut order = BatchOrder::new(10, 4, 7).unwrap();
        let first: Vec<Vec<usize>> = (0..6).map(|_| order.next_indices()).collect();
        let mut epoch0: Vec<usize> = first[..3].concat();
        epoch0.sort();
        assert_eq!(epoch0, (0..10).collect::<Vec<_>>());
        assert_eq!(first[2].len(), 2, "the last batch of an epoch is short");
        assert_ne!(
            first[..3].concat(),
            first[3..6].concat(),
            "epochs reshuffle"
        );
        let mut again = BatchOrder::new(10, 4, 7).unwrap();
        again.next_indices();
        let saved = again.position();
        let mut resumed = BatchOrder::at(10, 4, saved).unwrap();
        let rest: Vec<Vec<usize>> = (0..5).map(|_| resumed.next_indices()).collect();
        assert_eq!(rest, first[1..6]);
    }
}
