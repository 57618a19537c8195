//! Atomic, PyTorch-compatible checkpoints (safetensors weights + JSON state).
