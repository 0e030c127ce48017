// Host emulation of the warp-level tensor-core instructions and asynchronous copies that
// csrc/cuda/warp_mma.cuh wraps (mma.sync, ldmatrix, cp.async), for tests only. cuda_emulation.h
// includes it; kernels reach it only through warp_mma.cuh.
//
// Every collective is one detail::warp_collective step: each lane publishes its registers (or its
// row address), the warp meets (and checks that all lanes came from one call site), each lane
// computes its own result from what the warp published, the warp meets again. Every function
// takes its caller's call site as a defaulted last parameter (warp_mma.cuh passes its own
// callers' on); ldmatrix, cp_async and the shared loads and stores log their shared-memory
// addresses for the bank-conflict counts (rule 9 of cuda_emulation.h). The fragment layouts are
// those of the PTX ISA (ISA 9.0 section numbers:
// 9.7.14.5.x "Matrix Fragments for mma..." and 9.7.14.5.15 "ldmatrix"), written as the ISA writes
// them: a layout maps (lane, element i) to (row, col) of the matrix, with
//   groupID = lane >> 2,  threadID_in_group = lane % 4.
// Elements are numbered "low to high" as in the ISA: 16-bit element i of an operand lives in
// register i / 2, in its low half when i is even.
//
// Numerics. Each element of D is c + sum over k of a*b, accumulated in k order with fma in the
// accumulator type (float; double for .f64). The ISA does not specify the order or the internal
// precision of the tensor-core sum, so a GPU may round the sum differently. Products of f16 inputs
// are exact in float, and so are those of bf16 and tf32 inputs unless they leave float's range;
// tests that compare bit for bit use data whose sums are exact in any order.
//
// Counts. warp_mma_instructions() is the number of warp-level mma instructions the process has
// executed (one per warp per mma, whatever its shape), so that a test can see work skipped.
#pragma once

#include "cuda_emulation.h"

#include <array>
#include <atomic>
#include <bit>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>

namespace cuda_emulation {

// ---------------------------------------------------------------------------------------------
// Number formats. Exact where a value is exact; float to 16 bits rounds to nearest, ties to even.

// IEEE binary16: 1 sign, 5 exponent (bias 15), 10 mantissa bits.
inline float float_from_half_bits(std::uint16_t half) {
  const std::uint32_t sign = std::uint32_t(half & 0x8000u) << 16;
  const std::uint32_t exponent = (half >> 10) & 0x1fu;
  const std::uint32_t mantissa = half & 0x3ffu;
  if (exponent == 0) {  // zero or subnormal: mantissa * 2^-24, exact in float
    const float magnitude = std::ldexp(float(mantissa), -24);
    return sign != 0 ? -magnitude : magnitude;
  }
  if (exponent == 0x1f) {  // inf, NaN
    return std::bit_cast<float>(sign | 0x7f800000u | (mantissa << 13));
  }
  return std::bit_cast<float>(sign | ((exponent - 15 + 127) << 23) | (mantissa << 13));
}

inline std::uint16_t half_bits_from_float(float x) {
  const std::uint32_t bits = std::bit_cast<std::uint32_t>(x);
  const auto sign = std::uint16_t((bits >> 16) & 0x8000u);
  const std::uint32_t magnitude = bits & 0x7fffffffu;
  if (magnitude > 0x7f800000u) {  // NaN: quiet, with the top of the payload
    return std::uint16_t(sign | 0x7e00u | ((magnitude >> 13) & 0x1ffu));
  }
  if (magnitude >= 0x477ff000u) return std::uint16_t(sign | 0x7c00u);  // from 65520: inf
  if (magnitude <= 0x33000000u) return sign;             // up to 2^-25, halfway to 2^-24: zero
  // Keep the top bits and round on the rest: 13 bits for a normal half, more for a subnormal one.
  // A carry out of the mantissa moves on to the next binade (or from subnormal to normal).
  const int float_exponent = int(magnitude >> 23);
  const bool normal = magnitude >= 0x38800000u;  // 2^-14
  const int dropped_bits = normal ? 13 : 126 - float_exponent;
  const std::uint32_t significand =
      normal ? (magnitude - ((127u - 15u) << 23)) : ((magnitude & 0x7fffffu) | 0x800000u);
  std::uint32_t kept = significand >> dropped_bits;
  const std::uint32_t rest = significand & ((1u << dropped_bits) - 1);
  const std::uint32_t halfway = 1u << (dropped_bits - 1);
  if (rest > halfway || (rest == halfway && (kept & 1u) != 0)) ++kept;
  return std::uint16_t(sign | kept);
}

// bfloat16: the top half of a float.
inline float float_from_bfloat16_bits(std::uint16_t bfloat16) {
  return std::bit_cast<float>(std::uint32_t(bfloat16) << 16);
}

inline std::uint16_t bfloat16_bits_from_float(float x) {
  const std::uint32_t bits = std::bit_cast<std::uint32_t>(x);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return std::uint16_t((bits >> 16) | 0x40u);  // quiet NaN
  // Round on the low half; a carry moves on to the next binade, from the largest finite to inf.
  return std::uint16_t((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

// cvt.rna.tf32.f32: to the nearest float with a 10-bit mantissa, ties away from zero; the low 13
// bits of the result are zero.
inline std::uint32_t tf32_from_float(float x) {
  if (std::isnan(x)) return std::bit_cast<std::uint32_t>(x);
  return (std::bit_cast<std::uint32_t>(x) + 0x1000u) & 0xffffe000u;
}

// The value mma reads from a .tf32 operand register. The ISA gives tf32 "reduced precision
// (>= 10 bits)" and calls its layout implementation defined; this emulation drops the low 13
// mantissa bits (truncation), which is what Ampere and Hopper are reported to do with operands
// not rounded by cvt.rna.tf32.f32. Only a GPU can confirm it.
inline float float_from_tf32_operand(std::uint32_t bits) {
  const float x = std::bit_cast<float>(bits);
  return std::isnan(x) ? x : std::bit_cast<float>(bits & 0xffffe000u);
}

namespace detail {

inline std::atomic<unsigned long long>& warp_mma_count() {
  static std::atomic<unsigned long long> count{0};
  return count;
}

struct MatrixCoord {
  int row;
  int col;
};

inline int group_id(unsigned int lane) { return int(lane >> 2); }
inline int thread_in_group(unsigned int lane) { return int(lane % 4); }

// Accumulators C/D of the 16x8 shapes, the same for m16n8k8 and m16n8k16 (9.7.14.5.7, 9.7.14.5.8):
//   row = groupID for c0, c1; groupID + 8 for c2, c3
//   col = threadID_in_group * 2 + (i & 1)
inline MatrixCoord accumulator_16x8(unsigned int lane, int i) {
  return {group_id(lane) + 8 * (i / 2), thread_in_group(lane) * 2 + i % 2};
}

// mma.m16n8k16 with .f16 / .bf16 inputs: PTX ISA 9.7.14.5.8, "Matrix Fragments for mma.m16n8k16
// with floating point type". Four .b32 registers of A hold a0..a7, two of B hold b0..b3.
struct M16N8K16 {
  static constexpr int kM = 16, kN = 8, kK = 16;
  static constexpr int kAElements = 8, kBElements = 4, kCElements = 4;
  // row = groupID for a0, a1, a4, a5; groupID + 8 otherwise
  // col = threadID_in_group * 2 + (i & 1), plus 8 for i >= 4
  static MatrixCoord a(unsigned int lane, int i) {
    return {group_id(lane) + 8 * (i / 2 % 2), thread_in_group(lane) * 2 + i % 2 + 8 * (i / 4)};
  }
  // row = threadID_in_group * 2 + (i & 1), plus 8 for i >= 2;  col = groupID
  static MatrixCoord b(unsigned int lane, int i) {
    return {thread_in_group(lane) * 2 + i % 2 + 8 * (i / 2), group_id(lane)};
  }
  static MatrixCoord c(unsigned int lane, int i) { return accumulator_16x8(lane, i); }
};

// mma.m16n8k8 with .tf32 inputs: PTX ISA 9.7.14.5.7, "Matrix Fragments for mma.m16n8k8". One
// element per .b32 register: a0..a3, b0..b1.
struct M16N8K8 {
  static constexpr int kM = 16, kN = 8, kK = 8;
  static constexpr int kAElements = 4, kBElements = 2, kCElements = 4;
  // row = groupID for a0, a2; groupID + 8 for a1, a3
  // col = threadID_in_group for a0, a1; threadID_in_group + 4 for a2, a3
  static MatrixCoord a(unsigned int lane, int i) {
    return {group_id(lane) + 8 * (i % 2), thread_in_group(lane) + 4 * (i / 2)};
  }
  // row = threadID_in_group for b0; threadID_in_group + 4 for b1;  col = groupID
  static MatrixCoord b(unsigned int lane, int i) {
    return {thread_in_group(lane) + 4 * i, group_id(lane)};
  }
  static MatrixCoord c(unsigned int lane, int i) { return accumulator_16x8(lane, i); }
};

// mma.m8n8k4 with .f64: PTX ISA 9.7.14.5.2, "Matrix Fragments for mma.m8n8k4 with .f64 floating
// point type". One element of A and of B per lane, two of C/D.
struct M8N8K4 {
  static constexpr int kM = 8, kN = 8, kK = 4;
  static constexpr int kAElements = 1, kBElements = 1, kCElements = 2;
  // A: row = %laneid >> 2, col = %laneid % 4
  static MatrixCoord a(unsigned int lane, int) { return {group_id(lane), thread_in_group(lane)}; }
  // B: row = %laneid % 4, col = %laneid >> 2
  static MatrixCoord b(unsigned int lane, int) { return {thread_in_group(lane), group_id(lane)}; }
  // C/D: row = groupID, col = threadID_in_group * 2 + (i & 1)
  static MatrixCoord c(unsigned int lane, int i) {
    return {group_id(lane), thread_in_group(lane) * 2 + i};
  }
};

// D = A * B + C for the whole warp. element(registers, i) decodes element i of one lane's A or B
// registers. C and D may be the same array.
template <typename Layout, typename Accumulator, typename Register, std::size_t kARegisters,
          std::size_t kBRegisters, typename Decode>
void mma_sync(Accumulator (&d)[Layout::kCElements], const Register (&a)[kARegisters],
              const Register (&b)[kBRegisters], const Accumulator (&c)[Layout::kCElements],
              Decode element, const char* caller, CallSite site) {
  warp_for_intrinsic(0xffffffffu, caller);
  if (this_thread_context.lane == 0) warp_mma_count().fetch_add(1, std::memory_order_relaxed);
  struct Operands {
    Register a[kARegisters];
    Register b[kBRegisters];
  } mine;
  std::memcpy(mine.a, a, sizeof mine.a);
  std::memcpy(mine.b, b, sizeof mine.b);
  const unsigned int lane = this_thread_context.lane;
  const auto result = warp_collective(mine, [&](const auto& published) {
    Accumulator a_matrix[Layout::kM][Layout::kK] = {};
    Accumulator b_matrix[Layout::kK][Layout::kN] = {};
    for (unsigned int source = 0; source < warpSize; ++source) {
      const Operands operands = published(source);
      for (int i = 0; i < Layout::kAElements; ++i) {
        const MatrixCoord at = Layout::a(source, i);
        a_matrix[at.row][at.col] = element(operands.a, i);
      }
      for (int i = 0; i < Layout::kBElements; ++i) {
        const MatrixCoord at = Layout::b(source, i);
        b_matrix[at.row][at.col] = element(operands.b, i);
      }
    }
    std::array<Accumulator, Layout::kCElements> sums;
    for (int i = 0; i < Layout::kCElements; ++i) {
      const MatrixCoord at = Layout::c(lane, i);
      Accumulator sum = c[i];
      for (int k = 0; k < Layout::kK; ++k) {
        sum = std::fma(a_matrix[at.row][k], b_matrix[k][at.col], sum);
      }
      sums[i] = sum;
    }
    return sums;
  }, Arrival{caller, site});
  std::memcpy(d, result.data(), sizeof d);
}

// Element i of 16-bit elements packed two per register, low half first.
inline std::uint16_t packed_half(const std::uint32_t* registers, int i) {
  return std::uint16_t(registers[i / 2] >> (16 * (i % 2)));
}

}  // namespace detail

// Warp-level mma instructions executed by the process so far (one per warp per mma).
inline unsigned long long warp_mma_instructions() { return detail::warp_mma_count().load(); }

// ---------------------------------------------------------------------------------------------
// mma.sync.aligned.<shape>.row.col, f32 (f64) accumulators.

inline void mma_m16n8k16_f16(float (&d)[4], const std::uint32_t (&a)[4],
                             const std::uint32_t (&b)[2], const float (&c)[4],
                             CallSite site = CallSite::current()) {
  detail::mma_sync<detail::M16N8K16>(
      d, a, b, c,
      [](const std::uint32_t* r, int i) { return float_from_half_bits(detail::packed_half(r, i)); },
      "mma_m16n8k16_f16()", site);
}

inline void mma_m16n8k16_bf16(float (&d)[4], const std::uint32_t (&a)[4],
                              const std::uint32_t (&b)[2], const float (&c)[4],
                              CallSite site = CallSite::current()) {
  detail::mma_sync<detail::M16N8K16>(
      d, a, b, c,
      [](const std::uint32_t* r, int i) {
        return float_from_bfloat16_bits(detail::packed_half(r, i));
      },
      "mma_m16n8k16_bf16()", site);
}

inline void mma_m16n8k8_tf32(float (&d)[4], const std::uint32_t (&a)[4],
                             const std::uint32_t (&b)[2], const float (&c)[4],
                             CallSite site = CallSite::current()) {
  detail::mma_sync<detail::M16N8K8>(
      d, a, b, c, [](const std::uint32_t* r, int i) { return float_from_tf32_operand(r[i]); },
      "mma_m16n8k8_tf32()", site);
}

inline void mma_m8n8k4_f64(double (&d)[2], double a, double b, const double (&c)[2],
                           CallSite site = CallSite::current()) {
  const double a_register[1] = {a};
  const double b_register[1] = {b};
  detail::mma_sync<detail::M8N8K4>(
      d, a_register, b_register, c, [](const double* r, int i) { return r[i]; },
      "mma_m8n8k4_f64()", site);
}

// ---------------------------------------------------------------------------------------------
// ldmatrix.sync.aligned.m8n8.x<kMatrices>[.trans].shared.b16, PTX ISA 9.7.14.5.15.
//
// Lanes 8*m .. 8*m+7 give the addresses of rows 0..7 of matrix m, each 16 bytes (eight 16-bit
// elements) and 16-byte aligned; the addresses of the other lanes are not read (sm_80 and newer).
// Register m of each lane receives from matrix m, with groupID and threadID_in_group as above:
//   plain:  elements (row groupID, cols threadID_in_group * 2 + {0, 1})
//   .trans: elements (rows threadID_in_group * 2 + {0, 1}, col groupID), i.e. the matrix is read
//           column-major, as the mma B operand wants a row-major K x N tile
// the first of the two in the low half.
//
// For the bank-conflict counts each matrix is one phase of eight 16-byte rows: conflict-free when
// the eight rows lie in eight different 16-byte bank groups (address / 16 % 8).
template <int kMatrices, bool kTransposed>
void ldmatrix(std::uint32_t (&r)[kMatrices], const void* row_address,
              CallSite site = CallSite::current()) {
  static_assert(kMatrices == 1 || kMatrices == 2 || kMatrices == 4,
                "ldmatrix loads 1, 2 or 4 matrices");
  detail::warp_for_intrinsic(0xffffffffu, "ldmatrix()");
  const unsigned int lane = detail::this_thread_context.lane;
  if (lane < 8u * kMatrices && reinterpret_cast<std::uintptr_t>(row_address) % 16 != 0) {
    detail::fail("ldmatrix(): lane %u gives row address %p, which is not 16-byte aligned", lane,
                 row_address);
  }
  if (lane < 8u * kMatrices) {
    detail::log_shared_access(SharedAccessKind::ldmatrix, row_address, 16, site);
  }
  const int group = detail::group_id(lane);
  const int thread = detail::thread_in_group(lane);
  const auto loaded = detail::warp_collective(row_address, [&](const auto& published) {
    std::array<std::uint32_t, kMatrices> registers;
    for (int m = 0; m < kMatrices; ++m) {
      const auto row = [&](int index) {
        return static_cast<const std::byte*>(published(unsigned(8 * m + index)));
      };
      if constexpr (kTransposed) {
        std::uint16_t first, second;
        std::memcpy(&first, row(thread * 2) + 2 * group, sizeof first);
        std::memcpy(&second, row(thread * 2 + 1) + 2 * group, sizeof second);
        registers[m] = first | std::uint32_t(second) << 16;
      } else {
        std::memcpy(&registers[m], row(group) + 4 * thread, sizeof registers[m]);
      }
    }
    return registers;
  }, detail::Arrival{"ldmatrix()", site});
  std::memcpy(r, loaded.data(), sizeof r);
}

// ---------------------------------------------------------------------------------------------
// cp.async.{ca,cg}.shared.global [shared], [global], bytes, source_bytes: copies source_bytes
// (0 to bytes) from `global` and zero-fills the rest; with source_bytes 0, `global` is not read.
// When the destination is written depends on the landing mode (rule 8 of cuda_emulation.h;
// detail::AsyncCopies). Not a warp collective: lanes may issue different numbers of copies.

inline void cp_async(void* shared, const void* global, std::size_t bytes, std::size_t source_bytes,
                     CallSite site = CallSite::current()) {
  detail::current_launch("cp_async()");
  detail::at_instruction();
  if (bytes != 4 && bytes != 8 && bytes != 16) {
    detail::fail("cp_async(): copies 4, 8 or 16 bytes, not %zu", bytes);
  }
  if (source_bytes > bytes) {
    detail::fail("cp_async(): src-size %zu is larger than the copy's %zu bytes", source_bytes,
                 bytes);
  }
  if (reinterpret_cast<std::uintptr_t>(shared) % bytes != 0 ||
      (source_bytes != 0 && reinterpret_cast<std::uintptr_t>(global) % bytes != 0)) {
    detail::fail("cp_async(): a copy of %zu bytes from %p to %p needs both addresses %zu-byte "
                 "aligned", bytes, global, shared, bytes);
  }
  detail::log_shared_access(SharedAccessKind::cp_async, shared, bytes, site);
  detail::this_thread_async_copies.issue(shared, global, bytes, source_bytes);
}

inline void cp_async_commit() {
  detail::current_launch("cp_async_commit()");
  detail::at_instruction();
  detail::this_thread_async_copies.commit_group();
}

// cp.async.wait_group: all but the `newest_pending` most recently committed groups have landed.
inline void cp_async_wait(int newest_pending) {
  detail::current_launch("cp_async_wait()");
  detail::at_instruction();
  detail::this_thread_async_copies.wait_group(std::size_t(newest_pending));
}

// ---------------------------------------------------------------------------------------------
// ld.shared / st.shared of 4, 8 or 16 bytes, naturally aligned, counted for bank conflicts. Not
// warp collectives.

inline void check_shared_access(const void* address, std::size_t bytes, const char* caller) {
  detail::current_launch(caller);
  detail::at_instruction();
  if (reinterpret_cast<std::uintptr_t>(address) % bytes != 0) {
    detail::fail("%s: address %p is not %zu-byte aligned", caller, address, bytes);
  }
}

template <typename T>
T load_shared(const void* address, const char* caller, CallSite site) {
  static_assert(sizeof(T) == 4 || sizeof(T) == 8 || sizeof(T) == 16);
  check_shared_access(address, sizeof(T), caller);
  detail::log_shared_access(SharedAccessKind::load, address, sizeof(T), site);
  T value;
  std::memcpy(&value, address, sizeof(T));
  return value;
}

template <typename T>
void store_shared(void* address, const T& value, const char* caller, CallSite site) {
  static_assert(sizeof(T) == 4 || sizeof(T) == 8 || sizeof(T) == 16);
  check_shared_access(address, sizeof(T), caller);
  detail::log_shared_access(SharedAccessKind::store, address, sizeof(T), site);
  std::memcpy(address, &value, sizeof(T));
}

}  // namespace cuda_emulation
