// oneDNN's prepacked convolution (the `mkldnn::` operators PyTorch's Inductor uses on the CPU),
// which tch does not bind. Called through the dispatcher's boxed interface, so the C++ signature
// of the kernels does not have to be spelled out here. Each function returns NULL on success or
// a malloc'ed error message (freed by the caller).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>

#include <cstring>
#include <exception>
#include <string>
#include <vector>

namespace {

char* error_message(const char* what) { return strdup(what); }

c10::OperatorHandle operator_handle(const char* name, const char* overload) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, overload);
}

std::vector<int64_t> pair(int64_t v) { return {v, v}; }

c10::IValue optional_tensor(const at::Tensor* t) {
  return t == nullptr ? c10::IValue() : c10::IValue(*t);
}

}  // namespace

extern "C" char* svf_onednn_prepack(const at::Tensor* weight, int64_t stride, int64_t padding,
                                    int64_t dilation, const int64_t* input_size,
                                    size_t input_dims, at::Tensor** out) {
  try {
    static const c10::OperatorHandle op =
        operator_handle("mkldnn::_reorder_convolution_weight", "");
    torch::jit::Stack stack{
        c10::IValue(*weight),
        c10::IValue(pair(padding)),
        c10::IValue(pair(stride)),
        c10::IValue(pair(dilation)),
        c10::IValue(int64_t{1}),
        c10::IValue(std::vector<int64_t>(input_size, input_size + input_dims)),
    };
    op.callBoxed(stack);
    *out = new at::Tensor(stack.at(0).toTensor());
    return nullptr;
  } catch (const std::exception& e) {
    return error_message(e.what());
  }
}

// `relu(conv(x) + bias)`, `bias` (NULL: none) and `relu` optional. oneDNN could also add a
// tensor (its binary post-op), but that measured slower than a separate in-place addition.
extern "C" char* svf_onednn_conv(const at::Tensor* x, const at::Tensor* packed,
                                 const at::Tensor* bias, int64_t stride, int64_t padding,
                                 int64_t dilation, bool relu, at::Tensor** out) {
  try {
    static const c10::OperatorHandle op = operator_handle("mkldnn::_convolution_pointwise", "");
    torch::jit::Stack stack{
        c10::IValue(*x),
        c10::IValue(*packed),
        optional_tensor(bias),
        c10::IValue(pair(padding)),
        c10::IValue(pair(stride)),
        c10::IValue(pair(dilation)),
        c10::IValue(int64_t{1}),
        c10::IValue(std::string(relu ? "relu" : "none")),
        c10::IValue(c10::List<std::optional<at::Scalar>>()),
        c10::IValue(),
    };
    op.callBoxed(stack);
    *out = new at::Tensor(stack.at(0).toTensor());
    return nullptr;
  } catch (const std::exception& e) {
    return error_message(e.what());
  }
}
