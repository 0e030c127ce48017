// The packed path's three matrix products for a chunk of at most kFewPositions output positions:
// a weight of up to tens of MB against a handful of columns (PConvUNet's deepest layers see 1 to
// 4 output positions). These shapes are memory-bound on the weight, which must be read (or its
// gradient written) once; the GEMMs of MKL and oneDNN (through ATen) run them at a fraction of
// the memory bandwidth (forward of 1024->512 3x3 at 2x2, 2 AMD EPYC cores: at::mm 3.3 ms, these
// kernels 0.9 ms). W is the group's weight (M x K, rows ldw apart), cols_t the packed columns
// transposed (N x K, contiguous: a row of K per position) and grad_conv the chunk's scaled output
// gradient (M x N, contiguous). float and double; vectorised with AVX2 + FMA where the CPU has
// them, with the same code for plain x86-64 (SSE2) otherwise.
#pragma once

#include <cstdint>

namespace partialconv {
namespace cpu {

constexpr int64_t kFewPositions = 8;

// out (M x N, contiguous) = W cols_t^T: out[m][n] = sum_k W[m][k] cols_t[n][k].
template <typename T>
void few_positions_output(const T* w, int64_t ldw, const T* cols_t, T* out, int64_t M, int64_t N, int64_t K);

// grad_w (M x K, rows ldw apart) = grad_conv cols_t, or += when accumulate:
// grad_w[m][k] = sum_n grad_conv[m][n] cols_t[n][k].
template <typename T>
void few_positions_grad_weight(const T* grad_conv, const T* cols_t, T* grad_w, int64_t ldw, int64_t M, int64_t N,
                               int64_t K, bool accumulate);

// grad_cols_t (N x K, contiguous) = grad_conv^T W: grad_cols_t[n][k] = sum_m grad_conv[m][n] W[m][k].
template <typename T>
void few_positions_grad_columns(const T* grad_conv, const T* w, int64_t ldw, T* grad_cols_t, int64_t M, int64_t N,
                                int64_t K);

}  // namespace cpu
}  // namespace partialconv
