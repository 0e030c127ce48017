// CUDA backend of partial_conv (1, 2 and 3 spatial dimensions): checks, device guard, current
// stream, the plan of the call (conv_launch.cuh), its workspace from the caching allocator, and
// the launches, each one checked. No host synchronisation: capturable in a CUDA graph.
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <array>
#include <initializer_list>
#include <mutex>
#include <string>
#include <vector>

#include "../partial_conv.h"
#include "conv_launch.cuh"

namespace partialconv {
namespace {

template <typename T>
cuda::TensorRef<T, int64_t> tensor_ref(const at::Tensor& t) {
  cuda::TensorRef<T, int64_t> ref;
  if (!t.defined()) return ref;
  ref.data = static_cast<T*>(t.data_ptr());
  const int64_t lead = 2 + kDims - t.dim();
  ref.stride[0] = t.stride(0), ref.stride[1] = t.stride(1);
  for (int64_t d = 2; d < t.dim(); ++d) ref.stride[lead + d] = t.stride(d);
  return ref;
}

// One past the largest element offset a kernel can form in t.
int64_t offset_extent(const at::Tensor& t) {
  if (!t.defined()) return 0;
  int64_t extent = 1;
  for (int64_t d = 0; d < t.dim(); ++d) extent += (t.size(d) - 1) * t.stride(d);
  return extent;
}

cuda::DeviceInfo device_info(int device) {
  static std::mutex mutex;
  static std::vector<int> multiprocessors;
  const std::lock_guard<std::mutex> lock(mutex);
  if (int(multiprocessors.size()) <= device) multiprocessors.resize(size_t(device) + 1, 0);
  if (multiprocessors[size_t(device)] == 0)
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&multiprocessors[size_t(device)], cudaDevAttrMultiProcessorCount, device));
  return {multiprocessors[size_t(device)]};
}

void check_cuda_limits(const ConvGeometry& g) {
  // The kernels' coordinates are 32-bit (conv_problems.cuh: coord_t).
  for (int d = 0; d < kDims; ++d) {
    TORCH_CHECK_VALUE(g.in_size[d] + 2 * g.pad[d] < cuda::kMaxCoordinate &&
                          g.dilation[d] * (g.kernel[d] - 1) + 1 < cuda::kMaxCoordinate,
                      "partial_conv (CUDA): expected the padded input (size + 2 * padding) and the dilated ",
                      "kernel to stay below 2^29 along every dimension on CUDA; got size ", g.in_size[d],
                      ", padding ", g.pad[d], ", kernel ", g.kernel[d], ", dilation ", g.dilation[d],
                      " (the CPU takes them)");
  }
  TORCH_CHECK_VALUE(g.batch < cuda::kMaxCoordinate, "partial_conv (CUDA): expected a batch below 2^29, got ", g.batch);
  TORCH_CHECK_VALUE(g.groups <= cuda::kMaxGridZ, "partial_conv (CUDA): expected groups <= ", cuda::kMaxGridZ,
                    ", got ", g.groups);
  // Column tiles of 128 channels per group run along gridDim.y.
  const int64_t columns = std::max(g.out_channels_per_group(), g.taps() * g.in_channels_per_group());
  TORCH_CHECK_VALUE(cuda::ceil_div<int64_t>(columns, 128) <= cuda::kMaxGridY,
                    "partial_conv (CUDA): too many channels per group (", columns, " columns of a matrix product; ",
                    "at most ", int64_t(cuda::kMaxGridY) * 128, ")");
}

// Calls f(E{}) for the element type scalar_t is multiplied in.
template <typename scalar_t, typename F>
void with_element(cuda::ElementKind kind, F&& f) {
  using cuda::ElementKind;
  if constexpr (std::is_same<scalar_t, float>::value) {
    if (kind == ElementKind::kTf32) return f(cuda::Tf32{});
    return f(float{});
  } else if constexpr (std::is_same<scalar_t, double>::value) {
    return f(double{});
  } else {
    return f(scalar_t{});
  }
}

const char* core_name(cuda::ElementKind kind) {
  switch (kind) {
    case cuda::ElementKind::kHalf: return "float16 on tensor cores (mma.sync m16n8k16, float accumulators)";
    case cuda::ElementKind::kBFloat16: return "bfloat16 on tensor cores (mma.sync m16n8k16, float accumulators)";
    case cuda::ElementKind::kTf32: return "float32 on TF32 tensor cores (mma.sync m16n8k8; torch.backends.cudnn.allow_tf32 is True)";
    case cuda::ElementKind::kFloat: return "float32 exactly on CUDA cores (torch.backends.cudnn.allow_tf32 is False)";
    case cuda::ElementKind::kDouble: return "float64 on CUDA cores";
  }
  return "";
}

bool allow_tf32() { return at::globalContext().allowTF32CuDNN(at::Float32Op::CONV); }

template <typename E>
cuda::ConvPlan plan_call(const ConvGeometry& g, int device, bool forward,
                         std::initializer_list<at::Tensor> tensors) {
  int64_t extent = 0;
  for (const at::Tensor& t : tensors) extent = std::max(extent, offset_extent(t));
  return cuda::plan_conv<E>(g, device_info(device), forward, {extent});
}

std::string forward_path_cuda(const at::Tensor& input, const std::optional<at::Tensor>& mask,
                              const at::Tensor& weight, at::IntArrayRef stride, at::IntArrayRef padding,
                              at::IntArrayRef dilation, int64_t groups) {
  const ForwardProblem problem = check_forward_args<int64_t>(input, mask, weight, std::nullopt, stride, padding,
                                                             dilation, groups, "none", 0.0);
  const ConvGeometry& g = problem.geometry;
  check_cuda_limits(g);
  std::string text;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "forward_path_cuda", [&] {
    const cuda::ElementKind kind = cuda::element_kind<scalar_t>(allow_tf32());
    with_element<scalar_t>(kind, [&](auto element) {
      using E = decltype(element);
      const cuda::ConvPlan forward = plan_call<E>(g, input.get_device(), true, {input, mask.value_or(at::Tensor()), weight});
      const cuda::ConvPlan backward = plan_call<E>(g, input.get_device(), false, {input, mask.value_or(at::Tensor()), weight});
      text = c10::str("cuda: implicit GEMM, ", cuda::describe_plan(forward, true, core_name(kind)),
                      "; the masked input converted once to channels-last ", g.groups > 1 ? "(channels padded per group) " : "",
                      "and the mask's window sums computed once per output position; tiles of holes only skip ",
                      "their matrix work (backward: ", cuda::describe_plan(backward, false, "same core"), ")");
    });
  });
  return text;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> partial_conv_forward_cuda(
    const at::Tensor& input, const std::optional<at::Tensor>& mask, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t groups, c10::string_view activation, double negative_slope) {
  const ForwardProblem problem = check_forward_args<int64_t>(input, mask, weight, bias, stride, padding, dilation,
                                                             groups, activation, negative_slope);
  const ConvGeometry& g = problem.geometry;
  check_cuda_limits(g);
  const c10::cuda::CUDAGuard device_guard(input.device());
  auto [output, updated_mask, mask_scales] = allocate_forward_outputs(input, g);
  const at::Tensor mask_t = mask.value_or(at::Tensor()), bias_t = bias.value_or(at::Tensor());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "partial_conv_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const cuda::ElementKind kind = cuda::element_kind<scalar_t>(allow_tf32());
    with_element<scalar_t>(kind, [&](auto element) {
      using E = decltype(element);
      const cuda::ConvPlan plan = plan_call<E>(g, input.get_device(), true, {input, mask_t, weight, output});
      const at::Tensor workspace = at::empty({plan.workspace.bytes}, input.options().dtype(at::kByte));
      const cuda::ForwardArgs<scalar_t, acc_t> args{g,
                                                    problem.activation,
                                                    acc_t(problem.negative_slope),
                                                    tensor_ref<const scalar_t>(input),
                                                    tensor_ref<const scalar_t>(mask_t),
                                                    tensor_ref<const scalar_t>(weight),
                                                    bias_t.defined() ? bias_t.const_data_ptr<scalar_t>() : nullptr,
                                                    tensor_ref<scalar_t>(output),
                                                    updated_mask.mutable_data_ptr<scalar_t>(),
                                                    mask_scales.mutable_data_ptr<acc_t>()};
      unsigned char* space = workspace.mutable_data_ptr<unsigned char>();
      const auto check_launch = [] { C10_CUDA_KERNEL_LAUNCH_CHECK(); };
      if (plan.index64)
        cuda::run_forward<E, scalar_t, acc_t, int64_t>(args, plan, space, stream, check_launch);
      else
        cuda::run_forward<E, scalar_t, acc_t, int32_t>(args, plan, space, stream, check_launch);
    });
  });
  return {output, updated_mask, mask_scales};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> partial_conv_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& input, const std::optional<at::Tensor>& mask,
    const at::Tensor& weight, const std::optional<at::Tensor>& output, const at::Tensor& mask_scales_in,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    c10::string_view activation, double negative_slope, std::array<bool, 3> output_mask) {
  const ForwardProblem problem = check_backward_args<int64_t>(grad_output, input, mask, weight, output, mask_scales_in,
                                                              stride, padding, dilation, groups, activation,
                                                              negative_slope);
  const ConvGeometry& g = problem.geometry;
  check_cuda_limits(g);
  const c10::cuda::CUDAGuard device_guard(input.device());
  auto [grad_input, grad_weight, grad_bias] = allocate_backward_outputs(input, weight, output_mask);
  if (g.out_channels == 0) {  // no output: every gradient is zero (or empty)
    if (grad_input.defined()) grad_input.zero_();
    return {grad_input, grad_weight, grad_bias};
  }
  const at::Tensor mask_t = mask.value_or(at::Tensor()), mask_scales = mask_scales_in.contiguous();
  const at::Tensor output_t = problem.activation == Activation::kNone ? at::Tensor() : output.value_or(at::Tensor());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "partial_conv_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const cuda::ElementKind kind = cuda::element_kind<scalar_t>(allow_tf32());
    with_element<scalar_t>(kind, [&](auto element) {
      using E = decltype(element);
      const cuda::ConvPlan plan = plan_call<E>(g, input.get_device(), false,
                                               {grad_output, input, mask_t, weight, output_t, grad_input});
      const at::Tensor workspace = at::empty({plan.workspace.bytes}, input.options().dtype(at::kByte));
      const cuda::BackwardArgs<scalar_t, acc_t> args{g,
                                                     problem.activation,
                                                     acc_t(problem.negative_slope),
                                                     tensor_ref<const scalar_t>(grad_output),
                                                     tensor_ref<const scalar_t>(input),
                                                     tensor_ref<const scalar_t>(mask_t),
                                                     tensor_ref<const scalar_t>(weight),
                                                     tensor_ref<const scalar_t>(output_t),
                                                     mask_scales.const_data_ptr<acc_t>(),
                                                     tensor_ref<scalar_t>(grad_input),
                                                     grad_weight.defined() ? grad_weight.mutable_data_ptr<scalar_t>() : nullptr,
                                                     grad_bias.defined() ? grad_bias.mutable_data_ptr<scalar_t>() : nullptr};
      unsigned char* space = workspace.mutable_data_ptr<unsigned char>();
      const auto check_launch = [] { C10_CUDA_KERNEL_LAUNCH_CHECK(); };
      if (plan.index64)
        cuda::run_backward<E, scalar_t, acc_t, int64_t>(args, plan, space, stream, check_launch);
      else
        cuda::run_backward<E, scalar_t, acc_t, int32_t>(args, plan, space, stream, check_launch);
    });
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
