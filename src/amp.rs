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
    // The non-deprecated state functions (tch's `autocast` calls the deprecated device-less ones,
    // whose warning is printed on every call: GPU-NOTES 7).
    /// `bool at::autocast::is_autocast_enabled(c10::DeviceType)`.
    #[link_name = "_ZN2at8autocast19is_autocast_enabledEN3c1010DeviceTypeE"]
    fn at_is_autocast_enabled(device_type: i8) -> bool;
    /// `void at::autocast::set_autocast_enabled(c10::DeviceType, bool)`.
    #[link_name = "_ZN2at8autocast20set_autocast_enabledEN3c1010DeviceTypeEb"]
    fn at_set_autocast_enabled(device_type: i8, enabled: bool);
    /// `int64_t at::autocast::increment_nesting()`.
    #[link_name = "_ZN2at8autocast17increment_nestingEv"]
    fn at_increment_nesting() -> i64;
    /// `int64_t at::autocast::decrement_nesting()`.
    #[link_name = "_ZN2at8autocast17decrement_nestingEv"]
    fn at_decrement_nesting() -> i64;
    /// `void at::autocast::clear_cache()`.
    #[link_name = "_ZN2at8autocast11clear_cacheEv"]
    fn at_clear_cache();
}

fn cuda_autocast_enabled() -> bool {
    // SAFETY: a plain libtorch getter of thread-local state.
    unsafe { at_is_autocast_enabled(CUDA_DEVICE_TYPE) }
}

fn set_cuda_autocast_enabled(enabled: bool) {
    // SAFETY: a plain libtorch setter of thread-local state.
    unsafe { at_set_autocast_enabled(CUDA_DEVICE_TYPE, enabled) }
}

/// CUDA autocast state on this thread while it lives (PyTorch's `torch.autocast` context manager:
/// enabled flag, dtype, nesting count and cast cache), restored on drop, even on a panic.
struct AutocastGuard {
    previous_enabled: bool,
    previous_dtype: i8,
}

impl AutocastGuard {
    fn enter(enabled: bool, dtype: i8) -> AutocastGuard {
        let guard = AutocastGuard {
            previous_enabled: cuda_autocast_enabled(),
            previous_dtype: cuda_autocast_dtype(),
        };
        set_cuda_autocast_enabled(enabled);
        set_cuda_autocast_dtype(dtype);
        // SAFETY: libtorch's thread-local nesting counter, balanced in `drop`.
        unsafe { at_increment_nesting() };
        guard
    }
}

impl Drop for AutocastGuard {
    fn drop(&mut self) {
        // SAFETY: balances `enter`'s increment; the cache is libtorch's own.
        unsafe {
            if at_decrement_nesting() == 0 {
                at_clear_cache();
            }
        }
        set_cuda_autocast_enabled(self.previous_enabled);
        set_cuda_autocast_dtype(self.previous_dtype);
    }
}

/// Runs `f` with CUDA autocast off (when it is on): for computations that must stay float32
/// inside an `amp: bf16` forward, such as the prior mask (GPU-NOTES 6).
pub fn without_autocast<T>(f: impl FnOnce() -> T) -> T {
    if !cuda_autocast_enabled() {
        return f();
    }
    let _guard = AutocastGuard::enter(false, cuda_autocast_dtype());
    f()
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

/// Runs `f` (a forward pass) under bfloat16 autocast when `config.amp` is `bf16` and `device` is
/// CUDA: convolutions and matrix products in bfloat16, reductions and losses in float32 (libtorch's
/// autocast lists). Anywhere else `f` runs unchanged, in float32 like the reference.
pub fn autocast<T>(config: &Config, device: Device, f: impl FnOnce() -> T) -> T {
    match (config.amp, device) {
        (Amp::Bf16, Device::Cuda(_)) => {
            let _guard = AutocastGuard::enter(true, BFLOAT16);
            f()
        }
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
        tracing::warn!(
            "`amp: bf16` applies on CUDA only: this run on {} stays in float32",
            crate::device::name(device)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn autocast_state_is_set_for_the_closure_and_restored_after() {
        let before = cuda_autocast_dtype();
        // c10::ScalarType::Half, libtorch's default.
        assert_eq!(before, 5);
        assert!(!cuda_autocast_enabled());
        let config = Config {
            amp: Amp::Bf16,
            ..Config::default()
        };
        // The state is per thread and needs no GPU: `autocast` only sets it for CUDA devices.
        let inside = autocast(&config, Device::Cuda(0), || {
            let outer = (cuda_autocast_enabled(), cuda_autocast_dtype());
            let inner = without_autocast(|| (cuda_autocast_enabled(), cuda_autocast_dtype()));
            (outer, inner, cuda_autocast_enabled())
        });
        assert_eq!(inside, ((true, BFLOAT16), (false, BFLOAT16), true));
        assert_eq!(
            (cuda_autocast_enabled(), cuda_autocast_dtype()),
            (false, before)
        );
        let cpu = autocast(&config, Device::Cpu, cuda_autocast_enabled);
        assert!(!cpu);
    }
}
