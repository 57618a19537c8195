//! CUDA speed settings: bfloat16 autocast (`amp: bf16`) and cuDNN autotuning.
//!
//! tch 0.24 switches libtorch's CUDA autocast on and off but keeps its default dtype, float16;
//! bfloat16 needs libtorch's own setter, which tch does not wrap, so it is declared here by its C++
//! symbol in `libtorch_cpu` (always linked).

use tch::Device;

use crate::config::{Amp, Config};

/// `c10::DeviceType::CUDA`.
const CUDA_DEVICE_TYPE: i8 = 1;
/// `c10::ScalarType::BFloat16`.
const BFLOAT16: i8 = 15;

extern "C" {
    /// `void at::autocast::set_autocast_dtype(c10::DeviceType, c10::ScalarType)` (both enums are
    /// `int8_t`); per thread.
    #[link_name = "_ZN2at8autocast18set_autocast_dtypeEN3c1010DeviceTypeENS1_10ScalarTypeE"]
    fn at_set_autocast_dtype(device_type: i8, dtype: i8);
    /// `c10::ScalarType at::autocast::get_autocast_dtype(c10::DeviceType)`.
    #[link_name = "_ZN2at8autocast18get_autocast_dtypeEN3c1010DeviceTypeE"]
    fn at_get_autocast_dtype(device_type: i8) -> i8;
}

/// The dtype CUDA autocast casts to on this thread, as libtorch's `ScalarType` code.
fn cuda_autocast_dtype() -> i8 {
    // SAFETY: a plain libtorch getter of thread-local state; no pointers are involved.
    unsafe { at_get_autocast_dtype(CUDA_DEVICE_TYPE) }
}

fn set_cuda_autocast_dtype(dtype: i8) {
    // SAFETY: a plain libtorch setter of thread-local state; `dtype` is a valid ScalarType code.
    unsafe { at_set_autocast_dtype(CUDA_DEVICE_TYPE, dtype) }
}

/// Runs `f` with CUDA autocast casting to bfloat16 on this thread, then restores the dtype.
fn with_bf16_dtype<T>(f: impl FnOnce() -> T) -> T {
    let previous = cuda_autocast_dtype();
    set_cuda_autocast_dtype(BFLOAT16);
    let result = f();
    set_cuda_autocast_dtype(previous);
    result
}

/// Runs `f` (a forward pass) under bfloat16 autocast when `config.amp` is `bf16` and `device` is
/// CUDA: convolutions and matrix products in bfloat16, reductions and losses in float32 (libtorch's
/// autocast lists). Anywhere else `f` runs unchanged, in float32 like the reference.
pub fn autocast<T>(config: &Config, device: Device, f: impl FnOnce() -> T) -> T {
    match (config.amp, device) {
        (Amp::Bf16, Device::Cuda(_)) => with_bf16_dtype(|| tch::autocast(true, f)),
        _ => f(),
    }
}

/// Readies `device` for a run of fixed-size episodes. On CUDA, cuDNN times its convolution
/// algorithms once per input shape and keeps the fastest (PyTorch's `cudnn.benchmark = True`);
/// elsewhere `amp: bf16` has no effect, which is said once.
pub fn prepare(config: &Config, device: Device) {
    if device.is_cuda() {
        tch::Cuda::cudnn_set_benchmark(true);
    } else if config.amp == Amp::Bf16 {
        tracing::warn!("`amp: bf16` applies on CUDA only: this run on {device:?} stays in float32");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_dtype_is_set_for_the_closure_and_restored_after() {
        let before = cuda_autocast_dtype();
        // c10::ScalarType::Half, libtorch's default.
        assert_eq!(before, 5);
        assert_eq!(with_bf16_dtype(cuda_autocast_dtype), BFLOAT16);
        assert_eq!(cuda_autocast_dtype(), before);
    }
}
