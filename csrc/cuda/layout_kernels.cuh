// The elementwise passes around the GEMMs of conv_problems.cuh. Torch-free.
//
//   tap_table_kernel          the gather tables (tap deltas, weight offsets) of every GEMM
//   to_channels_last_kernel   one pass over a (N, C, *spatial) tensor in any layout into the
//                             channels-last, group-padded operand of a GEMM: the masked input X*M
//                             (and, for a multi-channel mask, its channel sums: the mask is read
//                             once), or the scaled output gradient dL/dconv of backward
//   mask_scales_kernel        S, ratio and U once per output position (not per column tile)
//   weight_layout_kernel      the weight as the forward (C_out, taps, C_in) or grad_input
//                             (C_in, taps, C_out) B operand
//   grad_bias_kernel          dL/dbias per channel, a fixed-order tree (deterministic)
//   strided_pass_kernel       the vendor path's passes: a (N, C, *spatial) tensor in its own layout
//                             from a source (X*M, M*dL/dXm, the epilogue, dL/dconv)
#pragma once

#include <cstdint>

#include "conv_problems.cuh"

namespace partialconv {
namespace cuda {

// The element steps of a channels-last operand along the spatial dimensions.
template <typename index_t>
struct ChannelSteps {
  index_t step[kDims];
};

// Round a value to what an element type stores: TF32 operands are rounded to nearest here, so the
// tensor core sees exactly the stored value.
template <typename E, typename acc_t>
__device__ __forceinline__ StorageOf<E> to_storage(acc_t value) {
  if constexpr (std::is_same<E, Tf32>::value) {
    const uint32_t bits = tf32_from_float(float(value));
    float rounded;
    __builtin_memcpy(&rounded, &bits, sizeof(rounded));
    return rounded;
  } else {
    return static_cast<StorageOf<E>>(value);
  }
}

// The taps of a gather table. Forward and weight gradient: every tap t = (td, th, tw), delta =
// t * dilation, weight offset t * channels. grad_input, stride phase r: the taps with
// (r + pad - t * dilation) divisible by the stride in every dimension, in raster order, delta =
// (r + pad - t * dilation) / stride (host and device enumerate them by the same rule:
// phase_reaches_tap).
template <typename index_t>
PCONV_HOST_DEVICE bool phase_reaches_tap(const ConvShape<index_t>& g, const index_t (&phase)[kDims],
                                         const index_t (&tap)[kDims], index_t (&delta)[kDims]) {
  for (int d = 0; d < kDims; ++d) {
    const index_t shifted = phase[d] + g.pad[d] - tap[d] * g.dilation[d];
    // Floor division by the stride, exact when it reaches the phase.
    const index_t q = shifted >= 0 ? shifted / g.stride[d] : -((-shifted + g.stride[d] - 1) / g.stride[d]);
    if (q * g.stride[d] != shifted) return false;
    delta[d] = q;
  }
  return true;
}

template <typename index_t>
PCONV_HOST_DEVICE void tap_coordinates(const ConvShape<index_t>& g, index_t t, index_t (&tap)[kDims]) {
  tap[2] = t % g.kernel[2];
  tap[1] = t / g.kernel[2] % g.kernel[1];
  tap[0] = t / (g.kernel[1] * g.kernel[2]);
}

// One thread per table: table 0 is the full table (forward, weight gradient), table 1 + phase the
// grad_input table of stride phase `phase` (raster order over the strides). `channels` is the
// padded channel count of the weight rows the offsets index: C_in (forward) or C_out (grad_input).
template <typename index_t>
__global__ void tap_table_kernel(const ConvShape<index_t> g, index_t forward_channels, index_t backward_channels,
                                 TapDelta<index_t>* tables, int phases) {
  const int table = int(blockIdx.x * blockDim.x + threadIdx.x);
  if (table > phases) return;
  const index_t taps = g.taps();
  TapDelta<index_t>* out = tables + index_t(table) * taps;
  index_t phase[kDims] = {0, 0, 0};
  if (table > 0) {
    const index_t r = index_t(table - 1);
    phase[2] = r % g.stride[2];
    phase[1] = r / g.stride[2] % g.stride[1];
    phase[0] = r / (g.stride[1] * g.stride[2]);
  }
  index_t count = 0;
  for (index_t t = 0; t < taps; ++t) {
    index_t tap[kDims], delta[kDims];
    tap_coordinates(g, t, tap);
    if (table == 0) {
      for (int d = 0; d < kDims; ++d) delta[d] = tap[d] * g.dilation[d];
      out[count++] = {{coord_t(delta[0]), coord_t(delta[1]), coord_t(delta[2])}, t * forward_channels};
    } else if (phase_reaches_tap(g, phase, tap, delta)) {
      out[count++] = {{coord_t(delta[0]), coord_t(delta[1]), coord_t(delta[2])}, t * backward_channels};
    }
  }
}

// origins[q] for every output position q of the batch: its window origin, position * stride -
// padding, and the origin's element offset in Xm (image * x_image + origin . x_step; the weight
// gradient's B rows).
// The padding rows past the last position (up to `padded`) get an origin outside the input and
// zero GC rows (gc_row elements each from gc_tail), so that the weight-gradient GEMM reads
// whole k-tiles without testing its rows.
template <typename index_t, typename Storage>
__global__ void position_table_kernel(const ConvShape<index_t> g, const GridDecode<index_t> grid, index_t x_image,
                                      const ChannelSteps<index_t> x_step, PositionEntry<index_t>* origins,
                                      index_t padded, Storage* gc_tail, index_t gc_row) {
  const index_t total = g.batch * g.out_positions();
  grid_stride(padded, [&](index_t q) {
    PositionEntry<index_t> entry;
    if (q < total) {
      index_t n, o[kDims];
      grid.decode(q, n, o);
      entry.offset = n * x_image;
      for (int d = 0; d < kDims; ++d) {
        entry.origin[d] = coord_t(o[d] * g.stride[d] - g.pad[d]);
        entry.offset += index_t(entry.origin[d]) * x_step.step[d];
      }
    } else {
      entry.offset = 0;
      entry.origin[0] = coord_t(-2 * kMaxCoordinate), entry.origin[1] = entry.origin[2] = 0;
      for (index_t e = 0; e < gc_row; ++e) gc_tail[(q - total) * gc_row + e] = Storage(0);
    }
    origins[q] = entry;
  });
}

// ---------------------------------------------------------------------------------------------
// Into channels-last, group-padded operands.

// The channels-last operand: element (n, pixel, g, c) at data + (n * pixels + pixel) * (groups *
// padded) + g * padded + c.
template <typename T, typename index_t>
struct ChannelsLast {
  T* data;
  index_t pixels, groups, channels, padded;  // channels: real per group; padded: a chunk multiple
};

// X*M at (n, c, x), exactly 0 in holes; also the mask value, for the channel sums. Sources are
// called as source(n, c, p, x) with p the position's index in its image.
template <typename scalar_t, typename acc_t, typename index_t>
struct MaskedInputSource {
  TensorRef<const scalar_t, index_t> input, mask;  // mask.data nullptr: no mask
  index_t mask_batch, mask_channels;

  __device__ acc_t mask_value(index_t n, index_t c, const index_t (&x)[kDims]) const {
    const index_t nm = mask_batch == 1 ? index_t(0) : n;
    return acc_t(mask.data[mask.offset(nm, mask_channels > 1 ? c : index_t(0), x)]);
  }
  __device__ acc_t operator()(index_t n, index_t c, index_t, const index_t (&x)[kDims]) const {
    const acc_t v = acc_t(input.data[input.offset(n, c, x)]);
    return mask.data != nullptr ? masked_value(v, mask_value(n, c, x)) : v;
  }
};

// dL/dconv = grad * act'(output) * ratio * U at (n, c, x) (p: the position's index in its image).
template <typename scalar_t, typename acc_t, typename index_t>
struct ScaledOutputGradSource {
  TensorRef<const scalar_t, index_t> grad_output, output;  // output.data nullptr: no activation
  const acc_t* mask_scales;
  index_t mask_batch, positions;
  GridDecode<index_t> grid;  // output positions (for grad_bias_kernel's own loop)
  Activation activation;
  acc_t negative_slope;

  __device__ OutputGrad<acc_t> value(index_t n, index_t c, index_t p, const index_t (&x)[kDims]) const {
    const MaskScaleRows<const acc_t> rows = mask_scale_rows(mask_scales, mask_batch, positions, n);
    const acc_t z = output.data != nullptr ? acc_t(output.data[output.offset(n, c, x)]) : acc_t(0);
    return partial_conv_output_grad(acc_t(grad_output.data[grad_output.offset(n, c, x)]), z,
                                    MaskScale<acc_t>{rows.ratio[p], rows.update[p]}, activation, negative_slope);
  }
  __device__ acc_t operator()(index_t n, index_t c, index_t p, const index_t (&x)[kDims]) const {
    return value(n, c, p, x).conv;
  }
};

// act((conv * ratio + b) * U) at (n, c, x), 0 in holes: the vendor path's epilogue on the
// convolution's output.
template <typename scalar_t, typename acc_t, typename index_t>
struct EpilogueSource {
  TensorRef<const scalar_t, index_t> conv;
  const scalar_t* bias;  // nullptr: no bias
  const acc_t* mask_scales;
  index_t mask_batch, positions;
  Activation activation;
  acc_t negative_slope;

  __device__ acc_t operator()(index_t n, index_t c, index_t p, const index_t (&x)[kDims]) const {
    const MaskScaleRows<const acc_t> rows = mask_scale_rows(mask_scales, mask_batch, positions, n);
    return partial_conv_output(acc_t(conv.data[conv.offset(n, c, x)]), MaskScale<acc_t>{rows.ratio[p], rows.update[p]},
                               bias != nullptr ? acc_t(bias[c]) : acc_t(0), activation, negative_slope);
  }
};

constexpr int kTransposeTile = 32;  // pixels and channels of one transpose step
constexpr int kTransposeRows = 8;   // threads per 32 pixels: 256 threads a block

// One block: kTransposeTile pixels of an image, every (padded) channel in steps of
// kTransposeTile, for the images blockIdx.y, + gridDim.y, ... (gridDim.y is at most 65535),
// through a shared-memory tile: reads run along pixels (coalesced for an NCHW-like source) or,
// with channels_fastest (a channels-last source), along channels; writes run along channels
// (coalesced in the channels-last operand). With kMaskSums (masked input, multi-channel mask,
// read along pixels) it also writes the channel sum of the mask per pixel into plane[n][pixel] for
// the images the mask has, each in a fixed order.
// (With only the thread count as bound, ptxas capped some variants at 32 registers and spilled;
// the explicit minimum of one block per multiprocessor leaves it the full budget.)
template <class Source, typename E, typename acc_t, typename index_t, bool kMaskSums>
__global__ void __launch_bounds__(kTransposeTile * kTransposeRows, 1)
    to_channels_last_kernel(const Source source, const ChannelsLast<StorageOf<E>, index_t> out, index_t batch,
                            const GridDecode<index_t> grid, const Divider<index_t> padded, bool channels_fastest,
                            acc_t* plane, index_t plane_images) {
  __shared__ acc_t tile[kTransposeTile][kTransposeTile + 1];
  __shared__ acc_t sums[kTransposeRows][kTransposeTile];
  const int tx = int(threadIdx.x) % kTransposeTile, ty = int(threadIdx.x) / kTransposeTile;
  const index_t pixel0 = index_t(blockIdx.x) * kTransposeTile;
  const index_t total = out.groups * out.padded;
  // Reading along pixels, the thread's pixel is the same for every channel: decoded once.
  index_t image_index, x[kDims];
  grid.decode(pixel0 + tx < out.pixels ? pixel0 + tx : index_t(0), image_index, x);
  for (index_t n = index_t(blockIdx.y); n < batch; n += index_t(gridDim.y)) {
    acc_t mask_sum = acc_t(0);
    for (index_t c0 = 0; c0 < total; c0 += kTransposeTile) {
      for (int j = ty; j < kTransposeTile; j += kTransposeRows) {
        const int cj = channels_fastest ? tx : j, pj = channels_fastest ? j : tx;  // within the tile
        const index_t pc = c0 + cj, pixel = pixel0 + pj;  // padded channel, pixel
        const index_t group = padded.div(pc), c = pc - group * out.padded;
        acc_t value = acc_t(0);
        if (pixel < out.pixels && pc < total && c < out.channels) {
          const index_t channel = group * out.channels + c;
          if (channels_fastest) {
            index_t xj[kDims];
            grid.decode(pixel, image_index, xj);
            value = source(n, channel, pixel, xj);
          } else {
            value = source(n, channel, pixel, x);
            if constexpr (kMaskSums) mask_sum += source.mask_value(n, channel, x);
          }
        }
        tile[cj][pj] = value;
      }
      __syncthreads();
      for (int j = ty; j < kTransposeTile; j += kTransposeRows) {
        const index_t p = pixel0 + j, pc = c0 + tx;
        if (p < out.pixels && pc < total) out.data[(n * out.pixels + p) * total + pc] = to_storage<E>(tile[tx][j]);
      }
      __syncthreads();
    }
    if constexpr (kMaskSums) {
      sums[ty][tx] = mask_sum;
      __syncthreads();
      if (ty == 0 && pixel0 + tx < out.pixels && n < plane_images) {
        acc_t s = acc_t(0);
        for (int r = 0; r < kTransposeRows; ++r) s += sums[r][tx];
        plane[n * out.pixels + pixel0 + tx] = s;
      }
      __syncthreads();
    }
  }
}

// ---------------------------------------------------------------------------------------------
// S, ratio and U at every output position of every mask image, once per call.

template <typename scalar_t, typename acc_t, typename index_t>
struct MaskScalesArgs {
  ConvShape<index_t> g;
  GridDecode<index_t> grid;  // output positions (batch = mask images)
  // The window source: a channel-summed plane (acc_t, contiguous (mask_batch, *in spatial)), a
  // single-channel mask (strided), or nothing (an all-ones mask).
  const acc_t* plane;
  TensorRef<const scalar_t, index_t> mask;
  acc_t* mask_scales;       // written through mask_scale_rows
  scalar_t* updated_mask;   // (mask_batch, 1, P)
};

template <typename scalar_t, typename acc_t, typename index_t>
__global__ void mask_scales_kernel(const MaskScalesArgs<scalar_t, acc_t, index_t> args) {
  const ConvShape<index_t>& g = args.g;
  const index_t positions = g.out_positions();
  const index_t total = g.mask_batch * positions;
  const acc_t numerator = acc_t(g.ratio_numerator());
  grid_stride(total, [&](index_t i) {
    index_t nm, o[kDims];
    const index_t p = args.grid.decode(i, nm, o);
    acc_t sum;
    if (args.plane != nullptr) {
      const index_t strides[kDims] = {g.in_size[1] * g.in_size[2], g.in_size[2], 1};
      sum = window_mask_sum<acc_t, acc_t, index_t>(args.plane + nm * g.in_positions(), index_t(1), index_t(0),
                                                   strides, g, o);
    } else {
      const TensorRef<const scalar_t, index_t>& m = args.mask;
      const index_t strides[kDims] = {m.stride[2], m.stride[3], m.stride[4]};
      sum = window_mask_sum<acc_t, scalar_t, index_t>(m.data != nullptr ? m.data + nm * m.stride[0] : nullptr,
                                                      index_t(1), index_t(0), strides, g, o);
    }
    const MaskScale<acc_t> scale = mask_scale(sum, numerator);
    const MaskScaleRows<acc_t> rows = mask_scale_rows(args.mask_scales, g.mask_batch, positions, nm);
    rows.ratio[p] = scale.ratio;
    rows.update[p] = scale.update;
    args.updated_mask[i] = static_cast<scalar_t>(scale.update);
  });
}

// ---------------------------------------------------------------------------------------------
// The weight as a B operand: out[g][row][tap][c] (c < padded), from weight (C_out, C_in/g,
// *kernel) read through its strides. Forward: row = output channel co, c = input channel ci.
// grad_input (transposed): row = ci, c = co.
template <typename scalar_t, typename E, typename acc_t, typename index_t>
__global__ void weight_layout_kernel(const TensorRef<const scalar_t, index_t> weight, const ConvShape<index_t> g,
                                     StorageOf<E>* out, index_t rows, index_t channels, index_t padded,
                                     bool transposed) {
  const index_t taps = g.taps();
  const index_t total = g.groups * rows * taps * padded;
  grid_stride(total, [&](index_t i) {
    const index_t c = i % padded, t = i / padded % taps, row = i / (padded * taps) % rows;
    const index_t group = i / (padded * taps * rows);
    acc_t value = acc_t(0);
    if (c < channels) {
      const index_t co = group * g.out_channels_per_group() + (transposed ? c : row);
      const index_t ci = transposed ? row : c;
      index_t tap[kDims];
      tap_coordinates(g, t, tap);
      value = acc_t(weight.data[weight.offset(co, ci, tap)]);
    }
    out[i] = to_storage<E>(value);
  });
}

// ---------------------------------------------------------------------------------------------
// out(n, c, x) = source(n, c, p, x) for every element of a (N, C, *spatial) tensor written through
// its strides, one grid-stride pass in the tensor's memory order: channels fastest for a
// channels-last tensor (channels_fastest), else positions fastest. `grid` decodes a position p and
// its coordinates x from an element's index: with positions fastest its "image" is n * C + c.
template <class Source, typename T, typename index_t>
__global__ void strided_pass_kernel(const Source source, const TensorRef<T, index_t> out, const GridDecode<index_t> grid,
                                    const Divider<index_t> channels, index_t count, bool channels_fastest) {
  grid_stride(count, [&](index_t i) {
    index_t n, c, x[kDims];
    index_t p;
    if (channels_fastest) {
      const index_t point = channels.div(i);
      c = i - point * channels.divisor;
      p = grid.decode(point, n, x);
    } else {
      index_t image;
      p = grid.decode(i, image, x);
      n = channels.div(image);
      c = image - n * channels.divisor;
    }
    out.data[out.offset(n, c, x)] = static_cast<T>(source(n, c, p, x));
  });
}

// ---------------------------------------------------------------------------------------------
// grad_bias[c] = sum over the batch's output positions of dL/dbias: one block per channel, a
// fixed-order tree over its threads.
constexpr int kBiasThreads = 256;

template <typename scalar_t, typename acc_t, typename index_t>
__global__ void __launch_bounds__(kBiasThreads)
    grad_bias_kernel(const ScaledOutputGradSource<scalar_t, acc_t, index_t> source, index_t batch,
                     scalar_t* grad_bias) {
  __shared__ acc_t partial[kBiasThreads];
  const index_t c = index_t(blockIdx.x);
  const index_t total = batch * source.positions;
  acc_t sum = acc_t(0);
  for (index_t i = index_t(threadIdx.x); i < total; i += kBiasThreads) {
    index_t n, x[kDims];
    const index_t p = source.grid.decode(i, n, x);
    sum += source.value(n, c, p, x).bias;
  }
  partial[threadIdx.x] = sum;
  __syncthreads();
  for (int width = kBiasThreads / 2; width > 0; width /= 2) {
    if (int(threadIdx.x) < width) partial[threadIdx.x] += partial[threadIdx.x + width];
    __syncthreads();
  }
  if (threadIdx.x == 0) grad_bias[c] = static_cast<scalar_t>(partial[0]);
}

}  // namespace cuda
}  // namespace partialconv
