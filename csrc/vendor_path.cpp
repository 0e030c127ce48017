// The vendor path (vendor_path.h): ATen operations only, so that one code runs on every device.
#include "vendor_path.h"

#include <ATen/ATen.h>

#include <vector>

namespace partialconv {
namespace vendor {
namespace {

// X*M, exactly 0 where M is 0 (d(X*M)/dX = M likewise): NaN and Inf in holes never reach the
// convolution. The product takes the layout of its first, full-sized operand.
at::Tensor apply_mask(const at::Tensor& values, const at::Tensor& mask) {
  if (!mask.defined()) return values;
  return values.mul(mask).masked_fill_(mask.eq(0), 0);
}

std::vector<int64_t> dims(const ConvGeometry& g, const int64_t (&values)[kDims]) {
  return spatial_sizes(values, g.spatial_dims);
}

// The ratio and U planes of the saved mask scales, (mask_batch, 1, *out_spatial) each: they
// broadcast over the batch (a batch-1 mask) and the output channels.
at::Tensor ratio_of(const at::Tensor& mask_scales) { return mask_scales.narrow(1, 0, 1); }
at::Tensor update_of(const at::Tensor& mask_scales) { return mask_scales.narrow(1, 1, 1); }

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

}  // namespace

void forward(const at::Tensor& input, const at::Tensor& mask, const at::Tensor& weight, const at::Tensor& bias,
             const ForwardProblem& problem, const at::Tensor& mask_scales, at::Tensor& output) {
  if (output.numel() == 0) return;
  const ConvGeometry& g = problem.geometry;
  const at::ScalarType acc = mask_scales.scalar_type();
  at::Tensor value;
  if (input.numel() == 0) {  // an input of extent 0 (with padding): no pixel reaches the output
    value = at::zeros(output.sizes(), output.options().dtype(acc));
  } else {
    const std::vector<int64_t> no_output_padding(size_t(g.spatial_dims), 0);
    value = at::convolution(apply_mask(input, mask), weight, {}, dims(g, g.stride), dims(g, g.pad),
                            dims(g, g.dilation), false, no_output_padding, g.groups)
                .to(acc);  // the epilogue in the accumulation type, as the fused kernels
  }
  // out = act((conv * ratio + b) * U)
  value.mul_(ratio_of(mask_scales));
  if (bias.defined()) value.add_(per_channel(bias.to(acc), g));
  value.mul_(update_of(mask_scales));
  // act(y) = y for y > 0, else 0 (relu) or y * slope (leaky relu): NaN follows the fused kernels.
  if (problem.activation == Activation::kRelu)
    value.masked_fill_(value.gt(0).logical_not_(), 0);
  else if (problem.activation == Activation::kLeakyRelu)
    value = at::where(value.gt(0), value, value.mul(problem.negative_slope));
  output.copy_(value.masked_fill_(holes(mask_scales), 0));
}

void backward(const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& mask,
              const at::Tensor& weight, const at::Tensor& output, const at::Tensor& mask_scales,
              const ForwardProblem& problem, std::array<bool, 3> output_mask, at::Tensor& grad_input,
              at::Tensor& grad_weight, at::Tensor& grad_bias) {
  const auto [need_input, need_weight, need_bias] = output_mask;
  if (grad_output.numel() == 0 || input.numel() == 0) {  // nothing reaches a gradient
    for (at::Tensor* grad : {&grad_input, &grad_weight, &grad_bias})
      if (grad->defined()) grad->zero_();
    return;
  }
  const ConvGeometry& g = problem.geometry;
  const at::ScalarType acc = mask_scales.scalar_type();
  // dL/db at each position: g * act'(out) * U, where act'(z) = 1 for z > 0, else 0 or the slope.
  at::Tensor grad_bias_terms = grad_output.to(acc, /*non_blocking=*/false, /*copy=*/true);
  grad_bias_terms.mul_(update_of(mask_scales));
  if (problem.activation != Activation::kNone) {
    const double below = problem.activation == Activation::kRelu ? 0.0 : problem.negative_slope;
    const at::TensorOptions options = grad_bias_terms.options();
    grad_bias_terms.mul_(at::where(output.gt(0), at::scalar_tensor(1.0, options), at::scalar_tensor(below, options)));
  }
  grad_bias_terms.masked_fill_(holes(mask_scales), 0);
  if (need_bias) {
    std::vector<int64_t> reduced{0};
    for (int64_t d = 2; d < grad_output.dim(); ++d) reduced.push_back(d);
    grad_bias.copy_(grad_bias_terms.sum(reduced));
  }
  if (!need_input && !need_weight) return;
  // dL/dconv = dL/db * ratio, in the operands' type for the convolution's backward.
  const at::Tensor grad_conv = grad_bias_terms.mul_(ratio_of(mask_scales)).to(input.scalar_type());
  const std::vector<int64_t> no_output_padding(size_t(g.spatial_dims), 0);
  // grad_input needs only the input's shape: the masked input is made for grad_weight alone.
  const auto [grad_masked, grad_w, unused] = at::convolution_backward(
      grad_conv, need_weight ? apply_mask(input, mask) : input, weight, std::nullopt, dims(g, g.stride),
      dims(g, g.pad), dims(g, g.dilation), false, no_output_padding, g.groups, {need_input, need_weight, false});
  if (need_weight) grad_weight.copy_(grad_w);
  if (need_input) grad_input.copy_(apply_mask(grad_masked, mask));
}

}  // namespace vendor
}  // namespace partialconv
