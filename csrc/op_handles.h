// The dispatcher's handles of the ops, for the kernels that call an op again below their own
// dispatch key (autocast, autograd): the C++ signatures of the schemas in partial_conv.cpp, spelled
// once.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <array>
#include <optional>
#include <tuple>

namespace partialconv {

using OpOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

// partial_conv_forward -> (output, updated_mask, mask_scales)
using ForwardSignature = OpOutputs(const at::Tensor& input, const std::optional<at::Tensor>& mask,
                                   const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                   at::IntArrayRef stride, at::IntArrayRef padding,
                                   at::IntArrayRef dilation, int64_t groups,
                                   c10::string_view activation, double negative_slope,
                                   c10::string_view normalization);

// partial_conv_backward -> (grad_input, grad_weight, grad_bias)
using BackwardSignature = OpOutputs(const at::Tensor& grad_output, const at::Tensor& input,
                                    const std::optional<at::Tensor>& mask, const at::Tensor& weight,
                                    const std::optional<at::Tensor>& output,
                                    const at::Tensor& mask_scales, at::IntArrayRef stride,
                                    at::IntArrayRef padding, at::IntArrayRef dilation,
                                    int64_t groups, c10::string_view activation,
                                    double negative_slope, std::array<bool, 3> output_mask);

const c10::TypedOperatorHandle<ForwardSignature>& forward_op();
const c10::TypedOperatorHandle<BackwardSignature>& backward_op();

}  // namespace partialconv
