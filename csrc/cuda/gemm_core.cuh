// The matrix engine of the CUDA kernels: shared-memory tile layouts, the traits of each element
// type (block tile, warp tiles, stages, the warp-level multiply), and the multistage mainloop.
// It knows nothing of convolutions: a "problem" (conv_problems.cuh) supplies tile iterators that
// copy global memory into a stage with 16-byte cp.async (zero fill for padding and for rows or
// columns past the matrix), and an epilogue. Torch-free (but for c10's 16-bit float types), so
// that the host emulation in tests/cuda_emulation/ runs this very source.
//
// Element types and their matrix cores (the block tile is M x N, the reduction walked kBlockK at
// a time, each k-tile row 64 bytes of one operand):
//   c10::Half, c10::BFloat16  tensor cores, mma.sync m16n8k16, float accumulators, kBlockK 32
//   Tf32 (float32 data)       tensor cores, mma.sync m16n8k8 .tf32, float accumulators, kBlockK 16
//   float, double             CUDA cores (exact float32, float64), kBlockK 16 and 8
// Operand tiles come in two layouts: "K-contiguous" (a row of the tile is one matrix row, its 64
// bytes along the reduction: the forward and grad_input operands) and "MN-contiguous" (a row of
// the tile is one reduction index, its bytes along M or N: the grad_weight operands).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <type_traits>

#include "../partial_conv_math.h"
#include "warp_mma.cuh"

#ifndef PCONV_CUDA_EMULATION
#include <cuda_runtime.h>
#define PCONV_DYNAMIC_SHARED(type, name)                                  \
  extern __shared__ __align__(16) unsigned char pconv_dynamic_shared_[]; \
  type* name = reinterpret_cast<type*>(pconv_dynamic_shared_)
#endif

namespace partialconv {
namespace cuda {

// float32 data multiplied on TF32 tensor cores (stored as float, rounded to TF32 by the layout
// passes, so the tensor core sees exactly the values the passes wrote).
struct Tf32 {};

template <typename T>
constexpr T ceil_div(T a, T b) {
  return (a + b - 1) / b;
}

// The type that element type E stores in memory.
template <typename E>
using StorageOf = typename std::conditional<std::is_same<E, Tf32>::value, float, E>::type;

// Elements of one 16-byte chunk (the unit of every global-to-shared copy).
template <typename E>
constexpr int kChunkElements = int(16 / sizeof(StorageOf<E>));

// ---------------------------------------------------------------------------------------------
// Shared-memory tile layouts, as byte offsets of 16-byte chunks.

// kRows rows of 64 bytes (4 chunks); chunk c of row r lives at chunk c ^ ((r / 2) % 4) of its row,
// so the 8 rows that one ldmatrix matrix (or one 8-lane phase of 16-byte accesses) reads, one
// chunk column of 8 consecutive rows, fall in 8 different 16-byte bank groups.
template <int kRows>
struct KContiguousTile {
  static constexpr int kRowBytes = 64, kChunks = 4, kBytes = kRows * kRowBytes;
  static PCONV_HOST_DEVICE int offset(int row, int chunk) {
    return row * kRowBytes + ((chunk ^ ((row >> 1) & 3)) << 4);
  }
};

// kK rows (reduction indices) of kRowBytes bytes; chunk c of row k lives at chunk
// c ^ ((k << kShift) % 8): with kShift 0 the 8 consecutive rows an ldmatrix .trans matrix reads
// fall in 8 bank groups; with kShift 1 the 4-byte fragment loads of TF32 (rows k and k + 4 read
// together) do.
template <int kK, int kBytesPerRow, int kShift>
struct MNContiguousTile {
  static constexpr int kRowBytes = kBytesPerRow, kChunks = kRowBytes / 16, kBytes = kK * kRowBytes;
  static_assert(kChunks >= 8, "the swizzle permutes groups of 8 chunks");
  static PCONV_HOST_DEVICE int offset(int k, int chunk) {
    return k * kRowBytes + ((chunk ^ ((k << kShift) & 7)) << 4);
  }
};

// ---------------------------------------------------------------------------------------------
// Warp-level multiplies. Each holds a thread's accumulators for its part of the block tile,
// multiplies one stage's tiles into them (multiply), and visits its outputs (for_each).

// The mma.sync input format of a 16-bit type.
template <typename E>
struct MmaFormat {};
template <>
struct MmaFormat<c10::Half> {
  static constexpr Float16Format value = Float16Format::f16;
};
template <>
struct MmaFormat<c10::BFloat16> {
  static constexpr Float16Format value = Float16Format::bf16;
};

// Tensor cores: a 2 x 2 grid of warps, each computing a 64 x 64 warp tile as 4 x 8 mma tiles of
// 16 x 8, kMmaK of the reduction per instruction (16 for 16-bit inputs, 8 for TF32).
// Fragments (warp_mma.cuh has the layouts, with g = lane / 4, t = lane % 4):
//   K-contiguous A (rows m, 64 bytes of k): ldmatrix_x4 of the quarters (m0, k0), (m0+8, k0),
//     (m0, k0+c), (m0+8, k0+c) with c the elements of a 16-byte chunk: lane l addresses row
//     m0 + l%8 + 8*(l/8%2), chunk k0/c + l/16. For 16-bit elements these are the a0..a7 pairs of
//     m16n8k16; for TF32 each 32-bit word of a chunk row is one element, and the four matrices are
//     a0 (g, t), a1 (g+8, t), a2 (g, t+4), a3 (g+8, t+4) of m16n8k8.
//   K-contiguous B (rows n): ldmatrix_x4 of (n0, k0), (n0, k0+c), (n0+8, k0), (n0+8, k0+c): the
//     b fragments of the n8 tiles at n0 and n0+8; lane l: row n0 + l%8 + 8*(l/16), chunk
//     k0/c + l/8%2.
//   MN-contiguous, 16-bit: ldmatrix_x4 .trans, A lanes at (k0 + 8*(l/16) + l%8, m0 + 8*(l/8%2)),
//     B lanes at (k0 + 8*(l/8%2) + l%8, n0 + 8*(l/16)).
//   MN-contiguous, TF32: no transposing ldmatrix for 32-bit elements: 4-byte shared loads,
//     a0 = A(m0+g, k0+t) and so on.
template <typename E, bool kKContiguous>
struct TensorCoreMma {
  static constexpr bool kTf32 = std::is_same<E, Tf32>::value;
  static constexpr int kWarpsM = 2, kWarpsN = 2, kWarpM = 64, kWarpN = 64;
  static constexpr int kBlockM = kWarpsM * kWarpM, kBlockN = kWarpsN * kWarpN;
  static constexpr int kThreads = 32 * kWarpsM * kWarpsN;
  static constexpr int kTilesM = kWarpM / 16, kTilesN = kWarpN / 8;
  static constexpr int kMmaK = kTf32 ? 8 : 16;
  static constexpr int kBlockK = kChunkElements<E> * 4;  // 64 bytes
  using Accumulator = float;
  using TileA = typename std::conditional<kKContiguous, KContiguousTile<kBlockM>,
                                          MNContiguousTile<kBlockK, kBlockM * int(sizeof(StorageOf<E>)), kTf32 ? 1 : 0>>::type;
  using TileB = typename std::conditional<kKContiguous, KContiguousTile<kBlockN>,
                                          MNContiguousTile<kBlockK, kBlockN * int(sizeof(StorageOf<E>)), kTf32 ? 1 : 0>>::type;

  // value[i][j]: mma tile (i, j) of the warp, c0,c1: (g, 2t+{0,1}), c2,c3: (g+8, 2t+{0,1}).
  float value[kTilesM][kTilesN][4];

  __device__ TensorCoreMma() {
#pragma unroll
    for (int i = 0; i < kTilesM; ++i)
#pragma unroll
      for (int j = 0; j < kTilesN; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) value[i][j][e] = 0.0f;
  }

  static __device__ int warp_m() { return int(threadIdx.x) / 32 % kWarpsM * kWarpM; }
  static __device__ int warp_n() { return int(threadIdx.x) / 32 / kWarpsM * kWarpN; }

  __device__ void mma(const uint32_t (&a)[4], const uint32_t (&b)[2], float (&d)[4]) {
    if constexpr (kTf32)
      mma_m16n8k8_tf32(d, a, b, d);
    else
      mma_m16n8k16<MmaFormat<E>::value>(d, a, b, d);
  }

  // One k-tile: a and b point at the stage's A and B tiles.
  __device__ void multiply(const unsigned char* a, const unsigned char* b) {
    const int lane = int(threadIdx.x) % 32;
    const int m0 = warp_m(), n0 = warp_n();
#pragma unroll
    for (int kk = 0; kk < kBlockK; kk += kMmaK) {
      uint32_t af[kTilesM][4], bf[kTilesN][2];
      if constexpr (kKContiguous) {
        constexpr int c = kChunkElements<E>;
#pragma unroll
        for (int i = 0; i < kTilesM; ++i)
          ldmatrix_x4(af[i], a + TileA::offset(m0 + i * 16 + lane % 8 + 8 * (lane / 8 % 2), kk / c + lane / 16));
#pragma unroll
        for (int j = 0; j < kTilesN; j += 2) {
          uint32_t pair[4];
          ldmatrix_x4(pair, b + TileB::offset(n0 + j * 8 + lane % 8 + 8 * (lane / 16), kk / c + lane / 8 % 2));
          bf[j][0] = pair[0], bf[j][1] = pair[1], bf[j + 1][0] = pair[2], bf[j + 1][1] = pair[3];
        }
      } else if constexpr (!kTf32) {
#pragma unroll
        for (int i = 0; i < kTilesM; ++i) {
          const int m = m0 + i * 16 + 8 * (lane / 8 % 2);
          ldmatrix_x4_trans(af[i], a + TileA::offset(kk + 8 * (lane / 16) + lane % 8, m / 8));
        }
#pragma unroll
        for (int j = 0; j < kTilesN; j += 2) {
          uint32_t pair[4];
          const int n = n0 + j * 8 + 8 * (lane / 16);
          ldmatrix_x4_trans(pair, b + TileB::offset(kk + 8 * (lane / 8 % 2) + lane % 8, n / 8));
          bf[j][0] = pair[0], bf[j][1] = pair[1], bf[j + 1][0] = pair[2], bf[j + 1][1] = pair[3];
        }
      } else {
        // Element (k, x) of an MN-contiguous TF32 tile is word x % 4 of chunk x / 4 of row k. The
        // fragments read k = kk + t (+ 4) and x = w0 + x0 + g, w0 the warp's first row (column),
        // a multiple of 64, and x0 a multiple of 8 known at compile time: the row's swizzle
        // (2k) % 8 = 2t is the lane's own, and with x0 / 4 even, chunk ^ 2t =
        // w0 / 4 + (x0 / 4 & ~7) + ((x0 / 4 & 7) ^ (g / 4) ^ 2t). So each lane computes its four
        // bases (one per x0 / 4 % 8) once, and every load is a base plus a constant.
        const int g = lane / 4, t = lane % 4;
        const unsigned char* a_base[4];
        const unsigned char* b_base[4];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const int within = ((((2 * j) ^ (g / 4) ^ (2 * t))) << 4) + (g % 4) * 4;
          a_base[j] = a + (kk + t) * TileA::kRowBytes + m0 * 4 + within;
          b_base[j] = b + (kk + t) * TileB::kRowBytes + n0 * 4 + within;
        }
        // x0: the compile-time part of the column; dk: 0 or 4 rows further.
        const auto word = [](const unsigned char* const (&base)[4], int row_bytes, int dk, int x0) {
          return load_shared_32(base[(x0 / 4 & 7) / 2] + dk * row_bytes + (x0 / 4 & ~7) * 16);
        };
#pragma unroll
        for (int i = 0; i < kTilesM; ++i) {
          af[i][0] = word(a_base, TileA::kRowBytes, 0, i * 16), af[i][1] = word(a_base, TileA::kRowBytes, 0, i * 16 + 8);
          af[i][2] = word(a_base, TileA::kRowBytes, 4, i * 16), af[i][3] = word(a_base, TileA::kRowBytes, 4, i * 16 + 8);
        }
#pragma unroll
        for (int j = 0; j < kTilesN; ++j) {
          bf[j][0] = word(b_base, TileB::kRowBytes, 0, j * 8), bf[j][1] = word(b_base, TileB::kRowBytes, 4, j * 8);
        }
      }
#pragma unroll
      for (int i = 0; i < kTilesM; ++i)
#pragma unroll
        for (int j = 0; j < kTilesN; ++j) mma(af[i], bf[j], value[i][j]);
    }
  }

  // visit(r, c, sum) for every output of the thread, r and c within the block tile.
  template <typename Visit>
  __device__ void for_each(Visit&& visit) const {
    const int lane = int(threadIdx.x) % 32;
    const int r0 = warp_m() + lane / 4, c0 = warp_n() + 2 * (lane % 4);
#pragma unroll
    for (int i = 0; i < kTilesM; ++i)
#pragma unroll
      for (int j = 0; j < kTilesN; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) visit(r0 + i * 16 + 8 * (e / 2), c0 + j * 8 + e % 2, value[i][j][e]);
  }
};

// CUDA cores, exact: 256 threads as 16 x 16, each computing 8 x kThreadN outputs of a 128 x
// (16 * kThreadN) tile (kThreadN 8 for float, 4 for double: 64 double accumulators).
// K-contiguous tiles: thread (tx, ty) owns rows tx + 16*i and columns ty + 16*j, and reads one
// 16-byte chunk (kChunkElements reduction indices) of each of its rows and columns per step: the
// 8 lanes of a 16-byte phase read 8 consecutive rows, conflict free under the swizzle.
// MN-contiguous tiles: the thread owns whole chunks of rows (and of columns), chunks tx + 16*i
// (ty + 16*j), read as 16-byte loads along M (N) for each reduction index.
template <typename T, bool kKContiguous>
struct SimtMma {
  static constexpr int kThreadsM = 16, kThreadsN = 16, kThreadM = 8, kThreadN = sizeof(T) == 8 ? 4 : 8;
  static constexpr int kBlockM = kThreadsM * kThreadM, kBlockN = kThreadsN * kThreadN;
  static constexpr int kThreads = kThreadsM * kThreadsN;
  static constexpr int kChunk = kChunkElements<T>;
  static constexpr int kBlockK = kChunk * 4;
  using Accumulator = T;
  using TileA = typename std::conditional<kKContiguous, KContiguousTile<kBlockM>,
                                          MNContiguousTile<kBlockK, kBlockM * int(sizeof(T)), 0>>::type;
  using TileB = typename std::conditional<kKContiguous, KContiguousTile<kBlockN>,
                                          MNContiguousTile<kBlockK, kBlockN * int(sizeof(T)), 0>>::type;

  T value[kThreadM][kThreadN];

  __device__ SimtMma() {
#pragma unroll
    for (int i = 0; i < kThreadM; ++i)
#pragma unroll
      for (int j = 0; j < kThreadN; ++j) value[i][j] = T(0);
  }

  static __device__ int tx() { return int(threadIdx.x) % kThreadsM; }
  static __device__ int ty() { return int(threadIdx.x) / kThreadsM; }

  // Row of the block tile that the thread's i-th row is.
  static __device__ int row(int i) {
    return kKContiguous ? tx() + kThreadsM * i : (tx() + kThreadsM * (i / kChunk)) * kChunk + i % kChunk;
  }
  static __device__ int col(int j) {
    return kKContiguous ? ty() + kThreadsN * j : (ty() + kThreadsN * (j / kChunk)) * kChunk + j % kChunk;
  }

  static __device__ void load_chunk(const unsigned char* address, T (&out)[kChunk]) {
    const uint4 bits = load_shared_128(address);
    static_assert(sizeof(uint4) == sizeof(out), "one chunk");
    __builtin_memcpy(&out, &bits, sizeof(out));
  }

  __device__ void multiply(const unsigned char* a, const unsigned char* b) {
    if constexpr (kKContiguous) {
#pragma unroll
      for (int chunk = 0; chunk < 4; ++chunk) {
        T af[kThreadM][kChunk], bf[kThreadN][kChunk];
#pragma unroll
        for (int i = 0; i < kThreadM; ++i) load_chunk(a + TileA::offset(row(i), chunk), af[i]);
#pragma unroll
        for (int j = 0; j < kThreadN; ++j) load_chunk(b + TileB::offset(col(j), chunk), bf[j]);
#pragma unroll
        for (int kk = 0; kk < kChunk; ++kk)
#pragma unroll
          for (int i = 0; i < kThreadM; ++i)
#pragma unroll
            for (int j = 0; j < kThreadN; ++j) value[i][j] += af[i][kk] * bf[j][kk];
      }
    } else {
#pragma unroll 4
      for (int k = 0; k < kBlockK; ++k) {
        T af[kThreadM], bf[kThreadN];
#pragma unroll
        for (int i = 0; i < kThreadM / kChunk; ++i)
          load_chunk(a + TileA::offset(k, tx() + kThreadsM * i), reinterpret_cast<T(&)[kChunk]>(af[i * kChunk]));
#pragma unroll
        for (int j = 0; j < kThreadN / kChunk; ++j)
          load_chunk(b + TileB::offset(k, ty() + kThreadsN * j), reinterpret_cast<T(&)[kChunk]>(bf[j * kChunk]));
#pragma unroll
        for (int i = 0; i < kThreadM; ++i)
#pragma unroll
          for (int j = 0; j < kThreadN; ++j) value[i][j] += af[i] * bf[j];
      }
    }
  }

  template <typename Visit>
  __device__ void for_each(Visit&& visit) const {
#pragma unroll
    for (int i = 0; i < kThreadM; ++i)
#pragma unroll
      for (int j = 0; j < kThreadN; ++j) visit(row(i), col(j), value[i][j]);
  }
};

// The warp-level multiply of an element type for K-contiguous or MN-contiguous operand tiles.
template <typename E, bool kKContiguous>
using WarpMma = typename std::conditional<std::is_same<E, double>::value || std::is_same<E, float>::value,
                                          SimtMma<E, kKContiguous>, TensorCoreMma<E, kKContiguous>>::type;

// Everything the mainloop needs to know about a kernel, in one place.
template <typename E, bool kKContiguous>
struct GemmTraits {
  using Storage = StorageOf<E>;
  using Mma = WarpMma<E, kKContiguous>;
  using Accumulator = typename Mma::Accumulator;
  using TileA = typename Mma::TileA;
  using TileB = typename Mma::TileB;
  static constexpr int kBlockM = Mma::kBlockM, kBlockN = Mma::kBlockN, kBlockK = Mma::kBlockK;
  static constexpr int kThreads = Mma::kThreads;
  static constexpr int kChunk = kChunkElements<E>;
  // Stages of the shared-memory ring: copies of the next kStages - 1 k-tiles are in flight while
  // one is multiplied.
  static constexpr int kStages = 4;
  static constexpr int kStageBytes = TileA::kBytes + TileB::kBytes;
  static constexpr int kSharedBytes = kStages * kStageBytes;
  // 16-byte chunks of the A and B tiles each thread copies per k-tile.
  static constexpr int kChunksA = TileA::kBytes / 16 / kThreads;
  static constexpr int kChunksB = TileB::kBytes / 16 / kThreads;
  static_assert(kChunksA * kThreads * 16 == TileA::kBytes && kChunksB * kThreads * 16 == TileB::kBytes,
                "every thread copies whole chunks");
};

// ---------------------------------------------------------------------------------------------
// The kernel: one block computes a kBlockM x kBlockN tile of one GEMM of the problem.
//
// Problem interface (conv_problems.cuh): Traits, Params, and a Block built from the params and
// the shared memory in every thread: k_tiles() (its range of the reduction; 0 when the tile needs
// no matrix work), Block::Iterators (built from the block: copy(stage_a, stage_b) issues the
// thread's cp.async of the current k-tile, advance() moves to the next one) and epilogue(mma).
//
// Mainloop (CUTLASS's multistage shape): copies of k-tiles 0 .. S-2 are issued first, one commit
// group each; then per k-tile kt: wait until tile kt landed (at most S-2 groups pending), one
// __syncthreads (which also tells that every warp is done reading the stage about to be refilled),
// issue the copies of tile kt + S - 1 into that stage, multiply stage kt % S. Groups are committed
// even when empty, so the count of pending groups stays exact at the end of the reduction.
template <class Problem>
__global__ void __launch_bounds__(Problem::Traits::kThreads) conv_gemm_kernel(const typename Problem::Params params) {
  using Traits = typename Problem::Traits;
  PCONV_DYNAMIC_SHARED(unsigned char, shared);
  const typename Problem::Block block(params, shared);
  typename Traits::Mma mma;
  typename Problem::Block::Iterators iterators(block);
  const int k_tiles = block.k_tiles();
  const auto stage_a = [&](int s) { return shared + s * Traits::kStageBytes; };
  const auto stage_b = [&](int s) { return shared + s * Traits::kStageBytes + Traits::TileA::kBytes; };

#pragma unroll
  for (int s = 0; s < Traits::kStages - 1; ++s) {
    if (s < k_tiles) {
      iterators.copy(stage_a(s), stage_b(s));
      iterators.advance();
    }
    cp_async_commit();
  }
  int read_stage = 0, write_stage = Traits::kStages - 1;
#pragma unroll 1
  for (int kt = 0; kt < k_tiles; ++kt) {
    cp_async_wait<Traits::kStages - 2>();
    __syncthreads();
    if (kt + Traits::kStages - 1 < k_tiles) {
      iterators.copy(stage_a(write_stage), stage_b(write_stage));
      iterators.advance();
    }
    cp_async_commit();
    mma.multiply(stage_a(read_stage), stage_b(read_stage));
    read_stage = read_stage == Traits::kStages - 1 ? 0 : read_stage + 1;
    write_stage = write_stage == Traits::kStages - 1 ? 0 : write_stage + 1;
  }
  cp_async_wait<0>();
  block.epilogue(mma);
}

}  // namespace cuda
}  // namespace partialconv
