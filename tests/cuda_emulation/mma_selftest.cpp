// Self test of the tensor-core instructions of the host emulation (warp_mma_emulation.h), used as
// kernels use them: through csrc/cuda/warp_mma.cuh. The fragment packing here is written from the
// PTX ISA's formulas (sections cited in warp_mma.cuh), independently of the emulator's code.
// Prints one line per check and exits 0 only if all pass. `mma_selftest <misuse>` instead runs
// one misuse the emulator must abort on (see launch_misuse).
#include "cuda_emulation.h"
#include "selftest_main.h"

#include "cuda/warp_mma.cuh"

#include <bit>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <new>
#include <random>
#include <string>
#include <utility>
#include <vector>

namespace {

using namespace partialconv::cuda;

// ---------------------------------------------------------------------------------------------
// Host data

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

// Multiples of 1/8 up to `limit` / 8 in magnitude: exact in f16, bf16 and tf32, and every sum of
// the products below is exact in float, so results must match a double loop bit for bit whatever
// order the tensor core sums in.
std::vector<double> random_eighths(std::mt19937& rng, int count, int limit) {
  std::uniform_int_distribution<int> numerator(-limit, limit);
  std::vector<double> values(count);
  for (double& value : values) value = numerator(rng) / 8.0;
  return values;
}

// c (m x n) = a (m x k, row-major) * b (k x n, row-major).
std::vector<double> matmul(const std::vector<double>& a, const std::vector<double>& b, int m,
                           int n, int k) {
  std::vector<double> c(std::size_t(m) * n, 0.0);
  for (int i = 0; i < m; ++i)
    for (int j = 0; j < n; ++j)
      for (int p = 0; p < k; ++p) c[i * n + j] += a[i * k + p] * b[p * n + j];
  return c;
}

std::vector<double> transposed(const std::vector<double>& matrix, int rows, int cols) {
  std::vector<double> result(matrix.size());
  for (int r = 0; r < rows; ++r)
    for (int c = 0; c < cols; ++c) result[c * rows + r] = matrix[r * cols + c];
  return result;
}

template <typename Result>
bool equals_exactly(const Result& got, const std::vector<double>& expected) {
  if (got.size() != expected.size()) return false;
  for (std::size_t i = 0; i < got.size(); ++i) {
    if (got[i] != static_cast<typename Result::value_type>(expected[i])) return false;
  }
  return true;
}

std::uint16_t float16_bits(Float16Format format, double value) {
  return format == Float16Format::f16 ? cuda_emulation::half_bits_from_float(float(value))
                                      : cuda_emulation::bfloat16_bits_from_float(float(value));
}

// ---------------------------------------------------------------------------------------------
// Number formats, against decoders written from the format definitions.

double half_magnitude(std::uint16_t bits) {  // 5 exponent bits (bias 15), 10 mantissa bits
  const int exponent = (bits >> 10) & 0x1f, mantissa = bits & 0x3ff;
  return exponent == 0 ? std::ldexp(mantissa, -24) : std::ldexp(1024 + mantissa, exponent - 25);
}

double bfloat16_magnitude(std::uint16_t bits) {  // 8 exponent bits (bias 127), 7 mantissa bits
  const int exponent = (bits >> 7) & 0xff, mantissa = bits & 0x7f;
  return exponent == 0 ? std::ldexp(mantissa, -133) : std::ldexp(128 + mantissa, exponent - 134);
}

struct Float16Codec {
  double (*magnitude)(std::uint16_t);  // reference, finite magnitudes
  float (*to_float)(std::uint16_t);
  std::uint16_t (*from_float)(float);
  std::uint16_t infinity;  // also the exponent mask
  double after_largest;    // where the next binade would start; rounding treats inf as if there
};

bool same_bits(float a, float b) {
  return std::bit_cast<std::uint32_t>(a) == std::bit_cast<std::uint32_t>(b);
}

// Every 16-bit pattern converts to float exactly and back to itself; the midpoint between every
// two neighbouring magnitudes rounds to the even one, the floats next to it to the nearer one;
// inf, NaN and float values below the smallest subnormal's half.
bool check_float16_codec(const Float16Codec& codec) {
  const float infinity = std::numeric_limits<float>::infinity();
  for (std::uint16_t magnitude = 0; magnitude < codec.infinity; ++magnitude) {
    const std::uint16_t next = magnitude + 1;
    const double lower = codec.magnitude(magnitude);
    const double upper = next == codec.infinity ? codec.after_largest : codec.magnitude(next);
    const float midpoint = float((lower + upper) / 2);
    const std::uint16_t even = magnitude % 2 == 0 ? magnitude : next;
    for (const std::uint16_t sign : {std::uint16_t(0), std::uint16_t(0x8000)}) {
      const float signed_one = sign != 0 ? -1.0f : 1.0f;
      if (!same_bits(codec.to_float(sign | magnitude), signed_one * float(lower))) return false;
      if (codec.from_float(signed_one * float(lower)) != (sign | magnitude)) return false;
      if (codec.from_float(signed_one * midpoint) != (sign | even)) return false;
      if (codec.from_float(signed_one * std::nextafter(midpoint, 0.0f)) != (sign | magnitude)) {
        return false;
      }
      if (codec.from_float(signed_one * std::nextafter(midpoint, infinity)) != (sign | next)) {
        return false;
      }
    }
  }
  const auto is_nan = [&](std::uint16_t bits) {
    return (bits & codec.infinity) == codec.infinity && (bits & ~codec.infinity & 0x7fff) != 0;
  };
  for (unsigned int bits = codec.infinity + 1u; bits < 0x8000u; ++bits) {
    if (!std::isnan(codec.to_float(std::uint16_t(bits)))) return false;
  }
  return codec.to_float(codec.infinity) == infinity &&
         codec.to_float(0x8000 | codec.infinity) == -infinity &&
         codec.from_float(infinity) == codec.infinity &&
         codec.from_float(std::numeric_limits<float>::max()) == codec.infinity &&
         is_nan(codec.from_float(std::numeric_limits<float>::quiet_NaN())) &&
         is_nan(codec.from_float(std::bit_cast<float>(0x7f800001u))) &&  // signaling, low payload
         codec.from_float(std::numeric_limits<float>::denorm_min()) == 0 &&
         codec.from_float(-std::numeric_limits<float>::denorm_min()) == 0x8000;
}

bool check_half_conversions() {
  return check_float16_codec({half_magnitude, cuda_emulation::float_from_half_bits,
                              cuda_emulation::half_bits_from_float, 0x7c00, 65536.0});
}

bool check_bfloat16_conversions() {
  return check_float16_codec({bfloat16_magnitude, cuda_emulation::float_from_bfloat16_bits,
                              cuda_emulation::bfloat16_bits_from_float, 0x7f80,
                              std::ldexp(1.0, 128)});
}

// tf32_from_float is cvt.rna: nearest, ties away from zero, low 13 bits cleared.
bool check_tf32_rounding() {
  const auto tf32 = [](double x) { return tf32_from_float(float(x)); };
  const auto bits = [](double x) { return std::bit_cast<std::uint32_t>(float(x)); };
  const double ulp = std::ldexp(1.0, -10);  // of tf32 at 1
  const float infinity = std::numeric_limits<float>::infinity();
  return tf32(1 + ulp / 2) == bits(1 + ulp) && tf32(-(1 + ulp / 2)) == bits(-(1 + ulp)) &&
         tf32(1 + ulp + ulp / 2) == bits(1 + 2 * ulp) &&
         tf32(1 + ulp / 2 - std::ldexp(1.0, -23)) == bits(1) && tf32(1 + ulp) == bits(1 + ulp) &&
         tf32(std::numeric_limits<float>::max()) == bits(infinity) &&
         tf32(-infinity) == bits(-infinity) &&
         std::isnan(std::bit_cast<float>(tf32(std::numeric_limits<double>::quiet_NaN())));
}

// ---------------------------------------------------------------------------------------------
// Fragment layouts, as the PTX ISA states them (groupID = lane >> 2, threadID_in_group = lane % 4).

struct Coord {
  int row, col;
};

int group_of(int lane) { return lane >> 2; }
int thread_of(int lane) { return lane % 4; }

// 9.7.14.5.8, mma.m16n8k16 .f16 / .bf16.
Coord m16n8k16_a(int lane, int i) {
  const int row = (i < 2 || (4 <= i && i < 6)) ? group_of(lane) : group_of(lane) + 8;
  const int col = i < 4 ? thread_of(lane) * 2 + (i & 1) : thread_of(lane) * 2 + (i & 1) + 8;
  return {row, col};
}
Coord m16n8k16_b(int lane, int i) {
  const int row = i < 2 ? thread_of(lane) * 2 + (i & 1) : thread_of(lane) * 2 + (i & 1) + 8;
  return {row, group_of(lane)};
}
// C/D of m16n8k16 (9.7.14.5.8) and m16n8k8 (9.7.14.5.7).
Coord m16n8_c(int lane, int i) {
  return {i < 2 ? group_of(lane) : group_of(lane) + 8, thread_of(lane) * 2 + (i & 1)};
}
// 9.7.14.5.7, mma.m16n8k8 .tf32.
Coord m16n8k8_a(int lane, int i) {
  const int row = (i == 0 || i == 2) ? group_of(lane) : group_of(lane) + 8;
  const int col = (i == 0 || i == 1) ? thread_of(lane) : thread_of(lane) + 4;
  return {row, col};
}
Coord m16n8k8_b(int lane, int i) {
  return {i == 0 ? thread_of(lane) : thread_of(lane) + 4, group_of(lane)};
}
// 9.7.14.5.2, mma.m8n8k4 .f64.
Coord m8n8k4_a(int lane) { return {lane >> 2, lane % 4}; }
Coord m8n8k4_b(int lane) { return {lane % 4, lane >> 2}; }
Coord m8n8k4_c(int lane, int i) { return {group_of(lane), thread_of(lane) * 2 + i}; }

// ---------------------------------------------------------------------------------------------
// (a) One mma per variant: one warp, registers packed on the host.

template <Float16Format kFormat>
__global__ void one_mma_m16n8k16(const std::uint32_t* a, const std::uint32_t* b, float* cd) {
  const int lane = threadIdx.x;
  const std::uint32_t a_registers[4] = {a[lane * 4], a[lane * 4 + 1], a[lane * 4 + 2],
                                        a[lane * 4 + 3]};
  const std::uint32_t b_registers[2] = {b[lane * 2], b[lane * 2 + 1]};
  float accumulators[4] = {cd[lane * 4], cd[lane * 4 + 1], cd[lane * 4 + 2], cd[lane * 4 + 3]};
  if constexpr (kFormat == Float16Format::f16) {
    mma_m16n8k16_f16(accumulators, a_registers, b_registers, accumulators);
  } else {
    mma_m16n8k16_bf16(accumulators, a_registers, b_registers, accumulators);
  }
  for (int i = 0; i < 4; ++i) cd[lane * 4 + i] = accumulators[i];
}

__global__ void one_mma_m16n8k8_tf32(const std::uint32_t* a, const std::uint32_t* b, float* cd) {
  const int lane = threadIdx.x;
  const std::uint32_t a_registers[4] = {a[lane * 4], a[lane * 4 + 1], a[lane * 4 + 2],
                                        a[lane * 4 + 3]};
  const std::uint32_t b_registers[2] = {b[lane * 2], b[lane * 2 + 1]};
  float accumulators[4] = {cd[lane * 4], cd[lane * 4 + 1], cd[lane * 4 + 2], cd[lane * 4 + 3]};
  mma_m16n8k8_tf32(accumulators, a_registers, b_registers, accumulators);
  for (int i = 0; i < 4; ++i) cd[lane * 4 + i] = accumulators[i];
}

__global__ void one_mma_m8n8k4_f64(const double* a, const double* b, double* cd) {
  const int lane = threadIdx.x;
  double accumulators[2] = {cd[lane * 2], cd[lane * 2 + 1]};
  mma_m8n8k4_f64(accumulators, a[lane], b[lane], accumulators);
  for (int i = 0; i < 2; ++i) cd[lane * 2 + i] = accumulators[i];
}

// Accumulators C and D (8 columns, `per_lane` elements a lane, element i of lane l at
// layout(l, i)) to and from the lanes' registers, lane-major.
template <typename T>
std::vector<T> to_lanes(const std::vector<double>& matrix, int per_lane,
                        Coord (*layout)(int, int)) {
  std::vector<T> registers(32 * per_lane);
  for (int lane = 0; lane < 32; ++lane) {
    for (int i = 0; i < per_lane; ++i) {
      const Coord at = layout(lane, i);
      registers[lane * per_lane + i] = T(matrix[at.row * 8 + at.col]);
    }
  }
  return registers;
}

template <typename T>
std::vector<T> from_lanes(const std::vector<T>& registers, int per_lane,
                          Coord (*layout)(int, int)) {
  std::vector<T> matrix(registers.size());
  for (int lane = 0; lane < 32; ++lane) {
    for (int i = 0; i < per_lane; ++i) {
      const Coord at = layout(lane, i);
      matrix[at.row * 8 + at.col] = registers[lane * per_lane + i];
    }
  }
  return matrix;
}

// a (m x k) * b (k x 8) + c
std::vector<double> multiply_add(const std::vector<double>& a, const std::vector<double>& b,
                                 const std::vector<double>& c, int m, int k) {
  std::vector<double> d = matmul(a, b, m, 8, k);
  for (std::size_t i = 0; i < d.size(); ++i) d[i] += c[i];
  return d;
}

// D = A (16x16) * B (16x8) + C for random A, B and C, each lane's registers packed from the
// matrices by the ISA's formulas, D unpacked the same way.
bool check_mma_m16n8k16(Float16Format format) {
  std::mt19937 rng(format == Float16Format::f16 ? 11 : 12);
  const std::vector<double> a = random_eighths(rng, 16 * 16, 16);
  const std::vector<double> b = random_eighths(rng, 16 * 8, 16);
  const std::vector<double> c = random_eighths(rng, 16 * 8, 64);
  std::vector<std::uint32_t> a_registers(32 * 4, 0), b_registers(32 * 2, 0);
  for (int lane = 0; lane < 32; ++lane) {
    for (int i = 0; i < 8; ++i) {  // element i in register i / 2, low half first
      const Coord at = m16n8k16_a(lane, i);
      const std::uint32_t bits = float16_bits(format, a[at.row * 16 + at.col]);
      a_registers[lane * 4 + i / 2] |= bits << (16 * (i % 2));
    }
    for (int i = 0; i < 4; ++i) {
      const Coord at = m16n8k16_b(lane, i);
      const std::uint32_t bits = float16_bits(format, b[at.row * 8 + at.col]);
      b_registers[lane * 2 + i / 2] |= bits << (16 * (i % 2));
    }
  }
  std::vector<float> cd = to_lanes<float>(c, 4, m16n8_c);
  const auto kernel = format == Float16Format::f16 ? one_mma_m16n8k16<Float16Format::f16>
                                                   : one_mma_m16n8k16<Float16Format::bf16>;
  cuda_emulation::launch(kernel, dim3(1), dim3(32), 0, a_registers.data(), b_registers.data(),
                         cd.data());
  return equals_exactly(from_lanes(cd, 4, m16n8_c), multiply_add(a, b, c, 16, 16));
}

// `low_bits_noise`: random low 13 bits in every A and B operand, which the emulation truncates
// (warp_mma_emulation.h), so D must not change.
bool check_mma_m16n8k8_tf32(bool low_bits_noise) {
  std::mt19937 rng(low_bits_noise ? 14 : 13);
  const std::vector<double> a = random_eighths(rng, 16 * 8, 16);
  const std::vector<double> b = random_eighths(rng, 8 * 8, 16);
  const std::vector<double> c = random_eighths(rng, 16 * 8, 64);
  std::uniform_int_distribution<std::uint32_t> noise(0, low_bits_noise ? 0x1fffu : 0u);
  const auto operand = [&](double value) {
    return std::bit_cast<std::uint32_t>(float(value)) | noise(rng);
  };
  std::vector<std::uint32_t> a_registers(32 * 4), b_registers(32 * 2);
  for (int lane = 0; lane < 32; ++lane) {
    for (int i = 0; i < 4; ++i) {
      const Coord at = m16n8k8_a(lane, i);
      a_registers[lane * 4 + i] = operand(a[at.row * 8 + at.col]);
    }
    for (int i = 0; i < 2; ++i) {
      const Coord at = m16n8k8_b(lane, i);
      b_registers[lane * 2 + i] = operand(b[at.row * 8 + at.col]);
    }
  }
  std::vector<float> cd = to_lanes<float>(c, 4, m16n8_c);
  cuda_emulation::launch(one_mma_m16n8k8_tf32, dim3(1), dim3(32), 0, a_registers.data(),
                         b_registers.data(), cd.data());
  return equals_exactly(from_lanes(cd, 4, m16n8_c), multiply_add(a, b, c, 16, 8));
}

bool check_mma_m8n8k4_f64() {
  std::mt19937 rng(15);
  const std::vector<double> a = random_eighths(rng, 8 * 4, 16);
  const std::vector<double> b = random_eighths(rng, 4 * 8, 16);
  const std::vector<double> c = random_eighths(rng, 8 * 8, 64);
  std::vector<double> a_registers(32), b_registers(32);
  for (int lane = 0; lane < 32; ++lane) {
    a_registers[lane] = a[m8n8k4_a(lane).row * 4 + m8n8k4_a(lane).col];
    b_registers[lane] = b[m8n8k4_b(lane).row * 8 + m8n8k4_b(lane).col];
  }
  std::vector<double> cd = to_lanes<double>(c, 2, m8n8k4_c);
  cuda_emulation::launch(one_mma_m8n8k4_f64, dim3(1), dim3(32), 0, a_registers.data(),
                         b_registers.data(), cd.data());
  return equals_exactly(from_lanes(cd, 2, m8n8k4_c), multiply_add(a, b, c, 8, 4));
}

// ---------------------------------------------------------------------------------------------
// (b) The tile pipeline of a tensor-core GEMM: global -> shared with cp.async (two stages, zero
// fill past the last row), shared -> registers with ldmatrix or plain loads, then mma. One block
// computes a 64 x 64 tile of C (32 x 32 for f64) with four warps in a 2 x 2 grid. n and k are
// multiples of the tile; m need not be.

constexpr int kThreads = 128;
constexpr int kTile = 64;    // rows and columns of a block's C tile (16-bit and tf32)
constexpr int kTileK = 32;   // k per pipeline stage (16-bit and tf32)
constexpr int kPad16 = 8;    // shared rows padded by 16 bytes: rows need not be contiguous
constexpr int kPad32 = 4;

// Copies `rows` rows of `row_bytes` from global to shared memory in kBytes pieces with cp.async,
// spread over the block; rows from `valid_rows` on are zero-filled instead.
template <int kBytes>
__device__ void stage_rows(void* shared, int shared_stride, const void* global,
                           std::ptrdiff_t global_stride, int rows, int valid_rows, int row_bytes) {
  const int pieces_per_row = row_bytes / kBytes;
  for (int piece = threadIdx.x; piece < rows * pieces_per_row; piece += blockDim.x) {
    const int row = piece / pieces_per_row;
    const int offset = piece % pieces_per_row * kBytes;
    const bool valid = row < valid_rows;
    cp_async<kBytes>(static_cast<unsigned char*>(shared) + row * shared_stride + offset,
                     static_cast<const unsigned char*>(global) + (valid ? row * global_stride : 0) +
                         offset,
                     valid);
  }
}

// While the block computes on k tile t, tile t + 1 is in flight into the other stage.
template <typename LoadStage, typename ComputeStage>
__device__ void two_stage_pipeline(int k_tiles, LoadStage load_stage, ComputeStage compute_stage) {
  load_stage(0, 0);
  cp_async_commit();
  for (int t = 0; t < k_tiles; ++t) {
    if (t + 1 < k_tiles) {
      load_stage((t + 1) % 2, t + 1);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    compute_stage(t % 2);
    __syncthreads();
  }
}

// Stores a warp's 32 x 32 f32 accumulators, 2 x 4 tiles of m16n8 (C/D layout of 9.7.14.5.8).
__device__ void store_accumulators(const float (&accumulators)[2][4][4], float* c, int m, int n,
                                   int row0, int col0) {
  const int lane = threadIdx.x % 32;
  for (int mi = 0; mi < 2; ++mi)
    for (int ni = 0; ni < 4; ++ni)
      for (int i = 0; i < 4; ++i) {
        const int row = row0 + mi * 16 + lane / 4 + (i < 2 ? 0 : 8);
        const int col = col0 + ni * 8 + lane % 4 * 2 + i % 2;
        if (row < m) c[row * n + col] = accumulators[mi][ni][i];
      }
}

// C = A * B, A m x k row-major, B k x n row-major (kBRowMajor: B fragments by ldmatrix .trans) or
// stored n x k (B fragments by plain ldmatrix), both of 16-bit floats of kFormat.
template <Float16Format kFormat, bool kBRowMajor>
__global__ void __launch_bounds__(kThreads)
    gemm_16bit(const std::uint16_t* a, const std::uint16_t* b, float* c, int m, int n, int k) {
  constexpr int a_stride = kTileK + kPad16;
  constexpr int b_stride = kBRowMajor ? kTile + kPad16 : kTileK + kPad16;
  constexpr int a_stage = kTile * a_stride;
  constexpr int b_stage = kBRowMajor ? kTileK * b_stride : kTile * b_stride;
  PCONV_DYNAMIC_SHARED(std::uint16_t, shared);
  std::uint16_t* a_tiles = shared;
  std::uint16_t* b_tiles = shared + 2 * a_stage;
  const int row0 = blockIdx.y * kTile, col0 = blockIdx.x * kTile;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int warp_row = warp / 2 * 32, warp_col = warp % 2 * 32;
  float accumulators[2][4][4] = {};

  const auto load_stage = [&](int stage, int k_tile) {
    const int k0 = k_tile * kTileK;
    stage_rows<16>(a_tiles + stage * a_stage, a_stride * 2, a + row0 * k + k0, k * 2, kTile,
                   m - row0, kTileK * 2);
    if constexpr (kBRowMajor) {
      stage_rows<16>(b_tiles + stage * b_stage, b_stride * 2, b + k0 * n + col0, n * 2, kTileK,
                     kTileK, kTile * 2);
    } else {
      stage_rows<16>(b_tiles + stage * b_stage, b_stride * 2, b + col0 * k + k0, k * 2, kTile,
                     kTile, kTileK * 2);
    }
  };
  const auto compute_stage = [&](int stage) {
    const std::uint16_t* a_tile = a_tiles + stage * a_stage;
    const std::uint16_t* b_tile = b_tiles + stage * b_stage;
    for (int kk = 0; kk < kTileK; kk += 16) {
      // A: lanes 0-7, 8-15, 16-23, 24-31 address the rows of the 8x8 quarters top-left,
      // bottom-left, top-right, bottom-right, which are registers a0a1, a2a3, a4a5, a6a7.
      std::uint32_t a_fragments[2][4];
      for (int mi = 0; mi < 2; ++mi) {
        ldmatrix_x4(a_fragments[mi],
                    a_tile + (warp_row + mi * 16 + lane % 16) * a_stride + kk + lane / 16 * 8);
      }
      std::uint32_t b_fragments[4][2];
      if constexpr (kBRowMajor) {
        // k rows kk..kk+7 and kk+8..kk+15 of an 8-column slice, read column-major.
        for (int ni = 0; ni < 4; ++ni) {
          ldmatrix_x2_trans(b_fragments[ni],
                            b_tile + (kk + lane % 16) * b_stride + warp_col + ni * 8);
        }
      } else {
        // Per 16 columns: n rows 0-7 at k 0-7 and 8-15, then n rows 8-15 at k 0-7 and 8-15.
        for (int pair = 0; pair < 2; ++pair) {
          std::uint32_t quarters[4];
          const int n_row = warp_col + pair * 16 + lane / 16 * 8 + lane % 8;
          ldmatrix_x4(quarters, b_tile + n_row * b_stride + kk + lane / 8 % 2 * 8);
          b_fragments[2 * pair][0] = quarters[0];
          b_fragments[2 * pair][1] = quarters[1];
          b_fragments[2 * pair + 1][0] = quarters[2];
          b_fragments[2 * pair + 1][1] = quarters[3];
        }
      }
      for (int mi = 0; mi < 2; ++mi)
        for (int ni = 0; ni < 4; ++ni)
          mma_m16n8k16<kFormat>(accumulators[mi][ni], a_fragments[mi], b_fragments[ni],
                                accumulators[mi][ni]);
    }
  };
  two_stage_pipeline(k / kTileK, load_stage, compute_stage);
  store_accumulators(accumulators, c, m, n, row0 + warp_row, col0 + warp_col);
}

// C = A * B in tf32, A m x k and B k x n row-major floats; fragments by plain 32-bit shared loads
// at the m16n8k8 .tf32 positions (ldmatrix moves 16-bit elements), rounded by cvt.rna.
__global__ void __launch_bounds__(kThreads)
    gemm_tf32(const float* a, const float* b, float* c, int m, int n, int k) {
  constexpr int a_stride = kTileK + kPad32, b_stride = kTile + kPad32;
  constexpr int a_stage = kTile * a_stride, b_stage = kTileK * b_stride;
  PCONV_DYNAMIC_SHARED(float, shared);
  float* a_tiles = shared;
  float* b_tiles = shared + 2 * a_stage;
  const int row0 = blockIdx.y * kTile, col0 = blockIdx.x * kTile;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int warp_row = warp / 2 * 32, warp_col = warp % 2 * 32;
  const int group = lane / 4, thread = lane % 4;
  float accumulators[2][4][4] = {};

  const auto load_stage = [&](int stage, int k_tile) {
    const int k0 = k_tile * kTileK;
    stage_rows<16>(a_tiles + stage * a_stage, a_stride * 4, a + row0 * k + k0, k * 4, kTile,
                   m - row0, kTileK * 4);
    stage_rows<16>(b_tiles + stage * b_stage, b_stride * 4, b + k0 * n + col0, n * 4, kTileK,
                   kTileK, kTile * 4);
  };
  const auto compute_stage = [&](int stage) {
    const float* a_tile = a_tiles + stage * a_stage;
    const float* b_tile = b_tiles + stage * b_stage;
    for (int kk = 0; kk < kTileK; kk += 8) {
      std::uint32_t a_fragments[2][4], b_fragments[4][2];
      for (int mi = 0; mi < 2; ++mi) {
        const float* rows = a_tile + (warp_row + mi * 16 + group) * a_stride + kk + thread;
        a_fragments[mi][0] = tf32_from_float(rows[0]);                 // (g,     t)
        a_fragments[mi][1] = tf32_from_float(rows[8 * a_stride]);      // (g + 8, t)
        a_fragments[mi][2] = tf32_from_float(rows[4]);                 // (g,     t + 4)
        a_fragments[mi][3] = tf32_from_float(rows[8 * a_stride + 4]);  // (g + 8, t + 4)
      }
      for (int ni = 0; ni < 4; ++ni) {
        const float* column = b_tile + (kk + thread) * b_stride + warp_col + ni * 8 + group;
        b_fragments[ni][0] = tf32_from_float(column[0]);             // (t,     g)
        b_fragments[ni][1] = tf32_from_float(column[4 * b_stride]);  // (t + 4, g)
      }
      for (int mi = 0; mi < 2; ++mi)
        for (int ni = 0; ni < 4; ++ni)
          mma_m16n8k8_tf32(accumulators[mi][ni], a_fragments[mi], b_fragments[ni],
                           accumulators[mi][ni]);
    }
  };
  two_stage_pipeline(k / kTileK, load_stage, compute_stage);
  store_accumulators(accumulators, c, m, n, row0 + warp_row, col0 + warp_col);
}

// C = A * B in f64 with m8n8k4, A m x k and B k x n row-major; 32 x 32 tile per block, 16 x 16
// per warp, staged with 8-byte cp.async.
constexpr int kTileF64 = 32, kTileKF64 = 16, kPadF64 = 2;

__global__ void __launch_bounds__(kThreads)
    gemm_f64(const double* a, const double* b, double* c, int m, int n, int k) {
  constexpr int a_stride = kTileKF64 + kPadF64, b_stride = kTileF64 + kPadF64;
  constexpr int a_stage = kTileF64 * a_stride, b_stage = kTileKF64 * b_stride;
  PCONV_DYNAMIC_SHARED(double, shared);
  double* a_tiles = shared;
  double* b_tiles = shared + 2 * a_stage;
  const int row0 = blockIdx.y * kTileF64, col0 = blockIdx.x * kTileF64;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int warp_row = warp / 2 * 16, warp_col = warp % 2 * 16;
  const int group = lane / 4, thread = lane % 4;
  double accumulators[2][2][2] = {};

  const auto load_stage = [&](int stage, int k_tile) {
    const int k0 = k_tile * kTileKF64;
    stage_rows<8>(a_tiles + stage * a_stage, a_stride * 8, a + row0 * k + k0, k * 8, kTileF64,
                  m - row0, kTileKF64 * 8);
    stage_rows<8>(b_tiles + stage * b_stage, b_stride * 8, b + k0 * n + col0, n * 8, kTileKF64,
                  kTileKF64, kTileF64 * 8);
  };
  const auto compute_stage = [&](int stage) {
    const double* a_tile = a_tiles + stage * a_stage;
    const double* b_tile = b_tiles + stage * b_stage;
    for (int kk = 0; kk < kTileKF64; kk += 4) {
      double a_fragments[2], b_fragments[2];
      for (int mi = 0; mi < 2; ++mi) {
        a_fragments[mi] = a_tile[(warp_row + mi * 8 + group) * a_stride + kk + thread];  // (g, t)
      }
      for (int ni = 0; ni < 2; ++ni) {
        b_fragments[ni] = b_tile[(kk + thread) * b_stride + warp_col + ni * 8 + group];  // (t, g)
      }
      for (int mi = 0; mi < 2; ++mi)
        for (int ni = 0; ni < 2; ++ni)
          mma_m8n8k4_f64(accumulators[mi][ni], a_fragments[mi], b_fragments[ni],
                         accumulators[mi][ni]);
    }
  };
  two_stage_pipeline(k / kTileKF64, load_stage, compute_stage);
  for (int mi = 0; mi < 2; ++mi)
    for (int ni = 0; ni < 2; ++ni)
      for (int i = 0; i < 2; ++i) {
        const int row = row0 + warp_row + mi * 8 + group;   // (g, 2t + i)
        const int col = col0 + warp_col + ni * 8 + thread * 2 + i;
        if (row < m) c[row * n + col] = accumulators[mi][ni][i];
      }
}

// m = 72: the second row block has 8 valid rows, the other 56 are zero-filled; k = 96: three
// pipeline stages.
constexpr int kGemmM = 72, kGemmN = 64, kGemmK = 96;

bool check_gemm_16bit(Float16Format format, bool b_row_major) {
  std::mt19937 rng(20 + 2 * int(format) + int(b_row_major));
  const std::vector<double> a = random_eighths(rng, kGemmM * kGemmK, 16);
  const std::vector<double> b = random_eighths(rng, kGemmK * kGemmN, 16);
  const std::vector<double> b_stored = b_row_major ? b : transposed(b, kGemmK, kGemmN);
  DeviceVector<std::uint16_t> a_bits(a.size()), b_bits(b.size());
  for (std::size_t i = 0; i < a.size(); ++i) a_bits[i] = float16_bits(format, a[i]);
  for (std::size_t i = 0; i < b.size(); ++i) b_bits[i] = float16_bits(format, b_stored[i]);
  DeviceVector<float> c(kGemmM * kGemmN, -1.0f);
  const auto kernel = format == Float16Format::f16
                          ? (b_row_major ? gemm_16bit<Float16Format::f16, true>
                                         : gemm_16bit<Float16Format::f16, false>)
                          : (b_row_major ? gemm_16bit<Float16Format::bf16, true>
                                         : gemm_16bit<Float16Format::bf16, false>);
  const int b_stage = b_row_major ? kTileK * (kTile + kPad16) : kTile * (kTileK + kPad16);
  const std::size_t shared_bytes = 2 * (kTile * (kTileK + kPad16) + b_stage) * 2;
  cuda_emulation::launch(kernel, dim3(kGemmN / kTile, (kGemmM + kTile - 1) / kTile), dim3(kThreads),
                         shared_bytes, a_bits.data(), b_bits.data(), c.data(), kGemmM, kGemmN,
                         kGemmK);
  return equals_exactly(c, matmul(a, b, kGemmM, kGemmN, kGemmK));
}

bool check_gemm_tf32() {
  std::mt19937 rng(30);
  const std::vector<double> a = random_eighths(rng, kGemmM * kGemmK, 16);
  const std::vector<double> b = random_eighths(rng, kGemmK * kGemmN, 16);
  const DeviceVector<float> a_floats(a.begin(), a.end()), b_floats(b.begin(), b.end());
  DeviceVector<float> c(kGemmM * kGemmN, -1.0f);
  const std::size_t shared_bytes =
      2 * (kTile * (kTileK + kPad32) + kTileK * (kTile + kPad32)) * sizeof(float);
  cuda_emulation::launch(gemm_tf32, dim3(kGemmN / kTile, (kGemmM + kTile - 1) / kTile),
                         dim3(kThreads), shared_bytes, a_floats.data(), b_floats.data(), c.data(),
                         kGemmM, kGemmN, kGemmK);
  return equals_exactly(c, matmul(a, b, kGemmM, kGemmN, kGemmK));
}

bool check_gemm_f64() {
  constexpr int m = 40, n = 32, k = 32;
  std::mt19937 rng(31);
  const std::vector<double> a = random_eighths(rng, m * k, 16);
  const std::vector<double> b = random_eighths(rng, k * n, 16);
  const DeviceVector<double> a_values(a.begin(), a.end()), b_values(b.begin(), b.end());
  DeviceVector<double> c(m * n, -1.0);
  const std::size_t shared_bytes =
      2 * (kTileF64 * (kTileKF64 + kPadF64) + kTileKF64 * (kTileF64 + kPadF64)) * sizeof(double);
  cuda_emulation::launch(gemm_f64, dim3(n / kTileF64, (m + kTileF64 - 1) / kTileF64),
                         dim3(kThreads), shared_bytes, a_values.data(), b_values.data(), c.data(),
                         m, n, k);
  return equals_exactly(c, matmul(a, b, m, n, k));
}

// ---------------------------------------------------------------------------------------------
// (c) ldmatrix on a known pattern: element (row r, col c) of matrix q is q * 64 + r * 8 + c. The
// 16-byte rows lie in shared memory in reverse order with gaps, so only the lanes' addresses say
// where they are; lanes whose address ldmatrix does not read pass a null pointer.

__host__ __device__ int pattern_value(int matrix, int row, int col) {
  return matrix * 64 + row * 8 + col;
}
__host__ __device__ int pattern_row_offset(int matrix, int row) {  // in 16-bit elements
  return (31 - (matrix * 8 + row)) * 16;
}

constexpr int kLdmatrixRegisters = 1 + 2 + 4 + 1 + 2 + 4;  // x1, x2, x4, then .trans

__global__ void load_pattern_with_ldmatrix(std::uint32_t* out) {
  PCONV_DYNAMIC_SHARED(std::uint16_t, rows);
  const int lane = threadIdx.x;
  const int matrix = lane / 8, row_in_matrix = lane % 8;
  std::uint16_t* row = rows + pattern_row_offset(matrix, row_in_matrix);
  for (int col = 0; col < 8; ++col) {
    row[col] = std::uint16_t(pattern_value(matrix, row_in_matrix, col));
  }
  __syncthreads();
  std::uint32_t* mine = out + lane * kLdmatrixRegisters;
  std::uint32_t x1[1], x2[2], x4[4], x1_trans[1], x2_trans[2], x4_trans[4];
  ldmatrix_x1(x1, lane < 8 ? row : nullptr);
  ldmatrix_x2(x2, lane < 16 ? row : nullptr);
  ldmatrix_x4(x4, row);
  ldmatrix_x1_trans(x1_trans, lane < 8 ? row : nullptr);
  ldmatrix_x2_trans(x2_trans, lane < 16 ? row : nullptr);
  ldmatrix_x4_trans(x4_trans, row);
  const std::uint32_t* all[] = {x1, x2, x2 + 1, x4, x4 + 1, x4 + 2, x4 + 3,
                                x1_trans, x2_trans, x2_trans + 1, x4_trans, x4_trans + 1,
                                x4_trans + 2, x4_trans + 3};
  for (int i = 0; i < kLdmatrixRegisters; ++i) mine[i] = *all[i];
}

// Register q of lane l: elements (l/4, 2(l%4)) and (l/4, 2(l%4)+1) of matrix q, or with .trans
// (2(l%4), l/4) and (2(l%4)+1, l/4); the first in the low half (9.7.14.5.15, Figure 104).
bool check_ldmatrix_pattern() {
  std::vector<std::uint32_t> out(32 * kLdmatrixRegisters, 0);
  cuda_emulation::launch(load_pattern_with_ldmatrix, dim3(1), dim3(32), 32 * 16 * 2, out.data());
  for (int lane = 0; lane < 32; ++lane) {
    int slot = 0;
    for (const bool transposed : {false, true}) {
      for (const int matrices : {1, 2, 4}) {
        for (int q = 0; q < matrices; ++q, ++slot) {
          const int group = lane / 4, pair = lane % 4 * 2;
          const std::uint32_t low = transposed ? pattern_value(q, pair, group)
                                               : pattern_value(q, group, pair);
          const std::uint32_t high = transposed ? pattern_value(q, pair + 1, group)
                                                : pattern_value(q, group, pair + 1);
          if (out[lane * kLdmatrixRegisters + slot] != (high << 16 | low)) return false;
        }
      }
    }
  }
  return true;
}

// ---------------------------------------------------------------------------------------------
// (d) cp.async: zero fill, and when copies land. Each lane owns 32 bytes of shared memory: 16,
// 8 and 4 bytes copied in three commit groups (odd lanes zero-fill, from a null source), then 4
// bytes copied but never committed. It records its bytes after cp_async_wait<1> with only the
// first group committed (it may stay in flight), after cp_async_wait<2> with three (the first
// has landed) and after cp_async_wait<0> (all committed groups have landed; the uncommitted copy
// is in no group, so it has not).

constexpr int kLaneBytes = 32;

__global__ void copy_with_cp_async(const unsigned char* source, unsigned char* seen) {
  PCONV_DYNAMIC_SHARED(unsigned char, shared);
  const int lane = threadIdx.x;
  unsigned char* mine = shared + lane * kLaneBytes;
  const bool valid = lane % 2 == 0;
  const unsigned char* from = valid ? source + lane * kLaneBytes : nullptr;
  const auto record = [&](int snapshot) {
    for (int i = 0; i < kLaneBytes; ++i) seen[(snapshot * 32 + lane) * kLaneBytes + i] = mine[i];
  };
  cp_async_16(mine, from, valid);
  cp_async_commit();
  cp_async_wait<1>();
  record(0);
  cp_async_8(mine + 16, valid ? from + 16 : nullptr, valid);
  cp_async_commit();
  cp_async_4(mine + 24, valid ? from + 24 : nullptr, valid);
  cp_async_commit();
  cp_async_wait<2>();
  record(1);
  cp_async_4(mine + 28, valid ? from + 28 : nullptr, valid);
  cp_async_wait<0>();
  record(2);
}

// In the landing mode `wait` (the latest legal moment), whatever PCONV_EMULATION_CP_ASYNC says.
bool check_cp_async() {
  DeviceVector<unsigned char> source(32 * kLaneBytes);
  for (std::size_t i = 0; i < source.size(); ++i) source[i] = static_cast<unsigned char>(i * 7 + 1);
  std::vector<unsigned char> seen(3 * 32 * kLaneBytes, 0);
  const cuda_emulation::CpAsyncLanding landing = cuda_emulation::cp_async_landing();
  cuda_emulation::set_cp_async_landing(cuda_emulation::CpAsyncLanding::at_wait);
  cuda_emulation::launch(copy_with_cp_async, dim3(1), dim3(32), 32 * kLaneBytes, source.data(),
                         seen.data());
  cuda_emulation::set_cp_async_landing(landing);
  const int landed_bytes[3] = {0, 16, 28};  // per snapshot
  for (int snapshot = 0; snapshot < 3; ++snapshot) {
    for (int lane = 0; lane < 32; ++lane) {
      for (int i = 0; i < kLaneBytes; ++i) {
        const unsigned char copied = lane % 2 == 0 ? source[lane * kLaneBytes + i] : 0;
        const unsigned char expected = i < landed_bytes[snapshot] ? copied : 0xCD;  // refill
        if (seen[(snapshot * 32 + lane) * kLaneBytes + i] != expected) return false;
      }
    }
  }
  return true;
}

// ---------------------------------------------------------------------------------------------
// Misuse the emulator must turn into an abort with a message.

__global__ void ldmatrix_misaligned_row() {
  PCONV_DYNAMIC_SHARED(unsigned char, rows);
  std::uint32_t r[1];
  ldmatrix_x1(r, rows + threadIdx.x * 16 + (threadIdx.x == 3 ? 2 : 0));
}

__global__ void cp_async_misaligned(const unsigned char* source) {
  PCONV_DYNAMIC_SHARED(unsigned char, shared);
  cp_async_16(shared + 8, source, true);
}

__global__ void mma_in_block(float* out) {
  const std::uint32_t a[4] = {}, b[2] = {};
  float d[4] = {};
  mma_m16n8k16_f16(d, a, b, d);
  out[threadIdx.x] = d[0];
}

// Half the warp loads from one line, half from another: one ldmatrix on a GPU is one call site.
__global__ void ldmatrix_per_branch(std::uint32_t* out) {
  PCONV_DYNAMIC_SHARED(unsigned char, rows);
  std::uint32_t r[1] = {};
  if (threadIdx.x < 16) {
    ldmatrix_x1(r, rows + threadIdx.x % 8 * 16);
  } else {
    ldmatrix_x1(r, rows + threadIdx.x % 8 * 16);
  }
  out[threadIdx.x] = r[0];
}

bool launch_misuse(const std::string& name) {
  DeviceVector<unsigned char> bytes(64);
  std::vector<float> out(48);
  if (name == "ldmatrix-misaligned-row") {
    cuda_emulation::launch(ldmatrix_misaligned_row, dim3(1), dim3(32), 32 * 16);
  } else if (name == "cp-async-misaligned") {
    cuda_emulation::launch(cp_async_misaligned, dim3(1), dim3(1), 64, bytes.data());
  } else if (name == "ldmatrix-at-different-sites") {
    std::vector<std::uint32_t> registers(32);
    cuda_emulation::launch(ldmatrix_per_branch, dim3(1), dim3(32), 8 * 16, registers.data());
  } else if (name == "mma-in-partial-warp") {
    cuda_emulation::launch(mma_in_block, dim3(1), dim3(48), 0, out.data());
  } else {
    return false;
  }
  return true;
}

}  // namespace

int main(int argc, char** argv) {
  return cuda_emulation::selftest_main(argc, argv, launch_misuse, {
      {"f16 <-> float: exact, round to nearest even, subnormals, inf, NaN", check_half_conversions},
      {"bf16 <-> float: exact, round to nearest even, subnormals, inf, NaN",
       check_bfloat16_conversions},
      {"tf32_from_float rounds to nearest, ties away from zero", check_tf32_rounding},
      {"mma m16n8k16 f16: one warp, ISA fragment layouts",
       [] { return check_mma_m16n8k16(Float16Format::f16); }},
      {"mma m16n8k16 bf16: one warp, ISA fragment layouts",
       [] { return check_mma_m16n8k16(Float16Format::bf16); }},
      {"mma m16n8k8 tf32: one warp, ISA fragment layouts",
       [] { return check_mma_m16n8k8_tf32(false); }},
      {"mma m16n8k8 tf32 ignores the low 13 bits of its operands (emulator's choice)",
       [] { return check_mma_m16n8k8_tf32(true); }},
      {"mma m8n8k4 f64: one warp, ISA fragment layouts", check_mma_m8n8k4_f64},
      {"ldmatrix x1/x2/x4 and .trans on a known pattern", check_ldmatrix_pattern},
      {"cp.async: zero fill, copies land at the wait that covers their group", check_cp_async},
      {"GEMM f16: cp.async pipeline, ldmatrix_x4 A, ldmatrix_x2_trans B (k x n), mma",
       [] { return check_gemm_16bit(Float16Format::f16, true); }},
      {"GEMM f16: cp.async pipeline, ldmatrix_x4 A, ldmatrix_x4 B (n x k), mma",
       [] { return check_gemm_16bit(Float16Format::f16, false); }},
      {"GEMM bf16: cp.async pipeline, ldmatrix_x4 A, ldmatrix_x4 B (n x k), mma",
       [] { return check_gemm_16bit(Float16Format::bf16, false); }},
      {"GEMM tf32: cp.async pipeline, 32-bit shared loads, mma", check_gemm_tf32},
      {"GEMM f64: 8-byte cp.async pipeline, mma m8n8k4", check_gemm_f64},
  });
}
