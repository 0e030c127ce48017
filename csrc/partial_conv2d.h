// Shared host-side pieces of the partial_conv2d op: argument checks (one set of messages for
// every backend) and the output layout rules. The schema lives in partial_conv2d.cpp.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <array>
#include <optional>
#include <string_view>
#include <tuple>

#include "partial_conv2d_math.h"

namespace partialconv {

// The arguments every backend's forward receives, checked, plus the geometry derived from them.
struct ForwardProblem {
  ConvGeometry geometry;
  Activation activation;
  double negative_slope;
};

// Checks ranks, shapes, dtypes, devices and conv parameters; throws ValueError/TypeError with a
// message naming the argument and what was expected.
ForwardProblem check_forward_args(const at::Tensor& input, const std::optional<at::Tensor>& mask,
                                  const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                  at::IntArrayRef stride, at::IntArrayRef padding,
                                  at::IntArrayRef dilation, int64_t groups,
                                  std::string_view activation, double negative_slope);

// The forward checks plus the tensors only backward receives.
ForwardProblem check_backward_args(const at::Tensor& grad_output, const at::Tensor& input,
                                   const std::optional<at::Tensor>& mask,
                                   const at::Tensor& weight,
                                   const std::optional<at::Tensor>& output,
                                   const at::Tensor& mask_scales, at::IntArrayRef stride,
                                   at::IntArrayRef padding, at::IntArrayRef dilation,
                                   int64_t groups, std::string_view activation,
                                   double negative_slope);

// Outputs are channels_last exactly when the input is channels_last (and not also plainly
// contiguous); the fake kernel in partialconv_cuda/ops.py applies the same rule.
at::MemoryFormat output_memory_format(const at::Tensor& input);

// dtype of the saved mask scales: float32 for float16/bfloat16/float32 input, float64 for
// float64.
at::ScalarType mask_scales_dtype(at::ScalarType input_dtype);

// Empty outputs of the right shapes and layouts: (output, updated_mask, mask_scales), where
// mask_scales is (mask_batch, 2, H', W'): channel 0 the ratio, channel 1 the update U, all that
// backward needs of the mask besides M itself (no division left for backward to do).
std::tuple<at::Tensor, at::Tensor, at::Tensor> allocate_forward_outputs(const at::Tensor& input,
                                                                        const ConvGeometry& g);

// Empty (grad_input, grad_weight, grad_bias) for the gradients output_mask asks for, undefined
// for the others; grad_input follows output_memory_format(input).
std::tuple<at::Tensor, at::Tensor, at::Tensor> allocate_backward_outputs(
    const at::Tensor& input, const at::Tensor& weight, std::array<bool, 3> output_mask);

}  // namespace partialconv
