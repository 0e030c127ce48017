// Schema of the partialconv_cuda ops and the argument checks shared by every backend.
#include "partial_conv2d.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <sstream>

namespace partialconv {
namespace {

std::string shape_string(const at::Tensor& t) {
  std::ostringstream os;
  os << t.sizes();
  return os.str();
}

void check_pair(at::IntArrayRef values, const char* name, int64_t minimum) {
  TORCH_CHECK_VALUE(values.size() == 2, "partial_conv2d: expected ", name,
                    " to have 2 elements (height, width), got ", values.size());
  for (const int64_t v : values) {
    TORCH_CHECK_VALUE(v >= minimum, "partial_conv2d: expected ", name, " to be ",
                      minimum == 0 ? "non-negative" : "positive", ", got ", values);
  }
}

void check_same_dtype_and_device(const at::Tensor& t, const char* name, const at::Tensor& input) {
  TORCH_CHECK_TYPE(t.scalar_type() == input.scalar_type(), "partial_conv2d: expected ", name,
                   " to have the input's dtype ", input.scalar_type(), ", got ", t.scalar_type(),
                   " (convert it with .to(input.dtype))");
  TORCH_CHECK_VALUE(t.device() == input.device(), "partial_conv2d: expected ", name,
                    " on the input's device ", input.device(), ", got ", t.device());
}

Activation parse_activation(std::string_view activation, double negative_slope) {
  if (activation == "none") return Activation::kNone;
  if (activation == "relu") return Activation::kRelu;
  if (activation == "leaky_relu") {
    // The backward pass reads act'(y) off the output, which needs sign(out) == sign(y).
    TORCH_CHECK_VALUE(negative_slope >= 0.0, "partial_conv2d: expected negative_slope >= 0 for ",
                      "leaky_relu, got ", negative_slope);
    return Activation::kLeakyRelu;
  }
  TORCH_CHECK_VALUE(false, "partial_conv2d: expected activation to be one of 'none', 'relu', ",
                    "'leaky_relu', got '", activation, "'");
}

}  // namespace

at::MemoryFormat output_memory_format(const at::Tensor& input) {
  return input.dim() == 4 && !input.is_contiguous() &&
                 input.is_contiguous(at::MemoryFormat::ChannelsLast)
             ? at::MemoryFormat::ChannelsLast
             : at::MemoryFormat::Contiguous;
}

at::ScalarType mask_scales_dtype(at::ScalarType input_dtype) {
  return input_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

ForwardProblem check_forward_args(const at::Tensor& input, const std::optional<at::Tensor>& mask,
                                  const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                  at::IntArrayRef stride, at::IntArrayRef padding,
                                  at::IntArrayRef dilation, int64_t groups,
                                  std::string_view activation, double negative_slope) {
  TORCH_CHECK_VALUE(input.dim() == 4, "partial_conv2d: expected input to be a 4-D tensor ",
                    "(N, C, H, W), got a ", input.dim(), "-D tensor of shape ",
                    shape_string(input));
  const auto dtype = input.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf ||
                       dtype == at::kBFloat16,
                   "partial_conv2d: expected input of dtype float32, float64, float16 or ",
                   "bfloat16, got ", dtype);
  TORCH_CHECK_VALUE(weight.dim() == 4, "partial_conv2d: expected weight to be a 4-D tensor ",
                    "(C_out, C_in / groups, kH, kW), got a ", weight.dim(),
                    "-D tensor of shape ", shape_string(weight));
  check_same_dtype_and_device(weight, "weight", input);
  check_pair(stride, "stride", 1);
  check_pair(padding, "padding", 0);
  check_pair(dilation, "dilation", 1);
  TORCH_CHECK_VALUE(groups >= 1, "partial_conv2d: expected groups to be positive, got ", groups);

  ConvGeometry g{};
  g.batch = input.size(0);
  g.in_channels = input.size(1);
  g.in_height = input.size(2);
  g.in_width = input.size(3);
  g.out_channels = weight.size(0);
  g.kernel_h = weight.size(2);
  g.kernel_w = weight.size(3);
  g.stride_h = stride[0];
  g.stride_w = stride[1];
  g.pad_h = padding[0];
  g.pad_w = padding[1];
  g.dilation_h = dilation[0];
  g.dilation_w = dilation[1];
  g.groups = groups;

  TORCH_CHECK_VALUE(g.in_channels >= 1, "partial_conv2d: expected input to have at least one ",
                    "channel, got shape ", shape_string(input));
  TORCH_CHECK_VALUE(g.in_channels % groups == 0, "partial_conv2d: expected input channels (",
                    g.in_channels, ") to be divisible by groups (", groups, ")");
  TORCH_CHECK_VALUE(g.out_channels % groups == 0, "partial_conv2d: expected weight.size(0) = ",
                    "output channels (", g.out_channels, ") to be divisible by groups (", groups,
                    ")");
  TORCH_CHECK_VALUE(weight.size(1) == g.in_channels / groups, "partial_conv2d: expected ",
                    "weight.size(1) to be input channels / groups = ", g.in_channels / groups,
                    ", got weight of shape ", shape_string(weight));
  TORCH_CHECK_VALUE(g.kernel_h >= 1 && g.kernel_w >= 1, "partial_conv2d: expected a kernel of ",
                    "at least 1x1, got weight of shape ", shape_string(weight));

  g.out_height = conv_output_size(g.in_height, g.kernel_h, g.stride_h, g.pad_h, g.dilation_h);
  g.out_width = conv_output_size(g.in_width, g.kernel_w, g.stride_w, g.pad_w, g.dilation_w);
  TORCH_CHECK_VALUE(g.out_height >= 1 && g.out_width >= 1, "partial_conv2d: output size would be ",
                    g.out_height, "x", g.out_width, " for input ", g.in_height, "x", g.in_width,
                    ", kernel ", g.kernel_h, "x", g.kernel_w, ", padding ", padding,
                    ", dilation ", dilation, "; expected at least 1x1 (the padded input is ",
                    "smaller than the dilated kernel)");

  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == g.out_channels, "partial_conv2d: ",
                      "expected bias of shape [", g.out_channels, "], got ",
                      shape_string(*bias));
    check_same_dtype_and_device(*bias, "bias", input);
  }

  g.mask_batch = 1;
  g.mask_channels = 0;
  if (mask.has_value()) {
    const at::Tensor& m = *mask;
    TORCH_CHECK_VALUE(m.dim() == 4, "partial_conv2d: expected mask to be a 4-D tensor ",
                      "(N or 1, 1 or C_in, H, W), got a ", m.dim(), "-D tensor of shape ",
                      shape_string(m));
    check_same_dtype_and_device(m, "mask", input);
    TORCH_CHECK_VALUE(m.size(0) == 1 || m.size(0) == g.batch, "partial_conv2d: expected mask ",
                      "batch size 1 or ", g.batch, " (the input's), got ", m.size(0));
    TORCH_CHECK_VALUE(m.size(1) == 1 || m.size(1) == g.in_channels, "partial_conv2d: expected ",
                      "mask to have 1 channel (single-channel mask) or ", g.in_channels,
                      " (one per input channel), got ", m.size(1));
    TORCH_CHECK_VALUE(m.size(2) == g.in_height && m.size(3) == g.in_width, "partial_conv2d: ",
                      "expected mask spatial size ", g.in_height, "x", g.in_width,
                      " (the input's), got ", m.size(2), "x", m.size(3));
    g.mask_batch = m.size(0);
    g.mask_channels = m.size(1);
  }
  return {g, parse_activation(activation, negative_slope), negative_slope};
}

ForwardProblem check_backward_args(const at::Tensor& grad_output, const at::Tensor& input,
                                   const std::optional<at::Tensor>& mask,
                                   const at::Tensor& weight,
                                   const std::optional<at::Tensor>& output,
                                   const at::Tensor& mask_scales, at::IntArrayRef stride,
                                   at::IntArrayRef padding, at::IntArrayRef dilation,
                                   int64_t groups, std::string_view activation,
                                   double negative_slope) {
  ForwardProblem problem = check_forward_args(input, mask, weight, std::nullopt, stride, padding,
                                              dilation, groups, activation, negative_slope);
  const ConvGeometry& g = problem.geometry;
  const std::vector<int64_t> out_shape{g.batch, g.out_channels, g.out_height, g.out_width};
  TORCH_CHECK_VALUE(grad_output.sizes() == at::IntArrayRef(out_shape), "partial_conv2d_backward: ",
                    "expected grad_output of shape ", at::IntArrayRef(out_shape), ", got ",
                    shape_string(grad_output));
  check_same_dtype_and_device(grad_output, "grad_output", input);
  if (problem.activation != Activation::kNone) {
    TORCH_CHECK_VALUE(output.has_value(), "partial_conv2d_backward: the forward output is ",
                      "needed for the gradient of activation '", activation, "'");
    TORCH_CHECK_VALUE(output->sizes() == at::IntArrayRef(out_shape), "partial_conv2d_backward: ",
                      "expected output of shape ", at::IntArrayRef(out_shape), ", got ",
                      shape_string(*output));
    check_same_dtype_and_device(*output, "output", input);
  }
  const std::vector<int64_t> scales_shape{g.mask_batch, 2, g.out_height, g.out_width};
  TORCH_CHECK_VALUE(mask_scales.sizes() == at::IntArrayRef(scales_shape),
                    "partial_conv2d_backward: expected mask_scales of shape ",
                    at::IntArrayRef(scales_shape), ", got ", shape_string(mask_scales));
  TORCH_CHECK_TYPE(mask_scales.scalar_type() == mask_scales_dtype(input.scalar_type()),
                   "partial_conv2d_backward: expected mask_scales of dtype ",
                   mask_scales_dtype(input.scalar_type()), ", got ", mask_scales.scalar_type());
  TORCH_CHECK_VALUE(mask_scales.device() == input.device(), "partial_conv2d_backward: expected ",
                    "mask_scales on the input's device ", input.device(), ", got ",
                    mask_scales.device());
  return problem;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> allocate_forward_outputs(const at::Tensor& input,
                                                                        const ConvGeometry& g) {
  at::Tensor output =
      at::empty({g.batch, g.out_channels, g.out_height, g.out_width},
                input.options().memory_format(output_memory_format(input)));
  at::Tensor updated_mask = at::empty({g.mask_batch, 1, g.out_height, g.out_width}, input.options());
  at::Tensor mask_scales = at::empty({g.mask_batch, 2, g.out_height, g.out_width},
                                     input.options().dtype(mask_scales_dtype(input.scalar_type())));
  return {output, updated_mask, mask_scales};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> allocate_backward_outputs(
    const at::Tensor& input, const at::Tensor& weight, std::array<bool, 3> output_mask) {
  at::Tensor grad_input, grad_weight, grad_bias;
  if (output_mask[0])
    grad_input = at::empty(input.sizes(), input.options().memory_format(output_memory_format(input)));
  if (output_mask[1]) grad_weight = at::empty(weight.sizes(), weight.options());
  if (output_mask[2]) grad_bias = at::empty({weight.size(0)}, weight.options());
  return {grad_input, grad_weight, grad_bias};
}

}  // namespace partialconv

TORCH_LIBRARY(partialconv_cuda, m) {
  // output: (N, C_out, H', W'); updated_mask: (N or 1, 1, H', W'), one value per output position
  // (the Python wrapper expands it to C_out channels for multi-channel masks); mask_scales:
  // (N or 1, 2, H', W') in float32 (float64 for float64 input), the ratio and the update U, which
  // is all backward needs of the mask besides M.
  m.def(
      "partial_conv2d_forward(Tensor input, Tensor? mask, Tensor weight, Tensor? bias, "
      "int[2] stride, int[2] padding, int[2] dilation, int groups, str activation, "
      "float negative_slope) -> (Tensor output, Tensor updated_mask, Tensor mask_scales)",
      {at::Tag::pt2_compliant_tag});
  // output is the forward output (read only when activation != 'none'); output_mask selects
  // (grad_input, grad_weight, grad_bias); a gradient not asked for is returned undefined (None).
  m.def(
      "partial_conv2d_backward(Tensor grad_output, Tensor input, Tensor? mask, Tensor weight, "
      "Tensor? output, Tensor mask_scales, int[2] stride, int[2] padding, int[2] dilation, "
      "int groups, str activation, float negative_slope, bool[3] output_mask) -> "
      "(Tensor grad_input, Tensor grad_weight, Tensor grad_bias)",
      {at::Tag::pt2_compliant_tag});
  // Which kernels partial_conv2d_forward would run for these arguments, and why (a debugging aid:
  // it runs no convolution).
  m.def(
      "forward_path(Tensor input, Tensor? mask, Tensor weight, int[2] stride, int[2] padding, "
      "int[2] dilation, int groups) -> str");
}
