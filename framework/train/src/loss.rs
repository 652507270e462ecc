//! The training loss: token-level cross-entropy, averaged over the targets
//! the mask lets through (padding and masked prompts count for nothing).

use mlx_rs::error::Exception;
use mlx_rs::ops::indexing::take_along_axis;
use mlx_rs::Array;

/// Mean cross-entropy of `logits` (`[batch, seq, vocab]`) against
/// `targets` (`[batch, seq]`, int32) over the positions where `mask`
/// (`[batch, seq]`, float) is 1, and the number of those positions (as a
/// float32 scalar). Computed in float32 whatever the logits' dtype.
pub fn masked_cross_entropy(
    logits: &Array,
    targets: &Array,
    mask: &Array,
) -> Result<(Array, Array), Exception> {
    let logits = logits.as_dtype(mlx_rs::Dtype::Float32)?;
    let log_norm = mlx_rs::ops::logsumexp_axis(&logits, -1, false)?;
    let picked = take_along_axis(&logits, &mlx_rs::ops::expand_dims(targets, -1)?, -1)?
        .squeeze_axes(&[-1])?;
    let per_token = log_norm.subtract(&picked)?;
    let mask = mask.as_dtype(mlx_rs::Dtype::Float32)?;
    let count = mask.sum(None)?;
    let total = per_token.multiply(&mask)?.sum(None)?;
    let loss = total.divide(&mlx_rs::ops::maximum(&count, Array::from_f32(1.0))?)?;
    Ok((loss, count))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The masked loss of a 2 x 2 x 3 case, by hand: only two positions
    /// count, so the loss is the mean of their two cross-entropies.
    #[test]
    fn equals_a_hand_computed_value() {
        let logits = Array::from_slice(
            &[
                1.0f32, 2.0, 3.0, /* masked */ 5.0, 0.0, 0.0, //
                0.5, 0.5, 0.5, /* masked */ 0.0, 9.0, 0.0,
            ],
            &[2, 2, 3],
        );
        let targets = Array::from_slice(&[2i32, 0, 1, 1], &[2, 2]);
        let mask = Array::from_slice(&[1.0f32, 0.0, 1.0, 0.0], &[2, 2]);
        let (loss, count) = masked_cross_entropy(&logits, &targets, &mask).unwrap();
        // -log softmax([1,2,3])[2] = log(e^1+e^2+e^3) - 3; uniform row: log 3.
        let first = ((1f64.exp() + 2f64.exp() + 3f64.exp()).ln() - 3.0) as f32;
        let second = 3f64.ln() as f32;
        let expected = (first + second) / 2.0;
        assert!(
            (loss.item_cast::<f32>() - expected).abs() < 1e-6,
            "{} vs {expected}",
            loss.item_cast::<f32>()
        );
        assert_eq!(count.item_cast::<f32>(), 2.0);
    }
}
