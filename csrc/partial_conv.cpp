// Schema of the partialconv_cuda ops and the argument checks shared by every backend and by the
// fake (Meta) kernels.
#include "partial_conv.h"
#include "op_handles.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <limits>
#include <sstream>
#include <string>
#include <vector>

namespace partialconv {
namespace {

// Padded input extents and dilated kernel extents stay below this, so that no index arithmetic of
// the kernels (o * stride - pad + k * dilation, and sums of such) can overflow int64.
constexpr int64_t kMaxExtent = int64_t(1) << 62;

template <typename Size>
c10::ArrayRef<Size> sizes_of(const at::Tensor& t);
template <>
c10::ArrayRef<int64_t> sizes_of<int64_t>(const at::Tensor& t) {
  return t.sizes();
}
template <>
c10::ArrayRef<c10::SymInt> sizes_of<c10::SymInt>(const at::Tensor& t) {
  return t.sym_sizes();
}

// The value of a size when it is known (always for int64_t; for a SymInt unless symbolic).
std::optional<int64_t> known_value(int64_t v) { return v; }
std::optional<int64_t> known_value(const c10::SymInt& v) { return v.maybe_as_int(); }

std::string shape_string(const at::Tensor& t) {
  std::ostringstream os;
  os << t.sym_sizes();  // symbolic sizes print as their expressions
  return os.str();
}

template <typename Size>
std::string sizes_string(const std::vector<Size>& sizes) {
  std::ostringstream os;
  for (size_t i = 0; i < sizes.size(); ++i) os << (i ? "x" : "") << sizes[i];
  return os.str();
}

// "partial_conv2d" for a 4-D input; "partial_conv" when the rank is not one the op takes.
std::string op_name(int64_t input_dim) {
  return input_dim >= 3 && input_dim <= 5 ? c10::str("partial_conv", input_dim - 2, "d")
                                          : std::string("partial_conv");
}

const char* spatial_names(int64_t spatial_dims) {
  return spatial_dims == 1 ? "L" : spatial_dims == 2 ? "H, W" : "D, H, W";
}

const char* kernel_names(int64_t spatial_dims) {
  return spatial_dims == 1 ? "kL" : spatial_dims == 2 ? "kH, kW" : "kD, kH, kW";
}

void check_parameter(at::IntArrayRef values, const std::string& op, const char* name,
                     int64_t spatial_dims, int64_t minimum) {
  TORCH_CHECK_VALUE(int64_t(values.size()) == spatial_dims, op, ": expected ", name, " to have ",
                    spatial_dims, " element", spatial_dims == 1 ? "" : "s", " (",
                    spatial_names(spatial_dims), "), got ", values.size());
  for (const int64_t v : values) {
    TORCH_CHECK_VALUE(v >= minimum, op, ": expected ", name, " to be ",
                      minimum == 0 ? "non-negative" : "positive", ", got ", values);
  }
}

void check_same_dtype_and_device(const at::Tensor& t, const std::string& op, const char* name,
                                 const at::Tensor& input) {
  TORCH_CHECK_TYPE(t.scalar_type() == input.scalar_type(), op, ": expected ", name,
                   " to have the input's dtype ", input.scalar_type(), ", got ", t.scalar_type(),
                   " (convert it with .to(input.dtype))");
  TORCH_CHECK_VALUE(t.device() == input.device(), op, ": expected ", name,
                    " on the input's device ", input.device(), ", got ", t.device());
}

Activation parse_activation(std::string_view activation, double negative_slope,
                            const std::string& op) {
  if (activation == "none") return Activation::kNone;
  if (activation == "relu") return Activation::kRelu;
  if (activation == "leaky_relu") {
    // The backward pass reads act'(y) off the output, which needs sign(out) == sign(y).
    TORCH_CHECK_VALUE(negative_slope >= 0.0, op, ": expected negative_slope >= 0 for ",
                      "leaky_relu, got ", negative_slope);
    return Activation::kLeakyRelu;
  }
  TORCH_CHECK_VALUE(false, op, ": expected activation to be one of 'none', 'relu', ",
                    "'leaky_relu', got '", activation, "'");
}

// Output extent along one dimension, after checking that its arithmetic stays within int64.
template <typename Size>
Size output_extent(const Size& in, const Size& kernel, int64_t stride, int64_t pad,
                   int64_t dilation, const std::string& op) {
  const std::optional<int64_t> in_value = known_value(in), kernel_value = known_value(kernel);
  int64_t padded = 0, window = 0;
  const bool padded_fits = !in_value || (!__builtin_mul_overflow(pad, int64_t(2), &padded) &&
                                         !__builtin_add_overflow(padded, *in_value, &padded) &&
                                         padded < kMaxExtent);
  const bool window_fits = !kernel_value || (!__builtin_mul_overflow(dilation, *kernel_value - 1, &window) &&
                                             window < kMaxExtent);
  TORCH_CHECK_VALUE(padded_fits && window_fits, op, ": expected the padded input (size + 2 * ",
                    "padding) and the dilated kernel (dilation * (kernel - 1) + 1) to stay below ",
                    "2^62 along every dimension; got size ", in, ", padding ", pad, ", kernel ",
                    kernel, ", dilation ", dilation);
  const Size span = in + 2 * pad - dilation * (kernel - 1) - 1;
  if (span < 0) return Size(0);
  return span / stride + 1;
}

template <typename Size>
std::vector<Size> tensor_shape(std::initializer_list<Size> leading, const Size (&spatial)[kDims],
                               int spatial_dims) {
  std::vector<Size> shape(leading);
  for (const Size& s : spatial_sizes(spatial, spatial_dims)) shape.push_back(s);
  return shape;
}

template <typename Size>
void check_shape(const at::Tensor& t, const std::vector<Size>& expected, const std::string& op,
                 const char* name) {
  const c10::ArrayRef<Size> sizes = sizes_of<Size>(t);
  bool same = sizes.size() == expected.size();
  for (size_t i = 0; same && i < sizes.size(); ++i) same = sizes[i] == expected[i];
  TORCH_CHECK_VALUE(same, op, "_backward: expected ", name, " of shape ",
                    c10::ArrayRef<Size>(expected), ", got ", shape_string(t));
}

at::Tensor empty_tensor(const std::vector<int64_t>& sizes, const at::TensorOptions& options) {
  return at::empty(sizes, options);
}
at::Tensor empty_tensor(const std::vector<c10::SymInt>& sizes, const at::TensorOptions& options) {
  return at::empty_symint(sizes, options);
}

}  // namespace

template <typename Size>
std::vector<Size> spatial_sizes(const Size (&sizes)[kDims], int spatial_dims) {
  return std::vector<Size>(sizes + kDims - spatial_dims, sizes + kDims);
}

at::MemoryFormat output_memory_format(const at::Tensor& input) {
  const at::MemoryFormat channels_last = input.dim() == 4   ? at::MemoryFormat::ChannelsLast
                                         : input.dim() == 5 ? at::MemoryFormat::ChannelsLast3d
                                                            : at::MemoryFormat::Contiguous;
  return channels_last != at::MemoryFormat::Contiguous && !input.is_contiguous() &&
                 input.is_contiguous(channels_last)
             ? channels_last
             : at::MemoryFormat::Contiguous;
}

at::ScalarType mask_scales_dtype(at::ScalarType input_dtype) {
  return input_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

template <typename Size>
ForwardProblemOf<Size> check_forward_args(const at::Tensor& input,
                                          const std::optional<at::Tensor>& mask,
                                          const at::Tensor& weight,
                                          const std::optional<at::Tensor>& bias,
                                          at::IntArrayRef stride, at::IntArrayRef padding,
                                          at::IntArrayRef dilation, int64_t groups,
                                          std::string_view activation, double negative_slope,
                                          std::string_view normalization) {
  const int64_t rank = input.dim();
  const std::string op = op_name(rank);
  TORCH_CHECK_VALUE(rank >= 3 && rank <= 5, op, ": expected input to be a 3-D, 4-D or 5-D tensor ",
                    "(N, C, L), (N, C, H, W) or (N, C, D, H, W), got a ", rank,
                    "-D tensor of shape ", shape_string(input));
  const int spatial_dims = int(rank - 2);
  const auto dtype = input.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf ||
                       dtype == at::kBFloat16,
                   op, ": expected input of dtype float32, float64, float16 or bfloat16, got ",
                   dtype);
  TORCH_CHECK_VALUE(weight.dim() == rank, op, ": expected weight to be a ", rank, "-D tensor ",
                    "(C_out, C_in / groups, ", kernel_names(spatial_dims), "), got a ",
                    weight.dim(), "-D tensor of shape ", shape_string(weight));
  check_same_dtype_and_device(weight, op, "weight", input);
  check_parameter(stride, op, "stride", spatial_dims, 1);
  check_parameter(padding, op, "padding", spatial_dims, 0);
  check_parameter(dilation, op, "dilation", spatial_dims, 1);
  TORCH_CHECK_VALUE(groups >= 1, op, ": expected groups to be positive, got ", groups);

  const c10::ArrayRef<Size> in = sizes_of<Size>(input), w = sizes_of<Size>(weight);
  ConvShape<Size> g{};
  g.batch = in[0];
  g.in_channels = in[1];
  g.out_channels = w[0];
  g.groups = Size(groups);
  g.spatial_dims = spatial_dims;
  // Per dimension, with the leading unit dimensions of 1-D and 2-D problems.
  const int lead = kDims - spatial_dims;
  int64_t strides[kDims], pads[kDims], dilations[kDims];
  for (int d = 0; d < kDims; ++d) {
    const bool real = d >= lead;
    g.in_size[d] = real ? in[2 + d - lead] : Size(1);
    g.kernel[d] = real ? w[2 + d - lead] : Size(1);
    strides[d] = real ? stride[d - lead] : 1;
    pads[d] = real ? padding[d - lead] : 0;
    dilations[d] = real ? dilation[d - lead] : 1;
    g.stride[d] = Size(strides[d]);
    g.pad[d] = Size(pads[d]);
    g.dilation[d] = Size(dilations[d]);
  }

  TORCH_CHECK_VALUE(g.in_channels >= 1, op, ": expected input to have at least one channel, ",
                    "got shape ", shape_string(input));
  TORCH_CHECK_VALUE(g.in_channels % groups == 0, op, ": expected input channels (", g.in_channels,
                    ") to be divisible by groups (", groups, ")");
  TORCH_CHECK_VALUE(g.out_channels % groups == 0, op, ": expected weight.size(0) = output ",
                    "channels (", g.out_channels, ") to be divisible by groups (", groups, ")");
  TORCH_CHECK_VALUE(w[1] == g.in_channels / groups, op, ": expected weight.size(1) to be input ",
                    "channels / groups = ", g.in_channels / groups, ", got weight of shape ",
                    shape_string(weight));
  bool kernel_positive = true;
  for (int d = lead; d < kDims; ++d) kernel_positive = kernel_positive && g.kernel[d] >= 1;
  TORCH_CHECK_VALUE(kernel_positive, op, ": expected a kernel of at least 1 along every ",
                    "dimension, got weight of shape ", shape_string(weight));

  bool output_fits = true;
  for (int d = 0; d < kDims; ++d) {
    g.out_size[d] = output_extent<Size>(g.in_size[d], g.kernel[d], strides[d], pads[d], dilations[d], op);
    output_fits = output_fits && g.out_size[d] >= 1;
  }
  TORCH_CHECK_VALUE(output_fits, op, ": output size would be ",
                    sizes_string(spatial_sizes(g.out_size, spatial_dims)), " for input ",
                    sizes_string(spatial_sizes(g.in_size, spatial_dims)), ", kernel ",
                    sizes_string(spatial_sizes(g.kernel, spatial_dims)), ", padding ", padding,
                    ", dilation ", dilation, "; expected at least 1 along every dimension (the ",
                    "padded input is smaller than the dilated kernel)");

  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && sizes_of<Size>(*bias)[0] == g.out_channels, op,
                      ": expected bias of shape [", g.out_channels, "], got ",
                      shape_string(*bias));
    check_same_dtype_and_device(*bias, op, "bias", input);
  }

  g.mask_batch = Size(1);
  g.mask_channels = Size(0);
  if (mask.has_value()) {
    const at::Tensor& m = *mask;
    TORCH_CHECK_VALUE(m.dim() == rank, op, ": expected mask to be a ", rank, "-D tensor ",
                      "(N or 1, 1 or C_in, ", spatial_names(spatial_dims), "), got a ", m.dim(),
                      "-D tensor of shape ", shape_string(m));
    check_same_dtype_and_device(m, op, "mask", input);
    const c10::ArrayRef<Size> ms = sizes_of<Size>(m);
    TORCH_CHECK_VALUE(ms[0] == 1 || ms[0] == g.batch, op, ": expected mask batch size 1 or ",
                      g.batch, " (the input's), got ", ms[0]);
    TORCH_CHECK_VALUE(ms[1] == 1 || ms[1] == g.in_channels, op, ": expected mask to have 1 ",
                      "channel (single-channel mask) or ", g.in_channels,
                      " (one per input channel), got ", ms[1]);
    bool same_spatial = true;
    for (int64_t d = 2; d < rank; ++d) same_spatial = same_spatial && ms[d] == in[d];
    TORCH_CHECK_VALUE(same_spatial, op, ": expected mask spatial size ",
                      sizes_string(spatial_sizes(g.in_size, spatial_dims)), " (the input's), got ",
                      sizes_string(std::vector<Size>(ms.begin() + 2, ms.end())));
    g.mask_batch = ms[0];
    g.mask_channels = ms[1];
  }
  TORCH_CHECK_VALUE(normalization == "window" || normalization == "sum", op,
                    ": expected normalization 'window' (sum(1)/sum(M), the paper's) or 'sum' (1/sum(M)), got '",
                    normalization, "'");
  g.normalization = normalization == "sum" ? Normalization::kSum : Normalization::kWindow;
  return {g, parse_activation(activation, negative_slope, op), negative_slope};
}

template <typename Size>
ForwardProblemOf<Size> check_backward_args(const at::Tensor& grad_output, const at::Tensor& input,
                                           const std::optional<at::Tensor>& mask,
                                           const at::Tensor& weight,
                                           const std::optional<at::Tensor>& output,
                                           const at::Tensor& mask_scales, at::IntArrayRef stride,
                                           at::IntArrayRef padding, at::IntArrayRef dilation,
                                           int64_t groups, std::string_view activation,
                                           double negative_slope) {
  ForwardProblemOf<Size> problem = check_forward_args<Size>(
      input, mask, weight, std::nullopt, stride, padding, dilation, groups, activation,
      negative_slope);
  const ConvShape<Size>& g = problem.geometry;
  const std::string op = op_name(input.dim());
  const std::vector<Size> out_shape = tensor_shape({g.batch, g.out_channels}, g.out_size, g.spatial_dims);
  check_shape(grad_output, out_shape, op, "grad_output");
  check_same_dtype_and_device(grad_output, op, "grad_output", input);
  if (problem.activation != Activation::kNone) {
    TORCH_CHECK_VALUE(output.has_value(), op, "_backward: the forward output is needed for the ",
                      "gradient of activation '", activation, "'");
    check_shape(*output, out_shape, op, "output");
    check_same_dtype_and_device(*output, op, "output", input);
  }
  check_shape(mask_scales, tensor_shape({g.mask_batch, Size(2)}, g.out_size, g.spatial_dims), op,
              "mask_scales");
  TORCH_CHECK_TYPE(mask_scales.scalar_type() == mask_scales_dtype(input.scalar_type()), op,
                   "_backward: expected mask_scales of dtype ",
                   mask_scales_dtype(input.scalar_type()), ", got ", mask_scales.scalar_type());
  TORCH_CHECK_VALUE(mask_scales.device() == input.device(), op, "_backward: expected ",
                    "mask_scales on the input's device ", input.device(), ", got ",
                    mask_scales.device());
  return problem;
}

template <typename Size>
std::tuple<at::Tensor, at::Tensor, at::Tensor> allocate_forward_outputs(const at::Tensor& input,
                                                                        const ConvShape<Size>& g) {
  at::Tensor output =
      empty_tensor(tensor_shape({g.batch, g.out_channels}, g.out_size, g.spatial_dims),
                   input.options().memory_format(output_memory_format(input)));
  at::Tensor updated_mask =
      empty_tensor(tensor_shape({g.mask_batch, Size(1)}, g.out_size, g.spatial_dims), input.options());
  at::Tensor mask_scales =
      empty_tensor(tensor_shape({g.mask_batch, Size(2)}, g.out_size, g.spatial_dims),
                   input.options().dtype(mask_scales_dtype(input.scalar_type())));
  return {output, updated_mask, mask_scales};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> allocate_backward_outputs(
    const at::Tensor& input, const at::Tensor& weight, std::array<bool, 3> output_mask) {
  at::Tensor grad_input, grad_weight, grad_bias;
  if (output_mask[0])
    grad_input = at::empty_symint(input.sym_sizes(),
                                  input.options().memory_format(output_memory_format(input)));
  if (output_mask[1]) grad_weight = at::empty_symint(weight.sym_sizes(), weight.options());
  if (output_mask[2]) grad_bias = at::empty_symint({weight.sym_size(0)}, weight.options());
  return {grad_input, grad_weight, grad_bias};
}

#define PCONV_INSTANTIATE_CHECKS(Size)                                                            \
  template ForwardProblemOf<Size> check_forward_args<Size>(                                      \
      const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&,                     \
      const std::optional<at::Tensor>&, at::IntArrayRef, at::IntArrayRef, at::IntArrayRef,        \
      int64_t, std::string_view, double, std::string_view);                                       \
  template ForwardProblemOf<Size> check_backward_args<Size>(                                     \
      const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&,  \
      const std::optional<at::Tensor>&, const at::Tensor&, at::IntArrayRef, at::IntArrayRef,      \
      at::IntArrayRef, int64_t, std::string_view, double);                                        \
  template std::tuple<at::Tensor, at::Tensor, at::Tensor> allocate_forward_outputs<Size>(         \
      const at::Tensor&, const ConvShape<Size>&);                                                 \
  template std::vector<Size> spatial_sizes<Size>(const Size (&)[kDims], int);
PCONV_INSTANTIATE_CHECKS(int64_t)
PCONV_INSTANTIATE_CHECKS(c10::SymInt)
#undef PCONV_INSTANTIATE_CHECKS

const c10::TypedOperatorHandle<ForwardSignature>& forward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("partialconv_cuda::partial_conv_forward", "")
                             .typed<ForwardSignature>();
  return op;
}

const c10::TypedOperatorHandle<BackwardSignature>& backward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("partialconv_cuda::partial_conv_backward", "")
                             .typed<BackwardSignature>();
  return op;
}

}  // namespace partialconv

TORCH_LIBRARY(partialconv_cuda, m) {
  // One op for 1, 2 and 3 spatial dimensions, taken from the input's rank: input (N, C_in,
  // *spatial), mask None or (N or 1, 1 or C_in, *spatial), weight (C_out, C_in / groups,
  // *kernel); stride, padding and dilation have one entry per spatial dimension.
  // output: (N, C_out, *out_spatial); updated_mask: (N or 1, 1, *out_spatial), one value per
  // output position (the Python wrapper expands it to C_out channels for multi-channel masks);
  // mask_scales: (N or 1, 2, *out_spatial) in float32 (float64 for float64 input), the ratio and
  // the update U (laid out as partial_conv_math.h's mask_scale_rows says), which is all backward
  // needs of the mask besides M.
  m.def(
      "partial_conv_forward(Tensor input, Tensor? mask, Tensor weight, Tensor? bias, "
      "int[] stride, int[] padding, int[] dilation, int groups, str activation, "
      "float negative_slope, str normalization=\"window\") -> "
      "(Tensor output, Tensor updated_mask, Tensor mask_scales)",
      {at::Tag::pt2_compliant_tag});
  // output is the forward output (read only when activation != 'none'); output_mask selects
  // (grad_input, grad_weight, grad_bias); a gradient not asked for is returned undefined (None).
  m.def(
      "partial_conv_backward(Tensor grad_output, Tensor input, Tensor? mask, Tensor weight, "
      "Tensor? output, Tensor mask_scales, int[] stride, int[] padding, int[] dilation, "
      "int groups, str activation, float negative_slope, bool[3] output_mask) -> "
      "(Tensor grad_input, Tensor grad_weight, Tensor grad_bias)",
      {at::Tag::pt2_compliant_tag});
  // Which kernels partial_conv_forward would run for these arguments, and why (a debugging aid:
  // it runs no convolution).
  m.def(
      "forward_path(Tensor input, Tensor? mask, Tensor weight, int[] stride, int[] padding, "
      "int[] dilation, int groups) -> str");
}
