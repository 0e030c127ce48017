// Every function of csrc/cuda/warp_mma.cuh in one kernel, so that ptxas checks their inline PTX
// (tests/test_cuda_emulation_mma.py compiles it for sm_80 and sm_90; it is never run). The data
// flow only keeps every result alive.
#include <cstdint>

#include "cuda/warp_mma.cuh"

using namespace partialconv::cuda;

__global__ void __launch_bounds__(32)
    every_warp_mma_function(const uint4* __restrict__ rows, bool valid, float* __restrict__ out,
                            double* __restrict__ out_f64) {
  __shared__ __align__(16) uint16_t tile[32 * 8];  // 32 rows of 16 bytes
  const int lane = threadIdx.x;
  uint16_t* row = &tile[lane * 8];
  cp_async_16(row, &rows[lane], valid);
  cp_async_commit();
  cp_async_8(row, &rows[lane], valid);
  cp_async_4(row + 4, &rows[lane], !valid);
  cp_async_zfill<16>(row, &rows[lane], lane % 17);
  cp_async_zfill<8>(row, &rows[lane], lane % 9);
  cp_async_zfill<4>(row + 6, &rows[lane], lane % 5);
  cp_async_commit();
  cp_async_wait<1>();
  cp_async_wait<0>();
  __syncthreads();

  uint32_t x1[1], x2[2], x4[4], x1_trans[1], x2_trans[2], x4_trans[4];
  ldmatrix_x1(x1, row);
  ldmatrix_x2(x2, row);
  ldmatrix_x4(x4, row);
  ldmatrix_x1_trans(x1_trans, row);
  ldmatrix_x2_trans(x2_trans, row);
  ldmatrix_x4_trans(x4_trans, row);

  float accumulators[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  mma_m16n8k16_f16(accumulators, x4, x2, accumulators);
  mma_m16n8k16_bf16(accumulators, x4_trans, x2_trans, accumulators);
  const uint32_t a_tf32[4] = {tf32_from_float(accumulators[0]), x1[0], x1_trans[0], x4[1]};
  const uint32_t b_tf32[2] = {tf32_from_float(accumulators[1]), x2[1]};
  mma_m16n8k8_tf32(accumulators, a_tf32, b_tf32, accumulators);
  double accumulators_f64[2] = {0.0, 0.0};
  mma_m8n8k4_f64(accumulators_f64, accumulators[2], accumulators[3], accumulators_f64);

  // Shared loads and stores of 32, 64 and 128 bits, on the rows of other lanes.
  __syncthreads();
  const uint4 wide = load_shared_128(&tile[(lane ^ 1) * 8]);
  const uint2 half_row = load_shared_64(&tile[(lane ^ 2) * 8 + 4]);
  const uint32_t word = load_shared_32(&tile[(lane ^ 3) * 8 + 2]);
  __syncthreads();
  store_shared_128(row, make_uint4(wide.x + word, wide.y, wide.z, wide.w));
  store_shared_64(row + 4, make_uint2(half_row.x, half_row.y + x2[0]));
  store_shared_32(row + 2, x4[3]);
  __syncthreads();
  accumulators[0] += __uint_as_float(load_shared_32(&tile[(lane ^ 4) * 8]));

  for (int i = 0; i < 4; ++i) out[lane * 4 + i] = accumulators[i];
  for (int i = 0; i < 2; ++i) out_f64[lane * 2 + i] = accumulators_f64[i];
}
