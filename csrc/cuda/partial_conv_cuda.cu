// CUDA backend of partial_conv (1, 2 and 3 spatial dimensions): checks, device guard, current
// stream, the choice between the fused kernels and the vendor path (../path_choice.h), and for the
// fused kernels the plan of the call (conv_launch.cuh), its workspace from the caching allocator,
// and the launches, each one checked. No host synchronisation (except while benchmark mode times
// a call's first run, never under graph capture): capturable in a CUDA graph.
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdlib>
#include <initializer_list>
#include <mutex>
#include <sstream>
#include <string>
#include <string_view>
#include <vector>

#include "../partial_conv.h"
#include "../path_choice.h"
#include "../vendor_path.h"
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

// Why the fused kernels do not take g; empty when they do (the vendor path takes every shape).
std::string fused_unsupported_reason(const ConvGeometry& g) {
  // The kernels' coordinates are 32-bit (conv_problems.cuh: coord_t).
  for (int d = 0; d < kDims; ++d) {
    if (g.in_size[d] + 2 * g.pad[d] >= cuda::kMaxCoordinate || g.dilation[d] * (g.kernel[d] - 1) + 1 >= cuda::kMaxCoordinate)
      return c10::str("the padded input (size + 2 * padding) and the dilated kernel must stay below 2^29 along every ",
                      "dimension; got size ", g.in_size[d], ", padding ", g.pad[d], ", kernel ", g.kernel[d],
                      ", dilation ", g.dilation[d]);
  }
  if (g.batch >= cuda::kMaxCoordinate) return c10::str("the batch must stay below 2^29, got ", g.batch);
  if (g.groups > cuda::kMaxGridZ) return c10::str("groups must be at most ", cuda::kMaxGridZ, ", got ", g.groups);
  // Column tiles of 128 channels per group run along gridDim.y.
  const int64_t columns = std::max(g.out_channels_per_group(), g.taps() * g.in_channels_per_group());
  if (cuda::ceil_div<int64_t>(columns, 128) > cuda::kMaxGridY)
    return c10::str("too many channels per group (", columns, " columns of a matrix product; at most ",
                    int64_t(cuda::kMaxGridY) * 128, ")");
  return "";
}

// PARTIALCONV_CUDA_PATH=fused or vendor forces a path (tests run both); "auto" or unset chooses.
std::optional<Implementation> forced_implementation() {
  const char* forced = std::getenv("PARTIALCONV_CUDA_PATH");
  if (forced == nullptr || *forced == '\0' || std::string_view(forced) == "auto") return std::nullopt;
  const std::string_view name(forced);
  TORCH_CHECK_VALUE(name == "fused" || name == "vendor",
                    "PARTIALCONV_CUDA_PATH must be 'auto', 'fused' or 'vendor', got '", forced, "'");
  return name == "fused" ? Implementation::kFused : Implementation::kVendor;
}

CallConditions call_conditions(const ConvGeometry& g) {
  CallConditions call;
  call.forced = forced_implementation();
  call.unsupported_reason = fused_unsupported_reason(g);
  call.fused_supported = call.unsupported_reason.empty();
  TORCH_CHECK_VALUE(call.fused_supported || call.forced != Implementation::kFused,
                    "partial_conv (CUDA): PARTIALCONV_CUDA_PATH=fused, but the fused kernels do not take this call: ",
                    call.unsupported_reason, " (the vendor path does: unset PARTIALCONV_CUDA_PATH)");
  call.deterministic = at::globalContext().deterministicAlgorithms();
  call.benchmark = benchmark_enabled();
  call.may_time = c10::cuda::currentStreamCaptureStatusMayInitCtx() == c10::cuda::CaptureStatus::None;
  return call;
}

bool allow_tf32() { return at::globalContext().allowTF32CuDNN(at::Float32Op::CONV); }

// What a measured choice is keyed on: the pass, the device, the dtype (and TF32), every size and
// stride of input, mask and weight (layouts and mask kinds differ in their strides), the conv
// parameters.
std::string call_key(const char* pass, const at::Tensor& input, const at::Tensor& mask, const at::Tensor& weight,
                     const ConvGeometry& g) {
  std::ostringstream key;
  key << pass << " " << input.device() << " " << input.scalar_type() << (allow_tf32() ? " tf32" : "");
  for (const at::Tensor* t : {&input, &mask, &weight}) {
    if (t->defined())
      key << " " << t->sizes() << t->strides();
    else
      key << " none";
  }
  for (int d = 0; d < kDims; ++d) key << " " << g.stride[d] << "," << g.pad[d] << "," << g.dilation[d];
  key << " groups " << g.groups;
  return key.str();
}

// A CUDA event that times, destroyed with its scope.
struct TimingEvent {
  cudaEvent_t event = nullptr;
  TimingEvent() { C10_CUDA_CHECK(cudaEventCreate(&event)); }
  ~TimingEvent() { C10_CUDA_IGNORE_ERROR(cudaEventDestroy(event)); }
  TimingEvent(const TimingEvent&) = delete;
  TimingEvent& operator=(const TimingEvent&) = delete;
};

// Chooses the implementation of one pass and runs it: run(implementation) writes the pass's
// outputs. When benchmark mode times the call, the timing runs wrote them already.
template <typename Run>
Choice choose_and_run(const std::string& key, const CallConditions& call, Run&& run) {
  bool timed = false;
  const Choice choice = measured_choices().choose(key, call, [&](Implementation implementation) {
    timed = true;
    const TimingEvent start, stop;
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    C10_CUDA_CHECK(cudaEventRecord(start.event, stream));
    run(implementation);
    C10_CUDA_CHECK(cudaEventRecord(stop.event, stream));
    C10_CUDA_CHECK(cudaEventSynchronize(stop.event));
    float milliseconds = 0;
    C10_CUDA_CHECK(cudaEventElapsedTime(&milliseconds, start.event, stop.event));
    return double(milliseconds) * 1e-3;
  });
  if (!timed) run(choice.implementation);
  return choice;
}

// Calls f(scalar_t{}, index_t{}) for the dtype and the narrowest index type that holds every
// element offset and element count of the tensors (enough for passes that only decode element
// positions; not for window arithmetic, whose paddings may be larger).
template <typename F>
void with_pass_types(at::ScalarType dtype, std::initializer_list<at::Tensor> tensors, F&& f) {
  int64_t extent = 0;
  for (const at::Tensor& t : tensors)
    if (t.defined()) extent = std::max({extent, offset_extent(t), t.numel()});
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "vendor_pass", [&] {
    if (extent < (int64_t(1) << 31))
      f(scalar_t{}, int32_t{});
    else
      f(scalar_t{}, int64_t{});
  });
}

// The vendor path's mask scales: S, ratio and U once per output position by the fused kernels'
// own mask_scales_kernel, from the channel sums of a multi-channel mask (one ATen reduction).
// 64-bit indexing always: the window arithmetic (o * stride - pad + t * dilation) takes the
// paddings and dilations the fused kernels refuse, which small tensors can have too.
void vendor_mask_scales(const at::Tensor& mask, const ConvGeometry& g, at::Tensor& mask_scales,
                        at::Tensor& updated_mask) {
  const at::Tensor plane =
      g.multi_channel_mask() ? mask.sum(1, false, mask_scales.scalar_type()).contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, updated_mask.scalar_type(), "vendor_mask_scales", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    cuda::run_mask_scales<scalar_t, acc_t, int64_t>(g, tensor_ref<const scalar_t>(mask),
                                                    plane.defined() ? plane.const_data_ptr<acc_t>() : nullptr,
                                                    mask_scales.mutable_data_ptr<acc_t>(),
                                                    updated_mask.mutable_data_ptr<scalar_t>(),
                                                    c10::cuda::getCurrentCUDAStream(),
                                                    [] { C10_CUDA_KERNEL_LAUNCH_CHECK(); });
  });
}

// The vendor path's passes on CUDA: one kernel each (cuda/layout_kernels.cuh), on the current
// stream, every launch checked.
class CudaPasses final : public vendor::ElementwisePasses {
 public:
  void apply_mask(const at::Tensor& values, const at::Tensor& mask, const ConvGeometry& g,
                  at::Tensor& out) const override {
    with_pass_types(values.scalar_type(), {values, mask, out}, [&](auto scalar, auto index) {
      using scalar_t = decltype(scalar);
      using index_t = decltype(index);
      cuda::run_apply_mask<scalar_t, at::opmath_type<scalar_t>, index_t>(
          g.as<index_t>(), tensor_ref<const scalar_t>(values), tensor_ref<const scalar_t>(mask),
          tensor_ref<scalar_t>(out), c10::cuda::getCurrentCUDAStream(), [] { C10_CUDA_KERNEL_LAUNCH_CHECK(); });
    });
  }

  void epilogue(const at::Tensor& conv, const at::Tensor& bias, const at::Tensor& mask_scales,
                const ForwardProblem& problem, at::Tensor& output) const override {
    with_pass_types(output.scalar_type(), {conv, mask_scales, output}, [&](auto scalar, auto index) {
      using scalar_t = decltype(scalar);
      using acc_t = at::opmath_type<scalar_t>;
      using index_t = decltype(index);
      cuda::run_epilogue<scalar_t, acc_t, index_t>(
          problem.geometry.as<index_t>(), tensor_ref<const scalar_t>(conv),
          bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr, mask_scales.const_data_ptr<acc_t>(),
          problem.activation, acc_t(problem.negative_slope), tensor_ref<scalar_t>(output),
          c10::cuda::getCurrentCUDAStream(), [] { C10_CUDA_KERNEL_LAUNCH_CHECK(); });
    });
  }

  at::Tensor scale_output_grad(const at::Tensor& grad_output, const at::Tensor& output, const at::Tensor& mask_scales,
                               const ForwardProblem& problem, bool need_grad_conv,
                               at::Tensor& grad_bias) const override {
    const at::Tensor grad_conv = need_grad_conv ? at::empty_like(grad_output) : at::Tensor();
    with_pass_types(grad_output.scalar_type(), {grad_output, output, mask_scales, grad_conv},
                    [&](auto scalar, auto index) {
      using scalar_t = decltype(scalar);
      using acc_t = at::opmath_type<scalar_t>;
      using index_t = decltype(index);
      cuda::run_scale_output_grad<scalar_t, acc_t, index_t>(
          problem.geometry.as<index_t>(), tensor_ref<const scalar_t>(grad_output), tensor_ref<const scalar_t>(output),
          mask_scales.const_data_ptr<acc_t>(), problem.activation, acc_t(problem.negative_slope),
          tensor_ref<scalar_t>(grad_conv), grad_bias.defined() ? grad_bias.mutable_data_ptr<scalar_t>() : nullptr,
          c10::cuda::getCurrentCUDAStream(), [] { C10_CUDA_KERNEL_LAUNCH_CHECK(); });
    });
    return grad_conv;
  }
};

const CudaPasses kCudaPasses;

const char* kVendorDescription =
    "vendor path: X*M (one pass) through ATen's convolution (cuDNN), the mask's window sums once per output "
    "position (no mask convolution), ratio, bias, U and activation in one pass after it";

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
  const c10::cuda::CUDAGuard device_guard(input.device());
  const at::Tensor mask_t = mask.value_or(at::Tensor());
  const CallConditions call = call_conditions(g);
  const Choice forward = measured_choices().predict(call_key("forward", input, mask_t, weight, g), call);
  const Choice backward = measured_choices().predict(call_key("backward", input, mask_t, weight, g), call);
  std::string fused_forward = "", fused_backward = "";
  if (call.fused_supported) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "forward_path_cuda", [&] {
      const cuda::ElementKind kind = cuda::element_kind<scalar_t>(allow_tf32());
      with_element<scalar_t>(kind, [&](auto element) {
        using E = decltype(element);
        const cuda::ConvPlan forward_plan = plan_call<E>(g, input.get_device(), true, {input, mask_t, weight});
        const cuda::ConvPlan backward_plan = plan_call<E>(g, input.get_device(), false, {input, mask_t, weight});
        fused_forward = c10::str("fused implicit GEMM, ", cuda::describe_plan(forward_plan, true, core_name(kind)),
                                 "; the masked input converted once to channels-last ",
                                 g.groups > 1 ? "(channels padded per group) " : "",
                                 "and the mask's window sums computed once per output position; tiles of holes only ",
                                 "skip their matrix work");
        fused_backward = c10::str("fused implicit GEMM, ", cuda::describe_plan(backward_plan, false, "same core"));
      });
    });
  }
  const auto describe = [](const Choice& choice, const std::string& fused) {
    return c10::str(choice.implementation == Implementation::kFused ? fused : std::string(kVendorDescription), " [",
                    choice.reason, "]");
  };
  return c10::str("cuda: ", describe(forward, fused_forward), " (backward: ", describe(backward, fused_backward), ")");
}

void fused_forward(const at::Tensor& input, const at::Tensor& mask, const at::Tensor& weight, const at::Tensor& bias,
                   const ForwardProblem& problem, at::Tensor& output, at::Tensor& updated_mask,
                   at::Tensor& mask_scales) {
  const ConvGeometry& g = problem.geometry;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "partial_conv_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const cuda::ElementKind kind = cuda::element_kind<scalar_t>(allow_tf32());
    with_element<scalar_t>(kind, [&](auto element) {
      using E = decltype(element);
      const cuda::ConvPlan plan = plan_call<E>(g, input.get_device(), true, {input, mask, weight, output});
      const at::Tensor workspace = at::empty({plan.workspace.bytes}, input.options().dtype(at::kByte));
      const cuda::ForwardArgs<scalar_t, acc_t> args{g,
                                                    problem.activation,
                                                    acc_t(problem.negative_slope),
                                                    tensor_ref<const scalar_t>(input),
                                                    tensor_ref<const scalar_t>(mask),
                                                    tensor_ref<const scalar_t>(weight),
                                                    bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr,
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
}

void fused_backward(const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& mask,
                    const at::Tensor& weight, const at::Tensor& output, const at::Tensor& mask_scales,
                    const ForwardProblem& problem, at::Tensor& grad_input, at::Tensor& grad_weight,
                    at::Tensor& grad_bias) {
  const ConvGeometry& g = problem.geometry;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "partial_conv_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const cuda::ElementKind kind = cuda::element_kind<scalar_t>(allow_tf32());
    with_element<scalar_t>(kind, [&](auto element) {
      using E = decltype(element);
      const cuda::ConvPlan plan = plan_call<E>(g, input.get_device(), false,
                                               {grad_output, input, mask, weight, output, grad_input});
      const at::Tensor workspace = at::empty({plan.workspace.bytes}, input.options().dtype(at::kByte));
      const cuda::BackwardArgs<scalar_t, acc_t> args{g,
                                                     problem.activation,
                                                     acc_t(problem.negative_slope),
                                                     tensor_ref<const scalar_t>(grad_output),
                                                     tensor_ref<const scalar_t>(input),
                                                     tensor_ref<const scalar_t>(mask),
                                                     tensor_ref<const scalar_t>(weight),
                                                     tensor_ref<const scalar_t>(output),
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
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> partial_conv_forward_cuda(
    const at::Tensor& input, const std::optional<at::Tensor>& mask, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t groups, c10::string_view activation, double negative_slope,
    c10::string_view normalization) {
  const ForwardProblem problem = check_forward_args<int64_t>(input, mask, weight, bias, stride, padding, dilation,
                                                             groups, activation, negative_slope, normalization);
  const ConvGeometry& g = problem.geometry;
  const c10::cuda::CUDAGuard device_guard(input.device());
  const at::NoGradGuard no_grad;  // the vendor path's ATen operations are not part of any autograd graph
  const CallConditions call = call_conditions(g);
  auto [output, updated_mask, mask_scales] = allocate_forward_outputs(input, g);
  const at::Tensor mask_t = mask.value_or(at::Tensor()), bias_t = bias.value_or(at::Tensor());
  choose_and_run(call_key("forward", input, mask_t, weight, g), call, [&](Implementation implementation) {
    if (implementation == Implementation::kFused) {
      fused_forward(input, mask_t, weight, bias_t, problem, output, updated_mask, mask_scales);
    } else {
      vendor_mask_scales(mask_t, g, mask_scales, updated_mask);
      vendor::forward(kCudaPasses, input, mask_t, weight, bias_t, problem, mask_scales, output);
    }
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
  const c10::cuda::CUDAGuard device_guard(input.device());
  const at::NoGradGuard no_grad;
  const CallConditions call = call_conditions(g);
  auto [grad_input, grad_weight, grad_bias] = allocate_backward_outputs(input, weight, output_mask);
  if (g.out_channels == 0) {  // no output: every gradient is zero (or empty)
    if (grad_input.defined()) grad_input.zero_();
    return {grad_input, grad_weight, grad_bias};
  }
  const at::Tensor mask_t = mask.value_or(at::Tensor()), mask_scales = mask_scales_in.contiguous();
  const at::Tensor output_t = problem.activation == Activation::kNone ? at::Tensor() : output.value_or(at::Tensor());
  choose_and_run(call_key("backward", input, mask_t, weight, g), call, [&](Implementation implementation) {
    if (implementation == Implementation::kFused)
      fused_backward(grad_output, input, mask_t, weight, output_t, mask_scales, problem, grad_input, grad_weight,
                     grad_bias);
    else
      vendor::backward(kCudaPasses, grad_output, input, mask_t, weight, output_t, mask_scales, problem, output_mask,
                       grad_input, grad_weight, grad_bias);
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
