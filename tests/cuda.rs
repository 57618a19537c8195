//! Issue 14's GPU path, on a CUDA device: every test is `#[ignore]`d here and run by
//! `scripts/gpu-check.sh` (`cargo test --test cuda -- --ignored`, or the built test binary with
//! `--ignored`).

mod common;

use svf::backbone::Init;
use svf::config::{Amp, Config};
use svf::model::{prior_mask, FewShotModel};
use svf::train::{self, StepInputs};
use tch::{nn, Device, Kind, Tensor};

const CUDA: Device = Device::Cuda(0);

/// Loads libtorch's CUDA library (the binaries load it at run time, `svf::device::load_cuda`);
/// first in every test, before libtorch is asked about CUDA.
fn require_cuda() {
    let device = svf::device::DeviceArg::Cuda(0).resolve();
    assert_eq!(device.expect("a CUDA device"), CUDA);
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a.to_device(Device::Cpu) - b.to_device(Device::Cpu))
        .abs()
        .max()
        .double_value(&[])
}

/// GPU-NOTES 6: under bf16 autocast the prior stays float32 and equals the CPU's.
#[test]
#[ignore = "needs a CUDA device (scripts/gpu-check.sh)"]
fn prior_under_bf16_autocast_is_float32_and_equals_the_cpu_prior() {
    require_cuda();
    tch::manual_seed(0);
    let cpu = (Kind::Float, Device::Cpu);
    let query = Tensor::randn([2, 256, 30, 30], cpu).relu();
    let support = Tensor::randn([2, 256, 30, 30], cpu).relu();
    let mask = Tensor::rand([2, 1, 60, 60], cpu)
        .gt(0.5)
        .to_kind(Kind::Float);
    let on_cpu = prior_mask(&query, &support, &mask);
    let config = Config {
        amp: Amp::Bf16,
        ..Config::default()
    };
    let on_gpu = svf::amp::autocast(&config, CUDA, || {
        // Inputs as an autocast forward hands them over: bf16 activations.
        prior_mask(
            &query.to_device(CUDA).to_kind(Kind::BFloat16),
            &support.to_device(CUDA).to_kind(Kind::BFloat16),
            &mask.to_device(CUDA),
        )
    });
    assert_eq!(on_gpu.kind(), Kind::Float);
    // The inputs were rounded to bf16 (3 significant digits); the prior itself is float32.
    let diff = max_abs_diff(&on_gpu, &on_cpu);
    assert!(diff < 2e-2, "{diff}");
    let exact = svf::amp::autocast(&config, CUDA, || {
        prior_mask(
            &query.to_device(CUDA),
            &support.to_device(CUDA),
            &mask.to_device(CUDA),
        )
    });
    let diff = max_abs_diff(&exact, &on_cpu);
    // TF32 is off for this float32 bmm only if libtorch's default says so: allow its rounding.
    assert!(diff < 2e-3, "{diff}");
}

/// The one train step on CUDA, float32 and bf16, from pinned host batches: finite losses, the
/// weights move, and bf16's first loss is close to float32's (same weights, same CUDA dropout).
#[test]
#[ignore = "needs a CUDA device (scripts/gpu-check.sh)"]
fn train_step_on_cuda_float32_and_bf16() {
    require_cuda();
    let dir = common::scratch("cuda-step");
    let mut firsts = Vec::new();
    for amp in [Amp::None, Amp::Bf16] {
        let config = Config {
            svf: true,
            amp,
            ..common::tiny_config(dir.join("run"))
        };
        tch::manual_seed(3);
        let vs = nn::VarStore::new(CUDA);
        let net = FewShotModel::new(&vs.root(), &config, Init::Random).unwrap();
        let mut sgd = train::optimiser(&vs, &config);
        let before = vs.variables()["layer3.0.conv1.vector_S"].to_device(Device::Cpu);
        tch::manual_seed(4);
        let cpu = Device::Cpu;
        let query = Tensor::randn([1, 3, 65, 65], (Kind::Float, cpu));
        let supports = Tensor::randn([1, 1, 3, 65, 65], (Kind::Float, cpu));
        let label = Tensor::randint(2, [1, 65, 65], (Kind::Int64, cpu));
        let support_labels = Tensor::randint(2, [1, 1, 65, 65], (Kind::Int64, cpu));
        let inputs = StepInputs {
            query_image: &query.pin_memory(CUDA),
            query_label: &label.pin_memory(CUDA),
            support_images: &supports.pin_memory(CUDA),
            support_labels: &support_labels.pin_memory(CUDA),
            class_ids: &[6],
        };
        let no_map: Option<fn(Tensor) -> Tensor> = None;
        tch::manual_seed(5);
        let first = train::train_step(&net, &mut sgd, &config, CUDA, &inputs, 0.01, no_map);
        let second = train::train_step(&net, &mut sgd, &config, CUDA, &inputs, 0.01, no_map);
        assert!(
            first.total.is_finite() && second.total.is_finite(),
            "{amp:?}"
        );
        let after = vs.variables()["layer3.0.conv1.vector_S"].to_device(Device::Cpu);
        assert!(
            max_abs_diff(&before, &after) > 0.0,
            "{amp:?}: vector_S did not move"
        );
        firsts.push(first.total);
    }
    let (f32_loss, bf16_loss) = (firsts[0], firsts[1]);
    assert!(
        (f32_loss - bf16_loss).abs() < 0.1 * f32_loss.abs().max(1.0),
        "float32 {f32_loss} vs bf16 {bf16_loss}"
    );
}
