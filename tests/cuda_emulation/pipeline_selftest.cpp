// Self test of what the host emulation checks in pipelined kernels: cp.async landing moments
// (PCONV_EMULATION_CP_ASYNC), bank-conflict counts of ldmatrix, cp.async and the shared loads and
// stores of csrc/cuda/warp_mma.cuh, and their alignment rules. Its GEMM is the model for the
// production kernels' mainloop: a ring of shared-memory stages filled by 16-byte cp.async with
// zero fill, one __syncthreads() per k-tile, ldmatrix + mma.sync, and a swizzled shared layout
// that makes both the copies and the ldmatrix reads conflict-free.
//
// `pipeline_selftest` runs every check (PASS/FAIL lines, exit status 0 only if all pass).
// `pipeline_selftest <misuse>` runs one kernel bug: either one the emulator aborts on, or a
// pipeline race, which it runs and compares with the reference (printing "results differ from
// the reference" when they do) for TSan or the comparison to catch; see launch_misuse.
#include "cuda_emulation.h"
#include "selftest_main.h"

#include "cuda/warp_mma.cuh"

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <new>
#include <random>
#include <string>
#include <vector>

namespace {

using namespace partialconv::cuda;
using cuda_emulation::BankConflicts;
using cuda_emulation::CpAsyncLanding;
using cuda_emulation::SharedAccessCounts;

// Arrays 16-byte aligned, as cudaMalloc's are: cp.async needs aligned sources.
template <typename T>
struct Aligned16Allocator {
  using value_type = T;
  Aligned16Allocator() = default;
  template <typename U>
  Aligned16Allocator(const Aligned16Allocator<U>&) {}
  T* allocate(std::size_t count) {
    return static_cast<T*>(::operator new(count * sizeof(T), std::align_val_t{16}));
  }
  void deallocate(T* memory, std::size_t) { ::operator delete(memory, std::align_val_t{16}); }
  bool operator==(const Aligned16Allocator&) const = default;
};
template <typename T>
using DeviceVector = std::vector<T, Aligned16Allocator<T>>;

constexpr CpAsyncLanding kLandings[] = {CpAsyncLanding::at_issue, CpAsyncLanding::at_wait,
                                        CpAsyncLanding::random};

// Runs run(arguments...) once per landing mode; true if it passed in every one. The mode of the
// environment (with its seed) is restored afterwards.
template <typename Run, typename... Arguments>
bool in_every_landing_mode(Run run, const Arguments&... arguments) {
  const CpAsyncLanding before = cuda_emulation::cp_async_landing();
  bool passed = true;
  for (const CpAsyncLanding landing : kLandings) {
    cuda_emulation::set_cp_async_landing(landing);
    passed = run(arguments...) && passed;
  }
  cuda_emulation::set_cp_async_landing(before);
  return passed;
}

bool counts_are(const SharedAccessCounts& counts, unsigned long long instructions,
                unsigned long long ideal_wavefronts, unsigned long long conflicts) {
  const bool same = counts.instructions == instructions &&
                    counts.ideal_wavefronts == ideal_wavefronts && counts.conflicts() == conflicts;
  if (!same) {
    std::fprintf(stderr, "  counted %llu instructions, %llu wavefronts for %llu phases; expected "
                 "%llu, %llu, %llu\n", counts.instructions, counts.wavefronts,
                 counts.ideal_wavefronts, instructions, ideal_wavefronts + conflicts,
                 ideal_wavefronts);
  }
  return same;
}

// ---------------------------------------------------------------------------------------------
// (a) cp.async of 4, 8 and 16 bytes with src-size 0 to the size: each lane copies a 16-byte
// piece with src-size lane % 17, an 8-byte one with lane % 9 and a 4-byte one with lane % 5, into
// its own 32 bytes of shared memory, then writes them out after wait_group 0 and a barrier (read
// by the next lane, so the barrier matters).

constexpr int kLaneBytes = 32;

__global__ void copy_partial_pieces(const unsigned char* source, unsigned char* out) {
  PCONV_DYNAMIC_SHARED(unsigned char, shared);
  const int lane = threadIdx.x;
  unsigned char* mine = shared + lane * kLaneBytes;
  const unsigned char* from = source + lane * kLaneBytes;
  cp_async_zfill<16>(mine, from, lane % 17);
  cp_async_commit();
  cp_async_zfill<8>(mine + 16, from + 16, lane % 9);
  cp_async_zfill<4>(mine + 24, from + 24, lane % 5);
  cp_async_4(mine + 28, from + 28, lane % 2 == 0);
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();
  const int next = (lane + 1) % 32;
  std::memcpy(out + next * kLaneBytes, shared + next * kLaneBytes, kLaneBytes);
}

bool check_partial_copies() {
  DeviceVector<unsigned char> source(32 * kLaneBytes);
  for (std::size_t i = 0; i < source.size(); ++i) source[i] = static_cast<unsigned char>(i * 5 + 3);
  return in_every_landing_mode([&] {
    std::vector<unsigned char> out(32 * kLaneBytes, 0xEE);
    cuda_emulation::launch(copy_partial_pieces, dim3(1), dim3(32), 32 * kLaneBytes, source.data(),
                           out.data());
    for (int lane = 0; lane < 32; ++lane) {
      // (offset, size, src-size) of the four pieces
      const int pieces[4][3] = {
          {0, 16, lane % 17}, {16, 8, lane % 9}, {24, 4, lane % 5}, {28, 4, lane % 2 == 0 ? 4 : 0}};
      for (const auto& piece : pieces) {
        for (int i = 0; i < piece[1]; ++i) {
          const int at = lane * kLaneBytes + piece[0] + i;
          if (out[at] != (i < piece[2] ? source[at] : 0)) return false;
        }
      }
    }
    return true;
  });
}

// ---------------------------------------------------------------------------------------------
// (b) Bank conflicts of single warp instructions: lane l accesses offset l * stride (0 for all
// lanes when stride is 0), with the access kind and size of the template.

enum class Access { load, store, cp_async };

template <Access kAccess, int kBytes>
__global__ void strided_access(int stride, const unsigned char* global, unsigned int* sink) {
  PCONV_DYNAMIC_SHARED(unsigned char, shared);
  const int lane = threadIdx.x;
  unsigned char* address = shared + lane * stride;
  unsigned int sum = 0;
  if constexpr (kAccess == Access::cp_async) {
    cp_async<kBytes>(address, global, true);
    cp_async_commit();
    cp_async_wait<0>();
  } else if constexpr (kAccess == Access::store) {
    if constexpr (kBytes == 4) store_shared_32(address, lane);
    if constexpr (kBytes == 8) store_shared_64(address, make_uint2(lane, 1));
    if constexpr (kBytes == 16) store_shared_128(address, make_uint4(lane, 1, 2, 3));
  } else {
    if constexpr (kBytes == 4) sum = load_shared_32(address);
    if constexpr (kBytes == 8) sum = load_shared_64(address).y;
    if constexpr (kBytes == 16) sum = load_shared_128(address).w;
  }
  sink[lane] = sum;
}

// Lanes in divergent code: only even lanes store, and lane l then stores l % 4 more times in a
// loop, so one call site runs as 1 + 3 = 4 warp instructions of 16, 12, 8 and 4 lanes.
__global__ void divergent_stores() {
  PCONV_DYNAMIC_SHARED(unsigned int, words);
  const int lane = threadIdx.x;
  if (lane % 2 == 0) {
    for (int i = 0; i <= lane / 2 % 4; ++i) store_shared_32(&words[i * 32 + lane], lane);
  }
}

template <Access kAccess, int kBytes>
SharedAccessCounts counts_of_stride(int stride) {
  DeviceVector<unsigned char> global(16, 7);
  std::vector<unsigned int> sink(32);
  cuda_emulation::launch(strided_access<kAccess, kBytes>, dim3(1), dim3(32),
                         32 * 128 + 16, stride, global.data(), sink.data());
  const BankConflicts counted = cuda_emulation::last_launch_bank_conflicts();
  return kAccess == Access::cp_async ? counted.cp_async
                                     : kAccess == Access::store ? counted.stores : counted.loads;
}

bool check_bank_conflict_counts() {
  bool passed =
      // 4 bytes: one phase of 32 lanes.
      counts_are(counts_of_stride<Access::load, 4>(4), 1, 1, 0) &&
      counts_are(counts_of_stride<Access::load, 4>(8), 1, 1, 1) &&       // 2 words per bank
      counts_are(counts_of_stride<Access::store, 4>(128), 1, 1, 31) &&   // all in bank 0
      counts_are(counts_of_stride<Access::load, 4>(0), 1, 1, 0) &&       // broadcast
      counts_are(counts_of_stride<Access::cp_async, 4>(4), 1, 1, 0) &&
      // 8 bytes: two halves of 16 lanes.
      counts_are(counts_of_stride<Access::store, 8>(8), 1, 2, 0) &&
      counts_are(counts_of_stride<Access::load, 8>(16), 1, 2, 2) &&      // lanes l, l + 8 collide
      counts_are(counts_of_stride<Access::cp_async, 8>(8), 1, 2, 0) &&
      // 16 bytes: four quarters of 8 lanes.
      counts_are(counts_of_stride<Access::load, 16>(16), 1, 4, 0) &&
      counts_are(counts_of_stride<Access::store, 16>(32), 1, 4, 4) &&    // 256 bytes a quarter
      counts_are(counts_of_stride<Access::cp_async, 16>(16), 1, 4, 0) &&
      counts_are(counts_of_stride<Access::cp_async, 16>(128), 1, 4, 28) &&  // 8-way
      counts_are(counts_of_stride<Access::load, 16>(0), 1, 4, 0);
  // The same kernel twice: bank_conflicts(kernel) adds up both launches.
  const SharedAccessCounts before = cuda_emulation::bank_conflicts(divergent_stores).stores;
  for (int launch = 0; launch < 2; ++launch) {
    cuda_emulation::launch(divergent_stores, dim3(1), dim3(32), 4 * 32 * 4);
    passed = counts_are(cuda_emulation::last_launch_bank_conflicts().stores, 4, 4, 0) && passed;
  }
  const SharedAccessCounts after = cuda_emulation::bank_conflicts(divergent_stores).stores;
  return passed && after.instructions - before.instructions == 8;
}

// ---------------------------------------------------------------------------------------------
// (c) The model mainloop: C (m x n, f32) = A (m x k, f16, row-major) * B^T with B stored n x k
// (f16, row-major, so both tiles are k-contiguous rows). A block computes a 64 x 64 tile of C with
// four warps of 32 x 32; a k-tile is 32 halves, so every tile row is 64 bytes: four 16-byte chunks.
// A stage holds the A tile and the B tile, 2 x 64 rows x 64 bytes.
//
// Swizzled layout: chunk c of row r lies at chunk c ^ (r / 2 % 4) of the row. The eight rows an
// ldmatrix matrix reads (r0..r0+7, one chunk) then lie in eight different 16-byte bank groups, and
// so do the eight chunks a quarter-warp of cp.async writes (rows 2j, 2j+1, chunks 0..3). Plain
// layout: rows r and r + 2 share their bank groups, so every ldmatrix matrix takes 4 wavefronts.

enum class Layout { plain, swizzled };
// multistage: CUTLASS's: wait, __syncthreads, refill the stage computed last, compute.
// double_buffer: two stages, refill, wait, __syncthreads, compute, __syncthreads.
enum class Schedule { multistage, double_buffer };
enum class Bug {
  none,
  refill_before_barrier,  // multistage: refill a stage before the barrier that ends its reads
  wait_too_few,           // multistage: wait_group kStages - 1, so tile t may be in flight
  no_trailing_barrier,    // double_buffer: without the barrier after compute
};

constexpr int kThreads = 128, kTileRows = 64, kTileK = 32, kRowBytes = kTileK * 2;
constexpr int kTileBytes = kTileRows * kRowBytes, kStageBytes = 2 * kTileBytes;

template <Layout kLayout>
__device__ __forceinline__ int chunk_offset(int row, int chunk) {
  const int physical = kLayout == Layout::swizzled ? chunk ^ (row / 2 % 4) : chunk;
  return row * kRowBytes + physical * 16;
}

// Stages are filled and read through these; they know the layout.
template <Layout kLayout>
struct StageTiles {
  unsigned char* stages;

  // Rows row0.. of `matrix` (row_count x k, row-major) from column k0, zero past row_count.
  __device__ void fill(unsigned char* tile, const std::uint16_t* matrix, int row0, int row_count,
                       int k, int k0) const {
    for (int piece = threadIdx.x; piece < kTileRows * 4; piece += blockDim.x) {
      const int row = piece / 4, chunk = piece % 4;
      const bool valid = row0 + row < row_count;
      const std::uint16_t* source = matrix + (valid ? (row0 + row) * k : 0) + k0 + chunk * 8;
      cp_async_16(tile + chunk_offset<kLayout>(row, chunk), source, valid);
    }
  }
  __device__ unsigned char* a(int stage) const { return stages + stage * kStageBytes; }
  __device__ unsigned char* b(int stage) const { return a(stage) + kTileBytes; }
};

template <int kStages, Layout kLayout, Schedule kSchedule, Bug kBug>
__global__ void __launch_bounds__(kThreads)
    pipelined_gemm(const std::uint16_t* a, const std::uint16_t* b, float* c, int m, int n, int k) {
  static_assert(kSchedule == Schedule::multistage || kStages == 2, "double buffering: 2 stages");
  PCONV_DYNAMIC_SHARED(unsigned char, shared);
  const StageTiles<kLayout> tiles{shared};
  const int row0 = blockIdx.y * kTileRows, col0 = blockIdx.x * kTileRows;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int warp_row = warp / 2 * 32, warp_col = warp % 2 * 32;
  const int k_tiles = k / kTileK;
  float accumulators[2][4][4] = {};

  const auto load_tile = [&](int stage, int k_tile) {
    tiles.fill(tiles.a(stage), a, row0, m, k, k_tile * kTileK);
    tiles.fill(tiles.b(stage), b, col0, n, k, k_tile * kTileK);
  };
  const auto compute_stage = [&](int stage) {
    for (int chunk0 = 0; chunk0 < 4; chunk0 += 2) {  // k 0-15, then 16-31
      // A: lanes 0-7, 8-15, 16-23, 24-31 give rows 0-7, 8-15, 0-7, 8-15 of chunks c, c, c+1,
      // c+1: the quarters top-left, bottom-left, top-right, bottom-right (a0a1 .. a6a7).
      std::uint32_t a_fragments[2][4];
      for (int mi = 0; mi < 2; ++mi) {
        const int row = warp_row + mi * 16 + lane % 16;
        ldmatrix_x4(a_fragments[mi],
                    tiles.a(stage) + chunk_offset<kLayout>(row, chunk0 + lane / 16));
      }
      // B (n x k): per 16 columns, n rows 0-7 at chunks c and c+1, then n rows 8-15.
      std::uint32_t b_fragments[4][2];
      for (int pair = 0; pair < 2; ++pair) {
        std::uint32_t quarters[4];
        const int row = warp_col + pair * 16 + lane / 16 * 8 + lane % 8;
        ldmatrix_x4(quarters, tiles.b(stage) + chunk_offset<kLayout>(row, chunk0 + lane / 8 % 2));
        b_fragments[2 * pair][0] = quarters[0];
        b_fragments[2 * pair][1] = quarters[1];
        b_fragments[2 * pair + 1][0] = quarters[2];
        b_fragments[2 * pair + 1][1] = quarters[3];
      }
      for (int mi = 0; mi < 2; ++mi)
        for (int ni = 0; ni < 4; ++ni)
          mma_m16n8k16_f16(accumulators[mi][ni], a_fragments[mi], b_fragments[ni],
                           accumulators[mi][ni]);
    }
  };

  if constexpr (kSchedule == Schedule::multistage) {
    // Prologue: tiles 0 .. kStages-2 in flight, one commit group each (empty past the end).
    for (int s = 0; s < kStages - 1; ++s) {
      if (s < k_tiles) load_tile(s, s);
      cp_async_commit();
    }
    for (int t = 0; t < k_tiles; ++t) {
      // Tile t has landed once at most kStages-2 newer groups are in flight: one group is
      // committed per iteration, empty or not, so the count holds to the end.
      if constexpr (kBug == Bug::wait_too_few) {
        cp_async_wait<kStages - 1>();
      } else {
        cp_async_wait<kStages - 2>();
      }
      const int next = t + kStages - 1;  // into the stage computed in iteration t - 1
      if constexpr (kBug == Bug::refill_before_barrier) {
        if (next < k_tiles) load_tile(next % kStages, next);
        cp_async_commit();
      }
      // Everyone's copies of tile t are visible, and everyone has finished computing t - 1.
      __syncthreads();
      if constexpr (kBug != Bug::refill_before_barrier) {
        if (next < k_tiles) load_tile(next % kStages, next);
        cp_async_commit();
      }
      compute_stage(t % kStages);
    }
    cp_async_wait<0>();
  } else {
    load_tile(0, 0);
    cp_async_commit();
    for (int t = 0; t < k_tiles; ++t) {
      if (t + 1 < k_tiles) {
        load_tile((t + 1) % 2, t + 1);
        cp_async_commit();
        cp_async_wait<1>();
      } else {
        cp_async_wait<0>();
      }
      __syncthreads();
      compute_stage(t % 2);
      if constexpr (kBug != Bug::no_trailing_barrier) __syncthreads();
    }
  }

  for (int mi = 0; mi < 2; ++mi)
    for (int ni = 0; ni < 4; ++ni)
      for (int i = 0; i < 4; ++i) {  // C/D layout: (g + 8 * (i / 2), 2t + i % 2)
        const int row = row0 + warp_row + mi * 16 + lane / 4 + 8 * (i / 2);
        const int col = col0 + warp_col + ni * 8 + lane % 4 * 2 + i % 2;
        if (row < m && col < n) c[row * n + col] = accumulators[mi][ni][i];
      }
}

// One block (the emulation is slow): m = 56, so the last 8 rows of the A tile are zero-filled;
// k = 128: four k-tiles, so a three-stage ring wraps around.
constexpr int kM = 56, kN = 64, kK = 128;
constexpr int kKTiles = kK / kTileK, kBlocks = 1, kWarps = kThreads / 32;

struct GemmProblem {
  DeviceVector<std::uint16_t> a, b;  // f16 bits
  std::vector<double> expected;
};

// Multiples of 1/8 up to 2 in magnitude: exact in f16, and every sum below is exact in float.
const GemmProblem& gemm_problem() {
  static const GemmProblem problem = [] {
    GemmProblem p;
    std::mt19937 rng(40);
    std::uniform_int_distribution<int> eighths(-16, 16);
    std::vector<double> a(kM * kK), b(kN * kK);
    for (double& x : a) x = eighths(rng) / 8.0;
    for (double& x : b) x = eighths(rng) / 8.0;
    for (const double x : a) p.a.push_back(cuda_emulation::half_bits_from_float(float(x)));
    for (const double x : b) p.b.push_back(cuda_emulation::half_bits_from_float(float(x)));
    p.expected.assign(kM * kN, 0.0);
    for (int i = 0; i < kM; ++i)
      for (int j = 0; j < kN; ++j)
        for (int q = 0; q < kK; ++q) p.expected[i * kN + j] += a[i * kK + q] * b[j * kK + q];
    return p;
  }();
  return problem;
}

template <int kStages, Layout kLayout, Schedule kSchedule, Bug kBug = Bug::none>
bool run_gemm() {
  const GemmProblem& problem = gemm_problem();
  std::vector<float> c(kM * kN, -1.0f);
  cuda_emulation::launch(pipelined_gemm<kStages, kLayout, kSchedule, kBug>,
                         dim3(kN / kTileRows, kBlocks), dim3(kThreads), kStages * kStageBytes,
                         problem.a.data(), problem.b.data(), c.data(), kM, kN, kK);
  for (int i = 0; i < kM * kN; ++i) {
    if (c[i] != float(problem.expected[i])) {
      std::fprintf(stderr, "pipeline_selftest: results differ from the reference (C[%d] = %g, not "
                   "%g)\n", i, double(c[i]), problem.expected[i]);
      return false;
    }
  }
  return true;
}

// Per warp and k-tile: 8 ldmatrix_x4 (2 k-steps x (2 for A + 2 for B)) of 4 phases each, and 4
// cp.async instructions (A and B tiles: 256 pieces each, 2 per thread).
constexpr unsigned long long kLdmatrixInstructions = 8ull * kKTiles * kWarps * kBlocks;
constexpr unsigned long long kCpAsyncInstructions = 4ull * kKTiles * kWarps * kBlocks;

template <int kStages, Layout kLayout, Schedule kSchedule>
bool check_gemm(unsigned long long ldmatrix_conflicts) {
  if (!run_gemm<kStages, kLayout, kSchedule>()) return false;
  const BankConflicts counted = cuda_emulation::last_launch_bank_conflicts();
  return counts_are(counted.ldmatrix, kLdmatrixInstructions, 4 * kLdmatrixInstructions,
                    ldmatrix_conflicts) &&
         counts_are(counted.cp_async, kCpAsyncInstructions, 4 * kCpAsyncInstructions, 0) &&
         counted.loads.instructions == 0 && counted.stores.instructions == 0;
}

// ---------------------------------------------------------------------------------------------
// Misuse: aborts, and pipeline races.

__global__ void copy_with_source_bytes(const unsigned char* source, int source_bytes) {
  PCONV_DYNAMIC_SHARED(unsigned char, shared);
  cp_async_zfill<8>(shared, source, source_bytes);
}

__global__ void misaligned_shared_access(int kind) {
  PCONV_DYNAMIC_SHARED(unsigned char, shared);
  if (kind == 0) (void)load_shared_128(shared + 8);
  if (kind == 1) store_shared_64(shared + 4, make_uint2(1, 2));
  if (kind == 2) (void)load_shared_32(shared + 2);
}

bool launch_misuse(const std::string& name) {
  DeviceVector<unsigned char> bytes(64, 1);
  if (name == "cp-async-src-size-above-size") {
    cuda_emulation::launch(copy_with_source_bytes, dim3(1), dim3(1), 64, bytes.data(), 9);
  } else if (name == "cp-async-src-size-negative") {
    cuda_emulation::launch(copy_with_source_bytes, dim3(1), dim3(1), 64, bytes.data(), -1);
  } else if (name == "load-shared-128-misaligned") {
    cuda_emulation::launch(misaligned_shared_access, dim3(1), dim3(1), 64, 0);
  } else if (name == "store-shared-64-misaligned") {
    cuda_emulation::launch(misaligned_shared_access, dim3(1), dim3(1), 64, 1);
  } else if (name == "load-shared-32-misaligned") {
    cuda_emulation::launch(misaligned_shared_access, dim3(1), dim3(1), 64, 2);
  } else if (name == "unswizzled-gemm") {  // with PCONV_EMULATION_BANK_CONFLICTS=fail
    run_gemm<3, Layout::plain, Schedule::multistage>();
  } else if (name == "refill-before-barrier") {
    run_gemm<3, Layout::swizzled, Schedule::multistage, Bug::refill_before_barrier>();
  } else if (name == "wait-too-few") {
    run_gemm<3, Layout::swizzled, Schedule::multistage, Bug::wait_too_few>();
  } else if (name == "no-trailing-barrier") {
    run_gemm<2, Layout::swizzled, Schedule::double_buffer, Bug::no_trailing_barrier>();
  } else {
    return false;
  }
  return true;
}

}  // namespace

int main(int argc, char** argv) {
  return cuda_emulation::selftest_main(argc, argv, launch_misuse, {
      {"cp.async of 4, 8 and 16 bytes, src-size 0 to the size, in every landing mode",
       check_partial_copies},
      {"bank conflicts of 32-, 64- and 128-bit loads, stores and cp.async; divergent lanes",
       check_bank_conflict_counts},
      {"3-stage cp.async + ldmatrix + mma mainloop, swizzled: exact, no bank conflicts, every mode",
       [] {
         return in_every_landing_mode(check_gemm<3, Layout::swizzled, Schedule::multistage>, 0);
       }},
      {"3-stage mainloop, plain layout: exact, 3 extra wavefronts per ldmatrix matrix",
       [] {
         return check_gemm<3, Layout::plain, Schedule::multistage>(3 * 4 * kLdmatrixInstructions);
       }},
      {"double-buffered mainloop with two barriers per k-tile: exact in every mode",
       [] {
         return in_every_landing_mode(check_gemm<2, Layout::swizzled, Schedule::double_buffer>, 0);
       }},
  });
}
