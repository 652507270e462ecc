//! Learning-rate schedules: linear warmup to the peak, then constant,
//! linear or cosine decay to `min_ratio` of the peak at the last step.

use serde::{Deserialize, Serialize};

/// The shape after warmup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Decay {
    /// Stay at the peak.
    Constant,
    /// Straight line down.
    Linear,
    /// Half a cosine down.
    Cosine,
}

/// A learning-rate schedule over optimizer steps.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Schedule {
    /// The learning rate after warmup.
    pub peak: f32,
    /// Steps of linear warmup from `peak / warmup`.
    pub warmup: usize,
    /// Total optimizer steps of the run.
    pub total: usize,
    /// What happens after warmup.
    pub decay: Decay,
    /// The final rate as a share of the peak.
    pub min_ratio: f32,
}

impl Schedule {
    /// A constant rate.
    pub fn constant(lr: f32) -> Self {
        Self {
            peak: lr,
            warmup: 0,
            total: 1,
            decay: Decay::Constant,
            min_ratio: 1.0,
        }
    }

    /// The rate of optimizer step `step` (0-based).
    pub fn lr(&self, step: usize) -> f32 {
        if step < self.warmup {
            return self.peak * (step + 1) as f32 / self.warmup as f32;
        }
        let span = self.total.saturating_sub(self.warmup).max(1);
        let progress = ((step - self.warmup) as f32 / span as f32).min(1.0);
        let low = self.peak * self.min_ratio;
        match self.decay {
            Decay::Constant => self.peak,
            Decay::Linear => self.peak + (low - self.peak) * progress,
            Decay::Cosine => {
                low + (self.peak - low) * 0.5 * (1.0 + (std::f32::consts::PI * progress).cos())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_decay() {
        let s = Schedule {
            peak: 1e-3,
            warmup: 4,
            total: 14,
            decay: Decay::Cosine,
            min_ratio: 0.1,
        };
        assert!((s.lr(0) - 2.5e-4).abs() < 1e-9);
        assert!((s.lr(3) - 1e-3).abs() < 1e-9);
        assert!((s.lr(4) - 1e-3).abs() < 1e-9, "decay starts at the peak");
        assert!(
            (s.lr(9) - 5.5e-4).abs() < 1e-7,
            "half way: the mean of peak and floor"
        );
        assert!((s.lr(14) - 1e-4).abs() < 1e-9);
        let linear = Schedule {
            decay: Decay::Linear,
            ..s
        };
        assert!((linear.lr(9) - 5.5e-4).abs() < 1e-7);
        assert_eq!(Schedule::constant(0.5).lr(100), 0.5);
    }
}
