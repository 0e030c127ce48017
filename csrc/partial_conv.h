// Shared host-side pieces of the partial_conv ops: argument checks (one set of checks and
// messages for every backend and for the fake tensors of torch.compile / torch.export) and the
// output layout rules. The schema lives in partial_conv.cpp.
//
// One op serves 1, 2 and 3 spatial dimensions, taken from the input's rank (3-D, 4-D or 5-D).
// The checks are templates over the size type: int64_t for real tensors, c10::SymInt for the
// fake tensors of torch.compile / torch.export (csrc/meta/), so that a wrong model fails at
// compile or export time with the same message as when run.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/SymInt.h>
#include <c10/util/ArrayRef.h>

#include <array>
#include <optional>
#include <string_view>
#include <tuple>

#include "partial_conv_math.h"

namespace partialconv {

// The arguments every backend's forward receives, checked, plus the geometry derived from them.
template <typename Size>
struct ForwardProblemOf {
  ConvShape<Size> geometry;
  Activation activation;
  double negative_slope;
};
using ForwardProblem = ForwardProblemOf<int64_t>;

// Checks ranks, shapes, dtypes, devices and conv parameters; throws ValueError/TypeError with a
// message naming the argument and what was expected.
template <typename Size>
ForwardProblemOf<Size> check_forward_args(const at::Tensor& input,
                                          const std::optional<at::Tensor>& mask,
                                          const at::Tensor& weight,
                                          const std::optional<at::Tensor>& bias,
                                          at::IntArrayRef stride, at::IntArrayRef padding,
                                          at::IntArrayRef dilation, int64_t groups,
                                          std::string_view activation, double negative_slope,
                                          std::string_view normalization = "window");

// The forward checks plus the tensors only backward receives.
template <typename Size>
ForwardProblemOf<Size> check_backward_args(const at::Tensor& grad_output, const at::Tensor& input,
                                           const std::optional<at::Tensor>& mask,
                                           const at::Tensor& weight,
                                           const std::optional<at::Tensor>& output,
                                           const at::Tensor& mask_scales, at::IntArrayRef stride,
                                           at::IntArrayRef padding, at::IntArrayRef dilation,
                                           int64_t groups, std::string_view activation,
                                           double negative_slope);

// Outputs are channels_last (channels_last_3d) exactly when a 4-D (5-D) input is, and not also
// plainly contiguous.
at::MemoryFormat output_memory_format(const at::Tensor& input);

// dtype of the saved mask scales: float32 for float16/bfloat16/float32 input, float64 for
// float64.
at::ScalarType mask_scales_dtype(at::ScalarType input_dtype);

// Empty outputs of the right shapes and layouts: (output, updated_mask, mask_scales), where
// mask_scales is (mask_batch, 2, *out_spatial), the ratio and the update U per output position
// (the layout of partial_conv_math.h's mask_scale_rows): all that backward needs of the mask
// besides M itself (no division left for backward to do).
template <typename Size>
std::tuple<at::Tensor, at::Tensor, at::Tensor> allocate_forward_outputs(const at::Tensor& input,
                                                                        const ConvShape<Size>& g);

// Empty (grad_input, grad_weight, grad_bias) for the gradients output_mask asks for, undefined
// for the others; grad_input follows output_memory_format(input).
std::tuple<at::Tensor, at::Tensor, at::Tensor> allocate_backward_outputs(
    const at::Tensor& input, const at::Tensor& weight, std::array<bool, 3> output_mask);

// The spatial sizes of the tensors, from the 3-D arrays of the geometry (dropping the leading
// unit dimensions of 1-D and 2-D problems).
template <typename Size>
std::vector<Size> spatial_sizes(const Size (&sizes)[kDims], int spatial_dims);

}  // namespace partialconv
