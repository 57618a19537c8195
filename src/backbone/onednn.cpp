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
// weight needs); the input is not kept for the backward. A 1×1 convolution's input gradient is
// the gradient (channels-last, so a matrix of positions × channels) times the weight
// (`gradient_weight`, as it is); otherwise it is a convolution too, with the weight's input and
// output channels swapped and its kernel flipped (`gradient_weight`, packed), padding
// `dilation·(k−1) − padding`.
struct FrozenWeightConvolution : public torch::autograd::Function<FrozenWeightConvolution> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& packed,
                            const at::Tensor& gradient_weight, bool gradient_by_matmul,
                            const at::Tensor* bias, int64_t padding, int64_t transposed_padding,
                            int64_t dilation, bool relu) {
    at::Tensor y = packed_convolution(x, packed, bias, 1, padding, dilation, relu);
    if (relu) {
      ctx->save_for_backward({y});
    }
    ctx->saved_data["gradient_weight"] = gradient_weight;
    ctx->saved_data["by_matmul"] = gradient_by_matmul;
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
    const at::Tensor weight = ctx->saved_data["gradient_weight"].toTensor();
    at::Tensor grad_x;
    if (ctx->saved_data["by_matmul"].toBool()) {
      const int64_t n = grad.size(0), out = grad.size(1), h = grad.size(2), w = grad.size(3);
      const at::Tensor rows =
          grad.contiguous(at::MemoryFormat::ChannelsLast).permute({0, 2, 3, 1}).reshape({-1, out});
      grad_x = at::mm(rows, weight.reshape({out, -1})).view({n, h, w, -1}).permute({0, 3, 1, 2});
      if (!ctx->saved_data["channels_last"].toBool()) {
        grad_x = grad_x.contiguous();
      }
    } else {
      grad = grad.contiguous(ctx->saved_data["channels_last"].toBool()
                                 ? at::MemoryFormat::ChannelsLast
                                 : at::MemoryFormat::Contiguous);
      grad_x = packed_convolution(grad, weight, nullptr, 1, ctx->saved_data["padding"].toInt(),
                                  ctx->saved_data["dilation"].toInt(), false);
    }
    return {grad_x,       at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
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
// packed (`packed`), and what its input gradient takes (`gradient_weight`, `gradient_by_matmul`).
extern "C" char* svf_onednn_conv_tracked(const at::Tensor* x, const at::Tensor* packed,
                                         const at::Tensor* gradient_weight,
                                         bool gradient_by_matmul, const at::Tensor* bias,
                                         int64_t padding,
                                         int64_t transposed_padding, int64_t dilation, bool relu,
                                         at::Tensor** out) {
  try {
    // The bias goes by pointer: `apply` takes every tensor argument for an input, and an
    // undefined one (no bias) has no device for it to check.
    at::Tensor y =
        FrozenWeightConvolution::apply(*x, *packed, *gradient_weight, gradient_by_matmul, bias,
                                       padding, transposed_padding, dilation, relu);
    *out = new at::Tensor(std::move(y));
    return nullptr;
  } catch (const std::exception& e) {
    return error_message(e.what());
  }
}
