// The vendor path (vendor_path.h): the glue around ATen's convolution for every device, and the
// elementwise passes from ATen operations that the CPU uses.
#include "vendor_path.h"

#include <ATen/ATen.h>

#include <vector>

namespace partialconv {
namespace vendor {
namespace {

std::vector<int64_t> dims(const ConvGeometry& g, const int64_t (&values)[kDims]) {
  return spatial_sizes(values, g.spatial_dims);
}

// The ratio and U planes of the saved mask scales (channels kRatioChannel and kUpdateChannel of
// partial_conv_math.h's layout), (mask_batch, 1, *out_spatial) each: they broadcast over the batch
// (a batch-1 mask) and the output channels.
at::Tensor ratio_of(const at::Tensor& mask_scales) { return mask_scales.narrow(1, kRatioChannel, 1); }
at::Tensor update_of(const at::Tensor& mask_scales) { return mask_scales.narrow(1, kUpdateChannel, 1); }

// The output positions whose window sees no valid pixel (ratio = U = 0): exactly 0 there.
at::Tensor holes(const at::Tensor& mask_scales) {
  return ratio_of(mask_scales).eq(0).logical_and_(update_of(mask_scales).eq(0));
}

// A (1, C, 1, ...) view of a per-channel vector, to broadcast over (N, C, *spatial).
at::Tensor per_channel(const at::Tensor& values, const ConvGeometry& g) {
  std::vector<int64_t> shape(size_t(2 + g.spatial_dims), 1);
  shape[1] = values.numel();
  return values.view(shape);
}

// The passes as ATen operations, each formula as written in vendor_path.h, computed in the
// accumulation type of the saved scales.
class AtenPasses final : public ElementwisePasses {
 public:
  void apply_mask(const at::Tensor& values, const at::Tensor& mask, const ConvGeometry&,
                  at::Tensor& out) const override {
    at::mul_out(out, values, mask).masked_fill_(mask.eq(0), 0);
  }

  void epilogue(const at::Tensor& conv, const at::Tensor& bias, const at::Tensor& mask_scales,
                const ForwardProblem& problem, at::Tensor& output) const override {
    const ConvGeometry& g = problem.geometry;
    at::Tensor value = conv.to(mask_scales.scalar_type(), /*non_blocking=*/false, /*copy=*/true);
    value.mul_(ratio_of(mask_scales));
    if (bias.defined()) value.add_(per_channel(bias.to(mask_scales.scalar_type()), g));
    value.mul_(update_of(mask_scales));
    // act(y) = y for y > 0, else 0 (relu) or y * slope (leaky relu); NaN as in partial_conv_math.h.
    if (problem.activation == Activation::kRelu)
      value.masked_fill_(value.gt(0).logical_not_(), 0);
    else if (problem.activation == Activation::kLeakyRelu)
      value = at::where(value.gt(0), value, value.mul(problem.negative_slope));
    output.copy_(value.masked_fill_(holes(mask_scales), 0));
  }

  at::Tensor scale_output_grad(const at::Tensor& grad_output, const at::Tensor& output, const at::Tensor& mask_scales,
                               const ForwardProblem& problem, bool need_grad_conv,
                               at::Tensor& grad_bias) const override {
    // dL/db at each position: g * act'(out) * U, where act'(z) = 1 for z > 0, else 0 or the slope.
    at::Tensor terms = grad_output.to(mask_scales.scalar_type(), /*non_blocking=*/false, /*copy=*/true);
    terms.mul_(update_of(mask_scales));
    if (problem.activation != Activation::kNone) {
      const double below = problem.activation == Activation::kRelu ? 0.0 : problem.negative_slope;
      const at::TensorOptions options = terms.options();
      terms.mul_(at::where(output.gt(0), at::scalar_tensor(1.0, options), at::scalar_tensor(below, options)));
    }
    terms.masked_fill_(holes(mask_scales), 0);
    if (grad_bias.defined()) {
      std::vector<int64_t> reduced{0};
      for (int64_t d = 2; d < grad_output.dim(); ++d) reduced.push_back(d);
      grad_bias.copy_(terms.sum(reduced));
    }
    if (!need_grad_conv) return at::Tensor();
    return terms.mul_(ratio_of(mask_scales)).to(grad_output.scalar_type());
  }
};

}  // namespace

const ElementwisePasses& aten_passes() {
  static const AtenPasses passes;
  return passes;
}

void forward(const ElementwisePasses& passes, const at::Tensor& input, const at::Tensor& mask,
             const at::Tensor& weight, const at::Tensor& bias, const ForwardProblem& problem,
             const at::Tensor& mask_scales, at::Tensor& output) {
  if (output.numel() == 0) return;
  const ConvGeometry& g = problem.geometry;
  at::Tensor conv;
  if (input.numel() == 0) {  // an input of extent 0 (with padding): no pixel reaches the output
    conv = at::zeros(output.sizes(), output.options());
  } else {
    at::Tensor masked = input;
    if (mask.defined()) {
      masked = at::empty_like(input);
      passes.apply_mask(input, mask, g, masked);
    }
    const std::vector<int64_t> no_output_padding(size_t(g.spatial_dims), 0);
    conv = at::convolution(masked, weight, {}, dims(g, g.stride), dims(g, g.pad), dims(g, g.dilation), false,
                           no_output_padding, g.groups);
  }
  passes.epilogue(conv, bias, mask_scales, problem, output);
}

void backward(const ElementwisePasses& passes, const at::Tensor& grad_output, const at::Tensor& input,
              const at::Tensor& mask, const at::Tensor& weight, const at::Tensor& output,
              const at::Tensor& mask_scales, const ForwardProblem& problem, std::array<bool, 3> output_mask,
              at::Tensor& grad_input, at::Tensor& grad_weight, at::Tensor& grad_bias) {
  const auto [need_input, need_weight, need_bias] = output_mask;
  if (grad_output.numel() == 0 || input.numel() == 0) {  // nothing reaches a gradient
    for (at::Tensor* grad : {&grad_input, &grad_weight, &grad_bias})
      if (grad->defined()) grad->zero_();
    return;
  }
  const ConvGeometry& g = problem.geometry;
  at::Tensor grad_bias_out = need_bias ? grad_bias : at::Tensor();
  const at::Tensor grad_conv = passes.scale_output_grad(grad_output, output, mask_scales, problem,
                                                        need_input || need_weight, grad_bias_out);
  if (!need_input && !need_weight) return;
  // grad_input needs only the input's shape: the masked input is made for grad_weight alone.
  at::Tensor operand = input;
  if (need_weight && mask.defined()) {
    operand = at::empty_like(input);
    passes.apply_mask(input, mask, g, operand);
  }
  const std::vector<int64_t> no_output_padding(size_t(g.spatial_dims), 0);
  const auto [grad_masked, grad_w, unused] = at::convolution_backward(
      grad_conv, operand, weight, std::nullopt, dims(g, g.stride), dims(g, g.pad), dims(g, g.dilation), false,
      no_output_padding, g.groups, {need_input, need_weight, false});
  if (need_weight) grad_weight.copy_(grad_w);
  if (need_input) {
    if (mask.defined())
      passes.apply_mask(grad_masked, mask, g, grad_input);
    else
      grad_input.copy_(grad_masked);
  }
}

}  // namespace vendor
}  // namespace partialconv
