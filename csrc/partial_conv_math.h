// The partial convolution formula and its index math, written once and shared by the CPU kernels,
// the CUDA kernels and the host emulation of the CUDA kernels. Torch-free on purpose: the emulator
// compiles this with a plain host compiler.
//
// For input X, mask M (1 = valid, 0 = hole), weight W and bias b, at every output position:
//   S      = sum of M over the window (taps in the zero padding count as holes; a multi-channel
//            mask also sums over every input channel)
//   U      = clamp(S, 0, 1)                                  (the updated mask)
//   ratio  = winsize / S * U  where S > 0, else 0            (winsize = prod(kernel), or
//                                                             C_in * prod(kernel))
//   out    = act((conv(X*M, W) * ratio + b) * U)
// A pixel whose mask is exactly 0 contributes 0 even if X holds NaN or Inf there.
//
// Every problem is 3-D here: a convolution with 1 or 2 spatial dimensions has leading unit
// dimensions (size 1, kernel 1, stride 1, padding 0, dilation 1), so one loop nest serves all.
#pragma once

#include <cstdint>
#include <type_traits>

#if defined(__CUDACC__) || defined(PCONV_CUDA_EMULATION)
#define PCONV_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define PCONV_HOST_DEVICE inline
#endif

namespace partialconv {

enum class Activation : int { kNone = 0, kRelu = 1, kLeakyRelu = 2 };

// The factor the convolution is renormalised by where its window sees valid pixels:
//   kWindow: winsize / S, the paper's sum(1)/sum(M) (NVIDIA's layers);
//   kSum:    1 / S, the seed's layer and implementations trained like it.
enum class Normalization : int { kWindow = 0, kSum = 1 };

// Spatial dimensions every problem is expressed in: depth, height, width.
constexpr int kDims = 3;

// Everything the kernels need to know about one call, filled by the argument checks. The CUDA
// kernels convert it to their index type (int32 while every offset fits, else int64).
template <typename index_t>
struct ConvShape {
  index_t batch, in_channels, out_channels, groups;
  // Per spatial dimension (depth, height, width); leading unit dimensions for 1-D and 2-D.
  index_t in_size[kDims], out_size[kDims], kernel[kDims], stride[kDims], pad[kDims],
      dilation[kDims];
  // mask_batch: 1 or batch (an absent mask is an all-ones mask of batch 1).
  // mask_channels: 0 for an absent mask, 1 for a single-channel mask, in_channels for a
  // multi-channel one.
  index_t mask_batch, mask_channels;
  // Spatial dimensions of the tensors: 1, 2 or 3 (the arrays above hold kDims - spatial_dims
  // leading unit dimensions).
  int spatial_dims;
  Normalization normalization;

  template <typename other_t>
  PCONV_HOST_DEVICE ConvShape<other_t> as() const {
    ConvShape<other_t> g{};
    g.batch = other_t(batch), g.in_channels = other_t(in_channels);
    g.out_channels = other_t(out_channels), g.groups = other_t(groups);
    for (int d = 0; d < kDims; ++d) {
      g.in_size[d] = other_t(in_size[d]), g.out_size[d] = other_t(out_size[d]);
      g.kernel[d] = other_t(kernel[d]), g.stride[d] = other_t(stride[d]);
      g.pad[d] = other_t(pad[d]), g.dilation[d] = other_t(dilation[d]);
    }
    g.mask_batch = other_t(mask_batch), g.mask_channels = other_t(mask_channels);
    g.spatial_dims = spatial_dims;
    g.normalization = normalization;
    return g;
  }
  PCONV_HOST_DEVICE index_t in_channels_per_group() const { return in_channels / groups; }
  PCONV_HOST_DEVICE index_t out_channels_per_group() const { return out_channels / groups; }
  PCONV_HOST_DEVICE index_t taps() const { return kernel[0] * kernel[1] * kernel[2]; }
  // Reduction length of the forward matrix product: (C_in/groups) * prod(kernel).
  PCONV_HOST_DEVICE index_t reduction_size() const { return in_channels_per_group() * taps(); }
  PCONV_HOST_DEVICE index_t out_positions() const { return out_size[0] * out_size[1] * out_size[2]; }
  PCONV_HOST_DEVICE index_t in_positions() const { return in_size[0] * in_size[1] * in_size[2]; }
  PCONV_HOST_DEVICE bool multi_channel_mask() const { return mask_channels > 1; }
  // winsize of the formula: every element the mask window covers.
  PCONV_HOST_DEVICE index_t window_size() const {
    return (multi_channel_mask() ? in_channels : index_t(1)) * taps();
  }
  // The numerator of the ratio numerator / S: winsize, or 1 for Normalization::kSum.
  PCONV_HOST_DEVICE index_t ratio_numerator() const {
    return normalization == Normalization::kSum ? index_t(1) : window_size();
  }
};

using ConvGeometry = ConvShape<int64_t>;

// Division by a divisor fixed for a whole launch, as a multiply-high and a shift (Granlund and
// Montgomery): GPUs have no integer divide instruction, and 64-bit division is a subroutine call.
// For 1 <= d < 2^(B-1) in a B-bit signed index type, with l = ceil(log2 d) and
// m = floor(2^B * (2^l - d) / d) + 1, n / d == (mulhi(n, m) + n) >> l for every 0 <= n < 2^(B-1).
template <typename index_t>
struct Divider {
  using unsigned_t = typename std::make_unsigned<index_t>::type;
  index_t divisor;
  unsigned_t multiplier;
  int shift;

  static Divider make(index_t d) {  // host side, once per launch
    Divider v{d, 0, 0};
    while ((unsigned_t(1) << v.shift) < unsigned_t(d)) ++v.shift;
    using wide_t = typename std::conditional<sizeof(index_t) == 4, uint64_t, unsigned __int128>::type;
    constexpr int bits = 8 * sizeof(index_t);
    v.multiplier = unsigned_t(((wide_t(1) << bits) * ((wide_t(1) << v.shift) - wide_t(d))) / wide_t(d) + 1);
    return v;
  }

  PCONV_HOST_DEVICE static unsigned_t mulhi(unsigned_t a, unsigned_t b) {
#ifdef __CUDA_ARCH__
    if constexpr (sizeof(index_t) == 4) return __umulhi(a, b);
    else return __umul64hi(a, b);
#else
    using wide_t = typename std::conditional<sizeof(index_t) == 4, uint64_t, unsigned __int128>::type;
    return unsigned_t((wide_t(a) * wide_t(b)) >> (8 * sizeof(index_t)));
#endif
  }

  PCONV_HOST_DEVICE index_t div(index_t n) const {
    return index_t((mulhi(unsigned_t(n), multiplier) + unsigned_t(n)) >> shift);
  }
  PCONV_HOST_DEVICE index_t mod(index_t n) const { return n - div(n) * divisor; }
};

// Output extent of a convolution along one dimension; below 1 means the window does not fit.
// The caller keeps in + 2 * pad and dilation * (kernel - 1) within int64 (the argument checks do).
PCONV_HOST_DEVICE int64_t conv_output_size(int64_t in, int64_t kernel, int64_t stride, int64_t pad,
                                           int64_t dilation) {
  const int64_t span = in + 2 * pad - dilation * (kernel - 1) - 1;
  return span < 0 ? 0 : span / stride + 1;
}

// Input coordinate read by kernel tap k at output coordinate o.
template <typename index_t>
PCONV_HOST_DEVICE index_t input_coord(index_t o, index_t k, index_t stride, index_t pad,
                                      index_t dilation) {
  return o * stride - pad + k * dilation;
}

// Value a pixel feeds the convolution: X*M, and exactly 0 in a hole (even for NaN/Inf in X).
template <typename acc_t>
PCONV_HOST_DEVICE acc_t masked_value(acc_t x, acc_t m) {
  return m == acc_t(0) ? acc_t(0) : x * m;
}

// a / b for b >= 1. On the GPU without IEEE division, whose slow-path subroutine call makes ptxas
// spill registers in the kernels that use it: a reciprocal estimate, Newton steps, and a final
// residual correction give the quotient to within an ulp (in practice correctly rounded).
template <typename T>
PCONV_HOST_DEVICE T divide_by_at_least_one(T a, T b) {
#ifdef __CUDA_ARCH__
  T r = T(__fdividef(1.0f, float(b)));
  r = fma(fma(-b, r, T(1)), r, r);
  if (sizeof(T) > sizeof(float)) r = fma(fma(-b, r, T(1)), r, r);
  const T q = a * r;
  return fma(fma(-b, q, a), r, q);
#else
  return a / b;
#endif
}

template <typename acc_t>
struct MaskScale {
  acc_t ratio;   // winsize / S * U, 0 where S == 0
  acc_t update;  // U = clamp(S, 0, 1)
};

// The saved mask scales of a call, the one description of their layout (every backend reads and
// writes them through mask_scale_rows): a contiguous (mask_batch, 2, *out_spatial) tensor of the
// accumulation type holding, for each mask image, the ratios of its P output positions (channel
// kRatioChannel), then their U (channel kUpdateChannel). A batch-shared mask (mask_batch 1) serves
// every image of the batch.
constexpr int kRatioChannel = 0, kUpdateChannel = 1;

template <typename T>
struct MaskScaleRows {
  T* ratio;   // ratio[p], p < P
  T* update;  // update[p]
};

// The rows of image n's mask scales (T const for reading).
template <typename T, typename index_t>
PCONV_HOST_DEVICE MaskScaleRows<T> mask_scale_rows(T* mask_scales, index_t mask_batch, index_t positions, index_t n) {
  T* image = mask_scales + (mask_batch == 1 ? index_t(0) : n) * 2 * positions;
  return {image + kRatioChannel * positions, image + kUpdateChannel * positions};
}

// A window that sees no valid pixel (a finite S <= 0): output and mask exactly 0, no matrix work.
// Every other window is computed, so that a NaN or an infinity in the mask reaches the output and
// the gradients as the formula says, whatever path runs.
template <typename acc_t>
PCONV_HOST_DEVICE bool is_hole(MaskScale<acc_t> s) {
  return s.ratio == acc_t(0) && s.update == acc_t(0);
}

// numerator / S * U == numerator / max(S, 1) for S > 0 (U = S below 1; the numerator is winsize,
// or 1: ConvShape::ratio_numerator): the divisor is never below 1.
// A non-finite S (the mask holds NaN or an infinity in the window) follows the formula: S = NaN
// gives U = ratio = NaN; S = +inf gives U = 1, ratio = 0 (and conv(X*M) is not finite, so the
// output is NaN); S = -inf gives U = 0 and a NaN ratio, so that the output is NaN, not a hole.
template <typename acc_t>
PCONV_HOST_DEVICE MaskScale<acc_t> mask_scale(acc_t mask_sum, acc_t numerator) {
  if (mask_sum > acc_t(0)) {
    return {divide_by_at_least_one(numerator, mask_sum < acc_t(1) ? acc_t(1) : mask_sum),
            mask_sum < acc_t(1) ? mask_sum : acc_t(1)};
  }
  if (mask_sum != mask_sum) return {mask_sum, mask_sum};  // NaN
  // -inf * 0 is NaN; a finite S <= 0 gives 0: a hole.
  return {mask_sum * acc_t(0), acc_t(0)};
}

template <typename acc_t>
PCONV_HOST_DEVICE acc_t apply_activation(acc_t y, Activation act, acc_t negative_slope) {
  if (act == Activation::kNone || y > acc_t(0)) return y;
  return act == Activation::kRelu ? acc_t(0) : y * negative_slope;
}

// d act(y) / dy, read off the activation's output z (for slope >= 0, z > 0 exactly when y > 0).
template <typename acc_t>
PCONV_HOST_DEVICE acc_t activation_grad(acc_t z, Activation act, acc_t negative_slope) {
  if (act == Activation::kNone || z > acc_t(0)) return acc_t(1);
  return act == Activation::kRelu ? acc_t(0) : negative_slope;
}

// out = act((conv * ratio + b) * U); a hole gives exactly 0.
template <typename acc_t>
PCONV_HOST_DEVICE acc_t partial_conv_output(acc_t conv, MaskScale<acc_t> s, acc_t bias,
                                            Activation act, acc_t negative_slope) {
  if (is_hole(s)) return acc_t(0);
  return apply_activation((conv * s.ratio + bias) * s.update, act, negative_slope);
}

// Gradient scales at one output position, from the incoming gradient g and the output z:
//   dL/dconv = g * act'(z) * ratio * U      dL/dbias = g * act'(z) * U
template <typename acc_t>
struct OutputGrad {
  acc_t conv;
  acc_t bias;
};

template <typename acc_t>
PCONV_HOST_DEVICE OutputGrad<acc_t> partial_conv_output_grad(acc_t g, acc_t z, MaskScale<acc_t> s,
                                                             Activation act,
                                                             acc_t negative_slope) {
  if (is_hole(s)) return {acc_t(0), acc_t(0)};
  const acc_t gb = g * activation_grad(z, act, negative_slope) * s.update;
  return {gb * s.ratio, gb};
}

// S at output position o = (od, oy, ox) of one mask image. `mask` points at that image's first
// element and is read through its strides (expanded, channels_last and sliced masks need no
// copy): stride_c between channels, strides[d] along spatial dimension d; `channels` is 1 for a
// single-channel mask and C_in for a multi-channel one. A null mask is all ones: S is then the
// number of taps inside the input. Threads that share one window pass part/parts: each sums the
// channels c == part (mod parts), and the parts add up to S.
template <typename acc_t, typename scalar_t, typename index_t>
PCONV_HOST_DEVICE acc_t window_mask_sum(const scalar_t* mask, index_t channels, index_t stride_c,
                                        const index_t (&strides)[kDims],
                                        const ConvShape<index_t>& g, const index_t (&o)[kDims],
                                        index_t part = 0, index_t parts = 1) {
  acc_t sum = acc_t(0);
  for (index_t kd = 0; kd < g.kernel[0]; ++kd) {
    const index_t id = input_coord<index_t>(o[0], kd, g.stride[0], g.pad[0], g.dilation[0]);
    if (id < 0 || id >= g.in_size[0]) continue;
    for (index_t ky = 0; ky < g.kernel[1]; ++ky) {
      const index_t iy = input_coord<index_t>(o[1], ky, g.stride[1], g.pad[1], g.dilation[1]);
      if (iy < 0 || iy >= g.in_size[1]) continue;
      for (index_t kx = 0; kx < g.kernel[2]; ++kx) {
        const index_t ix = input_coord<index_t>(o[2], kx, g.stride[2], g.pad[2], g.dilation[2]);
        if (ix < 0 || ix >= g.in_size[2]) continue;
        if (mask == nullptr) {
          sum += part == 0 ? acc_t(1) : acc_t(0);
          continue;
        }
        const index_t offset = id * strides[0] + iy * strides[1] + ix * strides[2];
        for (index_t c = part; c < channels; c += parts) sum += acc_t(mask[c * stride_c + offset]);
      }
    }
  }
  return sum;
}

}  // namespace partialconv
