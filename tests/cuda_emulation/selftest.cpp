// Self test of cuda_emulation.h: kernels written as one would for nvcc, run on the host and
// compared with plain loops. Prints one line per check and exits 0 only if all pass.
// `selftest <misuse>` instead runs one kernel bug the emulator must abort on (see launch_misuse).
#include "cuda_emulation.h"
#include "selftest_main.h"

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <utility>
#include <vector>

namespace {

constexpr int kTile = 16;

__device__ __forceinline__ int linear_thread_id() {
  return threadIdx.x + threadIdx.y * blockDim.x + threadIdx.z * blockDim.x * blockDim.y;
}

__device__ __forceinline__ int linear_block_id() {
  return blockIdx.x + blockIdx.y * gridDim.x + blockIdx.z * gridDim.x * gridDim.y;
}

// c[m x n] = a[m x k] * b[k x n], one 16x16 output tile per block.
__global__ void __launch_bounds__(kTile * kTile)
    matmul_static_tiles(const float* __restrict__ a, const float* __restrict__ b,
                        float* __restrict__ c, int m, int k, int n) {
  __shared__ float a_tile[kTile][kTile];
  __shared__ float b_tile[kTile][kTile];
  const int tx = threadIdx.x;
  const int ty = threadIdx.y;
  const int row = blockIdx.y * kTile + ty;
  const int col = blockIdx.x * kTile + tx;
  float sum = 0.0f;
  for (int t = 0; t < k; t += kTile) {
    a_tile[ty][tx] = (row < m && t + tx < k) ? a[row * k + t + tx] : 0.0f;
    b_tile[ty][tx] = (t + ty < k && col < n) ? b[(t + ty) * n + col] : 0.0f;
    __syncthreads();
    for (int i = 0; i < kTile; ++i) sum += a_tile[ty][i] * b_tile[i][tx];
    __syncthreads();
  }
  if (row < m && col < n) c[row * n + col] = sum;
}

// The same, with both tiles in dynamic shared memory of 2 * kTile * kTile floats.
__global__ void matmul_dynamic_tiles(const float* __restrict__ a, const float* __restrict__ b,
                                     float* __restrict__ c, int m, int k, int n) {
  PCONV_DYNAMIC_SHARED(float, tiles);
  float* a_tile = tiles;
  float* b_tile = tiles + kTile * kTile;
  const int tx = threadIdx.x;
  const int ty = threadIdx.y;
  const int row = blockIdx.y * kTile + ty;
  const int col = blockIdx.x * kTile + tx;
  float sum = 0.0f;
  for (int t = 0; t < k; t += kTile) {
    a_tile[ty * kTile + tx] = (row < m && t + tx < k) ? a[row * k + t + tx] : 0.0f;
    b_tile[ty * kTile + tx] = (t + ty < k && col < n) ? b[(t + ty) * n + col] : 0.0f;
    __syncthreads();
    for (int i = 0; i < kTile; ++i) sum += a_tile[ty * kTile + i] * b_tile[i * kTile + tx];
    __syncthreads();
  }
  if (row < m && col < n) c[row * n + col] = sum;
}

// One sum per block: __shfl_down_sync within each warp, then warp 0 combines the warp sums with
// __shfl_xor_sync so that every lane of it holds the block sum.
__global__ void block_sums(const float* __restrict__ values, int count,
                           float* __restrict__ block_totals, float* __restrict__ lane_totals) {
  __shared__ float warp_sums[32];
  const int index = blockIdx.x * blockDim.x + threadIdx.x;
  const int lane = threadIdx.x % warpSize;
  const int warp = threadIdx.x / warpSize;
  float sum = index < count ? values[index] : 0.0f;
  for (int offset = warpSize / 2; offset > 0; offset /= 2) {
    sum += __shfl_down_sync(0xffffffffu, sum, offset);
  }
  if (lane == 0) warp_sums[warp] = sum;
  __syncthreads();
  if (warp == 0) {
    const int warps = blockDim.x / warpSize;
    float total = lane < warps ? warp_sums[lane] : 0.0f;
    for (int mask = warpSize / 2; mask > 0; mask /= 2) {
      total += __shfl_xor_sync(0xffffffffu, total, mask);
    }
    lane_totals[blockIdx.x * warpSize + lane] = total;
    if (lane == 0) block_totals[blockIdx.x] = total;
  }
}

// Inclusive prefix sums within segments of `width` lanes (__shfl_up_sync), and each segment's
// total broadcast from its last lane (__shfl_sync), in double.
__global__ void segment_scans(const double* __restrict__ values, int width,
                              double* __restrict__ scans, double* __restrict__ totals) {
  const int index = blockIdx.x * blockDim.x + threadIdx.x;
  const int lane_in_segment = threadIdx.x % width;
  double scan = values[index];
  for (int delta = 1; delta < width; delta *= 2) {
    const double before = __shfl_up_sync(0xffffffffu, scan, delta, width);
    if (lane_in_segment >= delta) scan += before;
  }
  scans[index] = scan;
  totals[index] = __shfl_sync(0xffffffffu, scan, width - 1, width);
}

struct AtomicTargets {
  float* float_total;
  double* double_total;
  unsigned long long* wide_total;
  int* ticket_counter;
  int* tickets;  // one per thread of the grid
  int* highest_id;
  unsigned int* block_counter;
  int* block_order;  // one per block
};

__global__ void count_with_atomics(AtomicTargets targets) {
  const int id = linear_block_id() * blockDim.x * blockDim.y * blockDim.z + linear_thread_id();
  atomicAdd(targets.float_total, 0.5f);
  atomicAdd(targets.double_total, 0.25);
  atomicAdd(targets.wide_total, 3ull);
  targets.tickets[id] = atomicAdd(targets.ticket_counter, 1);
  atomicMax(targets.highest_id, id);
  if (linear_thread_id() == 0) {
    targets.block_order[atomicAdd(targets.block_counter, 1u)] = linear_block_id();
  }
}

// Odd blocks return at once; even blocks reverse their slice through shared memory.
__global__ void reverse_even_blocks(const int* __restrict__ in, int* __restrict__ out) {
  __shared__ int slice[64];
  if (blockIdx.x % 2 == 1) return;
  const int t = threadIdx.x;
  slice[t] = in[blockIdx.x * blockDim.x + t];
  __syncthreads();
  out[blockIdx.x * blockDim.x + t] = slice[blockDim.x - 1 - t];
}

// All warps but the first return; the first sums its lanes with warp intrinsics only.
__global__ void first_warp_sum(const int* __restrict__ in, int* __restrict__ out) {
  if (threadIdx.x >= warpSize) return;
  __syncwarp();
  int sum = __ldg(&in[blockIdx.x * blockDim.x + threadIdx.x]);
  for (int mask = warpSize / 2; mask > 0; mask /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, mask);
  if (threadIdx.x == 0) out[blockIdx.x] = sum;
}

// Each thread records its dynamic shared word before writing it, and whether the buffer is
// 16-byte aligned.
__global__ void read_dynamic_shared_first(unsigned int* __restrict__ seen,
                                          int* __restrict__ aligned) {
  PCONV_DYNAMIC_SHARED(unsigned int, words);
  seen[blockIdx.x * blockDim.x + threadIdx.x] = words[threadIdx.x];
  words[threadIdx.x] = blockIdx.x + 1;
  if (threadIdx.x == 0) aligned[blockIdx.x] = reinterpret_cast<std::uintptr_t>(words) % 16 == 0;
}

std::vector<float> random_integer_floats(std::mt19937& rng, int count) {
  std::uniform_int_distribution<int> value(-8, 8);
  std::vector<float> result(count);
  for (float& x : result) x = static_cast<float>(value(rng));
  return result;
}

std::vector<float> matmul_reference(const std::vector<float>& a, const std::vector<float>& b,
                                    int m, int k, int n) {
  std::vector<float> c(m * n, 0.0f);
  for (int i = 0; i < m; ++i)
    for (int j = 0; j < n; ++j)
      for (int p = 0; p < k; ++p) c[i * n + j] += a[i * k + p] * b[p * n + j];
  return c;
}

// Sizes that are not multiples of the tile, on a 3 x 3 grid; integer-valued data keeps every
// sum exact, so the results must match bit for bit.
bool check_matmul(bool dynamic_tiles) {
  constexpr int m = 45, k = 37, n = 35;
  std::mt19937 rng(dynamic_tiles ? 2 : 1);
  const std::vector<float> a = random_integer_floats(rng, m * k);
  const std::vector<float> b = random_integer_floats(rng, k * n);
  std::vector<float> c(m * n, -1.0f);
  const dim3 grid((n + kTile - 1) / kTile, (m + kTile - 1) / kTile);
  const dim3 block(kTile, kTile);
  if (dynamic_tiles) {
    cuda_emulation::launch(matmul_dynamic_tiles, grid, block, 2 * kTile * kTile * sizeof(float),
                           a.data(), b.data(), c.data(), m, k, n);
  } else {
    cuda_emulation::launch(matmul_static_tiles, grid, block, 0, a.data(), b.data(), c.data(), m,
                           k, n);
  }
  return c == matmul_reference(a, b, m, k, n);
}

bool check_block_reduction() {
  constexpr int threads = 256, count = 3 * threads + 77;
  constexpr int blocks = (count + threads - 1) / threads;
  std::mt19937 rng(3);
  const std::vector<float> values = random_integer_floats(rng, count);
  std::vector<float> totals(blocks), lane_totals(blocks * warpSize);
  cuda_emulation::launch(block_sums, dim3(blocks), dim3(threads), 0, values.data(), count,
                         totals.data(), lane_totals.data());
  for (int b = 0; b < blocks; ++b) {
    float expected = 0.0f;
    for (int i = b * threads; i < std::min(count, (b + 1) * threads); ++i) expected += values[i];
    if (totals[b] != expected) return false;
    for (int lane = 0; lane < warpSize; ++lane) {
      if (lane_totals[b * warpSize + lane] != expected) return false;
    }
  }
  return true;
}

bool check_segment_scans() {
  constexpr int threads = 64, blocks = 3, count = threads * blocks;
  std::vector<double> values(count);
  for (int i = 0; i < count; ++i) values[i] = 0.5 * (i % 7) - 1.0;
  for (const int width : {8, 32}) {
    std::vector<double> scans(count), totals(count);
    cuda_emulation::launch(segment_scans, dim3(blocks), dim3(threads), 0, values.data(), width,
                           scans.data(), totals.data());
    for (int start = 0; start < count; start += width) {
      double running = 0.0;
      for (int i = start; i < start + width; ++i) {
        running += values[i];
        if (scans[i] != running) return false;
      }
      for (int i = start; i < start + width; ++i) {
        if (totals[i] != running) return false;
      }
    }
  }
  return true;
}

// A 3-D grid of 3-D blocks: also checks that every thread runs once and blocks run x fastest.
bool check_atomics() {
  const dim3 grid(3, 2, 2), block(8, 4, 2);
  const int blocks = 12, threads = blocks * 64;
  float float_total = 0.0f;
  double double_total = 0.0;
  unsigned long long wide_total = 0;
  int ticket_counter = 0, highest_id = -1;
  unsigned int block_counter = 0;
  std::vector<int> tickets(threads, -1), block_order(blocks, -1);
  cuda_emulation::launch(count_with_atomics, grid, block, 0,
                         AtomicTargets{&float_total, &double_total, &wide_total, &ticket_counter,
                                       tickets.data(), &highest_id, &block_counter,
                                       block_order.data()});
  // atomicAdd returns the old value, so the tickets are 0 .. threads-1, each once.
  std::vector<int> ticket_counts(threads, 0);
  for (const int ticket : tickets) {
    if (ticket < 0 || ticket >= threads) return false;
    ++ticket_counts[ticket];
  }
  std::vector<int> block_ids(blocks);
  std::iota(block_ids.begin(), block_ids.end(), 0);
  return float_total == 0.5f * threads && double_total == 0.25 * threads &&
         wide_total == 3ull * threads && ticket_counter == threads &&
         std::count(ticket_counts.begin(), ticket_counts.end(), 1) == threads &&
         highest_id == threads - 1 && block_counter == static_cast<unsigned int>(blocks) &&
         block_order == block_ids;
}

bool check_early_returns() {
  constexpr int threads = 64, blocks = 5, count = threads * blocks;
  std::vector<int> in(count);
  std::iota(in.begin(), in.end(), 0);
  std::vector<int> reversed(count, -1);
  cuda_emulation::launch(reverse_even_blocks, dim3(blocks), dim3(threads), 0, in.data(),
                         reversed.data());
  for (int b = 0; b < blocks; ++b) {
    for (int t = 0; t < threads; ++t) {
      const int expected = b % 2 == 1 ? -1 : in[b * threads + threads - 1 - t];
      if (reversed[b * threads + t] != expected) return false;
    }
  }
  std::vector<int> sums(blocks, -1);
  cuda_emulation::launch(first_warp_sum, dim3(blocks), dim3(threads), 0, in.data(), sums.data());
  for (int b = 0; b < blocks; ++b) {
    if (sums[b] != std::accumulate(&in[b * threads], &in[b * threads + warpSize], 0)) return false;
  }
  return true;
}

// An odd size, so reading past the end would also be caught by ASan.
bool check_dynamic_shared_is_refilled() {
  constexpr int threads = 32, blocks = 3;
  std::vector<unsigned int> seen(threads * blocks, 0);
  std::vector<int> aligned(blocks, 0);
  cuda_emulation::launch(read_dynamic_shared_first, dim3(blocks), dim3(threads),
                         threads * sizeof(unsigned int) + 3, seen.data(), aligned.data());
  for (const unsigned int word : seen) {
    if (word != 0xCDCDCDCDu) return false;
  }
  return std::all_of(aligned.begin(), aligned.end(), [](int a) { return a == 1; });
}

// Touches the first and last byte of `bytes` of dynamic shared memory.
__global__ void touch_dynamic_shared(unsigned int bytes, unsigned char* out) {
  PCONV_DYNAMIC_SHARED(unsigned char, shared);
  if (threadIdx.x == 0) shared[0] = 1;
  if (threadIdx.x == 1) shared[bytes - 1] = 2;
  __syncthreads();
  if (threadIdx.x == 0) out[blockIdx.x] = static_cast<unsigned char>(shared[0] + shared[bytes - 1]);
}

// Above 48 KB only after cudaFuncSetAttribute, up to the architecture's limit, which
// cudaDeviceGetAttribute reports and cudaFuncSetAttribute enforces.
bool check_dynamic_shared_opt_in() {
  std::vector<unsigned char> out(2, 0);
  int sm80_limit = 0, sm90_limit = 0, major = 0;
  cuda_emulation::set_architecture(80);
  const bool sm80_ok =
      cudaDeviceGetAttribute(&sm80_limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, 0) ==
          cudaSuccess &&
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, 0) == cudaSuccess &&
      cudaFuncSetAttribute(touch_dynamic_shared, cudaFuncAttributeMaxDynamicSharedMemorySize,
                           200000) == cudaErrorInvalidValue &&
      cudaFuncSetAttribute(touch_dynamic_shared, cudaFuncAttributeMaxDynamicSharedMemorySize,
                           100 * 1024) == cudaSuccess;
  cuda_emulation::launch(touch_dynamic_shared, dim3(2), dim3(64), 100 * 1024, 100u * 1024,
                         out.data());
  cuda_emulation::set_architecture(90);
  const bool sm90_ok =
      cudaDeviceGetAttribute(&sm90_limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, 0) ==
          cudaSuccess &&
      cudaFuncSetAttribute(touch_dynamic_shared, cudaFuncAttributeMaxDynamicSharedMemorySize,
                           200000) == cudaSuccess;
  cuda_emulation::launch(touch_dynamic_shared, dim3(1), dim3(64), 200000, 200000u, out.data());
  cuda_emulation::set_architecture(80);
  return sm80_ok && sm90_ok && sm80_limit == 166912 && sm90_limit == 232448 && major == 8 &&
         out[0] == 3 && out[1] == 3;
}

// Kernel bugs the emulator must turn into an abort with a message, rather than a hang.
__global__ void return_before_syncthreads() {
  if (threadIdx.x >= 16) return;
  __syncthreads();
}

__global__ void return_before_shuffle(int* out) {
  if (threadIdx.x >= 16) return;
  out[threadIdx.x] = __shfl_down_sync(0xffffffffu, static_cast<int>(threadIdx.x), 1);
}

__global__ void shuffle_in_block(int* out) {
  out[threadIdx.x] = __shfl_down_sync(0xffffffffu, static_cast<int>(threadIdx.x), 1);
}

// Each branch has its own barrier: on a GPU that hangs or passes by luck.
__global__ void barrier_per_branch(int* out) {
  if (threadIdx.x < 32) {
    out[threadIdx.x] = 1;
    __syncthreads();
  } else {
    __syncthreads();
  }
}

__global__ void shuffle_per_branch(int* out) {
  int value = static_cast<int>(threadIdx.x);
  if (threadIdx.x < 16) {
    value = __shfl_xor_sync(0xffffffffu, value, 1);
  } else {
    value = __shfl_xor_sync(0xffffffffu, value, 1);
  }
  out[threadIdx.x] = value;
}

__global__ void syncwarp_against_shuffle(int* out) {
  int value = static_cast<int>(threadIdx.x);
  if (threadIdx.x < 16) {
    __syncwarp();
  } else {
    value = __shfl_sync(0xffffffffu, value, 0);
  }
  out[threadIdx.x] = value;
}

bool launch_misuse(const std::string& name) {
  std::vector<int> out(1025);
  if (name == "return-before-syncthreads") {
    cuda_emulation::launch(return_before_syncthreads, dim3(2), dim3(64), 0);
  } else if (name == "return-before-shuffle") {
    cuda_emulation::launch(return_before_shuffle, dim3(1), dim3(32), 0, out.data());
  } else if (name == "shuffle-in-partial-warp") {
    cuda_emulation::launch(shuffle_in_block, dim3(1), dim3(48), 0, out.data());
  } else if (name == "oversized-block") {
    cuda_emulation::launch(shuffle_in_block, dim3(1), dim3(1025), 0, out.data());
  } else if (name == "syncthreads-at-different-sites") {
    cuda_emulation::launch(barrier_per_branch, dim3(1), dim3(64), 0, out.data());
  } else if (name == "shuffle-at-different-sites") {
    cuda_emulation::launch(shuffle_per_branch, dim3(1), dim3(32), 0, out.data());
  } else if (name == "syncwarp-against-shuffle") {
    cuda_emulation::launch(syncwarp_against_shuffle, dim3(1), dim3(32), 0, out.data());
  } else if (name.starts_with("dynamic-shared-")) {
    // 48 KB + 16 without the attribute; 64 KB allowed, 80 KB used; the sm_80 limit + 16.
    cuda_emulation::set_architecture(80);
    std::vector<unsigned char> bytes(1);
    unsigned int size = 48 * 1024 + 16;
    if (name == "dynamic-shared-above-attribute") {
      cudaFuncSetAttribute(touch_dynamic_shared, cudaFuncAttributeMaxDynamicSharedMemorySize,
                           64 * 1024);
      size = 80 * 1024;
    } else if (name == "dynamic-shared-above-sm80-limit") {
      cudaFuncSetAttribute(touch_dynamic_shared, cudaFuncAttributeMaxDynamicSharedMemorySize,
                           166912);
      size = 166912 + 16;
    } else if (name != "dynamic-shared-above-48k") {
      return false;
    }
    cuda_emulation::launch(touch_dynamic_shared, dim3(1), dim3(32), size, size, bytes.data());
  } else {
    return false;
  }
  return true;
}

}  // namespace

int main(int argc, char** argv) {
  return cuda_emulation::selftest_main(argc, argv, launch_misuse, {
      {"matmul with static __shared__ tiles", [] { return check_matmul(false); }},
      {"matmul with dynamic shared tiles", [] { return check_matmul(true); }},
      {"block reduction with __shfl_down_sync and __shfl_xor_sync", check_block_reduction},
      {"segment scans with __shfl_up_sync and __shfl_sync", check_segment_scans},
      {"atomicAdd and atomicMax from every thread of a 3-D grid", check_atomics},
      {"whole-block and whole-warp early returns", check_early_returns},
      {"dynamic shared memory refilled with 0xCD before every block",
       check_dynamic_shared_is_refilled},
      {"dynamic shared memory above 48 KB after cudaFuncSetAttribute, up to the sm_80/sm_90 limit",
       check_dynamic_shared_opt_in},
  });
}
