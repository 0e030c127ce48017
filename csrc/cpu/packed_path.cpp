// Packed path: the output positions whose window sees a valid pixel are described as runs along
// output lines. Chunk by chunk (about an L2 cache's worth), their inputs are packed im2col-style
// with the mask applied (X*M never exists as a tensor; holes give exact zeros even under NaN
// input), multiplied by the weight in one GEMM (MKL/oneDNN through ATen, multithreaded), and one
// epilogue applies ratio, bias, mask update and activation. Positions whose window is all holes
// do no matrix work and are written as zeros.
//
// Backward reuses the runs and the packing: grad_conv = grad_out * act' * ratio * U is gathered
// per chunk, grad_weight += grad_conv @ cols^T, and W^T @ grad_conv is scattered back through
// the windows (col2im, each input channel owned by one thread: no atomics, deterministic), then
// multiplied by M. Half types are packed and accumulated in float. A chunk of at most
// kFewPositions positions (the deepest layers' whole image) runs its GEMMs through our own
// kernels (few_positions_gemm.h), which stream the weight once; ATen's GEMMs run the others.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "cpu_common.h"
#include "few_positions_gemm.h"
#include "paths.h"

namespace partialconv {
namespace cpu {
namespace {

// Packed elements (K x positions) per GEMM: about an L2 cache, so that the GEMM reads what the
// packing just wrote from cache, yet few enough chunks that the per-chunk thread wake-ups stay
// small.
constexpr int64_t kPackedElements = int64_t(1) << 18;
constexpr int64_t kMinPositionsPerGemm = 64;

// Output positions ox_begin..ox_end-1 of output line `line` (= od * H' + oy).
struct Run {
  int64_t line, ox_begin, ox_end;
  int64_t size() const { return ox_end - ox_begin; }
};

// The positions of one mask image that are not holes, as runs in raster order, and the hole runs.
struct PositionPlan {
  std::vector<Run> runs, holes;
};

template <typename acc_t>
PositionPlan plan_positions(ImageScales<acc_t> scales, const ConvGeometry& g) {
  PositionPlan plan;
  const int64_t width = g.out_size[2];
  for (int64_t line = 0; line < g.out_size[0] * g.out_size[1]; ++line) {
    for (int64_t ox = 0; ox < width;) {
      const bool valid = !scales.is_hole(line * width + ox);
      int64_t end = ox + 1;
      while (end < width && !scales.is_hole(line * width + end) == valid) ++end;
      (valid ? plan.runs : plan.holes).push_back({line, ox, end});
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
      plans[size_t(nm)] = plan_positions(image_scales<acc_t>(mask_scales, g, nm), g);
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
      pieces.push_back({run.line, run.ox_begin, run.ox_begin + take});
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
  return std::max(kMinPositionsPerGemm, kPackedElements / std::max<int64_t>(1, g.reduction_size()));
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

// A kernel tap (kd, ky, kx) from its index t in [0, taps).
struct Tap {
  int64_t kd, ky, kx;
};

Tap tap_of(int64_t t, const ConvGeometry& g) {
  return {t / (g.kernel[1] * g.kernel[2]), t / g.kernel[2] % g.kernel[1], t % g.kernel[2]};
}

// The input line (id, iy) that tap (kd, ky) of output line `line` reads; false if it lies in the
// padding.
bool input_line(const ConvGeometry& g, int64_t line, const Tap& tap, int64_t& id, int64_t& iy) {
  id = input_coord<int64_t>(line / g.out_size[1], tap.kd, g.stride[0], g.pad[0], g.dilation[0]);
  iy = input_coord<int64_t>(line % g.out_size[1], tap.ky, g.stride[1], g.pad[1], g.dilation[1]);
  return id >= 0 && id < g.in_size[0] && iy >= 0 && iy < g.in_size[1];
}

// cols[k][j]: the masked input at k = (ci, kd, ky, kx) of the group for the j-th position of the
// pieces; zero in the padding and in holes. Input lines are read as spans, not element by element.
template <typename scalar_t, typename acc_t>
void pack_columns(const StridedTensor<const scalar_t>& x, const StridedTensor<const scalar_t>& m,
                  const ConvGeometry& g, int64_t n, int64_t group, const std::vector<Run>& pieces,
                  int64_t count, acc_t* cols) {
  const int64_t taps = g.taps(), cin_g = g.in_channels_per_group();
  at::parallel_for(0, cin_g * taps, grain(count), [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const int64_t c = group * cin_g + k / taps;
      const Tap tap = tap_of(k % taps, g);
      const int64_t offset = tap.kx * g.dilation[2] - g.pad[2];  // input column = ox * stride + offset
      acc_t* out = cols + k * count;
      for (const Run& piece : pieces) {
        int64_t id, iy;
        const Span span = input_line(g, piece.line, tap, id, iy)
                              ? inside_span(piece, offset, g.stride[2], g.in_size[2])
                              : Span{piece.ox_end, piece.ox_end};
        acc_t* dst = out + (span.lo - piece.ox_begin);
        std::fill(out, dst, acc_t(0));
        if (span.hi > span.lo)
          gather_masked_line(x.line(n, c, id, iy), x.s[4], mask_line(m, g, n, c, id, iy), m.s[4],
                             span.lo * g.stride[2] + offset, g.stride[2], span.hi - span.lo, dst);
        std::fill(dst + (span.hi - span.lo), out + piece.size(), acc_t(0));
        out += piece.size();
      }
    }
  });
}

// A (rows x cols) contiguous matrix over the first rows*cols elements of a scratch buffer.
at::Tensor scratch_matrix(const at::Tensor& buffer, int64_t rows, int64_t cols) {
  return buffer.narrow(0, 0, rows * cols).view({rows, cols});
}

// The same columns transposed, cols_t[j][k] (a row of K per position: the layout of the
// few-positions kernels), written a position at a time. A few positions read a few kB of input;
// each tap's input offset is found once per position, not per channel.
template <typename scalar_t, typename acc_t>
void pack_columns_transposed(const StridedTensor<const scalar_t>& x, const StridedTensor<const scalar_t>& m,
                             const ConvGeometry& g, int64_t n, int64_t group, const std::vector<Run>& pieces,
                             int64_t count, acc_t* cols_t) {
  const int64_t taps = g.taps(), cin_g = g.in_channels_per_group(), K = cin_g * taps;
  // The (line, ox) of each of the count positions, in the order of the pieces.
  std::vector<std::pair<int64_t, int64_t>> positions;
  for (const Run& piece : pieces)
    for (int64_t ox = piece.ox_begin; ox < piece.ox_end; ++ox) positions.emplace_back(piece.line, ox);
  const int64_t nm = g.mask_batch == 1 ? 0 : n;
  at::parallel_for(0, count, grain(K), [&](int64_t begin, int64_t end) {
    // Per tap: the offset of its input element in a channel plane of x and of m; -1 in the padding.
    std::vector<int64_t> x_offset(static_cast<size_t>(taps)), m_offset(static_cast<size_t>(taps));
    for (int64_t j = begin; j < end; ++j) {
      const auto [line, ox] = positions[size_t(j)];
      for (int64_t t = 0; t < taps; ++t) {
        const Tap tap = tap_of(t, g);
        const int64_t ix = ox * g.stride[2] + tap.kx * g.dilation[2] - g.pad[2];
        int64_t id, iy;
        const bool inside = input_line(g, line, tap, id, iy) && ix >= 0 && ix < g.in_size[2];
        x_offset[size_t(t)] = inside ? id * x.s[2] + iy * x.s[3] + ix * x.s[4] : -1;
        m_offset[size_t(t)] = inside ? id * m.s[2] + iy * m.s[3] + ix * m.s[4] : -1;
      }
      acc_t* row = cols_t + j * K;
      for (int64_t ci = 0; ci < cin_g; ++ci) {
        const int64_t c = group * cin_g + ci;
        const scalar_t* x_plane = x.data + n * x.s[0] + c * x.s[1];
        const scalar_t* m_plane = m.data ? m.data + nm * m.s[0] + (g.multi_channel_mask() ? c : 0) * m.s[1] : nullptr;
        for (int64_t t = 0; t < taps; ++t) {
          const int64_t offset = x_offset[size_t(t)];
          const acc_t v = offset < 0 ? acc_t(0) : acc_t(x_plane[offset]);
          row[ci * taps + t] = offset < 0 || m_plane == nullptr ? v : masked_value(v, acc_t(m_plane[m_offset[size_t(t)]]));
        }
      }
    }
  });
}

}  // namespace

template <typename scalar_t>
void forward_packed(const at::Tensor& input, const at::Tensor& mask, const at::Tensor& weight,
                    const at::Tensor& bias, const ForwardProblem& problem, at::Tensor& output,
                    const at::Tensor& mask_scales) {
  using acc_t = at::opmath_type<scalar_t>;
  const ConvGeometry& g = problem.geometry;
  const int64_t P = g.out_positions(), K = g.reduction_size();
  const int64_t cout_g = g.out_channels_per_group();
  const at::TensorOptions options = acc_options(input);
  const at::Tensor w = weight.to(options.dtype()).contiguous().view({g.out_channels, K});
  const at::Tensor b = bias.defined() ? bias.to(options.dtype()).contiguous() : at::Tensor();
  const acc_t* bias_data = b.defined() ? b.const_data_ptr<acc_t>() : nullptr;
  const StridedTensor<const scalar_t> x(input), m(mask);
  const StridedTensor<scalar_t> out(output);
  const acc_t slope = acc_t(problem.negative_slope);
  const std::vector<PositionPlan> plans = plan_all<acc_t>(mask_scales, g);
  const int64_t limit = positions_per_gemm(g);
  const at::Tensor cols_buffer = at::empty({K * limit}, options);
  const at::Tensor cols_t_buffer = at::empty({K * kFewPositions}, options);
  const at::Tensor conv_buffer = at::empty({cout_g * limit}, options);
  const int64_t lines_per_depth = g.out_size[1];

  for (int64_t n = 0; n < g.batch; ++n) {
    const int64_t nm = g.mask_batch == 1 ? 0 : n;
    const ImageScales<acc_t> scales = image_scales<acc_t>(mask_scales, g, nm);
    for_each_chunk(plans[size_t(nm)], limit, [&](const std::vector<Run>& chunk, int64_t count) {
      at::Tensor cols = scratch_matrix(cols_buffer, K, count);
      at::Tensor conv = scratch_matrix(conv_buffer, cout_g, count);
      for (int64_t group = 0; group < g.groups; ++group) {
        const at::Tensor w_group = w.narrow(0, group * cout_g, cout_g);
        if (count <= kFewPositions) {
          acc_t* cols_t = cols_t_buffer.data_ptr<acc_t>();
          pack_columns_transposed<scalar_t, acc_t>(x, m, g, n, group, chunk, count, cols_t);
          few_positions_output(w_group.const_data_ptr<acc_t>(), K, cols_t, conv.data_ptr<acc_t>(), cout_g, count, K);
        } else {
          pack_columns<scalar_t, acc_t>(x, m, g, n, group, chunk, count, cols.data_ptr<acc_t>());
          at::mm_out(conv, w_group, cols);
        }
        const acc_t* conv_data = conv.const_data_ptr<acc_t>();
        at::parallel_for(0, cout_g, grain(count), [&](int64_t begin, int64_t end) {
          for (int64_t co = begin; co < end; ++co) {
            const int64_t c = group * cout_g + co;
            const acc_t bias_c = bias_data ? bias_data[c] : acc_t(0);
            const acc_t* conv_line = conv_data + co * count;
            for (const Run& piece : chunk) {
              const int64_t p0 = piece.line * g.out_size[2] + piece.ox_begin;
              scalar_t* dst = out.line(n, c, piece.line / lines_per_depth, piece.line % lines_per_depth) +
                              piece.ox_begin * out.s[4];
              with_activation(problem.activation, [&](auto act) {
                write_output_line<decltype(act)::value>(conv_line, 1, scales.ratio + p0, scales.update + p0,
                                                        bias_c, slope, dst, out.s[4], piece.size());
              });
              conv_line += piece.size();
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
      for (const Run& hole : plans[size_t(g.mask_batch == 1 ? 0 : n)].holes) {
        scalar_t* dst = out.line(n, c, hole.line / lines_per_depth, hole.line % lines_per_depth);
        for (int64_t ox = hole.ox_begin; ox < hole.ox_end; ++ox) dst[ox * out.s[4]] = scalar_t(0);
      }
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
  const int64_t K = g.reduction_size(), taps = g.taps();
  const int64_t cout_g = g.out_channels_per_group(), cin_g = g.in_channels_per_group();
  const at::TensorOptions options = acc_options(input);
  const at::Tensor w = weight.to(options.dtype()).contiguous().view({g.out_channels, K});
  // The weight gradient is summed in place where grad_weight has the accumulation dtype: the first
  // chunk writes it, the others add to it.
  const bool weight_in_place = grad_weight.defined() && grad_weight.scalar_type() == options.dtype().toScalarType() &&
                               grad_weight.is_contiguous();
  at::Tensor grad_weight_acc = weight_in_place ? grad_weight.view({g.out_channels, K})
                                               : at::empty({need_weight ? g.out_channels : 0, K}, options);
  bool weight_written = false;
  at::Tensor grad_bias_acc = at::zeros({g.out_channels}, options);
  // grad_input of one image before the multiplication by M.
  at::Tensor grad_image = at::zeros({need_input ? g.in_channels * g.in_positions() : 0}, options);
  const int64_t limit = positions_per_gemm(g);
  const at::Tensor grad_conv_buffer = at::empty({cout_g * limit}, options);
  const at::Tensor cols_buffer = at::empty({need_weight ? K * limit : 0}, options);
  const at::Tensor grad_cols_buffer = at::empty({need_input ? K * limit : 0}, options);
  const at::Tensor cols_t_buffer = at::empty({need_weight ? K * kFewPositions : 0}, options);

  const StridedTensor<const scalar_t> x(input), m(mask), gout(grad_output), z(output);
  const StridedTensor<scalar_t> gin(grad_input);
  acc_t* grad_bias_data = grad_bias_acc.data_ptr<acc_t>();
  acc_t* grad_image_data = grad_image.data_ptr<acc_t>();
  const acc_t slope = acc_t(problem.negative_slope);
  const std::vector<PositionPlan> plans = plan_all<acc_t>(mask_scales, g);
  const int64_t lines_per_depth = g.out_size[1];

  for (int64_t n = 0; n < g.batch; ++n) {
    const int64_t nm = g.mask_batch == 1 ? 0 : n;
    const ImageScales<acc_t> scales = image_scales<acc_t>(mask_scales, g, nm);
    // Positions whose window is all holes have a zero gradient scale: skipped as in forward.
    for_each_chunk(plans[size_t(nm)], limit, [&](const std::vector<Run>& chunk, int64_t count) {
      at::Tensor grad_conv = scratch_matrix(grad_conv_buffer, cout_g, count);
      acc_t* grad_conv_data = grad_conv.data_ptr<acc_t>();
      for (int64_t group = 0; group < g.groups; ++group) {
        // Each output channel is owned by one thread: its bias sum needs no atomics.
        at::parallel_for(0, cout_g, grain(count), [&](int64_t begin, int64_t end) {
          for (int64_t co = begin; co < end; ++co) {
            const int64_t c = group * cout_g + co;
            acc_t* grad_conv_line = grad_conv_data + co * count;
            acc_t bias_sum = acc_t(0);
            for (const Run& piece : chunk) {
              const int64_t p0 = piece.line * g.out_size[2] + piece.ox_begin;
              const int64_t od = piece.line / lines_per_depth, oy = piece.line % lines_per_depth;
              with_activation(problem.activation, [&](auto act) {
                bias_sum += scale_output_grad_line<decltype(act)::value>(
                    gout.line(n, c, od, oy) + piece.ox_begin * gout.s[4], gout.s[4],
                    z.data ? z.line(n, c, od, oy) + piece.ox_begin * z.s[4] : nullptr, z.s[4],
                    scales.ratio + p0, scales.update + p0, slope, grad_conv_line, piece.size());
              });
              grad_conv_line += piece.size();
            }
            grad_bias_data[c] += bias_sum;
          }
        });
        const at::Tensor w_group = w.narrow(0, group * cout_g, cout_g);
        if (need_weight) {
          at::Tensor grad_w_group = grad_weight_acc.narrow(0, group * cout_g, cout_g);
          if (count <= kFewPositions) {
            acc_t* cols_t = cols_t_buffer.data_ptr<acc_t>();
            pack_columns_transposed<scalar_t, acc_t>(x, m, g, n, group, chunk, count, cols_t);
            few_positions_grad_weight(grad_conv_data, cols_t, grad_w_group.data_ptr<acc_t>(), K, cout_g, count, K,
                                      weight_written);
          } else {
            at::Tensor cols = scratch_matrix(cols_buffer, K, count);
            pack_columns<scalar_t, acc_t>(x, m, g, n, group, chunk, count, cols.data_ptr<acc_t>());
            if (weight_written)
              grad_w_group.addmm_(grad_conv, cols.t());
            else
              at::mm_out(grad_w_group, grad_conv, cols.t());
          }
        }
        if (need_input) {
          // grad_cols[k][j] at k * k_step + j * j_step: K x count from ATen's GEMM, transposed from
          // the few-positions kernel.
          const bool few = count <= kFewPositions;
          at::Tensor grad_cols = scratch_matrix(grad_cols_buffer, few ? count : K, few ? K : count);
          if (few)
            few_positions_grad_columns(grad_conv_data, w_group.const_data_ptr<acc_t>(), K,
                                       grad_cols.data_ptr<acc_t>(), cout_g, count, K);
          else
            at::mm_out(grad_cols, w_group.t(), grad_conv);
          const int64_t k_step = few ? 1 : count, j_step = few ? K : 1;
          const acc_t* grad_cols_data = grad_cols.const_data_ptr<acc_t>();
          // col2im: each input channel is owned by one thread, so the sums need no atomics.
          at::parallel_for(0, cin_g, grain(taps * count), [&](int64_t begin, int64_t end) {
            for (int64_t ci = begin; ci < end; ++ci) {
              acc_t* plane = grad_image_data + (group * cin_g + ci) * g.in_positions();
              for (int64_t t = 0; t < taps; ++t) {
                const Tap tap = tap_of(t, g);
                const int64_t offset = tap.kx * g.dilation[2] - g.pad[2];
                const acc_t* row = grad_cols_data + (ci * taps + t) * k_step;
                for (const Run& piece : chunk) {
                  int64_t id, iy;
                  if (input_line(g, piece.line, tap, id, iy)) {
                    const Span span = inside_span(piece, offset, g.stride[2], g.in_size[2]);
                    acc_t* plane_line = plane + (id * g.in_size[1] + iy) * g.in_size[2];
                    for (int64_t ox = span.lo; ox < span.hi; ++ox)
                      plane_line[ox * g.stride[2] + offset] += row[(ox - piece.ox_begin) * j_step];
                  }
                  row += piece.size() * j_step;
                }
              }
            }
          });
        }
      }
      weight_written = need_weight;
    });
    if (need_input) write_masked_grad_input(grad_image_data, m, gin, g, n);
  }
  if (need_weight && !weight_written) grad_weight_acc.zero_();
  if (need_weight && !weight_in_place) grad_weight.copy_(grad_weight_acc.view(weight.sizes()));
  if (need_bias) grad_bias.copy_(grad_bias_acc);
}

PCONV_INSTANTIATE_FOR_DTYPES(forward_packed,
                             (const at::Tensor&, const at::Tensor&, const at::Tensor&,
                              const at::Tensor&, const ForwardProblem&, at::Tensor&,
                              const at::Tensor&))
PCONV_INSTANTIATE_FOR_DTYPES(backward_packed,
                             (const at::Tensor&, const at::Tensor&, const at::Tensor&,
                              const at::Tensor&, const at::Tensor&, const at::Tensor&,
                              const ForwardProblem&, std::array<bool, 3>, at::Tensor&,
                              at::Tensor&, at::Tensor&))

}  // namespace cpu
}  // namespace partialconv
