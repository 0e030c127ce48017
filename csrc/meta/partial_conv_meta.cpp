// Meta kernels of partial_conv: the fake-tensor implementation that torch.compile, torch.export
// and opcheck run. They apply the very checks the CPU and CUDA kernels apply (partial_conv.h,
// instantiated for symbolic sizes), so a wrong model fails when it is compiled or exported, with
// the message it would get when run, and allocate outputs of the shapes and layouts the kernels
// return.
#include <torch/library.h>

#include "../partial_conv.h"

namespace partialconv {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> partial_conv_forward_meta(
    const at::Tensor& input, const std::optional<at::Tensor>& mask, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t groups, c10::string_view activation,
    double negative_slope, c10::string_view normalization) {
  const ForwardProblemOf<c10::SymInt> problem = check_forward_args<c10::SymInt>(
      input, mask, weight, bias, stride, padding, dilation, groups, activation, negative_slope, normalization);
  return allocate_forward_outputs(input, problem.geometry);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> partial_conv_backward_meta(
    const at::Tensor& grad_output, const at::Tensor& input, const std::optional<at::Tensor>& mask,
    const at::Tensor& weight, const std::optional<at::Tensor>& output,
    const at::Tensor& mask_scales, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t groups, c10::string_view activation,
    double negative_slope, std::array<bool, 3> output_mask) {
  check_backward_args<c10::SymInt>(grad_output, input, mask, weight, output, mask_scales, stride,
                                   padding, dilation, groups, activation, negative_slope);
  return allocate_backward_outputs(input, weight, output_mask);
}

}  // namespace

TORCH_LIBRARY_IMPL(partialconv_cuda, Meta, m) {
  m.impl("partial_conv_forward", TORCH_FN(partial_conv_forward_meta));
  m.impl("partial_conv_backward", TORCH_FN(partial_conv_backward_meta));
}

}  // namespace partialconv
