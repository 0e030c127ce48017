// CPU backend of partial_conv (1, 2 and 3 spatial dimensions): checks, the mask scales, the choice
// between the two paths of paths.h (or the vendor path of ../vendor_path.h, when forced), and the
// registration with the dispatcher.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <array>
#include <cstdlib>
#include <string>
#include <string_view>

#include "../partial_conv.h"
#include "../vendor_path.h"
#include "cpu_common.h"
#include "few_positions_gemm.h"
#include "mask_scales.h"
#include "paths.h"

namespace partialconv {
namespace cpu {
namespace {

// Below these fractions of output positions with a valid pixel in their window, the packed path
// (which skips every such position, at a higher cost per position) beats the dense path (which
// skips only slabs without one). Measured on 2 AMD EPYC cores, float32, enc2 and dec2 of
// PConvUNet with irregular masks, by `python -m bench.cpu_paths`; see bench/NOTES.md.
constexpr double kForwardPackedBelowValidFraction = 0.25;
constexpr double kBackwardPackedBelowValidFraction = 0.3;

// Whether the whole batch has at most kFewPositions output positions in at most
// kMostFewPositionsImages images: then the packed path's GEMMs are our few-positions kernels, which
// stream the weight once per image, and it beats the dense path whatever the holes (PConvUNet's
// enc7, enc8 and dec8: ATen's convolution runs these shapes at a fraction of the memory bandwidth;
// see few_positions_gemm.h and bench/NOTES.md). From 4 images on, the dense path's one batched
// convolution was as fast or faster (enc8's 512->512 3x3 at 2x2, forward + backward, batch 4:
// 8.0 ms packed, 10.0 dense; batch 8: 14.5 packed, 13.4 conv2d; forward alone 2.3 vs 2.2 at 4).
constexpr int64_t kMostFewPositionsImages = 2;
bool few_positions(const ConvGeometry& g) {
  return g.batch <= kMostFewPositionsImages && g.batch * g.out_positions() <= kFewPositions;
}

// Whether the whole batch has at most kSmallOutputPositions output positions of a 2-D float32 (or
// float16 / bfloat16: computed in float32) convolution that ATen runs through oneDNN (otherwise it
// takes the same im2col + GEMM as the packed path): then the packed path beats the dense path
// whatever the holes. oneDNN runs these shapes (8x8 or 4x4 outputs of hundreds of channels) far from this
// CPU's peak. Measured in process on 2 AMD EPYC cores, PConvUNet at 256x256, batch 1, 30% holes
// (the layers see none), packed against dense: enc5 (64 positions) 1.22x forward, 1.43x forward +
// backward; enc6 (16) 1.26x, 1.42x; dec6 (64) 1.13x, 1.14x; but dec7 (16, 16384 input elements,
// ATen's im2col) 0.90x, 0.98x, and enc4 / dec5 (256 positions) 0.79-0.81x (bench/NOTES.md).
constexpr int64_t kSmallOutputPositions = 64;
bool small_output_through_onednn(const ConvGeometry& g, at::ScalarType dtype) {
  return dtype != at::kDouble && g.spatial_dims == 2 && g.groups == 1 && g.taps() > 1 &&
         g.batch * g.out_positions() <= kSmallOutputPositions && aten_convolves_through_onednn(g);
}

// kVendor, the CUDA vendor path's device-generic code, runs only when forced: it is here so that
// machines without a GPU test that code.
enum class CpuPath { kDenseBands, kPackedPositions, kVendor };
enum class Pass { kForward, kBackward };

const char* path_name(CpuPath path) {
  switch (path) {
    case CpuPath::kDenseBands: return "dense bands through ATen's convolution";
    case CpuPath::kPackedPositions: return "packed positions (im2col of valid positions only) and GEMM";
    case CpuPath::kVendor: return "vendor path (X*M through ATen's convolution, the CUDA vendor path's code)";
  }
  return "";
}

// PARTIALCONV_CPU_PATH=dense, packed or vendor forces a path (tests run each); otherwise few
// positions, then the valid fraction, decide between dense and packed.
const char* forced_path() {
  const char* forced = std::getenv("PARTIALCONV_CPU_PATH");
  if (forced == nullptr || *forced == '\0' || std::string_view(forced) == "auto") return nullptr;
  const std::string_view name(forced);
  TORCH_CHECK_VALUE(name == "dense" || name == "packed" || name == "vendor",
                    "PARTIALCONV_CPU_PATH must be 'auto', 'dense', 'packed' or 'vendor', got '", forced, "'");
  return forced;
}

CpuPath choose_path(const ConvGeometry& g, at::ScalarType dtype, double valid, Pass pass) {
  if (const char* forced = forced_path()) {
    const std::string_view name(forced);
    return name == "dense" ? CpuPath::kDenseBands : name == "packed" ? CpuPath::kPackedPositions : CpuPath::kVendor;
  }
  if (few_positions(g) || small_output_through_onednn(g, dtype)) return CpuPath::kPackedPositions;
  const double threshold =
      pass == Pass::kForward ? kForwardPackedBelowValidFraction : kBackwardPackedBelowValidFraction;
  return valid < threshold ? CpuPath::kPackedPositions : CpuPath::kDenseBands;
}

std::string forward_path_cpu(const at::Tensor& input, const std::optional<at::Tensor>& mask,
                             const at::Tensor& weight, at::IntArrayRef stride,
                             at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  const ForwardProblem problem = check_forward_args<int64_t>(
      input, mask, weight, std::nullopt, stride, padding, dilation, groups, "none", 0.0);
  auto [output, updated_mask, mask_scales] = allocate_forward_outputs(input, problem.geometry);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "forward_path_cpu", [&] {
    compute_mask_scales<scalar_t>(mask.value_or(at::Tensor()), problem.geometry, mask_scales, updated_mask);
  });
  const ConvGeometry& g = problem.geometry;
  const double valid = valid_fraction(mask_scales, g);
  const char* forced = forced_path();
  const CpuPath forward = choose_path(g, input.scalar_type(), valid, Pass::kForward);
  // The dense forward's bands: the input itself, or copies channels-last (see channels_last_bands).
  const bool dense = forward == CpuPath::kDenseBands;
  const char* band_source =
      dense && dense_forward_reads_input(input, mask.value_or(at::Tensor()), mask_scales, g)
          ? " with the input itself as the bands (no mask, or a mask of ones: no masked copy)"
      : dense && channels_last_bands(g, mask_scales.scalar_type()) ? " with channels-last bands"
                                                                   : "";
  const std::string why =
      forced != nullptr ? c10::str("forced by PARTIALCONV_CPU_PATH=", forced)
      : few_positions(g)
          ? c10::str(g.batch * g.out_positions(), " output positions in ", g.batch, " image(s), at most ",
                     kFewPositions, " in ", kMostFewPositionsImages, ": the packed path with its own few-positions ",
                     "GEMM kernels")
      : small_output_through_onednn(g, input.scalar_type())
          ? c10::str(g.batch * g.out_positions(), " output positions in ", g.batch, " image(s), at most ",
                     kSmallOutputPositions, ", which ATen's convolution would run through oneDNN: the packed path")
          : c10::str(int64_t(valid * 1000) / 10.0, "% of output positions see a valid pixel; the packed path is ",
                     "taken below ", kForwardPackedBelowValidFraction * 100, "% forward, ",
                     kBackwardPackedBelowValidFraction * 100, "% backward");
  const CpuPath backward = choose_path(g, input.scalar_type(), valid, Pass::kBackward);
  const char* input_gradient_layout =
      backward == CpuPath::kDenseBands && channels_last_input_gradient(g, mask_scales.scalar_type())
          ? " with grad_input computed channels-last where a band is whole images"
          : "";
  return c10::str("cpu: ", path_name(forward), band_source, " (backward: ", path_name(backward),
                  input_gradient_layout, "; ", why, ")");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> partial_conv_forward_cpu(
    const at::Tensor& input, const std::optional<at::Tensor>& mask, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t groups, c10::string_view activation,
    double negative_slope, c10::string_view normalization) {
  const ForwardProblem problem = check_forward_args<int64_t>(
      input, mask, weight, bias, stride, padding, dilation, groups, activation, negative_slope, normalization);
  const at::NoGradGuard no_grad;  // the scratch GEMMs below are not part of any autograd graph
  auto [output, updated_mask, mask_scales] = allocate_forward_outputs(input, problem.geometry);
  const at::Tensor mask_t = mask.value_or(at::Tensor()), bias_t = bias.value_or(at::Tensor());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "partial_conv_forward_cpu", [&] {
    compute_mask_scales<scalar_t>(mask_t, problem.geometry, mask_scales, updated_mask);
    if (output.numel() == 0) return;
    switch (choose_path(problem.geometry, input.scalar_type(), valid_fraction(mask_scales, problem.geometry),
                        Pass::kForward)) {
      case CpuPath::kDenseBands: return forward_bands<scalar_t>(input, mask_t, weight, bias_t, problem, output, mask_scales);
      case CpuPath::kPackedPositions: return forward_packed<scalar_t>(input, mask_t, weight, bias_t, problem, output, mask_scales);
      case CpuPath::kVendor: return vendor::forward(vendor::aten_passes(), input, mask_t, weight, bias_t, problem, mask_scales, output);
    }
  });
  return {output, updated_mask, mask_scales};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> partial_conv_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& input, const std::optional<at::Tensor>& mask,
    const at::Tensor& weight, const std::optional<at::Tensor>& output,
    const at::Tensor& mask_scales_in, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t groups, c10::string_view activation,
    double negative_slope, std::array<bool, 3> output_mask) {
  const ForwardProblem problem =
      check_backward_args<int64_t>(grad_output, input, mask, weight, output, mask_scales_in,
                                   stride, padding, dilation, groups, activation, negative_slope);
  const at::NoGradGuard no_grad;
  const at::Tensor mask_t = mask.value_or(at::Tensor()), mask_scales = mask_scales_in.contiguous();
  const CpuPath path = choose_path(problem.geometry, input.scalar_type(),
                                   valid_fraction(mask_scales, problem.geometry), Pass::kBackward);
  // The dense path makes grad_input and grad_weight itself (backward_bands).
  const bool dense = path == CpuPath::kDenseBands && problem.geometry.out_channels > 0;
  auto [grad_input, grad_weight, grad_bias] = allocate_backward_outputs(
      input, weight, dense ? std::array<bool, 3>{false, false, output_mask[2]} : output_mask);
  if (problem.geometry.out_channels == 0) {  // no output: every gradient is zero (or empty)
    if (grad_input.defined()) grad_input.zero_();
    return {grad_input, grad_weight, grad_bias};
  }
  const at::Tensor output_t =
      problem.activation == Activation::kNone ? at::Tensor() : output.value_or(at::Tensor());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "partial_conv_backward_cpu", [&] {
    switch (path) {
      case CpuPath::kDenseBands:
        return backward_bands<scalar_t>(grad_output, input, mask_t, weight, output_t, mask_scales, problem,
                                        output_mask, grad_input, grad_weight, grad_bias);
      case CpuPath::kPackedPositions:
        return backward_packed<scalar_t>(grad_output, input, mask_t, weight, output_t, mask_scales, problem,
                                         output_mask, grad_input, grad_weight, grad_bias);
      case CpuPath::kVendor:
        return vendor::backward(vendor::aten_passes(), grad_output, input, mask_t, weight, output_t, mask_scales,
                                problem, output_mask, grad_input, grad_weight, grad_bias);
    }
  });
  return {grad_input, grad_weight, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(partialconv_cuda, CPU, m) {
  m.impl("partial_conv_forward", TORCH_FN(partial_conv_forward_cpu));
  m.impl("partial_conv_backward", TORCH_FN(partial_conv_backward_cpu));
  m.impl("forward_path", TORCH_FN(forward_path_cpu));
}

}  // namespace cpu
}  // namespace partialconv
