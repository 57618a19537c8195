//! The learning-rate schedule: PFENet's poly decay with optional linear warm-up, or the SVF
//! paper's constant rate.

use crate::config::{Config, LrScheduleKind};

/// Poly: `lr(i) = base_lr · (1 − i/max_iter)^power`, or `base_lr · (0.1 + 0.9 · i/warmup_steps)`
/// while `i < warmup_steps`; `i` is the 1-based iteration, as in the reference's
/// `poly_learning_rate`. Constant: `base_lr` (the config rejects a warm-up with it).
/// The per-group multipliers (`head_lr_scale`, `backbone_lr_scale`) are applied per parameter by
/// the optimiser.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LrSchedule {
    pub kind: LrScheduleKind,
    pub base_lr: f64,
    pub max_iter: u64,
    pub power: f64,
    pub warmup_steps: u64,
}

impl LrSchedule {
    /// The schedule of `config` over `iterations_per_epoch · epochs` iterations.
    pub fn from_config(config: &Config, iterations_per_epoch: u64) -> LrSchedule {
        LrSchedule {
            kind: config.lr_schedule,
            base_lr: config.base_lr,
            max_iter: iterations_per_epoch * config.epochs as u64,
            power: config.power,
            warmup_steps: config.warmup_steps as u64,
        }
    }

    /// The base learning rate of iteration `iteration` (1-based).
    pub fn lr(&self, iteration: u64) -> f64 {
        let i = iteration as f64;
        if iteration < self.warmup_steps {
            self.base_lr * (0.1 + 0.9 * i / self.warmup_steps as f64)
        } else if self.kind == LrScheduleKind::Constant {
            self.base_lr
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
        let schedule = LrSchedule {
            kind: LrScheduleKind::Poly,
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
        let linear = LrSchedule {
            power: 1.0,
            ..schedule
        };
        assert!(close(linear.lr(25), 0.0025 * 0.75));
    }

    #[test]
    fn warm_up_ramps_linearly_from_a_tenth() {
        let schedule = LrSchedule {
            kind: LrScheduleKind::Poly,
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

    #[test]
    fn constant_keeps_base_lr_to_the_last_iteration() {
        let config = Config {
            lr_schedule: LrScheduleKind::Constant,
            base_lr: 0.015,
            epochs: 3,
            ..Config::default()
        };
        let schedule = LrSchedule::from_config(&config, 10);
        assert_eq!(schedule.max_iter, 30);
        for i in [1, 15, 29, 30] {
            assert_eq!(schedule.lr(i), 0.015, "iteration {i}");
        }
        let poly = LrSchedule {
            kind: LrScheduleKind::Poly,
            ..schedule
        };
        assert_eq!(poly.lr(30), 0.0);
    }
}
