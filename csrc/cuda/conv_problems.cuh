// The three convolution GEMMs on gemm_core.cuh's mainloop: their host-precomputed Params, the tile
// iterators that copy their operands into a stage, and their epilogues. Torch-free.
//
// Operands are prepared by the passes of layout_kernels.cuh, channels-last with every group's
// channels padded to a multiple of a 16-byte chunk (`channels` below), so each 16-byte copy reads
// 8 (16-bit), 4 (float) or 2 (double) channels of one pixel of one group:
//   Xm  masked input  (N, D, H, W, groups, channels)       X*M, 0 in holes and padding channels
//   GC  scaled output gradient (N, D', H', W', groups, out channels)   dL/dconv
//   weights rearranged per GEMM so that the reduction is contiguous.
//
// Gather GEMM (forward and grad_input): rows are the points of a grid, each gathering its
// reduction from the source at   coordinate = grid point * scale + offset + tap delta:
//   forward     grid = output positions, scale = stride, offset = -padding, delta = tap * dilation,
//               source Xm, columns = output channels of the group, B = weight (C_out, taps, C_in)
//   grad_input  one GEMM per stride phase r (input coordinates = r mod stride), up to
//               kMaxPhasesPerLaunch of them in one launch: grid = the input positions of the phase
//               (i = i' * stride + r), scale 1, offset 0, and only the taps that reach the phase,
//               delta = (r + padding - tap * dilation) / stride: taps off the stride grid are
//               never visited. Source GC, columns = input channels, B = weight (C_in, taps, C_out).
//   The reduction is tap-major, k = j * channels + c over the taps j of a table; a thread keeps
//   (j, c) of its chunk and advances it by one k-tile with an add and one compare: no division
//   in the mainloop.
// Weight-gradient GEMM: rows = output channels, columns = (tap, input channel), reduction = all
// output positions of the batch: A = GC (MN-contiguous along output channels), B = Xm gathered at
// position * stride - padding + tap * dilation (MN-contiguous along input channels).
//
// A reduction split in `splits` slices (z = group * splits + split, after the z of the launch's
// earlier phases) writes fp32 (fp64) partial sums; reduce_splits_kernel adds them in a fixed order
// and applies the epilogue: deterministic.
#pragma once

#include <cstdint>

#include "gemm_core.cuh"

namespace partialconv {
namespace cuda {

// A tensor as the host passes it: pointer plus element strides of (n, c, depth, height, width)
// (a 1-D or 2-D tensor has stride 0 in its missing leading dimensions).
template <typename T, typename index_t>
struct TensorRef {
  T* data = nullptr;
  index_t stride[2 + kDims] = {0, 0, 0, 0, 0};

  PCONV_HOST_DEVICE index_t offset(index_t n, index_t c, const index_t (&x)[kDims]) const {
    return n * stride[0] + c * stride[1] + x[0] * stride[2] + x[1] * stride[3] + x[2] * stride[4];
  }
};

// Coordinates are 32-bit in every kernel: the CUDA backend keeps every extent, padding and dilated
// kernel below kMaxCoordinate, so a coordinate, a tap delta and their sum fit; element offsets are
// index_t (32- or 64-bit).
using coord_t = int32_t;
constexpr int64_t kMaxCoordinate = int64_t(1) << 29;

// One tap of a gather table: the coordinate deltas it adds, and where its weights start in a row
// of the rearranged weight (tap index * channels).
template <typename index_t>
struct alignas(16) TapDelta {
  coord_t delta[kDims];
  index_t weight_offset;
};

// The window origin of one output position of the batch (weight gradient): the input coordinates
// of its tap (0, 0, 0), position * stride - padding, and their element offset in Xm.
template <typename index_t>
struct alignas(16) PositionEntry {
  index_t offset;
  coord_t origin[kDims];
};

// The points of a batch x grid[0] x grid[1] x grid[2] grid, numbered in raster order.
template <typename index_t>
struct GridDecode {
  Divider<index_t> per_image, per_plane, per_line;

  static GridDecode make(const index_t (&grid)[kDims]) {
    return {Divider<index_t>::make(grid[0] * grid[1] * grid[2]), Divider<index_t>::make(grid[1] * grid[2]),
            Divider<index_t>::make(grid[2])};
  }
  // n, and the grid coordinates x[] of point m; returns the point's index within its image.
  PCONV_HOST_DEVICE index_t decode(index_t m, index_t& n, index_t (&x)[kDims]) const {
    n = per_image.div(m);
    const index_t p = m - n * per_image.divisor;
    x[0] = per_plane.div(p);
    const index_t q = p - x[0] * per_plane.divisor;
    x[1] = per_line.div(q);
    x[2] = q - x[1] * per_line.divisor;
    return p;
  }
};

// The reduction range of one split: k-tiles [begin, begin + count).
struct SplitRange {
  int begin, count;
};

// The stride phases of grad_input one GEMM launch covers at most (8: stride 2 in 3-D).
constexpr int kMaxPhasesPerLaunch = 8;

PCONV_HOST_DEVICE SplitRange split_range(int split, int tiles_per_split, int total) {
  const int begin = split * tiles_per_split;
  const int end = begin + tiles_per_split < total ? begin + tiles_per_split : total;
  return {begin, end > begin ? end - begin : 0};
}

// Where a block's fp32/fp64 partial sums go when the reduction is split: workspace[z][row][col].
template <typename acc_t, typename index_t>
struct SplitOutput {
  acc_t* workspace;
  index_t rows, cols;
  PCONV_HOST_DEVICE acc_t& at(int z, index_t row, index_t col) const {
    return workspace[(index_t(z) * rows + row) * cols + col];
  }
};

// ---------------------------------------------------------------------------------------------
// Epilogues. prepare(row) computes what is shared by a row's outputs, store(row info, col, sum)
// writes one output; both run in the GEMM kernel (unsplit) and in reduce_splits_kernel.

// out = act((sum * ratio + bias) * U), written in the output's layout; rows are output positions.
template <typename scalar_t, typename acc_t, typename index_t>
struct ForwardEpilogue {
  struct Params {
    TensorRef<scalar_t, index_t> output;
    const scalar_t* bias;       // nullptr: no bias
    const acc_t* mask_scales;   // read through mask_scale_rows
    index_t mask_batch, positions, out_channels_per_group;
    Activation activation;
    acc_t negative_slope;
  };
  struct Row {
    index_t n, p, x[kDims];
  };

  PCONV_HOST_DEVICE static MaskScale<acc_t> scale(const Params& e, index_t n, index_t p) {
    const MaskScaleRows<const acc_t> rows = mask_scale_rows(e.mask_scales, e.mask_batch, e.positions, n);
    return {rows.ratio[p], rows.update[p]};
  }
  PCONV_HOST_DEVICE static void store(const Params& e, const Row& row, int group, index_t col, acc_t sum) {
    const index_t c = index_t(group) * e.out_channels_per_group + col;
    const acc_t b = e.bias != nullptr ? acc_t(e.bias[c]) : acc_t(0);
    e.output.data[e.output.offset(row.n, c, row.x)] =
        static_cast<scalar_t>(partial_conv_output(sum, scale(e, row.n, row.p), b, e.activation, e.negative_slope));
  }
};

// grad_input = M * sum at input position i = i' * stride + phase, exactly 0 in holes; rows are
// the phase's grid points i'.
template <typename scalar_t, typename acc_t, typename index_t>
struct GradInputEpilogue {
  struct Params {
    TensorRef<scalar_t, index_t> grad_input;
    TensorRef<const scalar_t, index_t> mask;  // data nullptr: no mask
    index_t mask_batch, mask_channels;         // mask_channels > 1: one per input channel
    index_t in_channels_per_group;
  };
  struct Row {
    index_t n, p, x[kDims];  // x: input coordinates
  };

  PCONV_HOST_DEVICE static void store(const Params& e, const Row& row, int group, index_t col, acc_t sum) {
    const index_t c = index_t(group) * e.in_channels_per_group + col;
    acc_t value = sum;
    if (e.mask.data != nullptr) {
      const index_t nm = e.mask_batch == 1 ? index_t(0) : row.n;
      value = masked_value(sum, acc_t(e.mask.data[e.mask.offset(nm, e.mask_channels > 1 ? c : index_t(0), row.x)]));
    }
    e.grad_input.data[e.grad_input.offset(row.n, c, row.x)] = static_cast<scalar_t>(value);
  }
};

// ---------------------------------------------------------------------------------------------
// Gather GEMM: forward (Epilogue = ForwardEpilogue) and grad_input (GradInputEpilogue).

template <typename E, typename scalar_t, typename index_t, template <typename, typename, typename> class EpilogueT>
struct GatherGemm {
  using Traits = GemmTraits<E, true>;
  using Storage = typename Traits::Storage;
  using acc_t = typename Traits::Accumulator;
  using Epilogue = EpilogueT<scalar_t, acc_t, index_t>;
  static constexpr bool kForward = std::is_same<Epilogue, ForwardEpilogue<scalar_t, acc_t, index_t>>::value;
  static constexpr int kBlockM = Traits::kBlockM, kBlockN = Traits::kBlockN, kBlockK = Traits::kBlockK;

  // One GEMM of the launch: the forward's only one, or one stride phase of grad_input (a launch
  // runs up to kMaxPhasesPerLaunch of them, so that the small GEMMs of deep layers fill the GPU
  // together). z = z_begin + group * splits + split.
  struct Phase {
    index_t rows;              // batch * prod(grid)
    GridDecode<index_t> grid;
    const TapDelta<index_t>* taps;
    int tap_count, k_tiles, splits, k_tiles_per_split, z_begin;
    index_t output_offset[kDims];        // epilogue coordinates: grid * output_scale + output_offset
    SplitOutput<acc_t, index_t> partials;  // used when splits > 1
  };

  struct Params {
    index_t cols;              // this GEMM's columns per group
    // The gathered operand (Xm or GC) and the coordinates a grid point reads.
    const Storage* a;
    index_t a_image, a_step[kDims], a_group;
    coord_t a_extent[kDims], scale[kDims], offset[kDims];
    index_t channels;          // padded channels of a group: the reduction per tap
    int step_taps, step_channels;  // one k-tile = step_taps * channels + step_channels
    // The rearranged weight: element (k = j * channels + c, col) of group g at
    // b + g * b_group + col * b_row + taps[j].weight_offset + c.
    const Storage* b;
    index_t b_row, b_group;
    index_t output_scale[kDims];
    int phase_count;
    Phase phases[kMaxPhasesPerLaunch];
    typename Epilogue::Params epilogue;
  };

  struct Block {
    const Params& p;
    const Phase& phase;
    unsigned char* shared;
    index_t m0, n0;
    int z, group;  // z within the phase
    SplitRange range;

    // The phase of blockIdx.z: the last one that starts at or before it.
    static __device__ const Phase& phase_of(const Params& params) {
      int ph = 0;
      while (ph + 1 < params.phase_count && int(blockIdx.z) >= params.phases[ph + 1].z_begin) ++ph;
      return params.phases[ph];
    }

    __device__ Block(const Params& params, unsigned char* shared_memory)
        : p(params),
          phase(phase_of(params)),
          shared(shared_memory),
          m0(index_t(blockIdx.x) * kBlockM),
          n0(index_t(blockIdx.y) * kBlockN),
          z(int(blockIdx.z) - phase.z_begin),
          group(z / phase.splits),
          range(split_range(z % phase.splits, phase.k_tiles_per_split, phase.k_tiles)) {
      if (m0 >= phase.rows) range.count = 0;  // a phase with fewer row tiles than the launch
      if constexpr (kForward) {
        if (!any_valid_row()) range.count = 0;  // a tile of holes only: no matrix work, zeros out
      }
    }

    __device__ int k_tiles() const { return range.count; }

    // Whether a row of the tile sees a valid pixel (the same answer in every thread).
    __device__ bool any_valid_row() {
      int* flag = reinterpret_cast<int*>(shared);
      if (threadIdx.x == 0) *flag = 0;
      __syncthreads();
      for (int r = int(threadIdx.x); r < kBlockM; r += Traits::kThreads) {
        const index_t m = m0 + r;
        if (m >= phase.rows) break;
        index_t n, x[kDims];
        const index_t pos = phase.grid.decode(m, n, x);
        if (!is_hole(Epilogue::scale(p.epilogue, n, pos))) atomicMax(flag, 1);
      }
      __syncthreads();
      const bool any = *flag != 0;
      __syncthreads();  // the flag's word is the first stage's: read before the copies overwrite it
      return any;
    }

    // Copies both operands of a k-tile. Thread t copies chunk column t % 4 of rows t / 4 + kRowStep
    // * i of the A tile (grid points) and of the B tile (columns): the same reduction indices.
    // What the copies need of the parameters is kept in registers.
    struct Iterators {
      static constexpr int kRowStep = Traits::kThreads / 4;
      const Storage* a;
      const Storage* b;
      const TapDelta<index_t>* taps;
      int tap_count, channels, step_taps, step_channels;
      int tap, channel;                // (j, c) of the thread's reduction index
      index_t a_step[kDims];
      coord_t a_extent[kDims];
      bool row_valid[Traits::kChunksA], col_valid[Traits::kChunksB];
      index_t row_base[Traits::kChunksA];
      coord_t row_coord[Traits::kChunksA][kDims];
      const Storage* col_base[Traits::kChunksB];
      int a_shared[Traits::kChunksA], b_shared[Traits::kChunksB];  // destinations in a stage

      __device__ explicit Iterators(const Block& block)
          : a(block.p.a),
            b(block.p.b),
            taps(block.phase.taps),
            tap_count(block.phase.tap_count),
            channels(int(block.p.channels)),
            step_taps(block.p.step_taps),
            step_channels(block.p.step_channels) {
        const Params& p = block.p;
        const int chunk = int(threadIdx.x) % 4;
        const int k = block.range.begin * kBlockK + chunk * Traits::kChunk;
        tap = k / channels;
        channel = k - tap * channels;
        for (int d = 0; d < kDims; ++d) a_step[d] = p.a_step[d], a_extent[d] = p.a_extent[d];
        const index_t group_a = index_t(block.group) * p.a_group;
#pragma unroll
        for (int i = 0; i < Traits::kChunksA; ++i) {
          const int r = int(threadIdx.x) / 4 + kRowStep * i;
          const index_t m = block.m0 + r;
          row_valid[i] = m < block.phase.rows;
          index_t n, x[kDims];
          block.phase.grid.decode(row_valid[i] ? m : index_t(0), n, x);
          row_base[i] = n * p.a_image + group_a;
#pragma unroll
          for (int d = 0; d < kDims; ++d) {
            row_coord[i][d] = coord_t(x[d]) * p.scale[d] + p.offset[d];
            row_base[i] += index_t(row_coord[i][d]) * p.a_step[d];
          }
          a_shared[i] = Traits::TileA::offset(r, chunk);
        }
#pragma unroll
        for (int i = 0; i < Traits::kChunksB; ++i) {
          const int r = int(threadIdx.x) / 4 + kRowStep * i;
          const index_t col = block.n0 + r;
          col_valid[i] = col < p.cols;
          col_base[i] = p.b + index_t(block.group) * p.b_group + (col_valid[i] ? col : index_t(0)) * p.b_row;
          b_shared[i] = Traits::TileB::offset(r, chunk);
        }
      }

      __device__ void copy(unsigned char* stage_a, unsigned char* stage_b) const {
        const bool k_valid = tap < tap_count;
        const TapDelta<index_t> t = taps[k_valid ? tap : 0];
        const index_t a_offset = index_t(t.delta[0]) * a_step[0] + index_t(t.delta[1]) * a_step[1] +
                                 index_t(t.delta[2]) * a_step[2] + channel;
#pragma unroll
        for (int i = 0; i < Traits::kChunksA; ++i) {
          bool inside = k_valid && row_valid[i];
#pragma unroll
          for (int d = 0; d < kDims; ++d)
            inside = inside && uint32_t(row_coord[i][d] + t.delta[d]) < uint32_t(a_extent[d]);
          cp_async_zfill<16>(stage_a + a_shared[i], inside ? a + (row_base[i] + a_offset) : a, inside ? 16 : 0);
        }
        const index_t b_offset = t.weight_offset + channel;
#pragma unroll
        for (int i = 0; i < Traits::kChunksB; ++i) {
          const bool valid = k_valid && col_valid[i];
          cp_async_zfill<16>(stage_b + b_shared[i], valid ? col_base[i] + b_offset : b, valid ? 16 : 0);
        }
      }

      __device__ void advance() {
        channel += step_channels;
        tap += step_taps;
        if (channel >= channels) {
          channel -= channels;
          ++tap;
        }
      }
    };

    template <typename Mma>
    __device__ void epilogue(const Mma& mma) const {
      const bool split = phase.splits > 1;
      mma.for_each([&](int r, int c, acc_t sum) {
        const index_t row = m0 + r, col = n0 + c;
        if (row >= phase.rows || col >= p.cols) return;
        if (split) {
          phase.partials.at(z, row, col) = sum;
          return;
        }
        store(p, phase, row, group, col, sum);
      });
    }
  };

  // The epilogue of one output: decodes its row (the grid point) into the epilogue's coordinates.
  PCONV_HOST_DEVICE static void store(const Params& p, const Phase& phase, index_t row, int group, index_t col,
                                      acc_t sum) {
    typename Epilogue::Row info;
    index_t x[kDims];
    info.p = phase.grid.decode(row, info.n, x);
    for (int d = 0; d < kDims; ++d) info.x[d] = x[d] * p.output_scale[d] + phase.output_offset[d];
    Epilogue::store(p.epilogue, info, group, col, sum);
  }

  // What reduce_splits_kernel sums for phase `ph` of the launch.
  PCONV_HOST_DEVICE static const Phase& reduction(const Params& p, int ph) { return p.phases[ph]; }
};

// ---------------------------------------------------------------------------------------------
// Weight-gradient GEMM: grad_weight[g][co][(j, c)] = sum over positions q of
// GC[q][g][co] * Xm[position q * stride - padding + tap j * dilation][g][c].

template <typename scalar_t, typename acc_t, typename index_t>
struct GradWeightEpilogue {
  struct Params {
    scalar_t* grad_weight;             // (C_out, C_in / groups, *kernel), contiguous
    index_t out_channels_per_group, in_channels_per_group, taps;
    index_t channels;                  // padded input channels of a group
  };
  // col = tap * channels + c; padding channels (c >= C_in / groups) are dropped.
  PCONV_HOST_DEVICE static void store(const Params& e, int group, index_t row, index_t col, acc_t sum) {
    const index_t tap = col / e.channels, c = col - tap * e.channels;
    if (c >= e.in_channels_per_group) return;
    const index_t co = index_t(group) * e.out_channels_per_group + row;
    e.grad_weight[(co * e.in_channels_per_group + c) * e.taps + tap] = static_cast<scalar_t>(sum);
  }
};

template <typename E, typename scalar_t, typename index_t>
struct GradWeightGemm {
  using Traits = GemmTraits<E, false>;
  using Storage = typename Traits::Storage;
  using acc_t = typename Traits::Accumulator;
  using Epilogue = GradWeightEpilogue<scalar_t, acc_t, index_t>;
  static constexpr int kBlockM = Traits::kBlockM, kBlockN = Traits::kBlockN, kBlockK = Traits::kBlockK;
  // 16-byte chunks of a tile row (one reduction index) of A and of B.
  static constexpr int kChunksPerRowA = Traits::TileA::kChunks, kChunksPerRowB = Traits::TileB::kChunks;

  struct Params {
    index_t rows, cols, positions;  // C_out / groups, taps * channels, batch * prod(output size)
    // Per output position of the batch, and kBlockK more past the end (position_table_kernel).
    const PositionEntry<index_t>* origins;
    // GC: element (q, g, co) at gc + q * gc_pixel + g * gc_group + co; zero rows past the last
    // position up to a whole k-tile more.
    const Storage* gc;
    index_t gc_pixel, gc_group, gc_channels;
    const Storage* x;               // Xm
    index_t x_step[kDims], x_group;
    coord_t x_extent[kDims];
    index_t channels;               // padded input channels of a group
    const TapDelta<index_t>* taps;  // delta = tap * dilation
    int splits, k_tiles_per_split, k_tiles;
    SplitOutput<acc_t, index_t> partials;
    typename Epilogue::Params epilogue;
  };

  struct Block {
    const Params& p;
    index_t m0, n0;
    int z, group;
    SplitRange range;

    __device__ Block(const Params& params, unsigned char*)
        : p(params),
          m0(index_t(blockIdx.x) * kBlockM),
          n0(index_t(blockIdx.y) * kBlockN),
          z(int(blockIdx.z)),
          group(int(blockIdx.z) / params.splits),
          range(split_range(int(blockIdx.z) % params.splits, params.k_tiles_per_split, params.k_tiles)) {}

    __device__ int k_tiles() const { return range.count; }

    // A: GC, the thread's chunk column (output channels) fixed, rows = positions. B: Xm, the
    // thread's chunk columns (kColumnsB of them, each one tap and kChunk input channels) fixed,
    // rows = kRowsB positions whose window origins come from a table, loaded one k-tile ahead
    // (advance), so that no load latency and no index decode sits between a k-tile and its copies;
    // each origin serves the thread's columns. GC and the table are padded to whole k-tiles (zero
    // rows, origins outside the input), so no row needs a bounds test of its own.
    struct Iterators {
      static constexpr int kRowStepA = Traits::kThreads / kChunksPerRowA;
      static constexpr int kColumnsB = Traits::kChunksB >= 2 ? 2 : 1;
      static constexpr int kRowsB = Traits::kChunksB / kColumnsB;
      static constexpr int kColumnGroupsB = kChunksPerRowB / kColumnsB;
      static constexpr int kRowStepB = Traits::kThreads / kColumnGroupsB;
      const Storage* a_tile;          // GC at the k-tile's first position and the thread's column
      const Storage* x;
      const PositionEntry<index_t>* origins;  // at the k-tile's first position
      index_t a_step;                 // kBlockK positions of GC
      index_t a_row[Traits::kChunksA];  // offsets of the thread's rows from a_tile
      int a_shared[Traits::kChunksA], b_shared[kRowsB][kColumnsB];  // destinations in a stage
      bool col_a_valid, col_b_valid[kColumnsB];
      coord_t extent[kDims];
      coord_t tap_delta[kColumnsB][kDims];
      index_t tap_offset[kColumnsB];  // of the column's tap and channels from a window origin
      PositionEntry<index_t> origin[kRowsB];

      __device__ explicit Iterators(const Block& block) : x(block.p.x) {
        const Params& p = block.p;
        const index_t q0 = index_t(block.range.begin) * kBlockK;
        const int chunk_a = int(threadIdx.x) % kChunksPerRowA;
        const index_t co = block.m0 + index_t(chunk_a) * Traits::kChunk;
        col_a_valid = co < p.gc_channels;
        a_tile = p.gc + q0 * p.gc_pixel + index_t(block.group) * p.gc_group + (col_a_valid ? co : index_t(0));
        a_step = kBlockK * p.gc_pixel;
#pragma unroll
        for (int i = 0; i < Traits::kChunksA; ++i) {
          const int k = int(threadIdx.x) / kChunksPerRowA + kRowStepA * i;
          a_row[i] = index_t(k) * p.gc_pixel;
          a_shared[i] = Traits::TileA::offset(k, chunk_a);
        }
        origins = p.origins + q0 + int(threadIdx.x) / kColumnGroupsB;
        for (int d = 0; d < kDims; ++d) extent[d] = p.x_extent[d];
#pragma unroll
        for (int j = 0; j < kColumnsB; ++j) {
          const int chunk = int(threadIdx.x) % kColumnGroupsB + kColumnGroupsB * j;
          const index_t col = block.n0 + index_t(chunk) * Traits::kChunk;
          col_b_valid[j] = col < p.cols;
          const index_t tap = col_b_valid[j] ? col / p.channels : index_t(0);
          const TapDelta<index_t> t = p.taps[tap];
          tap_offset[j] = index_t(block.group) * p.x_group + (col_b_valid[j] ? col - tap * p.channels : index_t(0));
          for (int d = 0; d < kDims; ++d) {
            tap_delta[j][d] = t.delta[d];
            tap_offset[j] += index_t(t.delta[d]) * p.x_step[d];
          }
#pragma unroll
          for (int i = 0; i < kRowsB; ++i)
            b_shared[i][j] = Traits::TileB::offset(int(threadIdx.x) / kColumnGroupsB + kRowStepB * i, chunk);
        }
        load_origins();
      }

      // The entries as 16-byte loads (one for 32-bit offsets, one and a 4-byte one for 64-bit).
      __device__ void load_origins() {
        constexpr int kVectors = int(sizeof(PositionEntry<index_t>) / sizeof(uint4));
#pragma unroll
        for (int i = 0; i < kRowsB; ++i) {
          const uint4* entry = reinterpret_cast<const uint4*>(origins + kRowStepB * i);
          uint4 raw[kVectors];
#pragma unroll
          for (int v = 0; v < kVectors; ++v) raw[v] = entry[v];
          __builtin_memcpy(&origin[i], raw, sizeof(raw));
        }
      }

      __device__ void copy(unsigned char* stage_a, unsigned char* stage_b) const {
#pragma unroll
        for (int i = 0; i < Traits::kChunksA; ++i)
          cp_async_zfill<16>(stage_a + a_shared[i], a_tile + a_row[i], col_a_valid ? 16 : 0);
#pragma unroll
        for (int i = 0; i < kRowsB; ++i) {
#pragma unroll
          for (int j = 0; j < kColumnsB; ++j) {
            bool inside = col_b_valid[j];
#pragma unroll
            for (int d = 0; d < kDims; ++d)
              inside = inside && uint32_t(origin[i].origin[d] + tap_delta[j][d]) < uint32_t(extent[d]);
            cp_async_zfill<16>(stage_b + b_shared[i][j], inside ? x + (origin[i].offset + tap_offset[j]) : x,
                               inside ? 16 : 0);
          }
        }
      }

      __device__ void advance() {
        a_tile += a_step;
        origins += kBlockK;
        load_origins();
      }
    };

    template <typename Mma>
    __device__ void epilogue(const Mma& mma) const {
      const bool split = p.splits > 1;
      mma.for_each([&](int r, int c, acc_t sum) {
        const index_t row = m0 + r, col = n0 + c;
        if (row >= p.rows || col >= p.cols) return;
        if (split)
          p.partials.at(z, row, col) = sum;
        else
          Epilogue::store(p.epilogue, group, row, col, sum);
      });
    }
  };

  // The reduction interface of reduce_splits_kernel: one "phase", the GEMM itself.
  PCONV_HOST_DEVICE static const Params& reduction(const Params& p, int) { return p; }
  PCONV_HOST_DEVICE static void store(const Params& p, const Params&, index_t row, int group, index_t col, acc_t sum) {
    Epilogue::store(p.epilogue, group, row, col, sum);
  }
};

// Calls f(i) for i in [0, count) over a grid-stride loop. The counter is 64-bit: a 32-bit one
// would wrap on the last step past a count just below 2^31.
template <typename index_t, typename F>
__device__ __forceinline__ void grid_stride(index_t count, F&& f) {
  for (int64_t i = int64_t(blockIdx.x) * int64_t(blockDim.x) + int64_t(threadIdx.x); i < int64_t(count);
       i += int64_t(gridDim.x) * int64_t(blockDim.x))
    f(index_t(i));
}

// Adds the splits' partial sums of every output in split order (deterministic) and applies the
// problem's epilogue. Grid-stride over groups x rows x cols.
template <class Problem, typename index_t>
__global__ void reduce_splits_kernel(const typename Problem::Params params, int phase, index_t cols, int groups) {
  using acc_t = typename Problem::acc_t;
  const auto& part = Problem::reduction(params, phase);
  const index_t per_group = part.rows * cols;
  const index_t total = per_group * index_t(groups);
  grid_stride(total, [&](index_t i) {
    const int group = int(i / per_group);
    const index_t within = i - index_t(group) * per_group;
    const index_t row = within / cols, col = within - row * cols;
    acc_t sum = acc_t(0);
    for (int s = 0; s < part.splits; ++s) sum += part.partials.at(group * part.splits + s, row, col);
    Problem::store(params, part, row, group, col, sum);
  });
}

}  // namespace cuda
}  // namespace partialconv
