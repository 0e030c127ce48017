// The partial convolution formula and its index math, written once and shared by the CPU kernel,
// the CUDA kernels and the host emulation of the CUDA kernels. Torch-free on purpose: the emulator
// compiles this with a plain host compiler.
//
// For input X, mask M (1 = valid, 0 = hole), weight W and bias b, at every output position:
//   S      = sum of M over the window (taps in the zero padding count as holes; a multi-channel
//            mask also sums over every input channel)
//   U      = clamp(S, 0, 1)                                  (the updated mask)
//   ratio  = winsize / S * U  where S > 0, else 0            (winsize = kh*kw, or Cin*kh*kw)
//   out    = act((conv(X*M, W) * ratio + b) * U)
// A pixel whose mask is exactly 0 contributes 0 even if X holds NaN or Inf there.
#pragma once

#include <cstdint>

#if defined(__CUDACC__) || defined(PCONV_CUDA_EMULATION)
#define PCONV_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define PCONV_HOST_DEVICE inline
#endif

namespace partialconv {

enum class Activation : int { kNone = 0, kRelu = 1, kLeakyRelu = 2 };

// Everything the kernels need to know about one call, filled by the argument checks.
struct ConvGeometry {
  int64_t batch, in_channels, in_height, in_width;
  int64_t out_channels, kernel_h, kernel_w;
  int64_t stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w, groups;
  int64_t out_height, out_width;
  // mask_batch: 1 or batch (an absent mask is an all-ones mask of batch 1).
  // mask_channels: 0 for an absent mask, 1 for a single-channel mask, in_channels for a
  // multi-channel one.
  int64_t mask_batch, mask_channels;

  PCONV_HOST_DEVICE int64_t in_channels_per_group() const { return in_channels / groups; }
  PCONV_HOST_DEVICE int64_t out_channels_per_group() const { return out_channels / groups; }
  PCONV_HOST_DEVICE int64_t taps() const { return kernel_h * kernel_w; }
  // Reduction length of the matrix product: (Cin/groups) * kh * kw.
  PCONV_HOST_DEVICE int64_t reduction_size() const { return in_channels_per_group() * taps(); }
  PCONV_HOST_DEVICE int64_t out_positions() const { return out_height * out_width; }
  PCONV_HOST_DEVICE bool multi_channel_mask() const { return mask_channels > 1; }
  // winsize of the formula: every element the mask window covers.
  PCONV_HOST_DEVICE int64_t window_size() const {
    return (multi_channel_mask() ? in_channels : 1) * taps();
  }
};

// Output extent of a convolution; below 1 means the window does not fit.
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

template <typename acc_t>
struct MaskScale {
  acc_t ratio;   // winsize / S * U, 0 where S == 0
  acc_t update;  // U = clamp(S, 0, 1)
};

template <typename acc_t>
PCONV_HOST_DEVICE MaskScale<acc_t> mask_scale(acc_t mask_sum, acc_t window_size) {
  MaskScale<acc_t> s{acc_t(0), acc_t(0)};
  if (mask_sum > acc_t(0)) {
    s.update = mask_sum < acc_t(1) ? mask_sum : acc_t(1);
    s.ratio = window_size / mask_sum * s.update;
  }
  return s;
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

// out = act((conv * ratio + b) * U); a position with U == 0 is a hole and gives exactly 0.
template <typename acc_t>
PCONV_HOST_DEVICE acc_t partial_conv_output(acc_t conv, MaskScale<acc_t> s, acc_t bias,
                                            Activation act, acc_t negative_slope) {
  if (s.update == acc_t(0)) return acc_t(0);
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
  if (s.update == acc_t(0)) return {acc_t(0), acc_t(0)};
  const acc_t gb = g * activation_grad(z, act, negative_slope) * s.update;
  return {gb * s.ratio, gb};
}

// Half-open range [begin, end) of kernel taps k whose input coordinate
// o*stride - pad + k*dilation lies inside [0, extent).
template <typename index_t>
struct TapRange {
  index_t begin, end;
};

template <typename index_t>
PCONV_HOST_DEVICE TapRange<index_t> valid_taps(index_t o, index_t kernel, index_t stride,
                                              index_t pad, index_t dilation, index_t extent) {
  const index_t first = o * stride - pad;  // input coordinate of tap 0
  // smallest k with first + k*dilation >= 0
  index_t begin = first >= 0 ? index_t(0) : (-first + dilation - 1) / dilation;
  // largest k with first + k*dilation <= extent - 1, plus one
  index_t end = first > extent - 1 ? index_t(0) : (extent - 1 - first) / dilation + 1;
  if (end > kernel) end = kernel;
  if (begin > end) begin = end;
  return {begin, end};
}

// S at output position (oy, ox) of one mask image. `mask` points at that image's first element
// and is read through its strides (expanded, channels_last and sliced masks need no copy);
// `channels` is 1 for a single-channel mask and Cin for a multi-channel one.
// A null mask is all ones: S is then the number of taps inside the image.
template <typename acc_t, typename scalar_t, typename index_t>
PCONV_HOST_DEVICE acc_t window_mask_sum(const scalar_t* mask, index_t channels, index_t stride_c,
                                        index_t stride_h, index_t stride_w, const ConvGeometry& g,
                                        index_t oy, index_t ox) {
  const TapRange<index_t> ty = valid_taps<index_t>(oy, g.kernel_h, g.stride_h, g.pad_h,
                                                   g.dilation_h, g.in_height);
  const TapRange<index_t> tx = valid_taps<index_t>(ox, g.kernel_w, g.stride_w, g.pad_w,
                                                   g.dilation_w, g.in_width);
  if (mask == nullptr) return acc_t((ty.end - ty.begin) * (tx.end - tx.begin));
  acc_t sum = acc_t(0);
  for (index_t c = 0; c < channels; ++c) {
    for (index_t ky = ty.begin; ky < ty.end; ++ky) {
      const index_t iy = input_coord<index_t>(oy, ky, g.stride_h, g.pad_h, g.dilation_h);
      for (index_t kx = tx.begin; kx < tx.end; ++kx) {
        const index_t ix = input_coord<index_t>(ox, kx, g.stride_w, g.pad_w, g.dilation_w);
        sum += acc_t(mask[c * stride_c + iy * stride_h + ix * stride_w]);
      }
    }
  }
  return sum;
}

}  // namespace partialconv
