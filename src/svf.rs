//! Singular Value Fine-tuning: SVD factorisation of convolution and linear weights.
