// CUDA kernels of partial_conv2d, torch-free (but for c10's two 16-bit float types) so that the
// host emulation in tests/cuda_emulation/ can compile and run this very source on a CPU.
//
// All three matrix products are one templated implicit GEMM (implicit_gemm_kernel). A "problem"
// struct supplies its three separable pieces: the tile loaders (load_a / load_b: the masked input,
// the scaled output gradient or the weight, gathered straight from the tensors, never
// materialised), an optional prologue (the forward's mask counting and tile skipping) and the
// epilogue. The matrix core in between knows nothing of convolutions; it is chosen by the scalar
// type (MatrixCore):
//   float16, bfloat16  TensorCoreCore: 128x64 block tiles, 8 warps of 32x32, mma.sync.m16n8k16
//                      on 16-bit operands (the loaders' float values rounded to scalar_t) with
//                      float accumulators
//   float32, float64   SimtCore: 64x64 block tiles on CUDA cores, 4x4 outputs per thread
//
//   forward     rows = output positions N*H'*W'   cols = C_out/g   reduction = C_in/g*kh*kw
//   grad_input  rows = input positions N*H*W      cols = C_in/g    reduction = C_out/g*kh*kw
//   grad_weight rows = C_out/g                    cols = C_in/g*kh*kw   reduction = N*H'*W',
//               split in fixed slices whose partial sums are added in a fixed order (no atomics:
//               deterministic).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstddef>
#include <cstdint>
#include <type_traits>
#include <utility>

#include "../partial_conv_math.h"
#include "warp_mma.cuh"

#ifndef PCONV_CUDA_EMULATION
#include <cuda_runtime.h>
#endif

namespace partialconv {
namespace cuda {

// Threads of the grad_bias reduction.
constexpr int kBiasThreads = 256;

template <typename T>
constexpr T ceil_div(T a, T b) {
  return (a + b - 1) / b;
}

// A 4-D tensor read through its strides (any layout, broadcast masks with stride 0).
template <typename T, typename index_t>
struct Strided4d {
  T* data;
  index_t s0, s1, s2, s3;

  PCONV_HOST_DEVICE T& operator()(index_t a, index_t b, index_t c, index_t d) const {
    return data[a * s0 + b * s1 + c * s2 + d * s3];
  }
};

// A tensor as the host passes it: pointer plus 64-bit strides.
template <typename T>
struct TensorArg {
  T* data = nullptr;
  int64_t strides[4] = {0, 0, 0, 0};

  template <typename index_t>
  Strided4d<T, index_t> as() const {
    return {data, index_t(strides[0]), index_t(strides[1]), index_t(strides[2]),
            index_t(strides[3])};
  }
};

template <typename scalar_t, typename acc_t>
struct ForwardArgs {
  ConvGeometry geometry;
  Activation activation;
  acc_t negative_slope;
  TensorArg<const scalar_t> input, mask, weight;  // mask.data == nullptr: no mask
  const scalar_t* bias;                           // nullptr: no bias
  TensorArg<scalar_t> output;
  scalar_t* updated_mask;  // (mask_batch, 1, H', W'), contiguous
  acc_t* mask_scales;      // (mask_batch, 2, H', W'), contiguous: ratio, update
};

template <typename scalar_t, typename acc_t>
struct BackwardArgs {
  ConvGeometry geometry;
  Activation activation;
  acc_t negative_slope;
  TensorArg<const scalar_t> grad_output, input, mask, weight;
  TensorArg<const scalar_t> output;  // read only for an activation
  const acc_t* mask_scales;          // (mask_batch, 2, H', W'), contiguous: ratio, update
  TensorArg<scalar_t> grad_input;
  scalar_t* grad_weight;  // (C_out, C_in/g, kh, kw), contiguous
  scalar_t* grad_bias;
  acc_t* grad_weight_partials;  // grad_weight_workspace_elements() elements
  int64_t grad_weight_splits;
};

// The digits (a, b, c) of i = (a * B + b) * C + c, from dividers by B * C and by C.
template <typename index_t>
struct Digits {
  index_t outer, middle, inner;
};

template <typename index_t>
PCONV_HOST_DEVICE Digits<index_t> mixed_radix_digits(index_t i, const Divider<index_t>& middle_inner,
                                                     const Divider<index_t>& inner) {
  const index_t outer = middle_inner.div(i), rest = i - outer * middle_inner.divisor;
  const index_t middle = inner.div(rest);
  return {outer, middle, rest - middle * inner.divisor};
}

// Position (n, y, x) of a row index over N images of H x W.
template <typename index_t>
struct Position {
  index_t n, y, x;
};

// Tap (channel within the group, ky, kx) of a reduction index over C x kh x kw.
template <typename index_t>
struct Tap {
  index_t c, ky, kx;
};

// The divisors of the index decode, fixed for a launch.
template <typename index_t>
struct Dividers {
  Divider<index_t> out_plane, out_width, in_plane, in_width, taps, kernel_w, stride_h, stride_w;

  static Dividers make(const ConvShape<index_t>& g) {
    return {Divider<index_t>::make(g.out_size[1] * g.out_size[2]), Divider<index_t>::make(g.out_size[2]),
            Divider<index_t>::make(g.in_size[1] * g.in_size[2]),   Divider<index_t>::make(g.in_size[2]),
            Divider<index_t>::make(g.taps()),                   Divider<index_t>::make(g.kernel[2]),
            Divider<index_t>::make(g.stride[1]),                 Divider<index_t>::make(g.stride[2])};
  }
  PCONV_HOST_DEVICE Position<index_t> output_position(index_t row) const {
    const Digits<index_t> d = mixed_radix_digits(row, out_plane, out_width);
    return {d.outer, d.middle, d.inner};
  }
  PCONV_HOST_DEVICE Position<index_t> input_position(index_t row) const {
    const Digits<index_t> d = mixed_radix_digits(row, in_plane, in_width);
    return {d.outer, d.middle, d.inner};
  }
  PCONV_HOST_DEVICE Tap<index_t> tap(index_t k) const {
    const Digits<index_t> d = mixed_radix_digits(k, taps, kernel_w);
    return {d.outer, d.middle, d.inner};
  }
};

// X*M as the convolution sees it: 0 in the padding, exactly 0 in holes.
template <typename scalar_t, typename acc_t, typename index_t>
struct MaskedInput {
  ConvShape<index_t> g;
  Strided4d<const scalar_t, index_t> input, mask;

  PCONV_HOST_DEVICE acc_t operator()(index_t n, index_t c, index_t oy, index_t ox, index_t ky,
                                     index_t kx) const {
    const index_t iy = input_coord<index_t>(oy, ky, g.stride[1], g.pad[1], g.dilation[1]);
    const index_t ix = input_coord<index_t>(ox, kx, g.stride[2], g.pad[2], g.dilation[2]);
    if (iy < 0 || iy >= g.in_size[1] || ix < 0 || ix >= g.in_size[2]) return acc_t(0);
    const acc_t x = acc_t(input(n, c, iy, ix));
    if (mask.data == nullptr) return x;
    const index_t nm = g.mask_batch == 1 ? index_t(0) : n;
    return masked_value(x, acc_t(mask(nm, g.multi_channel_mask() ? c : index_t(0), iy, ix)));
  }
};

// grad_output scaled on the fly: dL/dconv and dL/dbias at one output element.
template <typename scalar_t, typename acc_t, typename index_t>
struct ScaledOutputGrad {
  ConvShape<index_t> g;
  Strided4d<const scalar_t, index_t> grad_output, output;
  const acc_t* mask_scales;
  Activation activation;
  acc_t negative_slope;

  PCONV_HOST_DEVICE OutputGrad<acc_t> operator()(index_t n, index_t c, index_t oy,
                                                 index_t ox) const {
    const index_t nm = g.mask_batch == 1 ? index_t(0) : n;
    const index_t positions = g.out_size[1] * g.out_size[2];
    const acc_t* image = mask_scales + 2 * nm * positions;
    const index_t p = oy * g.out_size[2] + ox;
    const acc_t z = output.data != nullptr ? acc_t(output(n, c, oy, ox)) : acc_t(0);
    return partial_conv_output_grad(acc_t(grad_output(n, c, oy, ox)), z,
                                    MaskScale<acc_t>{image[p], image[positions + p]}, activation,
                                    negative_slope);
  }
};

// ---------------------------------------------------------------------------------------------
// Matrix cores. A core fixes the block tile (kBlockRows x kBlockCols outputs, the reduction walked
// kBlockK at a time), the threads of a block, the shared operand tiles (their element type and
// row padding) and the accumulators each thread holds: how they multiply a pair of tiles, and which
// outputs (r, c) of the block tile they are.

// The operand tiles of one reduction step, both k-major, each row padded by kPad elements:
//   a[kk][r] = A(row0 + r, k0 + kk)     b[kk][c] = B(k0 + kk, col0 + c)
template <typename T, int kK, int kRows, int kCols, int kPad>
struct OperandTiles {
  using Element = T;
  alignas(16) T a[kK][kRows + kPad];
  alignas(16) T b[kK][kCols + kPad];
};

// CUDA cores, operands in acc_t. Each of the 16 x 16 threads owns a 4 x 4 micro-tile at rows
// tx + 16*i and cols ty + 16*j, so consecutive threads touch consecutive rows (coalesced stores
// along output positions, no shared-memory bank conflicts on the A tile).
struct SimtCore {
  static constexpr int kBlockRows = 64, kBlockCols = 64, kBlockK = 16;
  static constexpr int kThreadRows = 4, kThreadCols = 4;
  static constexpr int kThreadsX = kBlockRows / kThreadRows, kThreadsY = kBlockCols / kThreadCols;
  static constexpr int kThreads = kThreadsX * kThreadsY;
  static constexpr const char* kName = "CUDA cores";
  static constexpr const char* kInstruction = "fma";

  template <typename acc_t>
  using Tiles = OperandTiles<acc_t, kBlockK, kBlockRows, kBlockCols, 0>;

  template <typename acc_t>
  struct Accumulators {
    acc_t value[kThreadRows][kThreadCols];

    __device__ Accumulators() {
#pragma unroll
      for (int i = 0; i < kThreadRows; ++i)
#pragma unroll
        for (int j = 0; j < kThreadCols; ++j) value[i][j] = acc_t(0);
    }

    __device__ void multiply(const Tiles<acc_t>& tiles) {
      const int tx = int(threadIdx.x) % kThreadsX, ty = int(threadIdx.x) / kThreadsX;
#pragma unroll
      for (int kk = 0; kk < kBlockK; ++kk) {
        acc_t a[kThreadRows], b[kThreadCols];
#pragma unroll
        for (int i = 0; i < kThreadRows; ++i) a[i] = tiles.a[kk][tx + i * kThreadsX];
#pragma unroll
        for (int j = 0; j < kThreadCols; ++j) b[j] = tiles.b[kk][ty + j * kThreadsY];
#pragma unroll
        for (int i = 0; i < kThreadRows; ++i)
#pragma unroll
          for (int j = 0; j < kThreadCols; ++j) value[i][j] += a[i] * b[j];
      }
    }

    // visit(r, c, sum) for every output of the thread, r and c within the block tile.
    template <typename Visit>
    __device__ void for_each(Visit&& visit) const {
      const int tx = int(threadIdx.x) % kThreadsX, ty = int(threadIdx.x) / kThreadsX;
#pragma unroll
      for (int i = 0; i < kThreadRows; ++i)
#pragma unroll
        for (int j = 0; j < kThreadCols; ++j)
          visit(tx + i * kThreadsX, ty + j * kThreadsY, value[i][j]);
    }
  };
};

// The mma.sync input format of a 16-bit scalar type.
template <typename scalar_t>
struct TensorCoreFormat {};
template <>
struct TensorCoreFormat<c10::Half> {
  static constexpr Float16Format value = Float16Format::f16;
};
template <>
struct TensorCoreFormat<c10::BFloat16> {
  static constexpr Float16Format value = Float16Format::bf16;
};

// Tensor cores, operands in the 16-bit scalar_t, float accumulators. 8 warps in a 4 x 2 grid,
// each computing a 32 x 32 warp tile as 2 x 4 mma.m16n8k16 tiles, two k16 steps per kBlockK.
// Fragments come from the k-major tiles by ldmatrix .trans, which hands lane (g = lane / 4,
// t = lane % 4) the elements (2t, g), (2t+1, g) of each 8x8 matrix it reads: with the matrix's
// rows on k, that is A(g, 2t..2t+1) and B(2t..2t+1, g), the mma fragment layouts (warp_mma.cuh).
template <typename scalar_t>
struct TensorCoreCore {
  static constexpr Float16Format kFormat = TensorCoreFormat<scalar_t>::value;
  static constexpr int kBlockRows = 128, kBlockCols = 64, kBlockK = 32;
  static constexpr int kWarpRows = 32, kWarpCols = 32;
  static constexpr int kWarpsM = kBlockRows / kWarpRows, kWarpsN = kBlockCols / kWarpCols;
  static constexpr int kThreads = 32 * kWarpsM * kWarpsN;
  static constexpr int kMmaM = 16, kMmaN = 8, kMmaK = 16;
  static constexpr int kTilesM = kWarpRows / kMmaM, kTilesN = kWarpCols / kMmaN;
  // 8 elements (16 bytes) of padding make a tile row 272 or 144 bytes, 16 mod 128: the 8 rows
  // that one ldmatrix matrix reads start in 8 distinct 16-byte bank groups, conflict free.
  static constexpr int kPad = 8;
  static constexpr const char* kName = "tensor cores";
  static constexpr const char* kInstruction = "mma.sync m16n8k16, float accumulators";

  template <typename acc_t>
  using Tiles = OperandTiles<scalar_t, kBlockK, kBlockRows, kBlockCols, kPad>;

  template <typename acc_t>
  struct Accumulators {
    static_assert(std::is_same<acc_t, float>::value, "mma.m16n8k16 accumulates in float");
    // value[i][j]: mma tile (i, j) of the warp, in the C layout c0,c1: (g, 2t+{0,1}),
    // c2,c3: (g+8, 2t+{0,1}).
    float value[kTilesM][kTilesN][4];

    __device__ Accumulators() {
#pragma unroll
      for (int i = 0; i < kTilesM; ++i)
#pragma unroll
        for (int j = 0; j < kTilesN; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e) value[i][j][e] = 0.0f;
    }

    static __device__ int warp_row() { return int(threadIdx.x) / 32 % kWarpsM * kWarpRows; }
    static __device__ int warp_col() { return int(threadIdx.x) / 32 / kWarpsM * kWarpCols; }

    __device__ void multiply(const Tiles<acc_t>& tiles) {
      const int lane = int(threadIdx.x) % 32;
      // ldmatrix_x4 .trans: lanes 8q..8q+7 give the addresses of rows k = 0..7 of matrix q.
      // a[i] = the A(m, k) quarters at (m0, kk), (m0+8, kk), (m0, kk+8), (m0+8, kk+8) of the mma
      // tile whose rows start at m0:
      //   lane -> tiles.a[kk + 8*(lane/16) + lane%8][m0 + 8*(lane/8%2)]
      // pair = the B(k, n) quarters at (kk, n0), (kk+8, n0), (kk, n0+8), (kk+8, n0+8): the b
      // fragments of the n8 tiles at n0 and n0+8:
      //   lane -> tiles.b[kk + 8*(lane/8%2) + lane%8][n0 + 8*(lane/16)]
      const int a_k = 8 * (lane / 16) + lane % 8, a_m = 8 * (lane / 8 % 2);
      const int b_k = 8 * (lane / 8 % 2) + lane % 8, b_n = 8 * (lane / 16);
      const int warp_m = warp_row(), warp_n = warp_col();
#pragma unroll
      for (int kk = 0; kk < kBlockK; kk += kMmaK) {
        uint32_t a[kTilesM][4], b[kTilesN][2];
#pragma unroll
        for (int i = 0; i < kTilesM; ++i)
          ldmatrix_x4_trans(a[i], &tiles.a[kk + a_k][warp_m + i * kMmaM + a_m]);
#pragma unroll
        for (int j = 0; j < kTilesN; j += 2) {
          uint32_t pair[4];
          ldmatrix_x4_trans(pair, &tiles.b[kk + b_k][warp_n + j * kMmaN + b_n]);
          b[j][0] = pair[0], b[j][1] = pair[1], b[j + 1][0] = pair[2], b[j + 1][1] = pair[3];
        }
#pragma unroll
        for (int i = 0; i < kTilesM; ++i)
#pragma unroll
          for (int j = 0; j < kTilesN; ++j)
            mma_m16n8k16<kFormat>(value[i][j], a[i], b[j], value[i][j]);
      }
    }

    // visit(r, c, sum) for every output of the thread, r and c within the block tile.
    template <typename Visit>
    __device__ void for_each(Visit&& visit) const {
      const int lane = int(threadIdx.x) % 32;
      const int r0 = warp_row() + lane / 4, c0 = warp_col() + 2 * (lane % 4);
#pragma unroll
      for (int i = 0; i < kTilesM; ++i)
#pragma unroll
        for (int j = 0; j < kTilesN; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e)
            visit(r0 + i * kMmaM + 8 * (e / 2), c0 + j * kMmaN + e % 2, value[i][j][e]);
    }
  };
};

// Tensor cores for the 16-bit floats, CUDA cores for float32 and float64.
template <typename scalar_t>
using MatrixCore =
    typename std::conditional<std::is_same<scalar_t, c10::Half>::value ||
                                  std::is_same<scalar_t, c10::BFloat16>::value,
                              TensorCoreCore<scalar_t>, SimtCore>::type;

// ---------------------------------------------------------------------------------------------
// The implicit GEMM on the problem's core. blockIdx.z is passed to the problem as `z` (its group,
// or group and split).

// The explicit minimum of one block per multiprocessor leaves ptxas the full register budget:
// with only the thread count it capped the 64-bit double variants at 80 registers and spilled.
template <typename Gemm>
__global__ void __launch_bounds__(Gemm::Core::kThreads, 1) implicit_gemm_kernel(const Gemm gemm) {
  using Core = typename Gemm::Core;
  using acc_t = typename Gemm::acc_t;
  using index_t = typename Gemm::index_t;
  using Tiles = typename Core::template Tiles<acc_t>;
  using Operand = typename Tiles::Element;
  constexpr int kBlockRows = Core::kBlockRows, kBlockCols = Core::kBlockCols;
  constexpr int kBlockK = Core::kBlockK, kThreads = Core::kThreads;
  __shared__ Tiles tiles;
  __shared__ typename Gemm::Shared shared;

  const index_t row0 = index_t(blockIdx.x) * kBlockRows;
  const index_t col0 = index_t(blockIdx.y) * kBlockCols;
  const int z = int(blockIdx.z);
  typename Core::template Accumulators<acc_t> accumulators;

  // The prologue's answer is the same for every thread of the block.
  if (gemm.prologue(shared, row0, z)) {
    const index_t k_end = gemm.reduction_end(z);
    for (index_t k0 = gemm.reduction_begin(z); k0 < k_end; k0 += kBlockK) {
      // Every tile element is written, those past the matrix with zeros.
      for (int e = int(threadIdx.x); e < kBlockK * kBlockRows; e += kThreads) {
        const int r = e % kBlockRows, kk = e / kBlockRows;
        const index_t row = row0 + r, k = k0 + kk;
        tiles.a[kk][r] =
            static_cast<Operand>(row < gemm.rows && k < k_end ? gemm.load_a(row, k, z) : acc_t(0));
      }
      for (int e = int(threadIdx.x); e < kBlockK * kBlockCols; e += kThreads) {
        const int c = e % kBlockCols, kk = e / kBlockCols;
        const index_t col = col0 + c, k = k0 + kk;
        tiles.b[kk][c] =
            static_cast<Operand>(col < gemm.cols && k < k_end ? gemm.load_b(k, col, z) : acc_t(0));
      }
      __syncthreads();
      accumulators.multiply(tiles);
      __syncthreads();
    }
  }

  accumulators.for_each([&](int r, int c, acc_t sum) {
    const index_t row = row0 + r, col = col0 + c;
    if (row < gemm.rows && col < gemm.cols) gemm.epilogue(shared, r, row, col, sum, z);
  });
}

struct NoShared {};

// ---------------------------------------------------------------------------------------------
// Forward: out[p, co] = epilogue(sum_k (X*M)[p, k] * W[co, k]); z = group.

template <typename scalar_t, typename acc_t_, typename index_t_, typename Core_>
struct ForwardGemm {
  using acc_t = acc_t_;
  using index_t = index_t_;
  using Core = Core_;
  static constexpr int kBlockRows = Core::kBlockRows;
  // Threads that share one window when the prologue sums the mask.
  static constexpr int kMaskSumParts = Core::kThreads / kBlockRows;
  static_assert(Core::kThreads % kBlockRows == 0, "the prologue needs whole threads per row");

  struct Shared {
    acc_t partial_sum[kMaskSumParts][kBlockRows];
    MaskScale<acc_t> scale[kBlockRows];
    int any_valid;
  };

  ConvShape<index_t> g;
  Dividers<index_t> divide;
  MaskedInput<scalar_t, acc_t, index_t> masked_input;
  Strided4d<const scalar_t, index_t> weight;
  Strided4d<scalar_t, index_t> output;
  const scalar_t* bias;
  scalar_t* updated_mask;
  acc_t* mask_scales;
  Activation activation;
  acc_t negative_slope, window_size;
  // Rows cover max(N, mask_batch) images: with N == 0 the mask outputs are still computed.
  index_t rows, cols, reduction;

  explicit ForwardGemm(const ForwardArgs<scalar_t, acc_t>& args)
      : g(args.geometry.template as<index_t>()),
        divide(Dividers<index_t>::make(g)),
        masked_input{g, args.input.template as<index_t>(), args.mask.template as<index_t>()},
        weight(args.weight.template as<index_t>()),
        output(args.output.template as<index_t>()),
        bias(args.bias),
        updated_mask(args.updated_mask),
        mask_scales(args.mask_scales),
        activation(args.activation),
        negative_slope(args.negative_slope),
        window_size(acc_t(g.window_size())),
        rows((g.batch > g.mask_batch ? g.batch : g.mask_batch) * g.out_positions()),
        cols(g.out_channels_per_group()),
        reduction(g.reduction_size()) {}

  PCONV_HOST_DEVICE index_t reduction_begin(int) const { return 0; }
  PCONV_HOST_DEVICE index_t reduction_end(int) const { return reduction; }

  // Window sums S of the block's rows (kMaskSumParts threads per window), their scales, the mask
  // outputs (written once: by the first column tile of group 0, for images the mask has), and
  // whether any row sees a valid pixel: a tile of holes only does no matrix work.
  __device__ bool prologue(Shared& sh, index_t row0, int z) const {
    const int r = int(threadIdx.x) % kBlockRows;
    const int part = int(threadIdx.x) / kBlockRows;
    const index_t row = row0 + r;
    const Position<index_t> pos = divide.output_position(row);
    const index_t nm = g.mask_batch == 1 ? index_t(0) : pos.n;
    acc_t partial = acc_t(0);
    if (row < rows) {
      const Strided4d<const scalar_t, index_t>& m = masked_input.mask;
      const index_t strides[kDims] = {index_t(0), m.s2, m.s3}, position[kDims] = {index_t(0), pos.y, pos.x};
      partial = window_mask_sum<acc_t, scalar_t, index_t>(
          m.data != nullptr ? m.data + nm * m.s0 : nullptr,
          g.mask_channels > 1 ? g.mask_channels : index_t(1), m.s1, strides, g, position,
          index_t(part), index_t(kMaskSumParts));
    }
    sh.partial_sum[part][r] = partial;
    if (threadIdx.x == 0) sh.any_valid = 0;
    __syncthreads();
    if (part == 0) {
      acc_t s = acc_t(0);
#pragma unroll
      for (int q = 0; q < kMaskSumParts; ++q) s += sh.partial_sum[q][r];
      sh.scale[r] = mask_scale(s, window_size);
      if (row < rows) {
        if (!is_hole(sh.scale[r])) atomicMax(&sh.any_valid, 1);
        if (blockIdx.y == 0 && z == 0 && pos.n < g.mask_batch) {
          const index_t positions = divide.out_plane.divisor;
          const index_t p = row - pos.n * positions;
          mask_scales[2 * pos.n * positions + p] = sh.scale[r].ratio;
          mask_scales[(2 * pos.n + 1) * positions + p] = sh.scale[r].update;
          updated_mask[row] = static_cast<scalar_t>(sh.scale[r].update);
        }
      }
    }
    __syncthreads();
    return sh.any_valid != 0;
  }

  PCONV_HOST_DEVICE acc_t load_a(index_t row, index_t k, int group) const {
    const Position<index_t> pos = divide.output_position(row);
    if (pos.n >= g.batch) return acc_t(0);
    const Tap<index_t> tap = divide.tap(k);
    return masked_input(pos.n, group * g.in_channels_per_group() + tap.c, pos.y, pos.x, tap.ky,
                        tap.kx);
  }

  PCONV_HOST_DEVICE acc_t load_b(index_t k, index_t col, int group) const {
    const Tap<index_t> tap = divide.tap(k);
    return acc_t(weight(group * cols + col, tap.c, tap.ky, tap.kx));
  }

  PCONV_HOST_DEVICE void epilogue(const Shared& sh, int r, index_t row, index_t col, acc_t conv,
                                  int group) const {
    const Position<index_t> pos = divide.output_position(row);
    if (pos.n >= g.batch) return;
    const index_t c = group * cols + col;
    const acc_t b = bias != nullptr ? acc_t(bias[c]) : acc_t(0);
    output(pos.n, c, pos.y, pos.x) =
        static_cast<scalar_t>(partial_conv_output(conv, sh.scale[r], b, activation, negative_slope));
  }
};

// ---------------------------------------------------------------------------------------------
// grad_input[q, ci] = M[q, ci] * sum_{co, ky, kx} dL/dconv[p(q, ky, kx), co] * W[co, ci, ky, kx]
// where p(q, ky, kx) is the output position whose tap (ky, kx) reads input position q (a
// transposed convolution: taps off the stride grid contribute nothing); z = group.

template <typename scalar_t, typename acc_t_, typename index_t_, typename Core_>
struct GradInputGemm {
  using acc_t = acc_t_;
  using index_t = index_t_;
  using Core = Core_;
  using Shared = NoShared;

  ConvShape<index_t> g;
  Dividers<index_t> divide;
  ScaledOutputGrad<scalar_t, acc_t, index_t> output_grad;
  Strided4d<const scalar_t, index_t> weight, mask;
  Strided4d<scalar_t, index_t> grad_input;
  index_t rows, cols, reduction;

  explicit GradInputGemm(const BackwardArgs<scalar_t, acc_t>& args)
      : g(args.geometry.template as<index_t>()),
        divide(Dividers<index_t>::make(g)),
        output_grad{g, args.grad_output.template as<index_t>(), args.output.template as<index_t>(),
                    args.mask_scales, args.activation, args.negative_slope},
        weight(args.weight.template as<index_t>()),
        mask(args.mask.template as<index_t>()),
        grad_input(args.grad_input.template as<index_t>()),
        rows(g.batch * g.in_size[1] * g.in_size[2]),
        cols(g.in_channels_per_group()),
        reduction(g.out_channels_per_group() * g.taps()) {}

  PCONV_HOST_DEVICE index_t reduction_begin(int) const { return 0; }
  PCONV_HOST_DEVICE index_t reduction_end(int) const { return reduction; }
  __device__ bool prologue(Shared&, index_t, int) const { return true; }

  // Output coordinate whose tap k reads input coordinate i, or -1 if none does.
  PCONV_HOST_DEVICE static index_t output_coord(index_t i, index_t k, const Divider<index_t>& stride,
                                                index_t pad, index_t dilation, index_t extent) {
    const index_t o = i + pad - k * dilation;
    if (o < 0) return -1;
    const index_t q = stride.div(o);
    return q * stride.divisor == o && q < extent ? q : index_t(-1);
  }

  PCONV_HOST_DEVICE acc_t load_a(index_t row, index_t k, int group) const {
    const Position<index_t> pos = divide.input_position(row);
    const Tap<index_t> tap = divide.tap(k);  // tap.c: output channel within the group
    const index_t oy = output_coord(pos.y, tap.ky, divide.stride_h, g.pad[1], g.dilation[1], g.out_size[1]);
    const index_t ox = output_coord(pos.x, tap.kx, divide.stride_w, g.pad[2], g.dilation[2], g.out_size[2]);
    if (oy < 0 || ox < 0) return acc_t(0);
    return output_grad(pos.n, group * g.out_channels_per_group() + tap.c, oy, ox).conv;
  }

  PCONV_HOST_DEVICE acc_t load_b(index_t k, index_t col, int group) const {
    const Tap<index_t> tap = divide.tap(k);
    return acc_t(weight(group * g.out_channels_per_group() + tap.c, col, tap.ky, tap.kx));
  }

  PCONV_HOST_DEVICE void epilogue(const Shared&, int, index_t row, index_t col, acc_t sum,
                                  int group) const {
    const Position<index_t> pos = divide.input_position(row);
    const index_t c = group * cols + col;
    acc_t value = sum;  // d(X*M)/dX = M; exactly 0 in holes
    if (mask.data != nullptr) {
      const index_t nm = g.mask_batch == 1 ? index_t(0) : pos.n;
      value = masked_value(sum, acc_t(mask(nm, g.multi_channel_mask() ? c : index_t(0), pos.y, pos.x)));
    }
    grad_input(pos.n, c, pos.y, pos.x) = static_cast<scalar_t>(value);
  }
};

// ---------------------------------------------------------------------------------------------
// grad_weight partial sums: for z = group * splits + split,
//   partials[z][co][k] = sum_{p in the split's slice} dL/dconv[p, co] * (X*M)[p, k].

// Slices of the N*H'*W' reduction: enough blocks of scalar_t's matrix core to fill the GPU, each
// slice at least kMinSplitRows long, and gridDim.z = groups * splits within its limit.
template <typename scalar_t>
int64_t grad_weight_splits(const ConvGeometry& g, int64_t multiprocessors) {
  using Core = MatrixCore<scalar_t>;
  constexpr int64_t kMinSplitRows = 1024, kMaxGridZ = 65535;
  const int64_t tiles = ceil_div<int64_t>(g.out_channels_per_group(), Core::kBlockRows) *
                        ceil_div<int64_t>(g.reduction_size(), Core::kBlockCols) * g.groups;
  const int64_t reduction = g.batch * g.out_positions();
  int64_t splits = ceil_div<int64_t>(2 * multiprocessors, tiles);
  const int64_t most = ceil_div<int64_t>(reduction, kMinSplitRows);
  if (splits > most) splits = most;
  if (splits > kMaxGridZ / g.groups) splits = kMaxGridZ / g.groups;
  return splits < 1 ? 1 : splits;
}

inline int64_t grad_weight_workspace_elements(const ConvGeometry& g, int64_t splits) {
  return g.groups * splits * g.out_channels_per_group() * g.reduction_size();
}

template <typename scalar_t, typename acc_t_, typename index_t_, typename Core_>
struct GradWeightGemm {
  using acc_t = acc_t_;
  using index_t = index_t_;
  using Core = Core_;
  using Shared = NoShared;

  ConvShape<index_t> g;
  Dividers<index_t> divide;
  ScaledOutputGrad<scalar_t, acc_t, index_t> output_grad;
  MaskedInput<scalar_t, acc_t, index_t> masked_input;
  acc_t* partials;
  int splits;
  index_t slice, rows, cols, reduction;

  explicit GradWeightGemm(const BackwardArgs<scalar_t, acc_t>& args)
      : g(args.geometry.template as<index_t>()),
        divide(Dividers<index_t>::make(g)),
        output_grad{g, args.grad_output.template as<index_t>(), args.output.template as<index_t>(),
                    args.mask_scales, args.activation, args.negative_slope},
        masked_input{g, args.input.template as<index_t>(), args.mask.template as<index_t>()},
        partials(args.grad_weight_partials),
        splits(int(args.grad_weight_splits)),
        slice(0),
        rows(g.out_channels_per_group()),
        cols(g.reduction_size()),
        reduction(g.batch * g.out_positions()) {
    slice = ceil_div<index_t>(ceil_div<index_t>(reduction, index_t(splits)), Core::kBlockK) *
            Core::kBlockK;
  }

  PCONV_HOST_DEVICE index_t reduction_begin(int z) const { return index_t(z % splits) * slice; }
  PCONV_HOST_DEVICE index_t reduction_end(int z) const {
    const index_t end = reduction_begin(z) + slice;
    return end < reduction ? end : reduction;
  }
  __device__ bool prologue(Shared&, index_t, int) const { return true; }

  PCONV_HOST_DEVICE acc_t load_a(index_t row, index_t p, int z) const {
    const Position<index_t> pos = divide.output_position(p);
    return output_grad(pos.n, index_t(z / splits) * rows + row, pos.y, pos.x).conv;
  }

  PCONV_HOST_DEVICE acc_t load_b(index_t p, index_t col, int z) const {
    const Position<index_t> pos = divide.output_position(p);
    const Tap<index_t> tap = divide.tap(col);
    return masked_input(pos.n, index_t(z / splits) * g.in_channels_per_group() + tap.c, pos.y,
                        pos.x, tap.ky, tap.kx);
  }

  PCONV_HOST_DEVICE void epilogue(const Shared&, int, index_t row, index_t col, acc_t sum,
                                  int z) const {
    partials[(index_t(z) * rows + row) * cols + col] = sum;
  }
};

// grad_weight[group][co][k] = sum over the group's splits, in order, of the partial sums.
template <typename scalar_t, typename acc_t, typename index_t>
__global__ void grad_weight_reduce_kernel(const acc_t* partials, scalar_t* grad_weight,
                                          Divider<index_t> per_group, index_t total, int splits) {
  for (index_t i = index_t(blockIdx.x) * index_t(blockDim.x) + index_t(threadIdx.x); i < total;
       i += index_t(gridDim.x) * index_t(blockDim.x)) {
    const index_t group = per_group.div(i), within = i - group * per_group.divisor;
    acc_t sum = acc_t(0);
    for (int s = 0; s < splits; ++s)
      sum += partials[(group * splits + s) * per_group.divisor + within];
    grad_weight[i] = static_cast<scalar_t>(sum);
  }
}

// grad_bias[c] = sum_p dL/dbias[p, c]: one block per channel, fixed-order tree reduction.
template <typename scalar_t, typename acc_t, typename index_t>
__global__ void __launch_bounds__(kBiasThreads)
    grad_bias_kernel(const ScaledOutputGrad<scalar_t, acc_t, index_t> output_grad,
                     const Dividers<index_t> divide, scalar_t* grad_bias) {
  __shared__ acc_t partial[kBiasThreads];
  const ConvShape<index_t>& g = output_grad.g;
  const index_t c = index_t(blockIdx.x);
  const index_t positions = g.batch * g.out_positions();
  acc_t sum = acc_t(0);
  for (index_t p = index_t(threadIdx.x); p < positions; p += kBiasThreads) {
    const Position<index_t> pos = divide.output_position(p);
    sum += output_grad(pos.n, c, pos.y, pos.x).bias;
  }
  partial[threadIdx.x] = sum;
  __syncthreads();
  for (int width = kBiasThreads / 2; width > 0; width /= 2) {
    if (int(threadIdx.x) < width) partial[threadIdx.x] += partial[threadIdx.x + width];
    __syncthreads();
  }
  if (threadIdx.x == 0) grad_bias[c] = static_cast<scalar_t>(partial[0]);
}

// ---------------------------------------------------------------------------------------------
// Launchers. Under nvcc they use <<<>>>, under the host emulation the emulator's launch.

template <typename... Params, typename... Args>
void launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, cudaStream_t stream,
                   Args&&... args) {
#ifdef PCONV_CUDA_EMULATION
  (void)stream;
  cuda_emulation::launch(kernel, grid, block, 0, std::forward<Args>(args)...);
#else
  kernel<<<grid, block, 0, stream>>>(std::forward<Args>(args)...);
#endif
}

// The implicit GEMM of Problem (ForwardGemm, GradInputGemm or GradWeightGemm) on scalar_t's
// matrix core; block and grid follow the core's tile.
template <template <typename, typename, typename, typename> class Problem, typename scalar_t,
          typename acc_t, typename index_t, typename Args>
void launch_gemm(const Args& args, int64_t grid_z, cudaStream_t stream) {
  using Core = MatrixCore<scalar_t>;
  using Gemm = Problem<scalar_t, acc_t, index_t, Core>;
  const Gemm gemm(args);
  if (gemm.rows == 0) return;  // nothing to compute, and a grid of size 0 is an invalid launch
  // At least one column tile, so the forward prologue still writes the mask outputs when
  // C_out == 0.
  const int64_t col_tiles = ceil_div<int64_t>(int64_t(gemm.cols), Core::kBlockCols);
  const dim3 grid(unsigned(ceil_div<int64_t>(int64_t(gemm.rows), Core::kBlockRows)),
                  unsigned(col_tiles > 0 ? col_tiles : 1), unsigned(grid_z));
  launch_kernel(implicit_gemm_kernel<Gemm>, grid, dim3(Core::kThreads), stream, gemm);
}

template <typename scalar_t, typename acc_t, typename index_t>
void launch_forward(const ForwardArgs<scalar_t, acc_t>& args, cudaStream_t stream) {
  launch_gemm<ForwardGemm, scalar_t, acc_t, index_t>(args, args.geometry.groups, stream);
}

// The backward kernels for the gradients asked for; after_launch() runs after every launch (the
// CUDA glue checks the launch there). An empty batch needs no special case: grad_weight and
// grad_bias then reduce over nothing and come out zero.
template <typename scalar_t, typename acc_t, typename index_t, typename AfterLaunch>
void launch_backward(const BackwardArgs<scalar_t, acc_t>& args, bool need_input, bool need_weight,
                     bool need_bias, cudaStream_t stream, AfterLaunch&& after_launch) {
  const ConvGeometry& g = args.geometry;
  if (need_input && g.batch > 0) {
    launch_gemm<GradInputGemm, scalar_t, acc_t, index_t>(args, g.groups, stream);
    after_launch();
  }
  if (need_weight && g.out_channels > 0) {
    launch_gemm<GradWeightGemm, scalar_t, acc_t, index_t>(args, g.groups * args.grad_weight_splits,
                                                          stream);
    after_launch();
    const int64_t total = g.out_channels * g.reduction_size();
    const int64_t blocks = ceil_div<int64_t>(total, 256);
    launch_kernel(grad_weight_reduce_kernel<scalar_t, acc_t, index_t>,
                  dim3(unsigned(blocks < 65535 ? blocks : 65535)), dim3(256), stream,
                  args.grad_weight_partials, args.grad_weight,
                  Divider<index_t>::make(index_t(g.out_channels_per_group() * g.reduction_size())),
                  index_t(total), int(args.grad_weight_splits));
    after_launch();
  }
  if (need_bias && g.out_channels > 0) {
    const ConvShape<index_t> shape = g.template as<index_t>();
    const ScaledOutputGrad<scalar_t, acc_t, index_t> output_grad{
        shape, args.grad_output.template as<index_t>(), args.output.template as<index_t>(),
        args.mask_scales, args.activation, args.negative_slope};
    launch_kernel(grad_bias_kernel<scalar_t, acc_t, index_t>, dim3(unsigned(g.out_channels)),
                  dim3(kBiasThreads), stream, output_grad, Dividers<index_t>::make(shape),
                  args.grad_bias);
    after_launch();
  }
}

}  // namespace cuda
}  // namespace partialconv
