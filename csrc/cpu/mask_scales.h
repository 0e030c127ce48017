// The mask's window sums S at every output position, and from them the saved scales (ratio, U)
// and the updated mask; the fraction of positions whose window sees a valid pixel.
#pragma once

#include <ATen/ATen.h>

#include "../partial_conv.h"

namespace partialconv {
namespace cpu {

// Fills mask_scales (mask_batch, 2, *out_spatial) and updated_mask (mask_batch, 1, *out_spatial)
// from the mask (undefined: no mask).
template <typename scalar_t>
void compute_mask_scales(const at::Tensor& mask, const ConvGeometry& g, at::Tensor& mask_scales,
                         at::Tensor& updated_mask);

// Fraction of output positions (over every mask image) that are not holes; 1 when there are none.
double valid_fraction(const at::Tensor& mask_scales, const ConvGeometry& g);

}  // namespace cpu
}  // namespace partialconv
