//! Episodic training: optimiser, LR schedule, run directory, resume.

mod schedule;
mod sgd;

pub use schedule::PolySchedule;
pub use sgd::{Sgd, SgdStateError};
