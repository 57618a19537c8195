//! The learning-rate schedule: PFENet's poly decay with optional linear warm-up.

/// `lr(i) = base_lr · (1 − i/max_iter)^power`, or `base_lr · (0.1 + 0.9 · i/warmup_steps)` while
/// `i < warmup_steps`; `i` is the 1-based iteration, as in the reference's `poly_learning_rate`.
/// The head's multiplier (`head_lr_scale`) is applied per parameter by the optimiser.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PolySchedule {
    pub base_lr: f64,
    pub max_iter: u64,
    pub power: f64,
    pub warmup_steps: u64,
}

impl PolySchedule {
    /// The base learning rate of iteration `iteration` (1-based).
    pub fn lr(&self, iteration: u64) -> f64 {
        let i = iteration as f64;
        if iteration < self.warmup_steps {
            self.base_lr * (0.1 + 0.9 * i / self.warmup_steps as f64)
        } else {
            self.base_lr * (1.0 - i / self.max_iter as f64).max(0.0).powf(self.power)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-15
    }

    #[test]
    fn poly_decay_matches_hand_computed_values() {
        let schedule = PolySchedule {
            base_lr: 0.0025,
            max_iter: 100,
            power: 0.9,
            warmup_steps: 0,
        };
        // (1 - 1/100)^0.9 = 0.99^0.9 = exp(0.9 ln 0.99) = 0.9909954834...
        assert!(close(schedule.lr(1), 0.0025 * 0.990_995_483_412_834_2));
        // (1 - 50/100)^0.9 = 0.5^0.9 = 0.535886731...
        assert!(close(schedule.lr(50), 0.0025 * 0.535_886_731_268_146_1));
        assert_eq!(schedule.lr(100), 0.0);
        let linear = PolySchedule {
            power: 1.0,
            ..schedule
        };
        assert!(close(linear.lr(25), 0.0025 * 0.75));
    }

    #[test]
    fn warm_up_ramps_linearly_from_a_tenth() {
        let schedule = PolySchedule {
            base_lr: 0.01,
            max_iter: 1000,
            power: 0.9,
            warmup_steps: 10,
        };
        assert!(close(schedule.lr(0), 0.001));
        assert!(close(schedule.lr(5), 0.01 * (0.1 + 0.9 * 0.5)));
        // From warmup_steps on, the poly value.
        assert!(close(schedule.lr(10), 0.01 * 0.99f64.powf(0.9)));
    }
}
