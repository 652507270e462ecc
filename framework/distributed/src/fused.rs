//! Summing many arrays over a group in a few large buffers: arrays of one
//! dtype are flattened and concatenated into buckets of about
//! [`DEFAULT_BUCKET_BYTES`], each bucket is all-summed once, and the sums
//! are cut back into the arrays' shapes. A training step's gradients (one
//! array per trained tensor, often hundreds of small ones) then cost a
//! handful of collectives, not one per tensor (as MLX's own
//! `average_gradients` does it).

use crate::error::{DistributedError, Result};
use crate::group::Group;
use mlx_rs::{Array, Dtype};

/// The size a bucket grows to before it is reduced (mlx-lm's default).
pub const DEFAULT_BUCKET_BYTES: usize = 32 << 20;

/// What a fused all-sum sends.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FusedStats {
    /// Collectives issued.
    pub collectives: usize,
    /// Bytes this rank contributes (the buffers' size).
    pub bytes: usize,
}

/// The sums over `group` of `arrays`, lazily, in the order given, with
/// buckets of at most `bucket_bytes` (an array larger than that is a
/// bucket of its own). A group of one returns the arrays unchanged.
pub fn all_sum(
    group: &Group,
    arrays: &[Array],
    bucket_bytes: usize,
) -> Result<(Vec<Array>, FusedStats)> {
    let mut stats = FusedStats::default();
    if group.size() == 1 {
        return Ok((arrays.to_vec(), stats));
    }
    let failed = |e: mlx_rs::error::Exception| DistributedError::Op {
        op: "fused all_sum".into(),
        message: e.what().to_string(),
    };
    let mut out: Vec<Option<Array>> = vec![None; arrays.len()];
    for bucket in buckets(arrays, bucket_bytes.max(1)) {
        let flat: Vec<Array> = bucket
            .iter()
            .map(|&i| arrays[i].reshape(&[-1]))
            .collect::<std::result::Result<_, _>>()
            .map_err(failed)?;
        let joined = if flat.len() == 1 {
            flat[0].clone()
        } else {
            mlx_rs::ops::concatenate(&flat, 0).map_err(failed)?
        };
        stats.collectives += 1;
        stats.bytes += joined.nbytes();
        let summed = group.all_sum(&joined)?;
        let mut offset = 0i32;
        for &i in &bucket {
            let size = arrays[i].size() as i32;
            let part = summed
                .index(offset..offset + size)
                .reshape(arrays[i].shape())
                .map_err(failed)?;
            offset += size;
            out[i] = Some(part);
        }
    }
    Ok((
        out.into_iter()
            .map(|a| a.expect("every array is in a bucket"))
            .collect(),
        stats,
    ))
}

/// Indices of `arrays` grouped into buckets: consecutive arrays of one
/// dtype until the bucket reaches `bucket_bytes`.
fn buckets(arrays: &[Array], bucket_bytes: usize) -> Vec<Vec<usize>> {
    let mut by_dtype: Vec<(Dtype, Vec<Vec<usize>>, usize)> = Vec::new();
    for (index, array) in arrays.iter().enumerate() {
        let dtype = array.dtype();
        let slot = match by_dtype.iter().position(|(d, _, _)| *d == dtype) {
            Some(slot) => slot,
            None => {
                by_dtype.push((dtype, vec![Vec::new()], 0));
                by_dtype.len() - 1
            }
        };
        let (_, lists, filled) = &mut by_dtype[slot];
        if *filled >= bucket_bytes {
            lists.push(Vec::new());
            *filled = 0;
        }
        lists.last_mut().expect("one list at least").push(index);
        *filled += array.nbytes();
    }
    by_dtype
        .into_iter()
        .flat_map(|(_, lists, _)| lists)
        .collect()
}

use mlx_rs::ops::indexing::IndexOp;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_split_by_dtype_and_size() {
        let f = |n: usize| Array::zeros::<f32>(&[n as i32]).unwrap();
        let h = Array::zeros::<f32>(&[4])
            .unwrap()
            .as_dtype(Dtype::Bfloat16)
            .unwrap();
        // 16-byte buckets: [0, 1] (8 + 8), then [3]; the bfloat16 array alone.
        let arrays = vec![f(2), f(2), h, f(4)];
        assert_eq!(buckets(&arrays, 16), vec![vec![0, 1], vec![3], vec![2]]);
        assert_eq!(buckets(&arrays, 1 << 20), vec![vec![0, 1, 3], vec![2]]);
    }

    #[test]
    fn a_group_of_one_sends_nothing() {
        let arrays = vec![Array::from_slice(&[1f32, 2.0], &[2])];
        let (sums, stats) = all_sum(&Group::single(), &arrays, 16).unwrap();
        assert_eq!(stats, FusedStats::default());
        assert_eq!(sums[0].as_slice::<f32>(), &[1.0, 2.0]);
    }
}
