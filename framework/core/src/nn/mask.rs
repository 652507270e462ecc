//! Attention masks for causal decoding, optionally limited to a sliding
//! window: a query at position `i` sees keys `j` with `i - window < j <= i`
//! (the `window` most recent positions, itself included), which is how
//! transformers applies Mistral's `sliding_window`; and the block-diagonal
//! mask of rows that pack several sequences.

use super::attention::AttentionMask;
use crate::error::{MlxContext, Result};
use mlx_rs::Array;

/// The mask for `queries` new positions after `offset` processed ones, of
/// which the last `stored` are still cached (all of them unless a sliding
/// window trimmed the cache).
///
/// Without a window this is the causal mask (none for a single query); with
/// one, it is a boolean `[queries, stored + queries]` mask once any query
/// could otherwise see past the window.
pub fn causal_mask(queries: usize, offset: usize, window: Option<usize>) -> Result<AttentionMask> {
    causal_mask_stored(queries, offset, offset, window)
}

/// [`causal_mask`] for a cache holding only the last `stored` of the
/// `offset` processed positions.
pub fn causal_mask_stored(
    queries: usize,
    offset: usize,
    stored: usize,
    window: Option<usize>,
) -> Result<AttentionMask> {
    let keys = stored + queries;
    let first_key = offset - stored;
    match window {
        Some(window) if keys > window => {
            let mut allowed = Vec::with_capacity(queries * keys);
            for q in 0..queries {
                let position = offset + q;
                for k in 0..keys {
                    let key = first_key + k;
                    allowed.push(key <= position && key + window > position);
                }
            }
            let mask = Array::from_slice(&allowed, &[queries as i32, keys as i32]);
            mask.eval()
                .context(|| "building the sliding-window mask".into())?;
            Ok(AttentionMask::Additive(mask))
        }
        _ if queries > 1 => Ok(AttentionMask::Causal),
        _ => Ok(AttentionMask::None),
    }
}

/// The mask of packed rows: `segments` (`[batch, seq]`, int32) numbers the
/// sequence each token belongs to, and a token sees the earlier tokens of
/// its own sequence only (within `window` of itself, if given). A
/// `[batch, 1, seq, seq]` boolean mask.
pub fn segment_mask(segments: &Array, window: Option<usize>) -> Result<AttentionMask> {
    let context = || "building the mask of packed sequences".to_owned();
    let shape = segments.shape();
    if shape.len() != 2 {
        return Err(crate::error::Error::InvalidArgument(format!(
            "segment ids must be [batch, seq], got {shape:?}"
        )));
    }
    // Built in the graph (no read on the host), so that a compiled training
    // step can take the segment ids as an input.
    let seq = shape[1];
    let build = || -> std::result::Result<Array, mlx_rs::error::Exception> {
        let ids = segments.as_dtype(mlx_rs::Dtype::Int32)?;
        let same = mlx_rs::ops::expand_dims(&ids, 2)?.eq(mlx_rs::ops::expand_dims(&ids, 1)?)?;
        let positions = mlx_rs::ops::arange::<_, i32>(0, seq, 1)?;
        let queries = mlx_rs::ops::expand_dims(&positions, 1)?;
        let keys = mlx_rs::ops::expand_dims(&positions, 0)?;
        let mut allowed = keys.le(&queries)?;
        if let Some(window) = window {
            let window = i32::try_from(window).unwrap_or(i32::MAX);
            // k + w > q, as k > q - w (no overflow for any window).
            let earliest = queries.subtract(Array::from_int(window))?;
            allowed = allowed.logical_and(&keys.gt(&earliest)?)?;
        }
        let allowed = same.logical_and(&mlx_rs::ops::expand_dims(&allowed, 0)?)?;
        mlx_rs::ops::expand_dims(&allowed, 1)
    };
    let mask = build().context(context)?;
    Ok(AttentionMask::Additive(mask))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allowed(mask: AttentionMask) -> Vec<bool> {
        match mask {
            AttentionMask::Additive(m) => m.as_slice::<bool>().to_vec(),
            other => panic!("expected an explicit mask, got {other:?}"),
        }
    }

    #[test]
    fn window_limits_each_query_to_its_recent_keys() {
        let mask = allowed(causal_mask(4, 0, Some(2)).unwrap());
        #[rustfmt::skip]
        let expected = [
            true,  false, false, false,
            true,  true,  false, false,
            false, true,  true,  false,
            false, false, true,  true,
        ];
        assert_eq!(mask, expected);
    }

    #[test]
    fn window_applies_after_cached_positions() {
        // One new query at position 5 with a window of 3 sees keys 3, 4, 5.
        let mask = allowed(causal_mask(1, 5, Some(3)).unwrap());
        assert_eq!(mask, [false, false, false, true, true, true]);
    }

    #[test]
    fn trimmed_cache_keeps_the_window_in_absolute_positions() {
        // 6 positions seen, the last 2 stored, window 3, 2 new queries
        // (positions 6 and 7) over keys 4, 5, 6, 7.
        let mask = allowed(causal_mask_stored(2, 6, 2, Some(3)).unwrap());
        assert_eq!(mask, [true, true, true, false, false, true, true, true]);
    }

    #[test]
    fn packed_sequences_see_only_themselves() {
        let segments = Array::from_slice(&[0i32, 0, 1, 1, 1, -1], &[1, 6]);
        let mask = allowed(segment_mask(&segments, None).unwrap());
        #[rustfmt::skip]
        let expected = [
            true,  false, false, false, false, false,
            true,  true,  false, false, false, false,
            false, false, true,  false, false, false,
            false, false, true,  true,  false, false,
            false, false, true,  true,  true,  false,
            false, false, false, false, false, true,
        ];
        assert_eq!(mask, expected);
        let windowed = allowed(segment_mask(&segments, Some(2)).unwrap());
        assert!(!windowed[4 * 6 + 2], "position 4 no longer sees 2");
        assert!(windowed[4 * 6 + 3]);
    }

    #[test]
    fn short_sequences_need_no_explicit_mask() {
        assert!(matches!(
            causal_mask(3, 0, Some(8)).unwrap(),
            AttentionMask::Causal
        ));
        assert!(matches!(
            causal_mask(1, 2, Some(8)).unwrap(),
            AttentionMask::None
        ));
        assert!(matches!(
            causal_mask(3, 0, None).unwrap(),
            AttentionMask::Causal
        ));
    }
}
