// CPU kernels of partial_conv2d.
//
// Window sums S come straight from the mask (no second convolution) and are saved as ratio and U.
// The output positions whose window sees a valid pixel are described as runs along output rows.
// Chunk by chunk (about an L2 cache's worth), their inputs are packed im2col-style with the mask
// applied (X*M never exists as a tensor; holes give exact zeros even under NaN input), multiplied
// by the weight in one GEMM (MKL/oneDNN through ATen, multithreaded), and one epilogue applies
// ratio, bias, mask update and activation. Positions whose window is all holes do no matrix work
// and are written as zeros.
//
// Backward reuses the runs and the packing: grad_conv = grad_out * act' * ratio * U is gathered
// per chunk, grad_weight += grad_conv @ cols^T, and W^T @ grad_conv is scattered back through
// the windows (col2im, each input channel owned by one thread: no atomics, deterministic), then
// multiplied by M. Half types are packed and accumulated in float.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdlib>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include "../partial_conv2d.h"

namespace partialconv {
namespace {

// Packed elements (K x positions) per GEMM: about an L2 cache, so that the GEMM reads what the
// packing just wrote from cache, yet few enough chunks that the per-chunk thread wake-ups stay
// small.
constexpr int64_t kPackedElements = int64_t(1) << 18;
constexpr int64_t kMinPositionsPerGemm = 64;

// Inner parallel loops give each task at least this many iterations; small problems run inline
// instead of paying for a thread wake-up.
constexpr int64_t kMinWorkPerTask = int64_t(1) << 15;

int64_t grain(int64_t work_per_item) {
  return std::max<int64_t>(1, kMinWorkPerTask / std::max<int64_t>(work_per_item, 1));
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

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
};

// The saved scales of one mask image: ratio and update for its P output positions.
template <typename acc_t>
struct ImageScales {
  const acc_t* ratio;
  const acc_t* update;
};

template <typename acc_t>
ImageScales<acc_t> image_scales(const at::Tensor& mask_scales, int64_t nm, int64_t P) {
  const acc_t* image = mask_scales.const_data_ptr<acc_t>() + nm * 2 * P;
  return {image, image + P};
}

// Output positions ox_begin..ox_end-1 of output row oy.
struct Run {
  int64_t oy, ox_begin, ox_end;
  int64_t size() const { return ox_end - ox_begin; }
};

// The valid positions (U > 0) of one mask image as runs in raster order, and the hole runs.
struct PositionPlan {
  std::vector<Run> runs, holes;
};

template <typename acc_t>
PositionPlan plan_positions(ImageScales<acc_t> scales, const ConvGeometry& g) {
  PositionPlan plan;
  for (int64_t oy = 0; oy < g.out_height; ++oy) {
    const acc_t* update = scales.update + oy * g.out_width;
    for (int64_t ox = 0; ox < g.out_width;) {
      const bool valid = update[ox] > acc_t(0);
      int64_t end = ox + 1;
      while (end < g.out_width && (update[end] > acc_t(0)) == valid) ++end;
      (valid ? plan.runs : plan.holes).push_back({oy, ox, end});
      ox = end;
    }
  }
  return plan;
}

// The plans of every mask image (one when the mask is shared by the batch).
template <typename acc_t>
std::vector<PositionPlan> plan_all(const at::Tensor& mask_scales, const ConvGeometry& g) {
  std::vector<PositionPlan> plans(size_t(g.mask_batch));
  at::parallel_for(0, g.mask_batch, 1, [&](int64_t begin, int64_t end) {
    for (int64_t nm = begin; nm < end; ++nm)
      plans[size_t(nm)] = plan_positions(image_scales<acc_t>(mask_scales, nm, g.out_positions()), g);
  });
  return plans;
}

// Calls fn(pieces, count) for consecutive pieces of the plan's runs, at most `limit` positions a
// call.
template <typename Fn>
void for_each_chunk(const PositionPlan& plan, int64_t limit, const Fn& fn) {
  std::vector<Run> pieces;
  int64_t count = 0;
  for (Run run : plan.runs) {
    while (run.ox_begin < run.ox_end) {
      const int64_t take = std::min(run.size(), limit - count);
      pieces.push_back({run.oy, run.ox_begin, run.ox_begin + take});
      run.ox_begin += take;
      count += take;
      if (count == limit) {
        fn(pieces, count);
        pieces.clear();
        count = 0;
      }
    }
  }
  if (count > 0) fn(pieces, count);
}

int64_t positions_per_gemm(const ConvGeometry& g) {
  return std::max(kMinPositionsPerGemm, kPackedElements / g.reduction_size());
}

// [lo, hi): the part of [ox_begin, ox_end) whose input column ox * stride + offset lies in
// [0, width).
struct Span {
  int64_t lo, hi;
};

Span inside_span(const Run& piece, int64_t offset, int64_t stride, int64_t width) {
  int64_t lo = piece.ox_begin, hi = piece.ox_end;
  if (offset < 0) lo = std::min(hi, std::max(lo, ceil_div(-offset, stride)));
  if (width - 1 - offset < 0) return {lo, lo};
  return {lo, std::max(lo, std::min(hi, (width - 1 - offset) / stride + 1))};
}

// Window sums of one single-channel mask plane at every output position, separably: along x for
// every input row (into row_sums, H x W'), then along y. Taps in the padding add nothing.
template <typename acc_t, typename T>
void plane_window_sums(const T* plane, int64_t stride_h, int64_t stride_w, const ConvGeometry& g,
                       acc_t* row_sums, acc_t* sums) {
  at::parallel_for(0, g.in_height, grain(g.out_width * g.kernel_w), [&](int64_t begin, int64_t end) {
    for (int64_t iy = begin; iy < end; ++iy)
      for (int64_t ox = 0; ox < g.out_width; ++ox) {
        acc_t sum = acc_t(0);
        for (int64_t kx = 0; kx < g.kernel_w; ++kx) {
          const int64_t ix = input_coord<int64_t>(ox, kx, g.stride_w, g.pad_w, g.dilation_w);
          if (ix >= 0 && ix < g.in_width) sum += acc_t(plane[iy * stride_h + ix * stride_w]);
        }
        row_sums[iy * g.out_width + ox] = sum;
      }
  });
  at::parallel_for(0, g.out_height, grain(g.out_width * g.kernel_h), [&](int64_t begin, int64_t end) {
    for (int64_t oy = begin; oy < end; ++oy) {
      acc_t* out = sums + oy * g.out_width;
      std::fill(out, out + g.out_width, acc_t(0));
      for (int64_t ky = 0; ky < g.kernel_h; ++ky) {
        const int64_t iy = input_coord<int64_t>(oy, ky, g.stride_h, g.pad_h, g.dilation_h);
        if (iy < 0 || iy >= g.in_height) continue;
        const acc_t* row = row_sums + iy * g.out_width;
        for (int64_t ox = 0; ox < g.out_width; ++ox) out[ox] += row[ox];
      }
    }
  });
}

// Window sums S, and from them ratio and U, for every output position of every mask image. A
// multi-channel mask is first summed over its channels in one contiguous pass (the window sum of
// the channel sum is S), so the windows never walk the channel dimension. Without a mask S is the
// count of taps inside the image (window_mask_sum of a null mask).
template <typename scalar_t>
void compute_mask_scales(const at::Tensor& mask, const ConvGeometry& g, at::Tensor& mask_scales,
                         at::Tensor& updated_mask) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto acc_dtype = mask_scales.scalar_type();
  const int64_t P = g.out_positions();
  const at::Tensor sums = at::empty({g.mask_batch, P}, mask_scales.options());
  acc_t* sums_data = sums.data_ptr<acc_t>();
  if (mask.defined()) {
    const at::Tensor plane = g.multi_channel_mask() ? at::sum(mask, {1}, /*keepdim=*/true, acc_dtype) : mask;
    const at::Tensor row_sums = at::empty({g.in_height, g.out_width}, mask_scales.options());
    for (int64_t nm = 0; nm < g.mask_batch; ++nm) {
      if (g.multi_channel_mask())
        plane_window_sums(plane.const_data_ptr<acc_t>() + nm * plane.stride(0), plane.stride(2),
                          plane.stride(3), g, row_sums.data_ptr<acc_t>(), sums_data + nm * P);
      else
        plane_window_sums(plane.const_data_ptr<scalar_t>() + nm * plane.stride(0), plane.stride(2),
                          plane.stride(3), g, row_sums.data_ptr<acc_t>(), sums_data + nm * P);
    }
  } else {
    at::parallel_for(0, P, grain(g.taps()), [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p)
        sums_data[p] = window_mask_sum<acc_t, scalar_t, int64_t>(nullptr, 1, 0, 0, 0, g, p / g.out_width,
                                                                 p % g.out_width);
    });
  }
  acc_t* scales = mask_scales.mutable_data_ptr<acc_t>();
  scalar_t* update = updated_mask.mutable_data_ptr<scalar_t>();
  const acc_t window_size = acc_t(g.window_size());
  at::parallel_for(0, g.mask_batch * P, grain(4), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t p = i % P, nm = i / P;
      const MaskScale<acc_t> scale = mask_scale(sums_data[i], window_size);
      scales[(2 * nm) * P + p] = scale.ratio;
      scales[(2 * nm + 1) * P + p] = scale.update;
      update[i] = static_cast<scalar_t>(scale.update);
    }
  });
}


// dst[i] = X*M at input columns ix0 + i * step of one input row (M null: no mask), exactly 0 in
// holes. The contiguous case is a plain loop g++ vectorises (with -fno-trapping-math).
template <typename scalar_t, typename acc_t>
void gather_masked_row(const scalar_t* x_row, int64_t x_stride, const scalar_t* m_row,
                       int64_t m_stride, int64_t ix0, int64_t step, int64_t count, acc_t* dst) {
  if (step == 1 && x_stride == 1 && (m_row == nullptr || m_stride == 1)) {
    const scalar_t* x = x_row + ix0;
    if (m_row != nullptr) {
      const scalar_t* m = m_row + ix0;
      for (int64_t i = 0; i < count; ++i) dst[i] = masked_value(acc_t(x[i]), acc_t(m[i]));
    } else {
      for (int64_t i = 0; i < count; ++i) dst[i] = acc_t(x[i]);
    }
    return;
  }
  for (int64_t i = 0; i < count; ++i) {
    const int64_t ix = ix0 + i * step;
    const acc_t v = acc_t(x_row[ix * x_stride]);
    dst[i] = m_row != nullptr ? masked_value(v, acc_t(m_row[ix * m_stride])) : v;
  }
}

// cols[k][j]: the masked input at tap k = (ci, ky, kx) of the group for the j-th position of the
// pieces; zero in the padding and in holes. Input rows are read as spans, not element by element.
template <typename scalar_t, typename acc_t>
void pack_columns(const Strided4d<const scalar_t>& x, const Strided4d<const scalar_t>& m,
                  const ConvGeometry& g, int64_t n, int64_t nm, int64_t group,
                  const std::vector<Run>& pieces, int64_t count, acc_t* cols) {
  const int64_t taps = g.taps(), cin_g = g.in_channels_per_group();
  at::parallel_for(0, cin_g * taps, grain(count), [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const int64_t c = group * cin_g + k / taps;
      const int64_t ky = (k % taps) / g.kernel_w, kx = k % g.kernel_w;
      const int64_t offset = kx * g.dilation_w - g.pad_w;  // input column = ox * stride + offset
      acc_t* out = cols + k * count;
      for (const Run& piece : pieces) {
        const int64_t iy = input_coord<int64_t>(piece.oy, ky, g.stride_h, g.pad_h, g.dilation_h);
        const Span span = iy < 0 || iy >= g.in_height ? Span{piece.ox_end, piece.ox_end}
                                                      : inside_span(piece, offset, g.stride_w, g.in_width);
        acc_t* dst = out + (span.lo - piece.ox_begin);
        std::fill(out, dst, acc_t(0));
        if (span.hi > span.lo)
          gather_masked_row(&x(n, c, iy, 0), x.s3,
                            m.data ? &m(nm, g.multi_channel_mask() ? c : 0, iy, 0) : nullptr, m.s3,
                            span.lo * g.stride_w + offset, g.stride_w, span.hi - span.lo, dst);
        std::fill(dst + (span.hi - span.lo), out + piece.size(), acc_t(0));
        out += piece.size();
      }
    }
  });
}

// Calls f(std::integral_constant<Activation, act>{}) for the runtime activation, so that the
// per-element loops below see it as a constant and vectorise.
template <typename F>
void with_activation(Activation act, F&& f) {
  switch (act) {
    case Activation::kNone: return f(std::integral_constant<Activation, Activation::kNone>{});
    case Activation::kRelu: return f(std::integral_constant<Activation, Activation::kRelu>{});
    case Activation::kLeakyRelu: return f(std::integral_constant<Activation, Activation::kLeakyRelu>{});
  }
}

// out[i * out_stride] = partial_conv_output(conv[i], {ratio[i], update[i]}, bias), i < count; the
// unit stride has its own loop.
template <Activation act, typename scalar_t, typename acc_t>
void write_output_row(const acc_t* conv, const acc_t* ratio, const acc_t* update, acc_t bias,
                      acc_t slope, scalar_t* out, int64_t out_stride, int64_t count) {
  const auto value = [&](int64_t i) {
    return static_cast<scalar_t>(partial_conv_output(conv[i], MaskScale<acc_t>{ratio[i], update[i]}, bias, act, slope));
  };
  if (out_stride == 1) {
    for (int64_t i = 0; i < count; ++i) out[i] = value(i);
  } else {
    for (int64_t i = 0; i < count; ++i) out[i * out_stride] = value(i);
  }
}

// grad_conv[i] = dL/dconv at count positions of one output row, from the incoming gradient and
// the output (read only for an activation); returns the row's dL/dbias.
template <Activation act, typename scalar_t, typename acc_t>
acc_t scale_output_grad_row(const scalar_t* grad, int64_t grad_stride, const scalar_t* out,
                            int64_t out_stride, const acc_t* ratio, const acc_t* update, acc_t slope,
                            acc_t* grad_conv, int64_t count) {
  acc_t bias_sum = acc_t(0);
  for (int64_t i = 0; i < count; ++i) {
    const OutputGrad<acc_t> og = partial_conv_output_grad(
        acc_t(grad[i * grad_stride]), out ? acc_t(out[i * out_stride]) : acc_t(0),
        MaskScale<acc_t>{ratio[i], update[i]}, act, slope);
    grad_conv[i] = og.conv;
    bias_sum += og.bias;
  }
  return bias_sum;
}

// grad_input of image n = M * grad_image (d(X*M)/dX = M; a hole gets exactly 0). grad_image is
// left zeroed for the next image.
template <typename scalar_t, typename acc_t>
void write_masked_grad_input(acc_t* grad_image, const Strided4d<const scalar_t>& m,
                             const Strided4d<scalar_t>& gin, const ConvGeometry& g, int64_t n,
                             int64_t nm) {
  at::parallel_for(0, g.in_channels, grain(g.in_height * g.in_width), [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      acc_t* plane = grad_image + c * g.in_height * g.in_width;
      const int64_t mc = g.multi_channel_mask() ? c : 0;
      for (int64_t iy = 0; iy < g.in_height; ++iy)
        for (int64_t ix = 0; ix < g.in_width; ++ix) {
          acc_t& v = plane[iy * g.in_width + ix];
          gin(n, c, iy, ix) = static_cast<scalar_t>(m.data ? masked_value(v, acc_t(m(nm, mc, iy, ix))) : v);
          v = acc_t(0);
        }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Packed path: only the positions whose window sees a valid pixel, im2col-packed chunk by chunk
// and multiplied by the weight (GEMM through ATen).

// A (rows x cols) contiguous matrix over the first rows*cols elements of a scratch buffer.
at::Tensor scratch_matrix(const at::Tensor& buffer, int64_t rows, int64_t cols) {
  return buffer.narrow(0, 0, rows * cols).view({rows, cols});
}

template <typename scalar_t>
void forward_packed(const at::Tensor& input, const at::Tensor& mask, const at::Tensor& weight,
                    const at::Tensor& bias, const ForwardProblem& problem, at::Tensor& output,
                    const at::Tensor& mask_scales) {
  using acc_t = at::opmath_type<scalar_t>;
  const ConvGeometry& g = problem.geometry;
  const int64_t P = g.out_positions(), K = g.reduction_size();
  const int64_t cout_g = g.out_channels_per_group();
  const auto acc_options = input.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  const at::Tensor w = weight.to(acc_options.dtype()).contiguous().view({g.out_channels, K});
  const at::Tensor b = bias.defined() ? bias.to(acc_options.dtype()).contiguous() : at::Tensor();
  const acc_t* bias_data = b.defined() ? b.const_data_ptr<acc_t>() : nullptr;
  const Strided4d<const scalar_t> x(input), m(mask);
  const Strided4d<scalar_t> out(output);
  const acc_t slope = acc_t(problem.negative_slope);
  const std::vector<PositionPlan> plans = plan_all<acc_t>(mask_scales, g);
  const int64_t limit = positions_per_gemm(g);
  const at::Tensor cols_buffer = at::empty({K * limit}, acc_options);
  const at::Tensor conv_buffer = at::empty({cout_g * limit}, acc_options);

  for (int64_t n = 0; n < g.batch; ++n) {
    const int64_t nm = g.mask_batch == 1 ? 0 : n;
    const ImageScales<acc_t> scales = image_scales<acc_t>(mask_scales, nm, P);
    for_each_chunk(plans[size_t(nm)], limit, [&](const std::vector<Run>& chunk, int64_t count) {
      at::Tensor cols = scratch_matrix(cols_buffer, K, count);
      at::Tensor conv = scratch_matrix(conv_buffer, cout_g, count);
      for (int64_t group = 0; group < g.groups; ++group) {
        pack_columns<scalar_t, acc_t>(x, m, g, n, nm, group, chunk, count, cols.data_ptr<acc_t>());
        at::mm_out(conv, w.narrow(0, group * cout_g, cout_g), cols);
        const acc_t* conv_data = conv.const_data_ptr<acc_t>();
        at::parallel_for(0, cout_g, grain(count), [&](int64_t begin, int64_t end) {
          for (int64_t co = begin; co < end; ++co) {
            const int64_t c = group * cout_g + co;
            const acc_t bias_c = bias_data ? bias_data[c] : acc_t(0);
            const acc_t* conv_row = conv_data + co * count;
            for (const Run& piece : chunk) {
              const int64_t p0 = piece.oy * g.out_width + piece.ox_begin;
              with_activation(problem.activation, [&](auto act) {
                write_output_row<decltype(act)::value>(conv_row, scales.ratio + p0, scales.update + p0, bias_c, slope,
                                            &out(n, c, piece.oy, piece.ox_begin), out.s3, piece.size());
              });
              conv_row += piece.size();
            }
          }
        });
      }
    });
  }

  // Windows without a valid pixel: output 0, no matrix work.
  at::parallel_for(0, g.batch * g.out_channels, grain(P), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t n = i / g.out_channels, c = i % g.out_channels;
      for (const Run& hole : plans[size_t(g.mask_batch == 1 ? 0 : n)].holes)
        for (int64_t ox = hole.ox_begin; ox < hole.ox_end; ++ox) out(n, c, hole.oy, ox) = scalar_t(0);
    }
  });
}

template <typename scalar_t>
void backward_packed(const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& mask,
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
  const at::Tensor w = weight.to(acc_options.dtype()).contiguous().view({g.out_channels, K});
  at::Tensor grad_weight_acc = at::zeros({need_weight ? g.out_channels : 0, K}, acc_options);
  at::Tensor grad_bias_acc = at::zeros({g.out_channels}, acc_options);
  // grad_input of one image before the multiplication by M.
  at::Tensor grad_image = at::zeros({need_input ? g.in_channels : 0, g.in_height, g.in_width}, acc_options);
  const int64_t limit = positions_per_gemm(g);
  const at::Tensor grad_conv_buffer = at::empty({cout_g * limit}, acc_options);
  const at::Tensor cols_buffer = at::empty({need_weight ? K * limit : 0}, acc_options);
  const at::Tensor grad_cols_buffer = at::empty({need_input ? K * limit : 0}, acc_options);

  const Strided4d<const scalar_t> x(input), m(mask), gout(grad_output), z(output);
  const Strided4d<scalar_t> gin(grad_input);
  acc_t* grad_bias_data = grad_bias_acc.data_ptr<acc_t>();
  acc_t* grad_image_data = grad_image.data_ptr<acc_t>();
  const acc_t slope = acc_t(problem.negative_slope);
  const std::vector<PositionPlan> plans = plan_all<acc_t>(mask_scales, g);

  for (int64_t n = 0; n < g.batch; ++n) {
    const int64_t nm = g.mask_batch == 1 ? 0 : n;
    const ImageScales<acc_t> scales = image_scales<acc_t>(mask_scales, nm, P);
    // Positions whose window is all holes have a zero gradient scale: skipped as in forward.
    for_each_chunk(plans[size_t(nm)], limit, [&](const std::vector<Run>& chunk, int64_t count) {
      at::Tensor grad_conv = scratch_matrix(grad_conv_buffer, cout_g, count);
      acc_t* grad_conv_data = grad_conv.data_ptr<acc_t>();
      for (int64_t group = 0; group < g.groups; ++group) {
        // Each output channel is owned by one thread: its bias sum needs no atomics.
        at::parallel_for(0, cout_g, grain(count), [&](int64_t begin, int64_t end) {
          for (int64_t co = begin; co < end; ++co) {
            const int64_t c = group * cout_g + co;
            acc_t* grad_conv_row = grad_conv_data + co * count;
            acc_t bias_sum = acc_t(0);
            for (const Run& piece : chunk) {
              const int64_t p0 = piece.oy * g.out_width + piece.ox_begin;
              with_activation(problem.activation, [&](auto act) {
                bias_sum += scale_output_grad_row<decltype(act)::value>(
                    &gout(n, c, piece.oy, piece.ox_begin), gout.s3,
                    z.data ? &z(n, c, piece.oy, piece.ox_begin) : nullptr, z.s3, scales.ratio + p0,
                    scales.update + p0, slope, grad_conv_row, piece.size());
              });
              grad_conv_row += piece.size();
            }
            grad_bias_data[c] += bias_sum;
          }
        });
        if (need_weight) {
          at::Tensor cols = scratch_matrix(cols_buffer, K, count);
          pack_columns<scalar_t, acc_t>(x, m, g, n, nm, group, chunk, count, cols.data_ptr<acc_t>());
          grad_weight_acc.narrow(0, group * cout_g, cout_g).addmm_(grad_conv, cols.t());
        }
        if (need_input) {
          at::Tensor grad_cols = scratch_matrix(grad_cols_buffer, K, count);
          at::mm_out(grad_cols, w.narrow(0, group * cout_g, cout_g).t(), grad_conv);
          const acc_t* grad_cols_data = grad_cols.const_data_ptr<acc_t>();
          // col2im: each input channel is owned by one thread, so the sums need no atomics.
          at::parallel_for(0, cin_g, grain(taps * count), [&](int64_t begin, int64_t end) {
            for (int64_t ci = begin; ci < end; ++ci) {
              acc_t* plane = grad_image_data + (group * cin_g + ci) * g.in_height * g.in_width;
              for (int64_t t = 0; t < taps; ++t) {
                const int64_t ky = t / g.kernel_w, kx = t % g.kernel_w;
                const int64_t offset = kx * g.dilation_w - g.pad_w;
                const acc_t* row = grad_cols_data + (ci * taps + t) * count;
                for (const Run& piece : chunk) {
                  const int64_t iy = input_coord<int64_t>(piece.oy, ky, g.stride_h, g.pad_h, g.dilation_h);
                  if (iy >= 0 && iy < g.in_height) {
                    const Span span = inside_span(piece, offset, g.stride_w, g.in_width);
                    acc_t* plane_row = plane + iy * g.in_width;
                    for (int64_t ox = span.lo; ox < span.hi; ++ox)
                      plane_row[ox * g.stride_w + offset] += row[ox - piece.ox_begin];
                  }
                  row += piece.size();
                }
              }
            }
          });
        }
      }
    });
    if (need_input) write_masked_grad_input(grad_image_data, m, gin, g, n, nm);
  }
  if (need_weight) grad_weight.copy_(grad_weight_acc.view(weight.sizes()));
  if (need_bias) grad_bias.copy_(grad_bias_acc);
}

// ---------------------------------------------------------------------------------------------
// Dense path: bands of output rows. Each band's input rows are copied once with the mask applied
// (a band at a time: X*M never exists as a whole tensor) and fed to ATen's convolution (oneDNN),
// whose direct convolution reads each input once instead of kh*kw times as the packed columns
// do; the epilogue then applies ratio, bias, U and activation. Output rows without a valid
// position skip the convolution.

// Elements of one band's masked input copy.
constexpr int64_t kBandElements = int64_t(1) << 21;

// The input rows a band of output rows reads: `count` rows from `first` are copied (rows outside
// the image as zeros), and `pad` more zero rows on either side are left to the convolution's own
// padding. The padding both sides share is passed on rather than copied, so that a band covering
// the whole image is the very convolution that conv2d would run (oneDNN's choice of algorithm
// depends on the shape: dec7's 1024->512 3x3 at 4x4 ran 1.7x slower with explicit zero rows).
struct RowSpan {
  int64_t first, count, pad;
};

RowSpan input_rows(const ConvGeometry& g, int64_t oy_begin, int64_t oy_end) {
  const int64_t first = oy_begin * g.stride_h - g.pad_h;
  const int64_t count = (oy_end - oy_begin - 1) * g.stride_h + g.dilation_h * (g.kernel_h - 1) + 1;
  const int64_t pad = std::max<int64_t>(0, std::min(-first, first + count - g.in_height));
  return {first + pad, count - 2 * pad, pad};
}

// Output rows [begin, end) of one image processed together.
struct Band {
  int64_t begin, end;
};

// Output rows per band: about kBandElements of masked input copy.
int64_t most_band_rows(const ConvGeometry& g) {
  return std::min(g.out_height, std::max<int64_t>(1, kBandElements / (g.in_channels * g.in_width * g.stride_h)));
}

// Elements of the largest band's masked input copy.
int64_t band_buffer_elements(const ConvGeometry& g) {
  const int64_t rows = most_band_rows(g);
  return g.in_channels * g.in_width * ((rows - 1) * g.stride_h + g.dilation_h * (g.kernel_h - 1) + 1);
}

// Runs of output rows holding a valid position, split to at most most_band_rows() each.
template <typename acc_t>
std::vector<Band> plan_bands(ImageScales<acc_t> scales, const ConvGeometry& g) {
  const int64_t most = most_band_rows(g);
  std::vector<Band> bands;
  for (int64_t oy = 0; oy < g.out_height; ++oy) {
    const acc_t* update = scales.update + oy * g.out_width;
    if (std::none_of(update, update + g.out_width, [](acc_t u) { return u > acc_t(0); })) continue;
    if (!bands.empty() && bands.back().end == oy && oy - bands.back().begin < most)
      bands.back().end = oy + 1;
    else
      bands.push_back({oy, oy + 1});
  }
  return bands;
}

// The band's masked input rows as a (1, C_in, rows, W) tensor of acc_t.
template <typename scalar_t, typename acc_t>
at::Tensor masked_band(const Strided4d<const scalar_t>& x, const Strided4d<const scalar_t>& m,
                       const ConvGeometry& g, int64_t n, int64_t nm, RowSpan rows,
                       const at::Tensor& buffer) {
  at::Tensor band = buffer.narrow(0, 0, g.in_channels * rows.count * g.in_width)
                        .view({1, g.in_channels, rows.count, g.in_width});
  acc_t* data = band.data_ptr<acc_t>();
  at::parallel_for(0, g.in_channels * rows.count, grain(g.in_width), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t c = i / rows.count, iy = rows.first + i % rows.count;
      acc_t* dst = data + i * g.in_width;
      if (iy < 0 || iy >= g.in_height) {
        std::fill(dst, dst + g.in_width, acc_t(0));
        continue;
      }
      gather_masked_row(&x(n, c, iy, 0), x.s3,
                        m.data ? &m(nm, g.multi_channel_mask() ? c : 0, iy, 0) : nullptr, m.s3,
                        0, 1, g.in_width, dst);
    }
  });
  return band;
}

// Writes zeros to the output rows no band covers.
template <typename scalar_t>
void zero_uncovered_rows(const Strided4d<scalar_t>& out, const ConvGeometry& g, int64_t n,
                         const std::vector<Band>& bands) {
  std::vector<char> covered(size_t(g.out_height), 0);
  for (const Band& band : bands) std::fill(covered.begin() + band.begin, covered.begin() + band.end, 1);
  at::parallel_for(0, g.out_channels, grain(g.out_positions()), [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c)
      for (int64_t oy = 0; oy < g.out_height; ++oy)
        if (!covered[size_t(oy)])
          for (int64_t ox = 0; ox < g.out_width; ++ox) out(n, c, oy, ox) = scalar_t(0);
  });
}

template <typename scalar_t>
void forward_bands(const at::Tensor& input, const at::Tensor& mask, const at::Tensor& weight,
                   const at::Tensor& bias, const ForwardProblem& problem, at::Tensor& output,
                   const at::Tensor& mask_scales) {
  using acc_t = at::opmath_type<scalar_t>;
  const ConvGeometry& g = problem.geometry;
  const int64_t P = g.out_positions();
  const auto acc_options = input.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  const at::Tensor w = weight.to(acc_options.dtype()).contiguous();
  const at::Tensor b = bias.defined() ? bias.to(acc_options.dtype()).contiguous() : at::Tensor();
  const acc_t* bias_data = b.defined() ? b.const_data_ptr<acc_t>() : nullptr;
  const Strided4d<const scalar_t> x(input), m(mask);
  const Strided4d<scalar_t> out(output);
  const acc_t slope = acc_t(problem.negative_slope);
  const at::Tensor buffer = at::empty({band_buffer_elements(g)}, acc_options);
  const int64_t stride[2] = {g.stride_h, g.stride_w};
  const int64_t dilation[2] = {g.dilation_h, g.dilation_w};

  std::vector<Band> bands;
  for (int64_t n = 0; n < g.batch; ++n) {
    const int64_t nm = g.mask_batch == 1 ? 0 : n;
    const ImageScales<acc_t> scales = image_scales<acc_t>(mask_scales, nm, P);
    if (n == 0 || nm != 0) bands = plan_bands(scales, g);
    for (const Band& band : bands) {
      const RowSpan rows = input_rows(g, band.begin, band.end);
      const int64_t padding[2] = {rows.pad, g.pad_w};
      const at::Tensor conv = at::conv2d(masked_band<scalar_t, acc_t>(x, m, g, n, nm, rows, buffer), w,
                                         {}, stride, padding, dilation, g.groups);
      const acc_t* conv_data = conv.const_data_ptr<acc_t>();
      const int64_t band_rows = band.end - band.begin;
      at::parallel_for(0, g.out_channels * band_rows, grain(g.out_width), [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          const int64_t c = i / band_rows, oy = band.begin + i % band_rows;
          const acc_t bias_c = bias_data ? bias_data[c] : acc_t(0);
          const acc_t* conv_row = conv_data + i * g.out_width;
          with_activation(problem.activation, [&](auto act) {
            write_output_row<decltype(act)::value>(conv_row, scales.ratio + oy * g.out_width, scales.update + oy * g.out_width,
                                        bias_c, slope, &out(n, c, oy, 0), out.s3, g.out_width);
          });
        }
      });
    }
    zero_uncovered_rows(out, g, n, bands);
  }
}

template <typename scalar_t>
void backward_bands(const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& mask,
                    const at::Tensor& weight, const at::Tensor& output,
                    const at::Tensor& mask_scales, const ForwardProblem& problem,
                    std::array<bool, 3> output_mask, at::Tensor& grad_input,
                    at::Tensor& grad_weight, at::Tensor& grad_bias) {
  using acc_t = at::opmath_type<scalar_t>;
  const ConvGeometry& g = problem.geometry;
  const auto [need_input, need_weight, need_bias] = output_mask;
  const int64_t P = g.out_positions();
  const auto acc_options = input.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  const at::Tensor w = weight.to(acc_options.dtype()).contiguous();
  // The bands' weight gradients summed: the first band's own tensor, the later ones added to it
  // (no zero-filled accumulator: the deep layers' weights are megabytes and their images tiny).
  at::Tensor grad_weight_sum;
  at::Tensor grad_bias_acc = at::zeros({g.out_channels}, acc_options);
  // grad_input of one image before the multiplication by M.
  at::Tensor grad_image = at::zeros({need_input ? g.in_channels : 0, g.in_height, g.in_width}, acc_options);
  const at::Tensor buffer = at::empty({band_buffer_elements(g)}, acc_options);
  const at::Tensor grad_conv_buffer = at::empty({g.out_channels * most_band_rows(g) * g.out_width}, acc_options);
  const Strided4d<const scalar_t> x(input), m(mask), gout(grad_output), z(output);
  const Strided4d<scalar_t> gin(grad_input);
  acc_t* grad_bias_data = grad_bias_acc.data_ptr<acc_t>();
  const acc_t slope = acc_t(problem.negative_slope);
  const int64_t stride[2] = {g.stride_h, g.stride_w};
  const int64_t dilation[2] = {g.dilation_h, g.dilation_w}, no_output_padding[2] = {0, 0};

  std::vector<Band> bands;
  for (int64_t n = 0; n < g.batch; ++n) {
    const int64_t nm = g.mask_batch == 1 ? 0 : n;
    const ImageScales<acc_t> scales = image_scales<acc_t>(mask_scales, nm, P);
    // Rows without a valid position have a zero gradient scale: skipped as in forward.
    if (n == 0 || nm != 0) bands = plan_bands(scales, g);
    for (const Band& band : bands) {
      const int64_t band_rows = band.end - band.begin;
      const RowSpan rows = input_rows(g, band.begin, band.end);
      at::Tensor grad_conv = grad_conv_buffer.narrow(0, 0, g.out_channels * band_rows * g.out_width)
                                 .view({1, g.out_channels, band_rows, g.out_width});
      acc_t* grad_conv_data = grad_conv.data_ptr<acc_t>();
      // Each output channel is owned by one thread: its bias sum needs no atomics.
      at::parallel_for(0, g.out_channels, grain(band_rows * g.out_width), [&](int64_t begin, int64_t end) {
        for (int64_t c = begin; c < end; ++c) {
          acc_t bias_sum = acc_t(0);
          for (int64_t oy = band.begin; oy < band.end; ++oy)
            with_activation(problem.activation, [&](auto act) {
              bias_sum += scale_output_grad_row<decltype(act)::value>(
                  &gout(n, c, oy, 0), gout.s3, z.data ? &z(n, c, oy, 0) : nullptr, z.s3,
                  scales.ratio + oy * g.out_width, scales.update + oy * g.out_width, slope,
                  grad_conv_data + (c * band_rows + oy - band.begin) * g.out_width, g.out_width);
            });
          grad_bias_data[c] += bias_sum;
        }
      });
      if (!need_input && !need_weight) continue;
      // The band's masked input feeds grad_weight; grad_input only needs its shape.
      const at::Tensor band_input =
          need_weight ? masked_band<scalar_t, acc_t>(x, m, g, n, nm, rows, buffer)
                      : buffer.narrow(0, 0, g.in_channels * rows.count * g.in_width)
                            .view({1, g.in_channels, rows.count, g.in_width});
      const int64_t padding[2] = {rows.pad, g.pad_w};
      const auto [band_grad_input, band_grad_weight, unused] = at::convolution_backward(
          grad_conv, band_input, w, std::nullopt, stride, padding, dilation, false,
          no_output_padding, g.groups, {need_input, need_weight, false});
      if (need_weight) {
        if (grad_weight_sum.defined())
          grad_weight_sum.add_(band_grad_weight);
        else
          grad_weight_sum = band_grad_weight;
      }
      if (need_input) {
        // Add the band's rows that lie inside the image.
        const int64_t first = std::max<int64_t>(rows.first, 0);
        const int64_t last = std::min(rows.first + rows.count, g.in_height);
        if (last > first)
          grad_image.narrow(1, first, last - first)
              .add_(band_grad_input[0].narrow(1, first - rows.first, last - first));
      }
    }
    if (need_input) write_masked_grad_input(grad_image.data_ptr<acc_t>(), m, gin, g, n, nm);
  }
  if (need_weight) {
    if (!grad_weight_sum.defined())  // no band: every output position is a hole
      grad_weight.zero_();
    else if (grad_weight_sum.scalar_type() == grad_weight.scalar_type() && grad_weight_sum.is_contiguous())
      grad_weight = grad_weight_sum;  // hand the sum over instead of copying it
    else
      grad_weight.copy_(grad_weight_sum);
  }
  if (need_bias) grad_bias.copy_(grad_bias_acc);
}

// ---------------------------------------------------------------------------------------------
// Which path a call takes.

// Below these fractions of output positions with a valid pixel in their window, the packed path
// (which skips every such position, at a higher cost per position) beats the dense path (which
// skips only rows without one). Measured on 2 AMD EPYC cores, float32, enc2 and dec2 of PConvUNet
// with irregular masks, by `python -m bench.cpu_paths`; see bench/NOTES.md.
constexpr double kForwardPackedBelowValidFraction = 0.25;
constexpr double kBackwardPackedBelowValidFraction = 0.3;

enum class CpuPath { kDenseBands, kPackedPositions };
enum class Pass { kForward, kBackward };

const char* path_name(CpuPath path) {
  return path == CpuPath::kDenseBands ? "dense bands through ATen's convolution"
                                      : "packed positions (im2col of valid positions only) and GEMM";
}

template <typename acc_t>
double valid_fraction(const at::Tensor& mask_scales, const ConvGeometry& g) {
  const int64_t P = g.out_positions();
  int64_t valid = 0;
  for (int64_t nm = 0; nm < g.mask_batch; ++nm) {
    const acc_t* update = image_scales<acc_t>(mask_scales, nm, P).update;
    valid += std::count_if(update, update + P, [](acc_t u) { return u > acc_t(0); });
  }
  return g.mask_batch * P == 0 ? 1.0 : double(valid) / double(g.mask_batch * P);
}

// PARTIALCONV_CPU_PATH=dense or packed forces a path (tests run both); otherwise the valid
// fraction decides.
CpuPath choose_path(double valid, Pass pass) {
  const char* forced = std::getenv("PARTIALCONV_CPU_PATH");
  if (forced != nullptr && std::string_view(forced) == "dense") return CpuPath::kDenseBands;
  if (forced != nullptr && std::string_view(forced) == "packed") return CpuPath::kPackedPositions;
  TORCH_CHECK_VALUE(forced == nullptr || *forced == '\0' || std::string_view(forced) == "auto",
                    "PARTIALCONV_CPU_PATH must be 'auto', 'dense' or 'packed', got '", forced, "'");
  const double threshold =
      pass == Pass::kForward ? kForwardPackedBelowValidFraction : kBackwardPackedBelowValidFraction;
  return valid < threshold ? CpuPath::kPackedPositions : CpuPath::kDenseBands;
}

std::string forward_path_cpu(const at::Tensor& input, const std::optional<at::Tensor>& mask,
                             const at::Tensor& weight, at::IntArrayRef stride,
                             at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  const ForwardProblem problem = check_forward_args(input, mask, weight, std::nullopt, stride,
                                                    padding, dilation, groups, "none", 0.0);
  auto [output, updated_mask, mask_scales] = allocate_forward_outputs(input, problem.geometry);
  double valid = 1.0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "forward_path_cpu", [&] {
    compute_mask_scales<scalar_t>(mask.value_or(at::Tensor()), problem.geometry, mask_scales, updated_mask);
    valid = valid_fraction<at::opmath_type<scalar_t>>(mask_scales, problem.geometry);
  });
  const char* forced = std::getenv("PARTIALCONV_CPU_PATH");
  const bool is_forced = forced != nullptr && *forced != '\0' && std::string_view(forced) != "auto";
  return c10::str("cpu: ", path_name(choose_path(valid, Pass::kForward)),
                  " (backward: ", path_name(choose_path(valid, Pass::kBackward)), "; ",
                  is_forced ? c10::str("forced by PARTIALCONV_CPU_PATH=", forced)
                            : c10::str(int64_t(valid * 1000) / 10.0, "% of output positions see a valid pixel; ",
                                       "the packed path is taken below ", kForwardPackedBelowValidFraction * 100,
                                       "% forward, ", kBackwardPackedBelowValidFraction * 100, "% backward"),
                  ")");
}

template <typename scalar_t>
void forward_kernel(const at::Tensor& input, const at::Tensor& mask, const at::Tensor& weight,
                    const at::Tensor& bias, const ForwardProblem& problem, at::Tensor& output,
                    at::Tensor& updated_mask, at::Tensor& mask_scales) {
  using acc_t = at::opmath_type<scalar_t>;
  compute_mask_scales<scalar_t>(mask, problem.geometry, mask_scales, updated_mask);
  if (output.numel() == 0) return;
  if (choose_path(valid_fraction<acc_t>(mask_scales, problem.geometry), Pass::kForward) == CpuPath::kDenseBands)
    forward_bands<scalar_t>(input, mask, weight, bias, problem, output, mask_scales);
  else
    forward_packed<scalar_t>(input, mask, weight, bias, problem, output, mask_scales);
}

template <typename scalar_t>
void backward_kernel(const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& mask,
                     const at::Tensor& weight, const at::Tensor& output,
                     const at::Tensor& mask_scales, const ForwardProblem& problem,
                     std::array<bool, 3> output_mask, at::Tensor& grad_input,
                     at::Tensor& grad_weight, at::Tensor& grad_bias) {
  using acc_t = at::opmath_type<scalar_t>;
  if (choose_path(valid_fraction<acc_t>(mask_scales, problem.geometry), Pass::kBackward) == CpuPath::kDenseBands)
    backward_bands<scalar_t>(grad_output, input, mask, weight, output, mask_scales, problem,
                             output_mask, grad_input, grad_weight, grad_bias);
  else
    backward_packed<scalar_t>(grad_output, input, mask, weight, output, mask_scales, problem,
                              output_mask, grad_input, grad_weight, grad_bias);
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
  m.impl("forward_path", TORCH_FN(forward_path_cpu));
}

}  // namespace partialconv
