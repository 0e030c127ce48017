// Warp-level tensor-core instructions, asynchronous copies and shared-memory accesses for the CUDA
// kernels: mma.sync, ldmatrix, cp.async, cvt.rna.tf32.f32, and ld.shared / st.shared of 32, 64 and
// 128 bits, as small device functions.
//
// Under nvcc each one is inline PTX for sm_80 or newer (a kernel built for an older target must
// not call them). Under the host emulation (PCONV_CUDA_EMULATION, tests/cuda_emulation/) each one
// calls the emulator's version in warp_mma_emulation.h, which implements the same fragment layouts,
// so a kernel's data movement and fragment bookkeeping can be tested without a GPU.
//
// The mma and ldmatrix functions are warp-collective (.sync.aligned): all 32 lanes of the warp
// call them together, from converged code, at one call site (the emulator checks it: every function
// here has a defaulted last parameter under the emulation, PCONV_CALL_SITE_PARAMETER, that carries
// its caller's source location; never pass it). A kernel's hot-loop shared-memory traffic goes
// through ldmatrix, cp_async and load_shared_* / store_shared_*, which the emulator counts for bank
// conflicts; plain C++ accesses to shared memory are not counted.
//
// Fragment layouts, from the PTX ISA (section numbers of ISA 9.0; later versions renumber them,
// the titles stay), with
//   groupID = lane >> 2, threadID_in_group = lane % 4 ("g" and "t" below)
// and 16-bit elements packed two per 32-bit register, the lower-numbered one in the low half:
//
//   mma.m16n8k16 .f16/.bf16, 9.7.14.5.8 "Matrix Fragments for mma.m16n8k16 with floating point
//   type". A (16x16, row-major "row"), a[0..3] hold a0..a7:
//     a0,a1: (g,   2t+{0,1})    a2,a3: (g+8, 2t+{0,1})
//     a4,a5: (g,   2t+8+{0,1})  a6,a7: (g+8, 2t+8+{0,1})
//   B (16x8, "col"), b[0..1] hold b0..b3:
//     b0,b1: (2t+{0,1}, g)      b2,b3: (2t+8+{0,1}, g)
//   C/D (16x8, f32): c0,c1: (g, 2t+{0,1})   c2,c3: (g+8, 2t+{0,1})
//
//   mma.m16n8k8 .tf32, 9.7.14.5.7 "Matrix Fragments for mma.m16n8k8". One element per register:
//     A (16x8):  a0: (g, t)   a1: (g+8, t)   a2: (g, t+4)   a3: (g+8, t+4)
//     B (8x8):   b0: (t, g)   b1: (t+4, g)
//     C/D:       as for m16n8k16
//
//   mma.m8n8k4 .f64, 9.7.14.5.2 "Matrix Fragments for mma.m8n8k4 with .f64 floating point type":
//     A (8x4): (g, t)   B (4x8): (t, g)   C/D (8x8): c0,c1: (g, 2t+{0,1})
//
//   ldmatrix.m8n8.x1/.x2/.x4 .b16, 9.7.14.5.15 "Warp-level matrix load instruction: ldmatrix":
//     lanes 8m..8m+7 give the row addresses (16 bytes each, 16-byte aligned) of rows 0..7 of
//     matrix m; register m of each lane receives elements (g, 2t+{0,1}) of matrix m, or with
//     .trans elements (2t+{0,1}, g). So ldmatrix_x4 of the four 8x8 quarters of a row-major
//     16x16 A tile (rows 0-7 | rows 8-15) x (cols 0-7 | cols 8-15), in the order top-left,
//     bottom-left, top-right, bottom-right, yields the A fragment above; ldmatrix_x2_trans of a
//     row-major K x N (16x8) B tile, or ldmatrix_x2 of an N x K (8x16) one, yields the B fragment.
#pragma once

#include <cstddef>
#include <cstdint>

namespace partialconv {
namespace cuda {

// The 16-bit floating-point input formats of mma.m16n8k16.
enum class Float16Format { f16, bf16 };

#ifdef PCONV_CUDA_EMULATION
// The caller's call site, for the emulator's checks (rules 1, 2 and 9 of cuda_emulation.h).
#define PCONV_CALL_SITE_PARAMETER \
  , ::cuda_emulation::CallSite call_site = ::cuda_emulation::CallSite::current()
#define PCONV_CALL_SITE_ARGUMENT , call_site
#else
#define PCONV_CALL_SITE_PARAMETER
#define PCONV_CALL_SITE_ARGUMENT

// Shared-state-space address of a generic pointer into shared memory, as the PTX operands want.
__device__ __forceinline__ uint32_t shared_address(const void* pointer) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(pointer));
}

// String literals concatenate inside asm, which is how one asm statement serves several
// instruction variants (an asm template must be a literal).
#define PCONV_MMA_M16N8K16_F32(input_type)                                                    \
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." input_type "." input_type ".f32 "     \
               "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%10, %11, %12, %13};\n"        \
               : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])                               \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), \
                 "f"(c[1]), "f"(c[2]), "f"(c[3]))
// ldmatrix reads shared memory that other lanes wrote: "memory" keeps it after their stores.
#define PCONV_LDMATRIX_X1(trans)                                                    \
  asm volatile("ldmatrix.sync.aligned.m8n8.x1" trans ".shared.b16 {%0}, [%1];\n" \
               : "=r"(r[0])                                                         \
               : "r"(address)                                                       \
               : "memory")
#define PCONV_LDMATRIX_X2(trans)                                                        \
  asm volatile("ldmatrix.sync.aligned.m8n8.x2" trans ".shared.b16 {%0, %1}, [%2];\n" \
               : "=r"(r[0]), "=r"(r[1])                                                 \
               : "r"(address)                                                           \
               : "memory")
#define PCONV_LDMATRIX_X4(trans)                                                                \
  asm volatile("ldmatrix.sync.aligned.m8n8.x4" trans ".shared.b16 {%0, %1, %2, %3}, [%4];\n" \
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])                                 \
               : "r"(address)                                                                   \
               : "memory")
#endif

// D = A * B + C with f32 accumulators, A and B 16-bit floats of `kFormat`;
// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32. d and c may be the same array.
template <Float16Format kFormat>
__device__ __forceinline__ void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4],
                                             const uint32_t (&b)[2],
                                             const float (&c)[4] PCONV_CALL_SITE_PARAMETER) {
#ifdef PCONV_CUDA_EMULATION
  if constexpr (kFormat == Float16Format::f16) {
    cuda_emulation::mma_m16n8k16_f16(d, a, b, c, call_site);
  } else {
    cuda_emulation::mma_m16n8k16_bf16(d, a, b, c, call_site);
  }
#else
  if constexpr (kFormat == Float16Format::f16) {
    PCONV_MMA_M16N8K16_F32("f16");
  } else {
    PCONV_MMA_M16N8K16_F32("bf16");
  }
#endif
}

__device__ __forceinline__ void mma_m16n8k16_f16(float (&d)[4], const uint32_t (&a)[4],
                                                 const uint32_t (&b)[2],
                                                 const float (&c)[4] PCONV_CALL_SITE_PARAMETER) {
  mma_m16n8k16<Float16Format::f16>(d, a, b, c PCONV_CALL_SITE_ARGUMENT);
}

__device__ __forceinline__ void mma_m16n8k16_bf16(float (&d)[4], const uint32_t (&a)[4],
                                                  const uint32_t (&b)[2],
                                                  const float (&c)[4] PCONV_CALL_SITE_PARAMETER) {
  mma_m16n8k16<Float16Format::bf16>(d, a, b, c PCONV_CALL_SITE_ARGUMENT);
}

// mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32. A and B hold fp32 bit patterns of which the
// tensor core uses only the top 19 bits (sign, exponent, 10 mantissa bits); round them first with
// tf32_from_float to get round-to-nearest instead of the hardware's treatment of the low bits
// (the emulator truncates them, see warp_mma_emulation.h).
__device__ __forceinline__ void mma_m16n8k8_tf32(float (&d)[4], const uint32_t (&a)[4],
                                                 const uint32_t (&b)[2],
                                                 const float (&c)[4] PCONV_CALL_SITE_PARAMETER) {
#ifdef PCONV_CUDA_EMULATION
  cuda_emulation::mma_m16n8k8_tf32(d, a, b, c, call_site);
#else
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%10, %11, %12, %13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]),
        "f"(c[2]), "f"(c[3]));
#endif
}

// cvt.rna.tf32.f32: x rounded to tf32 (nearest, ties away from zero), as an mma .tf32 operand.
__device__ __forceinline__ uint32_t tf32_from_float(float x) {
#ifdef PCONV_CUDA_EMULATION
  return cuda_emulation::tf32_from_float(x);
#else
  uint32_t tf32;
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(tf32) : "f"(x));
  return tf32;
#endif
}

// mma.sync.aligned.m8n8k4.row.col.f64.f64.f64.f64 (sm_80 and newer).
__device__ __forceinline__ void mma_m8n8k4_f64(double (&d)[2], double a, double b,
                                               const double (&c)[2] PCONV_CALL_SITE_PARAMETER) {
#ifdef PCONV_CUDA_EMULATION
  cuda_emulation::mma_m8n8k4_f64(d, a, b, c, call_site);
#else
  asm volatile("mma.sync.aligned.m8n8k4.row.col.f64.f64.f64.f64 {%0, %1}, {%2}, {%3}, {%4, %5};\n"
               : "=d"(d[0]), "=d"(d[1])
               : "d"(a), "d"(b), "d"(c[0]), "d"(c[1]));
#endif
}

// ldmatrix.sync.aligned.m8n8.x<kMatrices>[.trans].shared.b16: each lane passes the shared-memory
// address of one 16-byte row (only lanes 0 .. 8*kMatrices-1 are read). Each matrix is read in one
// shared-memory wavefront when its eight rows lie in eight different 16-byte bank groups
// (address / 16 % 8), e.g. with rows of 128 bytes and the 16-byte chunk index XOR row % 8.
template <int kMatrices, bool kTransposed>
__device__ __forceinline__ void ldmatrix(uint32_t (&r)[kMatrices],
                                         const void* row_address PCONV_CALL_SITE_PARAMETER) {
  static_assert(kMatrices == 1 || kMatrices == 2 || kMatrices == 4,
                "ldmatrix loads 1, 2 or 4 matrices");
#ifdef PCONV_CUDA_EMULATION
  cuda_emulation::ldmatrix<kMatrices, kTransposed>(r, row_address, call_site);
#else
  const uint32_t address = shared_address(row_address);
  if constexpr (kMatrices == 1) {
    if constexpr (kTransposed) PCONV_LDMATRIX_X1(".trans"); else PCONV_LDMATRIX_X1("");
  } else if constexpr (kMatrices == 2) {
    if constexpr (kTransposed) PCONV_LDMATRIX_X2(".trans"); else PCONV_LDMATRIX_X2("");
  } else {
    if constexpr (kTransposed) PCONV_LDMATRIX_X4(".trans"); else PCONV_LDMATRIX_X4("");
  }
#endif
}

__device__ __forceinline__ void ldmatrix_x1(
    uint32_t (&r)[1], const void* row_address PCONV_CALL_SITE_PARAMETER) {
  ldmatrix<1, false>(r, row_address PCONV_CALL_SITE_ARGUMENT);
}
__device__ __forceinline__ void ldmatrix_x2(
    uint32_t (&r)[2], const void* row_address PCONV_CALL_SITE_PARAMETER) {
  ldmatrix<2, false>(r, row_address PCONV_CALL_SITE_ARGUMENT);
}
__device__ __forceinline__ void ldmatrix_x4(
    uint32_t (&r)[4], const void* row_address PCONV_CALL_SITE_PARAMETER) {
  ldmatrix<4, false>(r, row_address PCONV_CALL_SITE_ARGUMENT);
}
__device__ __forceinline__ void ldmatrix_x1_trans(
    uint32_t (&r)[1], const void* row_address PCONV_CALL_SITE_PARAMETER) {
  ldmatrix<1, true>(r, row_address PCONV_CALL_SITE_ARGUMENT);
}
__device__ __forceinline__ void ldmatrix_x2_trans(
    uint32_t (&r)[2], const void* row_address PCONV_CALL_SITE_PARAMETER) {
  ldmatrix<2, true>(r, row_address PCONV_CALL_SITE_ARGUMENT);
}
__device__ __forceinline__ void ldmatrix_x4_trans(
    uint32_t (&r)[4], const void* row_address PCONV_CALL_SITE_PARAMETER) {
  ldmatrix<4, true>(r, row_address PCONV_CALL_SITE_ARGUMENT);
}

// Copies kBytes (4, 8 or 16) from global to shared memory without passing through registers:
// the first `source_bytes` (0 to kBytes) from `global`, zeros for the rest (src-size; with 0,
// `global` is not read and may be any pointer). Both addresses are kBytes-aligned. 16 bytes use
// cp.async.cg (bypassing L1), 4 and 8 cp.async.ca. The data may be read only after the
// cp_async_wait that covers its commit group, and by other threads only after a __syncthreads()
// that follows it; a stage may be refilled only after a __syncthreads() that follows every
// thread's last read of it. (The emulator writes shared memory anywhere from the issue to that
// wait, PCONV_EMULATION_CP_ASYNC, so a kernel that breaks either rule fails its tests.)
template <int kBytes>
__device__ __forceinline__ void cp_async_zfill(void* shared, const void* global,
                                               int source_bytes PCONV_CALL_SITE_PARAMETER) {
  static_assert(kBytes == 4 || kBytes == 8 || kBytes == 16, "cp.async copies 4, 8 or 16 bytes");
#ifdef PCONV_CUDA_EMULATION
  if (source_bytes < 0) {
    cuda_emulation::detail::fail("cp_async_zfill(): src-size %d is negative", source_bytes);
  }
  cuda_emulation::cp_async(shared, global, kBytes, std::size_t(source_bytes), call_site);
#else
  if constexpr (kBytes == 16) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n"
                 :
                 : "r"(shared_address(shared)), "l"(__cvta_generic_to_global(global)),
                   "r"(source_bytes)
                 : "memory");
  } else {
    asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;\n"
                 :
                 : "r"(shared_address(shared)), "l"(__cvta_generic_to_global(global)),
                   "n"(kBytes), "r"(source_bytes)
                 : "memory");
  }
#endif
}

// All kBytes from `global` when `valid`, else a zero fill that does not read `global`.
template <int kBytes>
__device__ __forceinline__ void cp_async(void* shared, const void* global,
                                         bool valid PCONV_CALL_SITE_PARAMETER) {
  cp_async_zfill<kBytes>(shared, global, valid ? kBytes : 0 PCONV_CALL_SITE_ARGUMENT);
}

__device__ __forceinline__ void cp_async_4(void* shared, const void* global,
                                           bool valid PCONV_CALL_SITE_PARAMETER) {
  cp_async<4>(shared, global, valid PCONV_CALL_SITE_ARGUMENT);
}
__device__ __forceinline__ void cp_async_8(void* shared, const void* global,
                                           bool valid PCONV_CALL_SITE_PARAMETER) {
  cp_async<8>(shared, global, valid PCONV_CALL_SITE_ARGUMENT);
}
__device__ __forceinline__ void cp_async_16(void* shared, const void* global,
                                            bool valid PCONV_CALL_SITE_PARAMETER) {
  cp_async<16>(shared, global, valid PCONV_CALL_SITE_ARGUMENT);
}

// cp.async.commit_group: the cp_async calls since the previous commit form one group.
__device__ __forceinline__ void cp_async_commit() {
#ifdef PCONV_CUDA_EMULATION
  cuda_emulation::cp_async_commit();
#else
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

// cp.async.wait_group kNewestPending: waits until at most the kNewestPending most recently
// committed groups are still in flight; every older group has landed in shared memory.
template <int kNewestPending>
__device__ __forceinline__ void cp_async_wait() {
  static_assert(kNewestPending >= 0, "cp.async.wait_group takes a count of groups");
#ifdef PCONV_CUDA_EMULATION
  cuda_emulation::cp_async_wait(kNewestPending);
#else
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kNewestPending) : "memory");
#endif
}

// ld.shared / st.shared of 32, 64 and 128 bits at a naturally aligned shared-memory address.
// Kernels use them for the shared-memory accesses of their hot loops (ldmatrix and cp_async aside)
// so that the emulator counts their bank conflicts: per warp instruction, the lanes of a 32-bit
// access in one phase, of a 64-bit one in two halves of 16, of a 128-bit one in four quarters of 8;
// a phase is conflict-free when no two of its lanes touch different 4-byte words of one bank
// (bank = address / 4 % 32). Not warp collectives: any subset of lanes may call them.
__device__ __forceinline__ uint32_t load_shared_32(const void* address PCONV_CALL_SITE_PARAMETER) {
#ifdef PCONV_CUDA_EMULATION
  return cuda_emulation::load_shared<uint32_t>(address, "load_shared_32()", call_site);
#else
  uint32_t value;
  asm volatile("ld.shared.b32 %0, [%1];\n" : "=r"(value) : "r"(shared_address(address)) : "memory");
  return value;
#endif
}

__device__ __forceinline__ uint2 load_shared_64(const void* address PCONV_CALL_SITE_PARAMETER) {
#ifdef PCONV_CUDA_EMULATION
  return cuda_emulation::load_shared<uint2>(address, "load_shared_64()", call_site);
#else
  uint2 value;
  asm volatile("ld.shared.v2.b32 {%0, %1}, [%2];\n"
               : "=r"(value.x), "=r"(value.y)
               : "r"(shared_address(address))
               : "memory");
  return value;
#endif
}

__device__ __forceinline__ uint4 load_shared_128(const void* address PCONV_CALL_SITE_PARAMETER) {
#ifdef PCONV_CUDA_EMULATION
  return cuda_emulation::load_shared<uint4>(address, "load_shared_128()", call_site);
#else
  uint4 value;
  asm volatile("ld.shared.v4.b32 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(value.x), "=r"(value.y), "=r"(value.z), "=r"(value.w)
               : "r"(shared_address(address))
               : "memory");
  return value;
#endif
}

__device__ __forceinline__ void store_shared_32(void* address,
                                                uint32_t value PCONV_CALL_SITE_PARAMETER) {
#ifdef PCONV_CUDA_EMULATION
  cuda_emulation::store_shared(address, value, "store_shared_32()", call_site);
#else
  asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(shared_address(address)), "r"(value) : "memory");
#endif
}

__device__ __forceinline__ void store_shared_64(void* address,
                                                uint2 value PCONV_CALL_SITE_PARAMETER) {
#ifdef PCONV_CUDA_EMULATION
  cuda_emulation::store_shared(address, value, "store_shared_64()", call_site);
#else
  asm volatile("st.shared.v2.b32 [%0], {%1, %2};\n" ::"r"(shared_address(address)), "r"(value.x),
               "r"(value.y)
               : "memory");
#endif
}

__device__ __forceinline__ void store_shared_128(void* address,
                                                 uint4 value PCONV_CALL_SITE_PARAMETER) {
#ifdef PCONV_CUDA_EMULATION
  cuda_emulation::store_shared(address, value, "store_shared_128()", call_site);
#else
  asm volatile("st.shared.v4.b32 [%0], {%1, %2, %3, %4};\n" ::"r"(shared_address(address)),
               "r"(value.x), "r"(value.y), "r"(value.z), "r"(value.w)
               : "memory");
#endif
}

#undef PCONV_CALL_SITE_PARAMETER
#undef PCONV_CALL_SITE_ARGUMENT
#ifndef PCONV_CUDA_EMULATION
#undef PCONV_MMA_M16N8K16_F32
#undef PCONV_LDMATRIX_X1
#undef PCONV_LDMATRIX_X2
#undef PCONV_LDMATRIX_X4
#endif

}  // namespace cuda
}  // namespace partialconv
