//! oneDNN's prepacked convolution for frozen weights on the CPU (issue 14). `conv2d` reorders its
//! weight into oneDNN's blocked layout on every call (6 % of an evaluation episode at 233), and its
//! backward reorders it again; a [`PackedConv`] reorders it once and fuses the bias and a ReLU into
//! the kernel. Where the input tracks gradients (SVF training's layer2..4), a stride-1 convolution
//! gets its input gradient through an autograd function in the bridge ([`InputGradient`]). The
//! bridge is `onednn.cpp`, compiled by `build.rs`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use tch::{Device, Kind, Tensor};

use crate::svf::ConvGeometry;

/// A CPU float32 convolution weight in oneDNN's layout, with the geometry it was packed for.
#[derive(Debug)]
pub(crate) struct PackedConv {
    packed: Tensor,
    geometry: ConvGeometry,
}

/// What follows a convolution: an addition (a residual block's shortcut), then ReLU.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Epilogue<'a> {
    pub add: Option<&'a Tensor>,
    pub relu: bool,
}

impl Epilogue<'_> {
    pub(crate) const NONE: Epilogue<'static> = Epilogue {
        add: None,
        relu: false,
    };

    /// The epilogue as separate operations on `y`, in place: `y` is a convolution's or a
    /// BatchNorm's fresh output, which their backward passes do not read. (An addition that would
    /// promote `y`'s dtype, as a float32 shortcut under bfloat16 autocast, is not in place.)
    pub(crate) fn apply(&self, y: Tensor) -> Tensor {
        let mut y = match self.add {
            Some(add) if add.kind() == y.kind() => {
                let mut y = y;
                let _ = y.g_add_(add);
                y
            }
            Some(add) => y + add,
            None => y,
        };
        if self.relu {
            let _ = y.relu_();
        }
        y
    }
}

/// Set when libtorch turned prepacking down once: no more attempts.
static UNAVAILABLE: AtomicBool = AtomicBool::new(false);

impl PackedConv {
    /// Whether a frozen convolution's input can take a packed path: a 4-d CPU float32 tensor
    /// (the caller checks the weights and, for an input that tracks gradients, the geometry).
    fn applies_to(input: &Tensor) -> bool {
        cfg!(svf_onednn)
            && !UNAVAILABLE.load(Ordering::Relaxed)
            && input.device() == Device::Cpu
            && input.kind() == Kind::Float
            && input.dim() == 4
    }

    /// A frozen float32 `weight` packed for inputs of `input_size` (other sizes give the same
    /// results, oneDNN reorders again only if it picks another layout for them). `None`, with a
    /// debug log, where libtorch lacks the operators.
    fn new(weight: &Tensor, geometry: ConvGeometry, input_size: &[i64]) -> Option<PackedConv> {
        match bridge::prepack(weight, geometry, input_size) {
            Ok(packed) => Some(PackedConv { packed, geometry }),
            Err(message) => {
                UNAVAILABLE.store(true, Ordering::Relaxed);
                tracing::debug!("oneDNN prepacking unavailable, plain convolution: {message}");
                None
            }
        }
    }

    fn shallow_clone(&self) -> PackedConv {
        PackedConv {
            packed: self.packed.shallow_clone(),
            geometry: self.geometry,
        }
    }

    /// `conv(x) + bias`, then ReLU if `relu`, in one oneDNN call; `Err` with libtorch's message
    /// if it fails. With `input_gradient` (this weight's), differentiable in `x`.
    fn forward(
        &self,
        x: &Tensor,
        input_gradient: Option<&InputGradient>,
        bias: Option<&Tensor>,
        relu: bool,
    ) -> Result<Tensor, String> {
        match input_gradient {
            None => bridge::convolution(x, &self.packed, bias, self.geometry, relu),
            Some(gradient) => bridge::tracked_convolution(x, self, gradient, bias, relu),
        }
    }
}

/// How the bridge's autograd function takes the input gradient of a stride-1 convolution with a
/// frozen weight (it needs no other).
#[derive(Debug)]
enum InputGradient {
    /// A 1×1 convolution's: one matrix product of the channels-last gradient with the weight as
    /// it is (as fast as a packed convolution, and no copy of the weight).
    MatMul(Tensor),
    /// Otherwise a convolution too: the weight with input and output channels swapped and the
    /// kernel flipped, at padding `dilation·(kernel−1) − padding` (which gives back the input's
    /// size), packed.
    Transposed(PackedConv),
}

impl InputGradient {
    /// For `weight` (packed for `input_size`) in `geometry`, at stride 1 (other strides make the
    /// input gradient a transposed convolution; the caller leaves them to libtorch); `None` for
    /// paddings over `dilation·(kernel−1)`, non-square kernels, or where oneDNN turns the
    /// transposed weight down.
    fn new(weight: &Tensor, geometry: ConvGeometry, input_size: &[i64]) -> Option<InputGradient> {
        debug_assert_eq!(geometry.stride, 1);
        let size = weight.size();
        let (out_channels, kernel) = (size[0], size[2]);
        let padding = geometry.dilation * (kernel - 1) - geometry.padding;
        if padding < 0 || kernel != size[3] {
            return None;
        }
        if kernel == 1 {
            return Some(InputGradient::MatMul(weight.shallow_clone()));
        }
        // Packed for gradients shaped like the output: the input's size less what the
        // convolution's reach takes off.
        let shrink = padding - geometry.padding;
        let grad_size = [
            input_size[0],
            out_channels,
            input_size[2] - shrink,
            input_size[3] - shrink,
        ];
        let transposed = tch::no_grad(|| weight.flip([2, 3]).transpose(0, 1).contiguous());
        let geometry = ConvGeometry {
            padding,
            ..geometry
        };
        PackedConv::new(&transposed, geometry, &grad_size).map(InputGradient::Transposed)
    }

    fn shallow_clone(&self) -> InputGradient {
        match self {
            InputGradient::MatMul(weight) => InputGradient::MatMul(weight.shallow_clone()),
            InputGradient::Transposed(packed) => InputGradient::Transposed(packed.shallow_clone()),
        }
    }
}

/// One convolution's packed weight, kept while the weight it was packed from is unchanged.
#[derive(Debug, Default)]
pub(crate) struct PackCache(Mutex<Option<Box<PackEntry>>>);

#[derive(Debug)]
struct PackEntry {
    /// The weight that was packed, held so that its storage (part of the key) stays its own.
    source: Tensor,
    version: i64,
    geometry: ConvGeometry,
    /// `None` where oneDNN turned the weight down.
    packed: Option<PackedConv>,
    /// For an input that tracks gradients, made on first need; `Some(None)` where there is none.
    input_gradient: Option<Option<InputGradient>>,
}

impl PackEntry {
    fn packs(&self, weight: &Tensor, geometry: ConvGeometry) -> bool {
        self.source.data_ptr() == weight.data_ptr()
            && self.source.size() == weight.size()
            && self.source.stride() == weight.stride()
            && self.version == weight.internal_version()
            && self.geometry == geometry
    }
}

impl PackCache {
    /// `epilogue(conv2d(x, weight, bias))`: through the packed weight (packed on first use, again
    /// when the weight changes) where neither `weight` nor `bias` tracks a gradient and `x` is on
    /// the CPU in float32, else libtorch's convolution and the epilogue as separate operations.
    /// The two agree up to summation order. An `x` that tracks gradients takes the packed path
    /// only at stride 1 (where the input gradient is a packed convolution too).
    pub(crate) fn conv2d(
        &self,
        x: &Tensor,
        weight: &Tensor,
        bias: Option<&Tensor>,
        geometry: ConvGeometry,
        epilogue: Epilogue,
    ) -> Tensor {
        let frozen = !weight.requires_grad() && bias.is_none_or(|b| !b.requires_grad());
        // An input that tracks gradients needs its gradient, a packed convolution at stride 1 only.
        let packable = frozen
            && weight.kind() == Kind::Float
            && PackedConv::applies_to(x)
            && (!x.requires_grad() || geometry.stride == 1);
        if let Some((packed, input_gradient)) =
            packable.then(|| self.packed(weight, geometry, x)).flatten()
        {
            // ReLU is fused only when nothing is added before it: oneDNN's fused addition (its
            // binary post-op) measured slower than the separate in-place one.
            let relu = epilogue.relu && epilogue.add.is_none();
            match packed.forward(x, input_gradient.as_ref(), bias, relu) {
                Ok(y) if relu => return y,
                Ok(y) => return epilogue.apply(y),
                Err(message) => {
                    // A failure here is a bug in the bridge: tests must not pass on the fallback.
                    debug_assert!(false, "oneDNN convolution failed: {message}");
                    tracing::warn!("oneDNN convolution failed, libtorch's used: {message}")
                }
            }
        }
        epilogue.apply(geometry.conv2d(x, weight, bias))
    }

    /// The packed form of `weight`, packed now for inputs like `x` unless it already is, and, if
    /// `x` tracks gradients, how to take its input gradient. `None` where `x` tracks gradients
    /// and there is no such way.
    fn packed(
        &self,
        weight: &Tensor,
        geometry: ConvGeometry,
        x: &Tensor,
    ) -> Option<(PackedConv, Option<InputGradient>)> {
        let mut guard = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if !guard.as_ref().is_some_and(|e| e.packs(weight, geometry)) {
            *guard = Some(Box::new(PackEntry {
                source: weight.shallow_clone(),
                version: weight.internal_version(),
                geometry,
                packed: PackedConv::new(weight, geometry, &x.size()),
                input_gradient: None,
            }));
        }
        let entry = guard.as_mut()?;
        let packed = entry.packed.as_ref()?.shallow_clone();
        if !x.requires_grad() {
            return Some((packed, None));
        }
        let input_gradient = entry
            .input_gradient
            .get_or_insert_with(|| InputGradient::new(weight, geometry, &x.size()))
            .as_ref()?
            .shallow_clone();
        Some((packed, Some(input_gradient)))
    }
}

#[cfg(svf_onednn)]
mod bridge {
    use std::ffi::{c_char, c_void, CStr};
    use std::ptr;

    use tch::Tensor;

    use crate::svf::ConvGeometry;

    extern "C" {
        fn svf_onednn_prepack(
            weight: *const c_void,
            stride: i64,
            padding: i64,
            dilation: i64,
            input_size: *const i64,
            input_dims: usize,
            out: *mut *mut c_void,
        ) -> *mut c_char;
        fn svf_onednn_conv(
            x: *const c_void,
            packed: *const c_void,
            bias: *const c_void,
            stride: i64,
            padding: i64,
            dilation: i64,
            relu: bool,
            out: *mut *mut c_void,
        ) -> *mut c_char;
        fn svf_onednn_conv_tracked(
            x: *const c_void,
            packed: *const c_void,
            gradient_weight: *const c_void,
            gradient_by_matmul: bool,
            bias: *const c_void,
            padding: i64,
            transposed_padding: i64,
            dilation: i64,
            relu: bool,
            out: *mut *mut c_void,
        ) -> *mut c_char;
    }

    /// The bridge's result: the new tensor, or the C++ exception's message.
    ///
    /// # Safety
    /// `error` is null or a malloc'ed C string; `out` is a new `at::Tensor` when `error` is null.
    unsafe fn result(error: *mut c_char, out: *mut c_void) -> Result<Tensor, String> {
        if error.is_null() {
            Ok(Tensor::from_ptr(out.cast()))
        } else {
            let message = CStr::from_ptr(error).to_string_lossy().into_owned();
            libc::free(error.cast());
            Err(message)
        }
    }

    fn raw(tensor: Option<&Tensor>) -> *const c_void {
        tensor.map_or(ptr::null(), |t| t.as_ptr().cast())
    }

    pub(super) fn prepack(
        weight: &Tensor,
        geometry: ConvGeometry,
        input_size: &[i64],
    ) -> Result<Tensor, String> {
        let mut out = ptr::null_mut();
        // SAFETY: the pointers are live tensors and a slice of `input_size.len()` values.
        unsafe {
            let error = svf_onednn_prepack(
                raw(Some(weight)),
                geometry.stride,
                geometry.padding,
                geometry.dilation,
                input_size.as_ptr(),
                input_size.len(),
                &mut out,
            );
            result(error, out)
        }
    }

    pub(super) fn convolution(
        x: &Tensor,
        packed: &Tensor,
        bias: Option<&Tensor>,
        geometry: ConvGeometry,
        relu: bool,
    ) -> Result<Tensor, String> {
        let mut out = ptr::null_mut();
        // SAFETY: the pointers are live tensors or null where the bridge accepts null.
        unsafe {
            let error = svf_onednn_conv(
                raw(Some(x)),
                raw(Some(packed)),
                raw(bias),
                geometry.stride,
                geometry.padding,
                geometry.dilation,
                relu,
                &mut out,
            );
            result(error, out)
        }
    }

    /// The stride-1 convolution through `packed`, differentiable in `x` by `gradient`.
    pub(super) fn tracked_convolution(
        x: &Tensor,
        packed: &super::PackedConv,
        gradient: &super::InputGradient,
        bias: Option<&Tensor>,
        relu: bool,
    ) -> Result<Tensor, String> {
        let (gradient_weight, by_matmul, transposed_padding) = match gradient {
            super::InputGradient::MatMul(weight) => (weight, true, 0),
            super::InputGradient::Transposed(t) => (&t.packed, false, t.geometry.padding),
        };
        let mut out = ptr::null_mut();
        // SAFETY: the pointers are live tensors or null where the bridge accepts null.
        unsafe {
            let error = svf_onednn_conv_tracked(
                raw(Some(x)),
                raw(Some(&packed.packed)),
                raw(Some(gradient_weight)),
                by_matmul,
                raw(bias),
                packed.geometry.padding,
                transposed_padding,
                packed.geometry.dilation,
                relu,
                &mut out,
            );
            result(error, out)
        }
    }
}

/// Without the bridge (`build.rs` found no libtorch headers) nothing is ever packed.
#[cfg(not(svf_onednn))]
mod bridge {
    use tch::Tensor;

    use crate::svf::ConvGeometry;

    const MISSING: &str = "built without the oneDNN bridge";

    pub(super) fn prepack(_: &Tensor, _: ConvGeometry, _: &[i64]) -> Result<Tensor, String> {
        Err(MISSING.to_string())
    }

    pub(super) fn convolution(
        _: &Tensor,
        _: &Tensor,
        _: Option<&Tensor>,
        _: ConvGeometry,
        _: bool,
    ) -> Result<Tensor, String> {
        Err(MISSING.to_string())
    }

    pub(super) fn tracked_convolution(
        _: &Tensor,
        _: &super::PackedConv,
        _: &super::InputGradient,
        _: Option<&Tensor>,
        _: bool,
    ) -> Result<Tensor, String> {
        Err(MISSING.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cpu(shape: &[i64]) -> Tensor {
        Tensor::randn(shape, (Kind::Float, Device::Cpu))
    }

    fn channels_last(x: &Tensor) -> Tensor {
        x.permute([0, 2, 3, 1]).contiguous().permute([0, 3, 1, 2])
    }

    /// A random input of `shape`, the `i`-th of a test's list: channels-last as the models' are,
    /// except the second (libtorch's default layout).
    fn input(shape: &[i64], i: usize) -> Tensor {
        if i == 1 {
            cpu(shape)
        } else {
            channels_last(&cpu(shape))
        }
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        assert_eq!(a.size(), b.size());
        (a - b).abs().max().double_value(&[])
    }

    /// libtorch's convolution followed by the epilogue's operations, written out.
    fn reference(
        x: &Tensor,
        weight: &Tensor,
        bias: Option<&Tensor>,
        geometry: ConvGeometry,
        add: Option<&Tensor>,
        relu: bool,
    ) -> Tensor {
        let y = geometry.conv2d(x, weight, bias);
        let y = match add {
            Some(add) => y + add,
            None => y,
        };
        if relu {
            y.relu()
        } else {
            y
        }
    }

    const fn geometry(stride: i64, padding: i64, dilation: i64) -> ConvGeometry {
        ConvGeometry {
            stride,
            padding,
            dilation,
        }
    }

    /// Stride 2, dilations 2 and 4, 1×1 and 7×7 kernels.
    const GEOMETRIES: [(i64, ConvGeometry); 5] = [
        (3, geometry(1, 1, 1)),
        (3, geometry(2, 2, 2)),
        (3, geometry(1, 4, 4)),
        (1, ConvGeometry::PLAIN),
        (7, geometry(2, 3, 1)),
    ];

    /// What `cache` holds: `None` if nothing, else whether the weight is packed and whether an
    /// input gradient was looked for (and found).
    fn packed_forms(cache: &PackCache) -> Option<(bool, Option<bool>)> {
        let entry = cache.0.lock().unwrap();
        let entry = entry.as_ref()?;
        let gradient = entry.input_gradient.as_ref().map(Option::is_some);
        Some((entry.packed.is_some(), gradient))
    }

    #[test]
    fn packed_convolutions_equal_libtorch_with_their_epilogues() {
        tch::manual_seed(3);
        for (kernel, geometry) in GEOMETRIES {
            let weight = channels_last(&cpu(&[12, 8, kernel, kernel]));
            let bias = cpu(&[12]);
            let cache = PackCache::default();
            // Packed for the first input; other sizes, batches and layouts use the same packing.
            for (i, shape) in [[1, 8, 17, 17], [3, 8, 11, 20], [2, 8, 17, 17]]
                .iter()
                .enumerate()
            {
                let x = input(shape, i);
                let out_shape = geometry.conv2d(&x, &weight, None).size();
                let add = cpu(&out_shape);
                for (bias, add, relu) in [
                    (None, None, false),
                    (Some(&bias), None, true),
                    (Some(&bias), Some(&add), true),
                    (None, Some(&add), false),
                ] {
                    let epilogue = Epilogue { add, relu };
                    let packed = cache.conv2d(&x, &weight, bias, geometry, epilogue);
                    let expected = reference(&x, &weight, bias, geometry, add, relu);
                    let diff = max_diff(&packed, &expected);
                    assert!(diff < 1e-4, "k{kernel} {geometry:?} {shape:?}: {diff}");
                }
                let packed = packed_forms(&cache).is_some_and(|(packed, _)| packed);
                assert!(
                    packed,
                    "nothing packed: was the oneDNN bridge built (build.rs)?"
                );
            }
        }
    }

    /// An input that tracks gradients: the same outputs, and the same input (and shortcut)
    /// gradients as libtorch's backward; the packed path (an input gradient) for stride 1 only.
    #[test]
    fn packed_convolutions_of_tracked_inputs_give_libtorchs_gradients() {
        tch::manual_seed(4);
        for (kernel, geometry) in GEOMETRIES {
            let weight = channels_last(&cpu(&[12, 8, kernel, kernel]));
            let bias = cpu(&[12]);
            let cache = PackCache::default();
            for (i, shape) in [[1, 8, 17, 17], [2, 8, 11, 20]].iter().enumerate() {
                let x = input(shape, i);
                let out_shape = geometry.conv2d(&x, &weight, None).size();
                // A gradient from above that is not all ones, so that the flip is tested.
                let upstream = cpu(&out_shape);
                let add = cpu(&out_shape);
                for (bias, add, relu) in [
                    (None, None, false),
                    (Some(&bias), None, true),
                    (Some(&bias), Some(&add), true),
                ] {
                    let run = |conv: &dyn Fn(&Tensor, Option<&Tensor>) -> Tensor| {
                        let x = x.copy().set_requires_grad(true);
                        let add = add.map(|a| a.copy().set_requires_grad(true));
                        let y = conv(&x, add.as_ref());
                        (&y * &upstream).sum(Kind::Float).backward();
                        (y.detach(), x.grad(), add.map(|a| a.grad()))
                    };
                    let (y, grad_x, grad_add) = run(&|x, add| {
                        cache.conv2d(x, &weight, bias, geometry, Epilogue { add, relu })
                    });
                    let (y_ref, grad_x_ref, grad_add_ref) =
                        run(&|x, add| reference(x, &weight, bias, geometry, add, relu));
                    let case = format!("k{kernel} {geometry:?} {shape:?} relu {relu}");
                    assert!(max_diff(&y, &y_ref) < 1e-4, "{case}: output");
                    assert!(
                        max_diff(&grad_x, &grad_x_ref) < 1e-4,
                        "{case}: input gradient"
                    );
                    if let (Some(g), Some(g_ref)) = (grad_add, grad_add_ref) {
                        assert!(max_diff(&g, &g_ref) < 1e-6, "{case}: shortcut gradient");
                    }
                }
            }
            // Stride 1: packed with its input gradient; otherwise nothing packed at all.
            let expected = (geometry.stride == 1).then_some((true, Some(true)));
            assert_eq!(packed_forms(&cache), expected, "k{kernel} {geometry:?}");
        }
    }

    #[test]
    fn a_changed_weight_is_packed_again_and_a_trainable_one_takes_libtorch() {
        let geometry = geometry(1, 1, 1);
        let weight = cpu(&[6, 4, 3, 3]);
        let x = cpu(&[1, 4, 9, 9]);
        let cache = PackCache::default();
        let before = cache.conv2d(&x, &weight, None, geometry, Epilogue::NONE);
        // In place, as loading weights does: same storage, a new version.
        let _ = tch::no_grad(|| weight.shallow_clone().g_mul_scalar_(-2.0));
        let after = cache.conv2d(&x, &weight, None, geometry, Epilogue::NONE);
        assert!(max_diff(&after, &(before * -2.0)) < 1e-4);

        // A weight that trains: libtorch's convolution, and its gradient arrives.
        let trainable = weight.copy().set_requires_grad(true);
        let y = cache.conv2d(&x, &trainable, None, geometry, Epilogue::NONE);
        y.sum(Kind::Float).backward();
        let expected = weight.copy().set_requires_grad(true);
        reference(&x, &expected, None, geometry, None, false)
            .sum(Kind::Float)
            .backward();
        assert!(max_diff(&trainable.grad(), &expected.grad()) < 1e-4);

        // A frozen input with a shortcut that tracks gradients: packed, the addition in place
        // records it, and the shortcut's gradient arrives.
        let add = cpu(&[1, 6, 9, 9]).set_requires_grad(true);
        let epilogue = Epilogue {
            add: Some(&add),
            relu: true,
        };
        let y = cache.conv2d(&x, &weight, None, geometry, epilogue);
        let expected = reference(&x, &weight, None, geometry, Some(&add.detach()), true);
        assert!(max_diff(&y, &expected) < 1e-4);
        y.sum(Kind::Float).backward();
        assert!(max_diff(&add.grad(), &expected.gt(0.0).to_kind(Kind::Float)) < 1e-6);
    }
}
