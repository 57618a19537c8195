//! Episodic training: optimiser, LR schedule, run directory, resume.
