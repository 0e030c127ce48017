// Autocast: partial_conv_forward casts its floating-point inputs to the autocast dtype of the
// device, as conv2d does, then runs the backend kernel below autocast. Backward needs no entry:
// it receives tensors that already share one dtype.
#include <ATen/autocast_mode.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "../op_handles.h"

namespace partialconv {
namespace {

template <c10::DeviceType device_type>
std::tuple<at::Tensor, at::Tensor, at::Tensor> partial_conv_forward_autocast(
    const at::Tensor& input, const std::optional<at::Tensor>& mask, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t groups, c10::string_view activation,
    double negative_slope, c10::string_view normalization) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(
      at::autocast::get_autocast_dispatch_key_from_device_type(device_type));
  const at::ScalarType dtype = at::autocast::get_autocast_dtype(device_type);
  return forward_op().call(at::autocast::cached_cast(dtype, input, device_type),
                           at::autocast::cached_cast(dtype, mask, device_type),
                           at::autocast::cached_cast(dtype, weight, device_type),
                           at::autocast::cached_cast(dtype, bias, device_type), stride, padding,
                           dilation, groups, activation, negative_slope, normalization);
}

}  // namespace

TORCH_LIBRARY_IMPL(partialconv_cuda, AutocastCPU, m) {
  m.impl("partial_conv_forward", TORCH_FN(partial_conv_forward_autocast<c10::DeviceType::CPU>));
}

TORCH_LIBRARY_IMPL(partialconv_cuda, AutocastCUDA, m) {
  m.impl("partial_conv_forward", TORCH_FN(partial_conv_forward_autocast<c10::DeviceType::CUDA>));
}

}  // namespace partialconv
