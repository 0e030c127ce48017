// Pieces every CPU path shares: strided tensor views, the saved mask scales of one mask image,
// thread grains, and the per-line loops of the epilogue and of the output-gradient scaling.
//
// Positions are handled in the 3-D form of partial_conv_math.h (depth, height, width; leading
// unit dimensions for 1-D and 2-D problems). A "line" is one (depth, height) pair: the positions
// along the width at fixed depth and height, the unit of every inner loop.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <type_traits>

#if defined(__SSE__)
#include <xmmintrin.h>
#endif

#include "../partial_conv.h"

namespace partialconv {
namespace cpu {

// Inner parallel loops give each task at least this many iterations; small problems run inline
// instead of paying for a thread wake-up.
constexpr int64_t kMinWorkPerTask = int64_t(1) << 15;

inline int64_t grain(int64_t work_per_item) {
  return std::max<int64_t>(1, kMinWorkPerTask / std::max<int64_t>(work_per_item, 1));
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Whether ATen's CPU convolution of a float32 2-D problem of this shape runs through oneDNN rather
// than ATen's own im2col + GEMM: ATen's use_mkldnn (torch 2.14) takes groups, a kernel above 3x3 in
// both dimensions, a batch above 1, or more than 20480 input elements.
inline bool aten_convolves_through_onednn(const ConvGeometry& g) {
  return g.groups > 1 || (g.kernel[1] > 3 && g.kernel[2] > 3) || g.batch > 1 ||
         g.in_channels * g.in_positions() > 20480;
}

// A 3-D, 4-D or 5-D tensor read through its strides as (n, c, depth, height, width), so that
// expanded, sliced and channels_last tensors need no copy; absent leading spatial dimensions have
// size 1 and stride 0.
template <typename T>
struct StridedTensor {
  T* data = nullptr;
  int64_t s[2 + kDims] = {0, 0, 0, 0, 0};

  StridedTensor() = default;
  explicit StridedTensor(const at::Tensor& t) {
    if (!t.defined()) return;
    data = static_cast<T*>(t.data_ptr());
    const int64_t lead = 2 + kDims - t.dim();
    s[0] = t.stride(0), s[1] = t.stride(1);
    for (int64_t d = 2; d < t.dim(); ++d) s[lead + d] = t.stride(d);
  }
  T& operator()(int64_t n, int64_t c, int64_t d, int64_t h, int64_t w) const {
    return data[n * s[0] + c * s[1] + d * s[2] + h * s[3] + w * s[4]];
  }
  // The first element of a line (n, c, d, h, 0); its elements are s[4] apart.
  T* line(int64_t n, int64_t c, int64_t d, int64_t h) const { return &(*this)(n, c, d, h, 0); }
};

// Whether the lines of t (one per depth and height) follow each other in memory, each `width`
// elements long: then consecutive lines of one depth are processed as one line of all their
// positions. The deep layers' small images (4x4 outputs of 512 channels) would otherwise pay a
// call and a few divisions per 4 elements. An absent tensor (no mask) follows any layout.
template <typename T>
bool rows_follow(const StridedTensor<T>& t, int64_t width) {
  return t.data == nullptr || t.s[3] == width * t.s[4];
}

// How many lines from `line` on (of `lines_per_depth` per depth, at most `limit`) are processed as
// one: all that remain at this depth when `merge` holds, else one.
inline int64_t lines_in_run(bool merge, int64_t line, int64_t lines_per_depth, int64_t limit) {
  return merge ? std::min(limit, lines_per_depth - line % lines_per_depth) : 1;
}

// The saved scales of one mask image (mask_scale_rows): ratio and update for its P output
// positions (raster order over depth, height, width).
template <typename acc_t>
struct ImageScales {
  const acc_t* ratio;
  const acc_t* update;
  bool is_hole(int64_t p) const { return partialconv::is_hole(MaskScale<acc_t>{ratio[p], update[p]}); }
};

// The scales of image n (of the mask's batch) from the saved mask_scales of geometry g.
template <typename acc_t>
ImageScales<acc_t> image_scales(const at::Tensor& mask_scales, const ConvGeometry& g, int64_t n) {
  const MaskScaleRows<const acc_t> rows =
      mask_scale_rows(mask_scales.const_data_ptr<acc_t>(), g.mask_batch, g.out_positions(), n);
  return {rows.ratio, rows.update};
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

// out[i * out_stride] = partial_conv_output(conv[i * conv_stride], {ratio[i], update[i]}, bias),
// i < count; unit strides have their own loop (g++ vectorises it), and so has the in-place case
// (one pointer, so that g++ sees no aliasing).
template <Activation act, typename scalar_t, typename acc_t>
void write_output_line(const acc_t* conv, int64_t conv_stride, const acc_t* ratio, const acc_t* update,
                       acc_t bias, acc_t slope, scalar_t* out, int64_t out_stride, int64_t count) {
  const auto value = [&](acc_t conv_value, int64_t i) {
    return static_cast<scalar_t>(partial_conv_output(conv_value, MaskScale<acc_t>{ratio[i], update[i]}, bias, act, slope));
  };
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    if (out_stride == 1 && conv_stride == 1 && out == conv) {
      for (int64_t i = 0; i < count; ++i) out[i] = value(out[i], i);
      return;
    }
  }
  if (out_stride == 1 && conv_stride == 1) {
    for (int64_t i = 0; i < count; ++i) out[i] = value(conv[i], i);
  } else {
    for (int64_t i = 0; i < count; ++i) out[i * out_stride] = value(conv[i * conv_stride], i);
  }
}

// grad_conv[i] = dL/dconv at count positions of one output line, from the incoming gradient and
// the output (read only for an activation); returns the line's dL/dbias. The bias sum runs in
// kLanes partial sums added in a fixed order (the same result on every call), so that g++
// vectorises the loop (a single running sum is a reduction it may not reorder).
template <Activation act, typename scalar_t, typename acc_t>
acc_t scale_output_grad_line(const scalar_t* grad, int64_t grad_stride, const scalar_t* out,
                             int64_t out_stride, const acc_t* ratio, const acc_t* update,
                             acc_t slope, acc_t* grad_conv, int64_t count) {
  constexpr int64_t kLanes = 8;
  acc_t lanes[kLanes] = {};
  const auto run = [&](auto unit_strides) {
    constexpr bool unit = decltype(unit_strides)::value;
    const int64_t gs = unit ? 1 : grad_stride, zs = unit ? 1 : out_stride;
    const auto step = [&](int64_t i, acc_t& lane) {
      const OutputGrad<acc_t> og = partial_conv_output_grad(
          acc_t(grad[i * gs]), act == Activation::kNone ? acc_t(0) : acc_t(out[i * zs]),
          MaskScale<acc_t>{ratio[i], update[i]}, act, slope);
      grad_conv[i] = og.conv;
      lane += og.bias;
    };
    int64_t i = 0;
    for (; i + kLanes <= count; i += kLanes)
      for (int64_t j = 0; j < kLanes; ++j) step(i + j, lanes[j]);
    for (; i < count; ++i) step(i, lanes[i % kLanes]);
  };
  if (grad_stride == 1 && (out == nullptr || out_stride == 1))
    run(std::true_type{});
  else
    run(std::false_type{});
  acc_t sum = acc_t(0);
  for (int64_t j = 0; j < kLanes; ++j) sum += lanes[j];
  return sum;
}

// dst[i] = X*M at input columns ix0 + i * step of one input line (M null: no mask), exactly 0 in
// holes. The contiguous case is a plain loop g++ vectorises (with -fno-trapping-math).
template <typename scalar_t, typename acc_t>
void gather_masked_line(const scalar_t* x_line, int64_t x_stride, const scalar_t* m_line,
                        int64_t m_stride, int64_t ix0, int64_t step, int64_t count, acc_t* dst) {
  if (step == 1 && x_stride == 1 && (m_line == nullptr || m_stride == 1)) {
    const scalar_t* x = x_line + ix0;
    if (m_line != nullptr) {
      const scalar_t* m = m_line + ix0;
      for (int64_t i = 0; i < count; ++i) dst[i] = masked_value(acc_t(x[i]), acc_t(m[i]));
    } else {
      for (int64_t i = 0; i < count; ++i) dst[i] = acc_t(x[i]);
    }
    return;
  }
  for (int64_t i = 0; i < count; ++i) {
    const int64_t ix = ix0 + i * step;
    const acc_t v = acc_t(x_line[ix * x_stride]);
    dst[i] = m_line != nullptr ? masked_value(v, acc_t(m_line[ix * m_stride])) : v;
  }
}

// dst[i * C + c] = rows[c * row_stride + i] for i < count, c < C: `count` positions of C channel
// rows, written position by position with their channels (channels-last), in address order (dst
// is a band of megabytes, not in any cache: its write misses are what this loop costs). Float
// channels go four at a time through SSE 4x4 transposes of four positions.
template <typename T>
void transpose_rows_to_positions(const T* rows, int64_t row_stride, int64_t C, int64_t count, T* dst) {
  int64_t i = 0;
#if defined(__SSE__)
  if constexpr (std::is_same_v<T, float>) {
    for (; i + 4 <= count; i += 4) {
      float* out = dst + i * C;
      int64_t c = 0;
      for (; c + 4 <= C; c += 4) {
        const float* r = rows + c * row_stride + i;
        __m128 a = _mm_loadu_ps(r), b = _mm_loadu_ps(r + row_stride);
        __m128 e = _mm_loadu_ps(r + 2 * row_stride), f = _mm_loadu_ps(r + 3 * row_stride);
        _MM_TRANSPOSE4_PS(a, b, e, f);
        _mm_storeu_ps(out + c, a);
        _mm_storeu_ps(out + C + c, b);
        _mm_storeu_ps(out + 2 * C + c, e);
        _mm_storeu_ps(out + 3 * C + c, f);
      }
      for (; c < C; ++c)
        for (int64_t k = 0; k < 4; ++k) out[k * C + c] = rows[c * row_stride + i + k];
    }
  }
#endif
  for (; i < count; ++i)
    for (int64_t c = 0; c < C; ++c) dst[i * C + c] = rows[c * row_stride + i];
}

// The mask line matching input line (n, c, d, h): the mask image of n, its channel c for a
// multi-channel mask; null without a mask.
template <typename scalar_t>
const scalar_t* mask_line(const StridedTensor<const scalar_t>& m, const ConvGeometry& g,
                          int64_t n, int64_t c, int64_t d, int64_t h) {
  if (m.data == nullptr) return nullptr;
  return m.line(g.mask_batch == 1 ? 0 : n, g.multi_channel_mask() ? c : 0, d, h);
}

// out[w * out_stride] = M * values[w] for `count` positions of a line, M read at mask_stride (no
// mask: the values themselves); a hole gets exactly 0.
template <typename scalar_t, typename acc_t>
void write_masked_line(const acc_t* values, const scalar_t* mask, int64_t mask_stride, scalar_t* out,
                       int64_t out_stride, int64_t count) {
  if (out_stride == 1 && mask != nullptr && mask_stride == 1) {  // the usual case: a loop g++ vectorises
    for (int64_t w = 0; w < count; ++w) out[w] = static_cast<scalar_t>(masked_value(values[w], acc_t(mask[w])));
    return;
  }
  for (int64_t w = 0; w < count; ++w)
    out[w * out_stride] =
        static_cast<scalar_t>(mask ? masked_value(values[w], acc_t(mask[w * mask_stride])) : values[w]);
}

// grad_input of image n = M * grad_image (d(X*M)/dX = M; a hole gets exactly 0). grad_image (C_in
// planes of the input's positions) is left zeroed for the next image when `clear` is set. gin may
// be grad_image itself (the product written in place).
template <typename scalar_t, typename acc_t>
void write_masked_grad_input(acc_t* grad_image, const StridedTensor<const scalar_t>& m,
                             const StridedTensor<scalar_t>& gin, const ConvGeometry& g, int64_t n,
                             bool clear = true) {
  const int64_t lines = g.in_size[0] * g.in_size[1], width = g.in_size[2];
  const bool merge = rows_follow(m, width) && rows_follow(gin, width);
  at::parallel_for(0, g.in_channels, grain(g.in_positions()), [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      for (int64_t line = 0, run = 1; line < lines; line += run) {
        run = lines_in_run(merge, line, g.in_size[1], lines - line);
        const int64_t d = line / g.in_size[1], h = line % g.in_size[1], count = run * width;
        acc_t* values = grad_image + (c * lines + line) * width;
        const scalar_t* mask = mask_line(m, g, n, c, d, h);
        write_masked_line(values, mask, m.s[4], gin.line(n, c, d, h), gin.s[4], count);
        if (clear) std::fill(values, values + count, acc_t(0));
      }
    }
  });
}

// The first `elements` of a scratch buffer kept by the calling thread between calls (the caching
// allocator pattern): the dense path's band buffers are up to tens of megabytes, which the
// system allocator would map and fault in afresh on every call. Each slot grows to the largest
// request of its thread and dtype up to kMostScratchElements (larger requests get a buffer of
// their own, freed after the call) and is held until the thread exits; a slot's contents are
// valid until its next request on the same thread, so a caller must not keep them past its call.
enum class Scratch { kMaskedBand, kGradConv, kGradConvChannelsLast, kChannelRows, kCount };
constexpr int64_t kMostScratchElements = int64_t(1) << 24;

inline at::Tensor thread_scratch(Scratch slot, int64_t elements, const at::TensorOptions& options) {
  if (elements > kMostScratchElements) return at::empty({elements}, options);
  thread_local std::array<at::Tensor, size_t(Scratch::kCount)> slots;
  at::Tensor& buffer = slots[size_t(slot)];
  if (!buffer.defined() || buffer.numel() < elements || buffer.dtype() != options.dtype()) {
    buffer = at::Tensor();  // the old buffer freed before the new one is made
    buffer = at::empty({elements}, options);
  }
  return buffer.narrow(0, 0, elements);
}

// Tensor options of the accumulation type of scalar_t.
inline at::TensorOptions acc_options(const at::Tensor& input) {
  return input.options().dtype(mask_scales_dtype(input.scalar_type()));
}

}  // namespace cpu
}  // namespace partialconv

