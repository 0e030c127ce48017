// CUDA backend of partial_conv for 1 and 2 spatial dimensions (a 1-D problem runs as a 2-D one of
// height 1; 3-D is refused until the N-d kernels land): checks, device guard, current stream, dtype and index-width
// dispatch, launches (each one checked). The kernels are in partial_conv2d_kernels.cuh.
// Everything here is capturable in a CUDA graph: no host synchronisation, and the only
// allocations (outputs, the grad_weight workspace) go through the caching allocator.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <array>
#include <cstdlib>
#include <initializer_list>
#include <limits>
#include <string>

#include "../partial_conv.h"
#include "partial_conv2d_kernels.cuh"

namespace partialconv {
namespace {

// 32-bit indexing while every offset and row count stays below this (the margin covers a tile's
// overhang past the last row).
constexpr int64_t kInt32IndexLimit = std::numeric_limits<int32_t>::max() - 4096;

// The (n, c, height, width) strides of a 3-D or 4-D tensor; a 1-D problem's tensors have a height
// of 1 (stride 0).
template <typename T>
cuda::TensorArg<T> tensor_arg(const at::Tensor& t) {
  cuda::TensorArg<T> arg;
  if (!t.defined()) return arg;
  arg.data = static_cast<T*>(t.data_ptr());
  for (int64_t d = 0; d < t.dim(); ++d) arg.strides[d + (d >= 2 ? 4 - t.dim() : 0)] = t.stride(d);
  return arg;
}

// One past the largest element offset a kernel can form in t.
int64_t offset_extent(const at::Tensor& t) {
  if (!t.defined()) return 0;
  int64_t extent = 1;
  for (int64_t d = 0; d < t.dim(); ++d) extent += (t.size(d) - 1) * t.stride(d);
  return extent;
}

bool needs_64bit_indexing(std::initializer_list<at::Tensor> tensors,
                          std::initializer_list<int64_t> counts) {
  for (const at::Tensor& t : tensors)
    if (offset_extent(t) > kInt32IndexLimit) return true;
  for (const int64_t count : counts)
    if (count > kInt32IndexLimit) return true;
  return false;
}

int64_t multiprocessor_count(int device) {
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  return count;
}

// grad_weight's split-K count for the matrix core of the input's dtype.
int64_t grad_weight_splits(const at::Tensor& input, const ConvGeometry& g) {
  const int64_t multiprocessors = multiprocessor_count(input.get_device());
  return AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, input.scalar_type(), "grad_weight_splits",
      [&] { return cuda::grad_weight_splits<scalar_t>(g, multiprocessors); });
}

void check_cuda_limits(const ConvGeometry& g) {
  TORCH_CHECK_NOT_IMPLEMENTED(g.spatial_dims <= 2, "partial_conv3d: the CUDA kernels do not ",
                              "support 3 spatial dimensions yet (1-D and 2-D run on CUDA); run ",
                              "the 3-D layer on the CPU (3-D CUDA support comes with the N-d ",
                              "kernels)");
  TORCH_CHECK_VALUE(g.groups <= 65535, "partial_conv2d (CUDA): expected groups <= 65535, got ",
                    g.groups);
  TORCH_CHECK_VALUE(g.out_channels <= std::numeric_limits<int32_t>::max(),
                    "partial_conv2d (CUDA): too many output channels: ", g.out_channels);
}

bool forward_needs_64bit_indexing(const at::Tensor& input, const at::Tensor& mask,
                                  const at::Tensor& weight, const at::Tensor& output,
                                  const at::Tensor& mask_scales, const ConvGeometry& g) {
  return needs_64bit_indexing({input, mask, weight, output, mask_scales},
                              {std::max(g.batch, g.mask_batch) * g.out_positions(), g.reduction_size()});
}

std::string forward_path_cuda(const at::Tensor& input, const std::optional<at::Tensor>& mask,
                              const at::Tensor& weight, at::IntArrayRef stride,
                              at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  const ForwardProblem problem = check_forward_args<int64_t>(input, mask, weight, std::nullopt, stride,
                                                    padding, dilation, groups, "none", 0.0);
  const ConvGeometry& g = problem.geometry;
  check_cuda_limits(g);
  const c10::cuda::CUDAGuard device_guard(input.device());
  auto [output, updated_mask, mask_scales] = allocate_forward_outputs(input, g);
  const bool wide = forward_needs_64bit_indexing(input, mask.value_or(at::Tensor()), weight, output,
                                                 mask_scales, g);
  const std::string core = AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, input.scalar_type(), "forward_path_cuda", [&] {
        using Core = cuda::MatrixCore<scalar_t>;
        return c10::str(Core::kName, " (", Core::kInstruction, "; ", Core::kBlockRows, "x",
                        Core::kBlockCols, " tiles");
      });
  return c10::str("cuda: implicit GEMM on ", core, "; tiles of holes only skip the matrix work), ",
                  wide ? "64-bit indexing (an offset or row count passes 2^31)" : "32-bit indexing");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> partial_conv_forward_cuda(
    const at::Tensor& input, const std::optional<at::Tensor>& mask, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t groups, c10::string_view activation,
    double negative_slope) {
  const ForwardProblem problem = check_forward_args<int64_t>(input, mask, weight, bias, stride, padding,
                                                    dilation, groups, activation, negative_slope);
  const ConvGeometry& g = problem.geometry;
  check_cuda_limits(g);
  const c10::cuda::CUDAGuard device_guard(input.device());
  auto [output, updated_mask, mask_scales] = allocate_forward_outputs(input, g);
  const at::Tensor mask_t = mask.value_or(at::Tensor());
  const at::Tensor bias_t = bias.value_or(at::Tensor());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const bool wide = forward_needs_64bit_indexing(input, mask_t, weight, output, mask_scales, g);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, input.scalar_type(), "partial_conv_forward_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const cuda::ForwardArgs<scalar_t, acc_t> args{
            g,
            problem.activation,
            acc_t(problem.negative_slope),
            tensor_arg<const scalar_t>(input),
            tensor_arg<const scalar_t>(mask_t),
            tensor_arg<const scalar_t>(weight),
            bias_t.defined() ? bias_t.const_data_ptr<scalar_t>() : nullptr,
            tensor_arg<scalar_t>(output),
            updated_mask.mutable_data_ptr<scalar_t>(),
            mask_scales.mutable_data_ptr<acc_t>()};
        if (wide)
          cuda::launch_forward<scalar_t, acc_t, int64_t>(args, stream);
        else
          cuda::launch_forward<scalar_t, acc_t, int32_t>(args, stream);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return {output, updated_mask, mask_scales};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> partial_conv_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& input, const std::optional<at::Tensor>& mask,
    const at::Tensor& weight, const std::optional<at::Tensor>& output,
    const at::Tensor& mask_scales_in, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t groups, c10::string_view activation,
    double negative_slope, std::array<bool, 3> output_mask) {
  const ForwardProblem problem =
      check_backward_args<int64_t>(grad_output, input, mask, weight, output, mask_scales_in, stride, padding,
                          dilation, groups, activation, negative_slope);
  const ConvGeometry& g = problem.geometry;
  check_cuda_limits(g);
  const c10::cuda::CUDAGuard device_guard(input.device());
  auto [grad_input, grad_weight, grad_bias] = allocate_backward_outputs(input, weight, output_mask);
  const auto [need_input, need_weight, need_bias] = output_mask;
  const at::Tensor mask_t = mask.value_or(at::Tensor());
  const at::Tensor output_t =
      problem.activation == Activation::kNone ? at::Tensor() : output.value_or(at::Tensor());
  const at::Tensor mask_scales = mask_scales_in.contiguous();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const bool weight_kernels = need_weight && g.out_channels > 0;
  const int64_t splits = weight_kernels ? grad_weight_splits(input, g) : 0;
  const at::Tensor workspace =
      weight_kernels ? at::empty({cuda::grad_weight_workspace_elements(g, splits)},
                                 input.options().dtype(mask_scales_dtype(input.scalar_type())))
                     : at::Tensor();
  const bool wide = needs_64bit_indexing(
      {grad_output, input, mask_t, weight, output_t, mask_scales, grad_input, workspace},
      {g.batch * g.in_size[1] * g.in_size[2], g.batch * g.out_positions(), g.reduction_size(),
       g.out_channels_per_group() * g.taps()});

  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, input.scalar_type(), "partial_conv_backward_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const cuda::BackwardArgs<scalar_t, acc_t> args{
            g,
            problem.activation,
            acc_t(problem.negative_slope),
            tensor_arg<const scalar_t>(grad_output),
            tensor_arg<const scalar_t>(input),
            tensor_arg<const scalar_t>(mask_t),
            tensor_arg<const scalar_t>(weight),
            tensor_arg<const scalar_t>(output_t),
            mask_scales.const_data_ptr<acc_t>(),
            tensor_arg<scalar_t>(grad_input),
            grad_weight.defined() ? grad_weight.mutable_data_ptr<scalar_t>() : nullptr,
            grad_bias.defined() ? grad_bias.mutable_data_ptr<scalar_t>() : nullptr,
            workspace.defined() ? workspace.mutable_data_ptr<acc_t>() : nullptr,
            splits};
        const auto check_launch = [] { C10_CUDA_KERNEL_LAUNCH_CHECK(); };
        if (wide)
          cuda::launch_backward<scalar_t, acc_t, int64_t>(args, need_input, need_weight,
                                                          need_bias, stream, check_launch);
        else
          cuda::launch_backward<scalar_t, acc_t, int32_t>(args, need_input, need_weight,
                                                          need_bias, stream, check_launch);
      });
  return {grad_input, grad_weight, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(partialconv_cuda, CUDA, m) {
  m.impl("partial_conv_forward", TORCH_FN(partial_conv_forward_cuda));
  m.impl("partial_conv_backward", TORCH_FN(partial_conv_backward_cuda));
  m.impl("forward_path", TORCH_FN(forward_path_cuda));
}

}  // namespace partialconv
