// oneDNN's prepacked convolution (the `mkldnn::` operators PyTorch's Inductor uses on the CPU),
// which tch does not bind. Called through the dispatcher's boxed interface, so the C++ signature
// of the kernels does not have to be spelled out here. The operators have no backward; for a
// frozen weight whose input tracks gradients, an autograd function supplies the input gradient as
// another packed convolution. Each exported function returns NULL on success or a malloc'ed error
// message (freed by the caller).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <torch/autograd.h>

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

namespace {

// `relu(conv(x) + bias)`, `bias` (NULL: none) and `relu` optional. oneDNN could also add a
// tensor (its binary post-op), but that measured slower than a separate in-place addition.
at::Tensor packed_convolution(const at::Tensor& x, const at::Tensor& packed, const at::Tensor* bias,
                              int64_t stride, int64_t padding, int64_t dilation, bool relu) {
  static const c10::OperatorHandle op = operator_handle("mkldnn::_convolution_pointwise", "");
  torch::jit::Stack stack{
      c10::IValue(x),
      c10::IValue(packed),
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
  return stack.at(0).toTensor();
}

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// A stride-1 convolution with a frozen weight, differentiable in its input only (what a frozen
// weight needs). The input gradient of a stride-1 convolution is itself a convolution: the weight
// with input and output channels swapped and the kernel flipped (`packed_transposed`), padding
// `dilation·(k−1) − padding`. Both run prepacked, and the input is not kept for the backward.
struct FrozenWeightConvolution : public torch::autograd::Function<FrozenWeightConvolution> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& packed,
                            const at::Tensor& packed_transposed, const at::Tensor* bias,
                            int64_t padding, int64_t transposed_padding, int64_t dilation,
                            bool relu) {
    at::Tensor y = packed_convolution(x, packed, bias, 1, padding, dilation, relu);
    if (relu) {
      ctx->save_for_backward({y});
    }
    ctx->saved_data["packed_transposed"] = packed_transposed;
    ctx->saved_data["padding"] = transposed_padding;
    ctx->saved_data["dilation"] = dilation;
    ctx->saved_data["relu"] = relu;
    ctx->saved_data["channels_last"] =
        x.suggest_memory_format() == at::MemoryFormat::ChannelsLast;
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    at::Tensor grad = grads.at(0);
    if (ctx->saved_data["relu"].toBool()) {
      grad = at::threshold_backward(grad, ctx->get_saved_variables().at(0), 0);
    }
    grad = grad.contiguous(ctx->saved_data["channels_last"].toBool()
                               ? at::MemoryFormat::ChannelsLast
                               : at::MemoryFormat::Contiguous);
    at::Tensor grad_x = packed_convolution(
        grad, ctx->saved_data["packed_transposed"].toTensor(), nullptr, 1,
        ctx->saved_data["padding"].toInt(), ctx->saved_data["dilation"].toInt(), false);
    return {grad_x, at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

}  // namespace

extern "C" char* svf_onednn_conv(const at::Tensor* x, const at::Tensor* packed,
                                 const at::Tensor* bias, int64_t stride, int64_t padding,
                                 int64_t dilation, bool relu, at::Tensor** out) {
  try {
    *out = new at::Tensor(packed_convolution(*x, *packed, bias, stride, padding, dilation, relu));
    return nullptr;
  } catch (const std::exception& e) {
    return error_message(e.what());
  }
}

// The stride-1 convolution of `FrozenWeightConvolution`: `relu(conv(x) + bias)` with the weight
// packed as it is (`packed`) and transposed for the input gradient (`packed_transposed`).
extern "C" char* svf_onednn_conv_tracked(const at::Tensor* x, const at::Tensor* packed,
                                         const at::Tensor* packed_transposed,
                                         const at::Tensor* bias, int64_t padding,
                                         int64_t transposed_padding, int64_t dilation, bool relu,
                                         at::Tensor** out) {
  try {
    // The bias goes by pointer: `apply` takes every tensor argument for an input, and an
    // undefined one (no bias) has no device for it to check.
    at::Tensor y = FrozenWeightConvolution::apply(*x, *packed, *packed_transposed, bias, padding,
                                                  transposed_padding, dilation, relu);
    *out = new at::Tensor(std::move(y));
    return nullptr;
  } catch (const std::exception& e) {
    return error_message(e.what());
  }
}
