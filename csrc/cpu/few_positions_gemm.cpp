// Register-tiled kernels for the matrix products of few_positions_gemm.h. Each tile keeps its
// accumulators in 12 of the 16 vector registers and streams the weight (or its gradient) once;
// the few positions' columns (at most kFewPositions x K) stay in the L2 cache. Every kernel is
// compiled twice, for AVX2 + FMA and for the build's baseline, and run_kernel picks one by the CPU
// (and ATEN_CPU_CAPABILITY).
#include "few_positions_gemm.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string_view>

#include "cpu_common.h"

#define PCONV_UNROLL _Pragma("GCC unroll 16")
// The vector helpers below are always inlined: no vector crosses a call, whatever the target.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace partialconv {
namespace cpu {
namespace {

// One vector register of AVX: 8 floats or 4 doubles (two SSE registers on the baseline).
template <typename T>
using Vec [[gnu::vector_size(32)]] = T;
template <typename T>
constexpr int kLanes = int(sizeof(Vec<T>) / sizeof(T));

template <typename T>
[[gnu::always_inline]] inline Vec<T> load(const T* p) {
  Vec<T> v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

template <typename T, typename V>  // V is Vec<T> (which would not deduce T)
[[gnu::always_inline]] inline void store(T* p, const V& v) {
  static_assert(sizeof(V) == sizeof(Vec<T>));
  std::memcpy(p, &v, sizeof v);
}

// The tiles, in one place: rows of W (or of the output gradient) x positions or vectors along K.
struct Tiles {
  // few_positions_output: kOutputRows<J> rows x J positions of dot products, each a vector of
  // partial sums along K (added up once per tile); J is the chunk's position count up to
  // kOutputPositions, so that no accumulator idles (enc8's one position ran its weight pass 1.3x
  // slower in tiles of 4 positions than of 1).
  static constexpr int kOutputPositions = 4;
  template <int J>
  static constexpr int kOutputRows = J == 1 ? 8 : J == 2 ? 6 : J == 3 ? 4 : 3;
  // few_positions_grad_weight: kWeightRows rows x kWeightVectors vectors along K.
  static constexpr int kWeightRows = 4, kWeightVectors = 3;
  // few_positions_grad_columns: kColumnRows rows of W at a time added to the result's segment of
  // kColumnSegment columns (at most 8 x 512 elements: 16 kB in float).
  static constexpr int kColumnRows = 4;
  static constexpr int64_t kColumnSegment = 512;
};

// out[m][n] for rows [m0, m1) of W, in tiles of J positions.
template <int J>
struct OutputRows {
  template <typename T>
  [[gnu::always_inline]] static void run(const T* w, int64_t ldw, const T* cols_t, T* out, int64_t m0, int64_t m1,
                                         int64_t N, int64_t K) {
    constexpr int R = Tiles::kOutputRows<J>, L = kLanes<T>;
    const int64_t k_vectors_end = K / L * L;
    for (int64_t m = m0; m < m1; m += R) {
      const int rows = int(std::min<int64_t>(R, m1 - m));
      const T* a[R];
      // Rows past the block's end repeat its last row: computed, not stored.
      PCONV_UNROLL for (int r = 0; r < R; ++r) a[r] = w + (m + std::min(r, rows - 1)) * ldw;
      for (int64_t n = 0; n < N; n += J) {
        const int positions = int(std::min<int64_t>(J, N - n));
        const T* b[J];
        PCONV_UNROLL for (int j = 0; j < J; ++j) b[j] = cols_t + (n + std::min(j, positions - 1)) * K;
        Vec<T> acc[R][J] = {};
        for (int64_t k = 0; k < k_vectors_end; k += L) {
          Vec<T> av[R], bv[J];
          PCONV_UNROLL for (int r = 0; r < R; ++r) av[r] = load(a[r] + k);
          PCONV_UNROLL for (int j = 0; j < J; ++j) bv[j] = load(b[j] + k);
          PCONV_UNROLL for (int r = 0; r < R; ++r) {
            PCONV_UNROLL for (int j = 0; j < J; ++j) acc[r][j] += av[r] * bv[j];
          }
        }
        // Lane sums first, with constant indices, so that acc stays in registers.
        T sums[R][J];
        PCONV_UNROLL for (int r = 0; r < R; ++r) {
          PCONV_UNROLL for (int j = 0; j < J; ++j) {
            T sum = T(0);
            PCONV_UNROLL for (int l = 0; l < L; ++l) sum += acc[r][j][l];
            sums[r][j] = sum;
          }
        }
        for (int r = 0; r < rows; ++r) {
          for (int j = 0; j < positions; ++j) {
            T sum = sums[r][j];
            for (int64_t k = k_vectors_end; k < K; ++k) sum += a[r][k] * b[j][k];
            out[(m + r) * N + n + j] = sum;
          }
        }
      }
    }
  }
};

// grad_w[m][k] for rows [m0, m1).
struct GradWeightRows {
  template <typename T>
  [[gnu::always_inline]] static void run(const T* grad_conv, const T* cols_t, T* grad_w, int64_t ldw, int64_t m0,
                                         int64_t m1, int64_t N, int64_t K, bool accumulate) {
    constexpr int R = Tiles::kWeightRows, V = Tiles::kWeightVectors, L = kLanes<T>, width = V * L;
    const int64_t tiles_end = K / width * width;
    for (int64_t m = m0; m < m1; m += R) {
      const int rows = int(std::min<int64_t>(R, m1 - m));
      const T* g[R];
      PCONV_UNROLL for (int r = 0; r < R; ++r) g[r] = grad_conv + (m + std::min(r, rows - 1)) * N;
      for (int64_t k = 0; k < tiles_end; k += width) {
        Vec<T> acc[R][V] = {};
        for (int64_t n = 0; n < N; ++n) {
          Vec<T> c[V];
          PCONV_UNROLL for (int v = 0; v < V; ++v) c[v] = load(cols_t + n * K + k + v * L);
          PCONV_UNROLL for (int r = 0; r < R; ++r) {
            const T s = g[r][n];
            PCONV_UNROLL for (int v = 0; v < V; ++v) acc[r][v] += s * c[v];
          }
        }
        PCONV_UNROLL for (int r = 0; r < R; ++r) {
          if (r >= rows) break;
          T* dst = grad_w + (m + r) * ldw + k;
          PCONV_UNROLL for (int v = 0; v < V; ++v)
            store(dst + v * L, accumulate ? load(dst + v * L) + acc[r][v] : acc[r][v]);
        }
      }
      for (int r = 0; r < rows; ++r) {
        for (int64_t k = tiles_end; k < K; ++k) {
          T sum = T(0);
          for (int64_t n = 0; n < N; ++n) sum += g[r][n] * cols_t[n * K + k];
          T& dst = grad_w[(m + r) * ldw + k];
          dst = accumulate ? dst + sum : sum;
        }
      }
    }
  }
};

// grad_cols_t[n][k] for k in [k0, k1), where k0 is a multiple of the vector width. W is read a row
// segment at a time (a column walk down W would miss the cache on every row); the result, at most
// kFewPositions x kColumnSegment elements, stays in the L1 cache while every row adds to it.
struct GradColumnsRange {
  // R rows of W from row m added to the columns of [k, k_end).
  template <typename T, int R>
  [[gnu::always_inline]] static void add_rows(const T* grad_conv, const T* w, int64_t ldw, T* grad_cols_t, int64_t m,
                                              int64_t N, int64_t K, int64_t k, int64_t k_end) {
    constexpr int L = kLanes<T>;
    const T* rows[R];
    PCONV_UNROLL for (int r = 0; r < R; ++r) rows[r] = w + (m + r) * ldw;
    const T* g = grad_conv + m * N;  // g[r * N + n] = grad_conv[m + r][n]
    const int64_t vectors_end = k + (k_end - k) / L * L;
    for (; k < vectors_end; k += L) {
      Vec<T> wv[R];
      PCONV_UNROLL for (int r = 0; r < R; ++r) wv[r] = load(rows[r] + k);
      for (int64_t n = 0; n < N; ++n) {
        T* dst = grad_cols_t + n * K + k;
        Vec<T> acc = load(dst);
        PCONV_UNROLL for (int r = 0; r < R; ++r) acc += g[r * N + n] * wv[r];
        store(dst, acc);
      }
    }
    for (; k < k_end; ++k) {
      for (int64_t n = 0; n < N; ++n) {
        PCONV_UNROLL for (int r = 0; r < R; ++r) grad_cols_t[n * K + k] += g[r * N + n] * rows[r][k];
      }
    }
  }

  template <typename T>
  [[gnu::always_inline]] static void run(const T* grad_conv, const T* w, int64_t ldw, T* grad_cols_t, int64_t M,
                                         int64_t N, int64_t K, int64_t k0, int64_t k1) {
    constexpr int R = Tiles::kColumnRows;
    for (int64_t k = k0; k < k1; k += Tiles::kColumnSegment) {
      const int64_t k_end = std::min(k1, k + Tiles::kColumnSegment);
      for (int64_t n = 0; n < N; ++n) std::fill(grad_cols_t + n * K + k, grad_cols_t + n * K + k_end, T(0));
      int64_t m = 0;
      for (; m + R <= M; m += R) add_rows<T, R>(grad_conv, w, ldw, grad_cols_t, m, N, K, k, k_end);
      for (; m < M; ++m) add_rows<T, 1>(grad_conv, w, ldw, grad_cols_t, m, N, K, k, k_end);
    }
  }
};

#if defined(__x86_64__) && defined(__GNUC__)
// ATEN_CPU_CAPABILITY=default, torch's switch to its baseline kernels, keeps these on the baseline too.
bool cpu_has_avx2_fma() {
  static const bool has = [] {
    const char* capability = std::getenv("ATEN_CPU_CAPABILITY");
    if (capability != nullptr && std::string_view(capability) == "default") return false;
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return has;
}

template <typename Kernel, typename... Args>
[[gnu::target("avx2,fma")]] void run_avx2_fma(Args... args) {
  Kernel::run(args...);
}
#endif

template <typename Kernel, typename... Args>
void run_baseline(Args... args) {
  Kernel::run(args...);
}

template <typename Kernel, typename... Args>
void run_kernel(Args... args) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (cpu_has_avx2_fma()) return run_avx2_fma<Kernel>(args...);
#endif
  run_baseline<Kernel>(args...);
}

}  // namespace

template <int J, typename T>
void output_in_tiles(const T* w, int64_t ldw, const T* cols_t, T* out, int64_t M, int64_t N, int64_t K) {
  constexpr int64_t R = Tiles::kOutputRows<J>;
  at::parallel_for(0, ceil_div(M, R), grain(R * N * K), [&](int64_t begin, int64_t end) {
    run_kernel<OutputRows<J>>(w, ldw, cols_t, out, begin * R, std::min(M, end * R), N, K);
  });
}

template <typename T>
void few_positions_output(const T* w, int64_t ldw, const T* cols_t, T* out, int64_t M, int64_t N, int64_t K) {
  static_assert(Tiles::kOutputPositions == 4);
  switch (std::min<int64_t>(N, Tiles::kOutputPositions)) {
    case 1: return output_in_tiles<1>(w, ldw, cols_t, out, M, N, K);
    case 2: return output_in_tiles<2>(w, ldw, cols_t, out, M, N, K);
    case 3: return output_in_tiles<3>(w, ldw, cols_t, out, M, N, K);
    default: return output_in_tiles<4>(w, ldw, cols_t, out, M, N, K);
  }
}

template <typename T>
void few_positions_grad_weight(const T* grad_conv, const T* cols_t, T* grad_w, int64_t ldw, int64_t M, int64_t N,
                               int64_t K, bool accumulate) {
  constexpr int64_t R = Tiles::kWeightRows;
  at::parallel_for(0, ceil_div(M, R), grain(R * N * K), [&](int64_t begin, int64_t end) {
    run_kernel<GradWeightRows>(grad_conv, cols_t, grad_w, ldw, begin * R, std::min(M, end * R), N, K, accumulate);
  });
}

template <typename T>
void few_positions_grad_columns(const T* grad_conv, const T* w, int64_t ldw, T* grad_cols_t, int64_t M, int64_t N,
                                int64_t K) {
  constexpr int64_t width = kLanes<T>;
  at::parallel_for(0, ceil_div(K, width), grain(width * M * N), [&](int64_t begin, int64_t end) {
    run_kernel<GradColumnsRange>(grad_conv, w, ldw, grad_cols_t, M, N, K, begin * width, std::min(K, end * width));
  });
}

#define PCONV_INSTANTIATE_FEW_POSITIONS(T)                                                                    \
  template void few_positions_output<T>(const T*, int64_t, const T*, T*, int64_t, int64_t, int64_t);          \
  template void few_positions_grad_weight<T>(const T*, const T*, T*, int64_t, int64_t, int64_t, int64_t, bool); \
  template void few_positions_grad_columns<T>(const T*, const T*, int64_t, T*, int64_t, int64_t, int64_t);
PCONV_INSTANTIATE_FEW_POSITIONS(float)
PCONV_INSTANTIATE_FEW_POSITIONS(double)
#undef PCONV_INSTANTIATE_FEW_POSITIONS

}  // namespace cpu
}  // namespace partialconv
