// CPU kernels of partial_conv2d.
//
// Forward, per image and group: window sums S come straight from the mask (no second
// convolution) and are saved as ratio and U for backward; the output positions with S > 0 are
// packed im2col-style with the mask applied (X*M never exists as a tensor, holes give exact
// zeros), multiplied by the weight in one GEMM per chunk of positions, and one epilogue applies ratio, bias, mask update and activation. Positions
// with S == 0 skip the matrix product and are written as zeros.
// Backward reuses the packing: grad_conv = grad_out * act' * ratio * U is formed chunk by chunk,
// grad_weight += grad_conv @ cols^T, and grad_input gathers W^T @ grad_conv back through the
// windows (col2im) and is multiplied by M. Half types are packed and accumulated in float.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <vector>

#include "../partial_conv2d.h"

namespace partialconv {
namespace {

// Elements of one packed column buffer (K x positions); bounds the scratch memory per call.
constexpr int64_t kColumnBufferElements = int64_t(1) << 20;

// Work items per parallel task are sized so that each task does at least this many inner
// iterations; small problems then run inline instead of paying for a thread wake-up.
constexpr int64_t kMinWorkPerTask = int64_t(1) << 15;

int64_t grain(int64_t work_per_item) {
  return std::max<int64_t>(1, kMinWorkPerTask / std::max<int64_t>(work_per_item, 1));
}

// Output positions packed per GEMM: as many as fit the column buffer, at least 64, at most P.
int64_t column_chunk(int64_t reduction_size, int64_t positions) {
  return std::max<int64_t>(1, std::min(positions, std::max<int64_t>(64, kColumnBufferElements / reduction_size)));
}

// A 4-D tensor read through its strides, so expanded, sliced and channels_last tensors need no
// copy.
template <typename T>
struct Strided4d {
  T* data;
  int64_t s0, s1, s2, s3;

  explicit Strided4d(const at::Tensor& t)
      : data(t.defined() ? static_cast<T*>(t.data_ptr()) : nullptr),
        s0(t.defined() ? t.stride(0) : 0),
        s1(t.defined() ? t.stride(1) : 0),
        s2(t.defined() ? t.stride(2) : 0),
        s3(t.defined() ? t.stride(3) : 0) {}
  T& operator()(int64_t a, int64_t b, int64_t c, int64_t d) const {
    return data[a * s0 + b * s1 + c * s2 + d * s3];
  }
  T* image(int64_t a) const { return data == nullptr ? nullptr : data + a * s0; }
};

// The saved scales of one mask image: ratio[p] and update[p] for its P output positions.
template <typename acc_t>
struct ImageScales {
  const acc_t* ratio;
  const acc_t* update;
  MaskScale<acc_t> operator[](int64_t p) const { return {ratio[p], update[p]}; }
};

template <typename acc_t>
ImageScales<acc_t> image_scales(const at::Tensor& mask_scales, int64_t nm, int64_t P) {
  const acc_t* image = mask_scales.const_data_ptr<acc_t>() + nm * 2 * P;
  return {image, image + P};
}

// Output positions of one mask image, those whose window sees a valid pixel (U > 0) first, in
// raster order, then the holes.
struct PositionOrder {
  std::vector<int64_t> positions;
  int64_t valid = 0;
};

template <typename acc_t>
PositionOrder order_positions(ImageScales<acc_t> scales, int64_t count) {
  PositionOrder order;
  order.positions.reserve(count);
  for (int64_t p = 0; p < count; ++p)
    if (scales.update[p] > acc_t(0)) order.positions.push_back(p);
  order.valid = static_cast<int64_t>(order.positions.size());
  for (int64_t p = 0; p < count; ++p)
    if (!(scales.update[p] > acc_t(0))) order.positions.push_back(p);
  return order;
}

// Window sums S, and from them ratio and U, for every output position of every mask image.
template <typename scalar_t>
void compute_mask_scales(const at::Tensor& mask, const ConvGeometry& g, at::Tensor& mask_scales,
                         at::Tensor& updated_mask) {
  using acc_t = at::opmath_type<scalar_t>;
  const Strided4d<const scalar_t> m(mask);
  acc_t* scales = mask_scales.mutable_data_ptr<acc_t>();
  scalar_t* update = updated_mask.mutable_data_ptr<scalar_t>();
  const int64_t P = g.out_positions();
  const acc_t window_size = acc_t(g.window_size());
  const int64_t channels = std::max<int64_t>(g.mask_channels, 1), taps = g.taps();
  at::parallel_for(0, g.mask_batch * P, grain(channels * taps), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t p = i % P;
      const int64_t nm = i / P;
      const MaskScale<acc_t> scale = mask_scale(
          window_mask_sum<acc_t, scalar_t, int64_t>(m.image(nm), channels, m.s1, m.s2, m.s3, g,
                                                    p / g.out_width, p % g.out_width),
          window_size);
      scales[(2 * nm) * P + p] = scale.ratio;
      scales[(2 * nm + 1) * P + p] = scale.update;
      update[i] = static_cast<scalar_t>(scale.update);
    }
  });
}

// cols[k][j] = masked input at tap k = (ci, ky, kx) of the group for output position
// positions[j]; zero in the padding and in holes.
template <typename scalar_t, typename acc_t>
void pack_masked_columns(const Strided4d<const scalar_t>& x, const Strided4d<const scalar_t>& m,
                         const ConvGeometry& g, int64_t n, int64_t nm, int64_t group,
                         const int64_t* positions, int64_t count, acc_t* cols) {
  const int64_t taps = g.taps();
  const int64_t cin_g = g.in_channels_per_group();
  at::parallel_for(0, cin_g * taps, grain(count), [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const int64_t c = group * cin_g + k / taps;
      const int64_t ky = (k % taps) / g.kernel_w, kx = k % g.kernel_w;
      const int64_t mc = g.multi_channel_mask() ? c : 0;
      acc_t* row = cols + k * count;
      for (int64_t j = 0; j < count; ++j) {
        const int64_t p = positions[j];
        const int64_t iy = input_coord<int64_t>(p / g.out_width, ky, g.stride_h, g.pad_h,
                                                g.dilation_h);
        const int64_t ix = input_coord<int64_t>(p % g.out_width, kx, g.stride_w, g.pad_w,
                                                g.dilation_w);
        acc_t v = acc_t(0);
        if (iy >= 0 && iy < g.in_height && ix >= 0 && ix < g.in_width) {
          v = acc_t(x(n, c, iy, ix));
          if (m.data != nullptr) v = masked_value(v, acc_t(m(nm, mc, iy, ix)));
        }
        row[j] = v;
      }
    }
  });
}

// A (rows x cols) contiguous matrix over the first rows*cols elements of a scratch buffer.
at::Tensor scratch_matrix(const at::Tensor& buffer, int64_t rows, int64_t cols) {
  return buffer.narrow(0, 0, rows * cols).view({rows, cols});
}

template <typename scalar_t>
void forward_kernel(const at::Tensor& input, const at::Tensor& mask, const at::Tensor& weight,
                    const at::Tensor& bias, const ForwardProblem& problem, at::Tensor& output,
                    at::Tensor& updated_mask, at::Tensor& mask_scales) {
  using acc_t = at::opmath_type<scalar_t>;
  const ConvGeometry& g = problem.geometry;
  compute_mask_scales<scalar_t>(mask, g, mask_scales, updated_mask);
  if (output.numel() == 0) return;

  const int64_t P = g.out_positions(), K = g.reduction_size();
  const int64_t cout_g = g.out_channels_per_group();
  const auto acc_options = input.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  const at::Tensor w = weight.to(acc_options.dtype()).contiguous().view({g.out_channels, K});
  const at::Tensor b = bias.defined() ? bias.to(acc_options.dtype()).contiguous() : at::Tensor();
  const acc_t* bias_data = b.defined() ? b.const_data_ptr<acc_t>() : nullptr;
  const int64_t chunk = column_chunk(K, P);
  const at::Tensor cols_buffer = at::empty({K * chunk}, acc_options);
  const at::Tensor conv_buffer = at::empty({cout_g * chunk}, acc_options);

  const Strided4d<const scalar_t> x(input), m(mask);
  const Strided4d<scalar_t> out(output);
  const acc_t slope = acc_t(problem.negative_slope);

  PositionOrder order;
  for (int64_t n = 0; n < g.batch; ++n) {
    const int64_t nm = g.mask_batch == 1 ? 0 : n;
    const ImageScales<acc_t> scales = image_scales<acc_t>(mask_scales, nm, P);
    if (n == 0 || nm != 0) order = order_positions(scales, P);
    for (int64_t group = 0; group < g.groups; ++group) {
      const at::Tensor w_g = w.narrow(0, group * cout_g, cout_g);
      for (int64_t start = 0; start < order.valid; start += chunk) {
        const int64_t count = std::min(chunk, order.valid - start);
        const int64_t* positions = order.positions.data() + start;
        at::Tensor cols = scratch_matrix(cols_buffer, K, count);
        at::Tensor conv = scratch_matrix(conv_buffer, cout_g, count);
        pack_masked_columns<scalar_t, acc_t>(x, m, g, n, nm, group, positions, count,
                                             cols.data_ptr<acc_t>());
        at::mm_out(conv, w_g, cols);
        const acc_t* conv_data = conv.const_data_ptr<acc_t>();
        at::parallel_for(0, cout_g, grain(count), [&](int64_t begin, int64_t end) {
          for (int64_t co = begin; co < end; ++co) {
            const int64_t c = group * cout_g + co;
            const acc_t bias_c = bias_data ? bias_data[c] : acc_t(0);
            for (int64_t j = 0; j < count; ++j) {
              const int64_t p = positions[j];
              out(n, c, p / g.out_width, p % g.out_width) = static_cast<scalar_t>(
                  partial_conv_output(conv_data[co * count + j], scales[p],
                                      bias_c, problem.activation, slope));
            }
          }
        });
      }
    }
    // Windows without a valid pixel: output 0, no matrix work.
    at::parallel_for(0, g.out_channels, grain(P - order.valid), [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c)
        for (int64_t j = order.valid; j < P; ++j) {
          const int64_t p = order.positions[j];
          out(n, c, p / g.out_width, p % g.out_width) = scalar_t(0);
        }
    });
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> partial_conv2d_forward_cpu(
    const at::Tensor& input, const std::optional<at::Tensor>& mask, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t groups, c10::string_view activation,
    double negative_slope) {
  const ForwardProblem problem = check_forward_args(input, mask, weight, bias, stride, padding,
                                                    dilation, groups, activation, negative_slope);
  const at::NoGradGuard no_grad;  // the scratch GEMMs below are not part of any autograd graph
  auto [output, updated_mask, mask_scales] = allocate_forward_outputs(input, problem.geometry);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(),
                                  "partial_conv2d_forward_cpu", [&] {
                                    forward_kernel<scalar_t>(input, mask.value_or(at::Tensor()),
                                                             weight, bias.value_or(at::Tensor()),
                                                             problem, output, updated_mask,
                                                             mask_scales);
                                  });
  return {output, updated_mask, mask_scales};
}


template <typename scalar_t>
void backward_kernel(const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& mask,
                     const at::Tensor& weight, const at::Tensor& output,
                     const at::Tensor& mask_scales, const ForwardProblem& problem,
                     std::array<bool, 3> output_mask, at::Tensor& grad_input,
                     at::Tensor& grad_weight, at::Tensor& grad_bias) {
  using acc_t = at::opmath_type<scalar_t>;
  const ConvGeometry& g = problem.geometry;
  const auto [need_input, need_weight, need_bias] = output_mask;
  const int64_t P = g.out_positions(), K = g.reduction_size(), taps = g.taps();
  const int64_t cout_g = g.out_channels_per_group(), cin_g = g.in_channels_per_group();
  const auto acc_options = input.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  const int64_t chunk = column_chunk(K, P);

  const at::Tensor w = weight.to(acc_options.dtype()).contiguous().view({g.out_channels, K});
  const at::Tensor grad_conv_buffer = at::empty({cout_g * chunk}, acc_options);
  const at::Tensor cols_buffer = at::empty({need_weight ? K * chunk : 0}, acc_options);
  const at::Tensor grad_cols_buffer = at::empty({need_input ? K * chunk : 0}, acc_options);
  at::Tensor grad_weight_acc = at::zeros({need_weight ? g.out_channels : 0, K}, acc_options);
  at::Tensor grad_bias_acc = at::zeros({g.out_channels}, acc_options);
  // grad_input of one image before the final multiplication by M.
  at::Tensor grad_image = at::zeros({need_input ? g.in_channels : 0, g.in_height, g.in_width},
                                    acc_options);

  const Strided4d<const scalar_t> x(input), m(mask), gout(grad_output), z(output);
  const Strided4d<scalar_t> gin(grad_input);
  acc_t* grad_bias_data = grad_bias_acc.data_ptr<acc_t>();
  acc_t* grad_image_data = grad_image.data_ptr<acc_t>();
  const acc_t slope = acc_t(problem.negative_slope);

  PositionOrder order;
  for (int64_t n = 0; n < g.batch; ++n) {
    const int64_t nm = g.mask_batch == 1 ? 0 : n;
    const ImageScales<acc_t> scales = image_scales<acc_t>(mask_scales, nm, P);
    if (n == 0 || nm != 0) order = order_positions(scales, P);
    for (int64_t group = 0; group < g.groups; ++group) {
      const at::Tensor w_g = w.narrow(0, group * cout_g, cout_g);
      // Positions with S == 0 have a zero gradient scale: they are skipped like in forward.
      for (int64_t start = 0; start < order.valid; start += chunk) {
        const int64_t count = std::min(chunk, order.valid - start);
        const int64_t* positions = order.positions.data() + start;
        at::Tensor grad_conv = scratch_matrix(grad_conv_buffer, cout_g, count);
        acc_t* grad_conv_data = grad_conv.data_ptr<acc_t>();
        at::parallel_for(0, cout_g, grain(count), [&](int64_t begin, int64_t end) {
          for (int64_t co = begin; co < end; ++co) {
            const int64_t c = group * cout_g + co;
            acc_t bias_sum = acc_t(0);
            for (int64_t j = 0; j < count; ++j) {
              const int64_t p = positions[j], oy = p / g.out_width, ox = p % g.out_width;
              const OutputGrad<acc_t> og = partial_conv_output_grad(
                  acc_t(gout(n, c, oy, ox)), z.data ? acc_t(z(n, c, oy, ox)) : acc_t(0),
                  scales[p], problem.activation, slope);
              grad_conv_data[co * count + j] = og.conv;
              bias_sum += og.bias;
            }
            grad_bias_data[c] += bias_sum;
          }
        });
        if (need_weight) {
          at::Tensor cols = scratch_matrix(cols_buffer, K, count);
          pack_masked_columns<scalar_t, acc_t>(x, m, g, n, nm, group, positions, count,
                                               cols.data_ptr<acc_t>());
          grad_weight_acc.narrow(0, group * cout_g, cout_g).addmm_(grad_conv, cols.t());
        }
        if (need_input) {
          at::Tensor grad_cols = scratch_matrix(grad_cols_buffer, K, count);
          at::mm_out(grad_cols, w_g.t(), grad_conv);
          const acc_t* grad_cols_data = grad_cols.const_data_ptr<acc_t>();
          // col2im: each input channel is owned by one thread, so the sums need no atomics.
          at::parallel_for(0, cin_g, grain(taps * count), [&](int64_t begin, int64_t end) {
            for (int64_t ci = begin; ci < end; ++ci) {
              acc_t* plane = grad_image_data + (group * cin_g + ci) * g.in_height * g.in_width;
              for (int64_t t = 0; t < taps; ++t) {
                const int64_t ky = t / g.kernel_w, kx = t % g.kernel_w;
                const acc_t* row = grad_cols_data + (ci * taps + t) * count;
                for (int64_t j = 0; j < count; ++j) {
                  const int64_t p = positions[j];
                  const int64_t iy = input_coord<int64_t>(p / g.out_width, ky, g.stride_h,
                                                          g.pad_h, g.dilation_h);
                  const int64_t ix = input_coord<int64_t>(p % g.out_width, kx, g.stride_w,
                                                          g.pad_w, g.dilation_w);
                  if (iy >= 0 && iy < g.in_height && ix >= 0 && ix < g.in_width)
                    plane[iy * g.in_width + ix] += row[j];
                }
              }
            }
          });
        }
      }
    }
    if (need_input) {
      // d(X*M)/dX = M; a hole gets exactly 0.
      at::parallel_for(0, g.in_channels, grain(g.in_height * g.in_width), [&](int64_t begin, int64_t end) {
        for (int64_t c = begin; c < end; ++c) {
          acc_t* plane = grad_image_data + c * g.in_height * g.in_width;
          const int64_t mc = g.multi_channel_mask() ? c : 0;
          for (int64_t iy = 0; iy < g.in_height; ++iy)
            for (int64_t ix = 0; ix < g.in_width; ++ix) {
              acc_t& v = plane[iy * g.in_width + ix];
              const acc_t grad = m.data ? masked_value(v, acc_t(m(nm, mc, iy, ix))) : v;
              gin(n, c, iy, ix) = static_cast<scalar_t>(grad);
              v = acc_t(0);
            }
        }
      });
    }
  }
  if (need_weight) grad_weight.copy_(grad_weight_acc.view(weight.sizes()));
  if (need_bias) grad_bias.copy_(grad_bias_acc);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> partial_conv2d_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& input, const std::optional<at::Tensor>& mask,
    const at::Tensor& weight, const std::optional<at::Tensor>& output,
    const at::Tensor& mask_scales, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t groups, c10::string_view activation,
    double negative_slope, std::array<bool, 3> output_mask) {
  const ForwardProblem problem =
      check_backward_args(grad_output, input, mask, weight, output, mask_scales, stride, padding,
                          dilation, groups, activation, negative_slope);
  const at::NoGradGuard no_grad;
  auto [grad_input, grad_weight, grad_bias] =
      allocate_backward_outputs(input, weight, output_mask);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, input.scalar_type(), "partial_conv2d_backward_cpu", [&] {
        backward_kernel<scalar_t>(grad_output, input, mask.value_or(at::Tensor()), weight,
                                  problem.activation == Activation::kNone
                                      ? at::Tensor()
                                      : output.value_or(at::Tensor()),
                                  mask_scales.contiguous(), problem, output_mask, grad_input,
                                  grad_weight, grad_bias);
      });
  return {grad_input, grad_weight, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(partialconv_cuda, CPU, m) {
  m.impl("partial_conv2d_forward", TORCH_FN(partial_conv2d_forward_cpu));
  m.impl("partial_conv2d_backward", TORCH_FN(partial_conv2d_backward_cpu));
}

}  // namespace partialconv
