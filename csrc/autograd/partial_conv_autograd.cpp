// Reverse mode of the ops, as their Autograd kernels (torchvision's ops/autograd layering): the
// forward op records a node whose backward calls partial_conv_backward; the backward op's results
// get a node that refuses to be differentiated again. In C++ rather than torch.library.register_autograd
// so that an eager call crosses no Python on the way in (a Python autograd kernel cost about 100 us
// a call, more than a small layer's whole convolution) nor in backward.
//
// torch.compile and torch.export trace these kernels like any C++ autograd kernel; forward mode and
// the torch.func transforms, which C++ autograd Functions do not support, are served in Python
// (partialconv_cuda/ops.py, PartialConvFunction), whose forward reaches this kernel with no input
// requiring a gradient, which records nothing.
#include <torch/autograd.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "../op_handles.h"

namespace partialconv {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using Outputs = OpOutputs;

constexpr const char* kNoSecondOrder =
    "partial_conv: second-order derivatives (double backward, hessians, forward mode over reverse "
    "mode) through the layer are not supported; use partialconv_cuda.partial_conv_reference for "
    "them";

bool defined(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

bool any_requires_grad(std::initializer_list<std::optional<at::Tensor>> tensors) {
  if (!at::GradMode::is_enabled()) return false;
  for (const std::optional<at::Tensor>& t : tensors)
    if (defined(t) && t->requires_grad()) return true;
  return false;
}

std::optional<at::Tensor> optional(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

// The node's only differentiable output is the op's output; the updated mask and the mask scales
// leave through `rest` without autograd history (a node with non-differentiable outputs is one
// compiled autograd refuses).
class PartialConvForward : public torch::autograd::Function<PartialConvForward> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& input,
                               const std::optional<at::Tensor>& mask, const at::Tensor& weight,
                               const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                               at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                               c10::string_view activation, double negative_slope,
                               c10::string_view normalization, Outputs* rest) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [output, updated_mask, mask_scales] =
        forward_op().call(input, mask, weight, bias, stride, padding, dilation, groups,
                          activation, negative_slope, normalization);
    std::get<1>(*rest) = updated_mask;
    std::get<2>(*rest) = mask_scales;
    // The mask reaches backward only through its per-position scales and as the factor M of
    // grad_input; the activation's derivative is read off the output.
    const bool activated = activation != "none";
    ctx->save_for_backward({input, mask.value_or(at::Tensor()), weight,
                            activated ? output : at::Tensor(), mask_scales});
    ctx->saved_data["stride"] = stride.vec();
    ctx->saved_data["padding"] = padding.vec();
    ctx->saved_data["dilation"] = dilation.vec();
    ctx->saved_data["groups"] = groups;
    ctx->saved_data["activation"] = std::string(activation);
    ctx->saved_data["negative_slope"] = negative_slope;
    ctx->saved_data["has_mask"] = defined(mask);
    ctx->saved_data["has_bias"] = defined(bias);
    return {output};
  }

  // One gradient per forward argument (12); the mask and the non-tensor arguments get none.
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const bool has_mask = ctx->saved_data["has_mask"].toBool();
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    // needs_input_grad counts only the tensors that were passed: input, [mask], weight, [bias].
    const size_t weight_edge = has_mask ? 2 : 1;
    const std::array<bool, 3> output_mask = {ctx->needs_input_grad(0),
                                             ctx->needs_input_grad(weight_edge),
                                             has_bias && ctx->needs_input_grad(weight_edge + 1)};
    const std::vector<int64_t> stride = ctx->saved_data["stride"].toIntVector();
    const std::vector<int64_t> padding = ctx->saved_data["padding"].toIntVector();
    const std::vector<int64_t> dilation = ctx->saved_data["dilation"].toIntVector();
    const std::string activation = ctx->saved_data["activation"].toStringRef();
    auto [grad_input, grad_weight, grad_bias] = backward_op().call(
        grads[0], saved[0], optional(saved[1]), saved[2], optional(saved[3]), saved[4], stride,
        padding, dilation, ctx->saved_data["groups"].toInt(), activation,
        ctx->saved_data["negative_slope"].toDouble(), output_mask);
    at::Tensor none;
    return {grad_input, none, grad_weight, grad_bias, none, none, none, none, none, none, none, none};
  }
};

// The grad_fn of partial_conv_backward's results when backward records a graph (create_graph=True;
// torch.func.grad always does): differentiating them again is refused instead of silently giving
// zeros.
struct SecondOrderRefused : torch::autograd::Node {
  explicit SecondOrderRefused(torch::autograd::edge_list&& next_edges)
      : Node(std::move(next_edges)) {}
  std::string name() const override { return "PartialConvBackwardBackward"; }
  variable_list apply(variable_list&&) override {
    TORCH_CHECK_NOT_IMPLEMENTED(false, kNoSecondOrder);
  }
};

Outputs partial_conv_forward_autograd(const at::Tensor& input,
                                      const std::optional<at::Tensor>& mask,
                                      const at::Tensor& weight,
                                      const std::optional<at::Tensor>& bias,
                                      at::IntArrayRef stride, at::IntArrayRef padding,
                                      at::IntArrayRef dilation, int64_t groups,
                                      c10::string_view activation, double negative_slope,
                                      c10::string_view normalization) {
  // Nothing to record (no_grad, inference, or the torch.func path's inner call): no node.
  if (!any_requires_grad({input, mask, weight, bias})) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return forward_op().call(input, mask, weight, bias, stride, padding, dilation, groups,
                             activation, negative_slope, normalization);
  }
  Outputs outputs;
  std::get<0>(outputs) =
      PartialConvForward::apply(input, mask, weight, bias, stride, padding, dilation, groups,
                                activation, negative_slope, normalization, &outputs)[0];
  return outputs;
}

Outputs partial_conv_backward_autograd(const at::Tensor& grad_output, const at::Tensor& input,
                                       const std::optional<at::Tensor>& mask,
                                       const at::Tensor& weight,
                                       const std::optional<at::Tensor>& output,
                                       const at::Tensor& mask_scales, at::IntArrayRef stride,
                                       at::IntArrayRef padding, at::IntArrayRef dilation,
                                       int64_t groups, c10::string_view activation,
                                       double negative_slope, std::array<bool, 3> output_mask) {
  auto grads = [&] {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return backward_op().call(grad_output, input, mask, weight, output, mask_scales, stride,
                              padding, dilation, groups, activation, negative_slope, output_mask);
  }();
  if (any_requires_grad({grad_output, input, mask, weight, output, mask_scales})) {
    const auto refused = c10::make_intrusive<SecondOrderRefused>(
        torch::autograd::collect_next_edges(grad_output, input, mask.value_or(at::Tensor()),
                                            weight, output.value_or(at::Tensor()), mask_scales));
    torch::autograd::set_history({std::get<0>(grads), std::get<1>(grads), std::get<2>(grads)},
                                 refused);
  }
  return grads;
}

}  // namespace

TORCH_LIBRARY_IMPL(partialconv_cuda, Autograd, m) {
  m.impl("partial_conv_forward", TORCH_FN(partial_conv_forward_autograd));
  m.impl("partial_conv_backward", TORCH_FN(partial_conv_backward_autograd));
}

}  // namespace partialconv
