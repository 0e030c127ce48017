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

// Whether mask_scales are those of a mask of ones: S at every output position the count of mask
// elements its window covers inside the input. A necessary condition for the mask being ones,
// checked on the output positions alone (holes that no window reads do not show).
bool scales_of_ones(const at::Tensor& mask_scales, const ConvGeometry& g);

// Fraction of output positions (over every mask image) that are not holes; 1 when there are none.
double valid_fraction(const at::Tensor& mask_scales, const ConvGeometry& g);

}  // namespace cpu
}  // namespace partialconv
