// Main loops that miss the project's target, for tests/test_sass.py (compiled to a cubin for sm_80
// and sm_90, never run).
//
// gathered_mma: every k-tile gathers its A tile element by element (2-byte loads) in a loop of
// runtime length nested in the k-loop, divides by a runtime image width there (integer division:
// I2F, MUFU.RCP, F2I) and scales by a float division (MUFU.RCP and a call to the division slow
// path), with a __syncthreads() before and after the tile's two mma.sync.
// simt_dot: a loop of FFMAs and no tensor cores.
#include <cstdint>

#include "cuda/warp_mma.cuh"

using namespace partialconv::cuda;

__global__ void __launch_bounds__(32)
    gathered_mma(const uint16_t* __restrict__ image, const float* __restrict__ scale,
                 float* __restrict__ out, int k_tiles, int width, int pitch, int tile_elements) {
  __shared__ __align__(16) uint16_t a_tile[16 * 16];
  __shared__ __align__(16) uint16_t b_tile[16 * 16];
  const int lane = threadIdx.x;
  float accumulators[2][4] = {};
  for (int k_tile = 0; k_tile < k_tiles; ++k_tile) {
    for (int i = lane; i < tile_elements; i += blockDim.x) {
      const int pixel = k_tile * 16 + i / 16;
      const int y = pixel / width, x = pixel % width;
      a_tile[i] = image[y * pitch + x];
      b_tile[i] = image[x * pitch + y];
    }
    __syncthreads();
    uint32_t a_fragment[4], b_fragment[4];
    ldmatrix_x4(a_fragment, &a_tile[(lane % 16) * 16 + (lane / 16) * 8]);
    ldmatrix_x4(b_fragment, &b_tile[(lane % 16) * 16 + (lane / 16) * 8]);
    const uint32_t b0[2] = {b_fragment[0], b_fragment[1]}, b1[2] = {b_fragment[2], b_fragment[3]};
    mma_m16n8k16_f16(accumulators[0], a_fragment, b0, accumulators[0]);
    mma_m16n8k16_f16(accumulators[1], a_fragment, b1, accumulators[1]);
    const float divisor = scale[k_tile];
    for (int n = 0; n < 2; ++n)
      for (int j = 0; j < 4; ++j) accumulators[n][j] /= divisor;
    __syncthreads();
  }
  for (int n = 0; n < 2; ++n)
    for (int j = 0; j < 4; ++j) out[(n * 4 + j) * 32 + lane] = accumulators[n][j];
}

__global__ void simt_dot(const float* __restrict__ a, const float* __restrict__ b,
                         float* __restrict__ out, int k) {
  float sum = 0.0f;
  for (int i = 0; i < k; ++i) sum += a[i * blockDim.x + threadIdx.x] * b[i];
  out[threadIdx.x] = sum;
}
