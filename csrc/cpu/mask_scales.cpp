// Window sums of the mask, separably: along the width for every input line, then along the height,
// then along the depth (a pass whose window is a single tap at stride 1 without padding is
// skipped), so no window ever walks more than one dimension. A multi-channel mask is first summed
// over its channels in one contiguous pass (the window sum of the channel sum is S).
#include "mask_scales.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <vector>

#include "cpu_common.h"

namespace partialconv {
namespace cpu {
namespace {

// One spatial dimension of the window: out[o] = sum over taps k whose input coordinate
// o * stride - pad + k * dilation lies in [0, in_extent) of in[that coordinate].
struct Axis {
  int64_t in_extent, out_extent, kernel, stride, pad, dilation;

  // A single tap at stride 1 without padding: out == in.
  bool identity() const { return kernel == 1 && stride == 1 && pad == 0; }
  int64_t coord(int64_t o, int64_t k) const { return input_coord<int64_t>(o, k, stride, pad, dilation); }
  int64_t taps_inside(int64_t o) const {
    int64_t count = 0;
    for (int64_t k = 0; k < kernel; ++k) count += coord(o, k) >= 0 && coord(o, k) < in_extent;
    return count;
  }
};

Axis axis(const ConvGeometry& g, int d) {
  return {g.in_size[d], g.out_size[d], g.kernel[d], g.stride[d], g.pad[d], g.dilation[d]};
}

// out[line][ox] for every input line (depth, height) of one mask plane read through its strides.
// The taps of output index ox inside the line are [first[ox], last[ox]) (the input coordinate
// grows with the tap), the same for every line: the sums run over them without a bounds check, in
// the order of a walk over every tap that skips those outside.
template <typename acc_t, typename T>
void width_sums(const T* plane, const int64_t (&strides)[kDims], const ConvGeometry& g, acc_t* out) {
  const Axis w = axis(g, 2);
  const int64_t lines = g.in_size[0] * g.in_size[1];
  std::vector<int64_t> first(size_t(w.out_extent)), last(size_t(w.out_extent));
  for (int64_t ox = 0; ox < w.out_extent; ++ox) {
    int64_t k0 = 0, k1 = w.kernel;
    while (k0 < k1 && w.coord(ox, k0) < 0) ++k0;
    while (k1 > k0 && w.coord(ox, k1 - 1) >= w.in_extent) --k1;
    first[size_t(ox)] = k0, last[size_t(ox)] = k1;
  }
  const int64_t step = w.dilation * strides[2];
  at::parallel_for(0, lines, grain(w.out_extent * w.kernel), [&](int64_t begin, int64_t end) {
    for (int64_t line = begin; line < end; ++line) {
      const T* in = plane + (line / g.in_size[1]) * strides[0] + (line % g.in_size[1]) * strides[1];
      acc_t* row = out + line * w.out_extent;
      for (int64_t ox = 0; ox < w.out_extent; ++ox) {
        const int64_t k0 = first[size_t(ox)], k1 = last[size_t(ox)];
        const T* tap = k0 < k1 ? in + w.coord(ox, k0) * strides[2] : in;  // no pointer outside the line
        acc_t sum = acc_t(0);
        for (int64_t k = k0; k < k1; ++k, tap += step) sum += acc_t(*tap);
        row[ox] = sum;
      }
    }
  });
}

// Window sums along the middle dimension of a contiguous (outer, a.in_extent, inner) array into
// a contiguous (outer, a.out_extent, inner) one.
template <typename acc_t>
void axis_sums(const acc_t* in, int64_t outer, int64_t inner, const Axis& a, acc_t* out) {
  at::parallel_for(0, outer * a.out_extent, grain(inner * a.kernel), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t o = i % a.out_extent, block = i / a.out_extent;
      acc_t* row = out + i * inner;
      std::fill(row, row + inner, acc_t(0));
      for (int64_t k = 0; k < a.kernel; ++k) {
        const int64_t coord = a.coord(o, k);
        if (coord < 0 || coord >= a.in_extent) continue;
        const acc_t* source = in + (block * a.in_extent + coord) * inner;
        for (int64_t j = 0; j < inner; ++j) row[j] += source[j];
      }
    }
  });
}

// S of one mask plane (one mask image, one channel or the channel sum) at every output position.
template <typename acc_t, typename T>
void plane_window_sums(const T* plane, const int64_t (&strides)[kDims], const ConvGeometry& g,
                       acc_t* width_scratch, acc_t* height_scratch, acc_t* sums) {
  const bool height_pass = !axis(g, 1).identity(), depth_pass = !axis(g, 0).identity();
  acc_t* current = height_pass || depth_pass ? width_scratch : sums;
  width_sums(plane, strides, g, current);
  if (height_pass) {
    acc_t* next = depth_pass ? height_scratch : sums;
    axis_sums(current, g.in_size[0], g.out_size[2], axis(g, 1), next);
    current = next;
  }
  if (depth_pass) axis_sums(current, int64_t(1), g.out_size[1] * g.out_size[2], axis(g, 0), sums);
}

// S without a mask at output position p: the taps inside the input, a product over the
// dimensions, each dimension's count found once per output index.
struct UnmaskedSums {
  std::vector<int64_t> taps[kDims];
  int64_t extent1, extent2;

  explicit UnmaskedSums(const ConvGeometry& g) : extent1(g.out_size[1]), extent2(g.out_size[2]) {
    for (int d = 0; d < kDims; ++d)
      for (int64_t o = 0; o < g.out_size[d]; ++o) taps[d].push_back(axis(g, d).taps_inside(o));
  }
  int64_t operator()(int64_t p) const {
    return taps[0][size_t(p / (extent1 * extent2))] * taps[1][size_t(p / extent2 % extent1)] *
           taps[2][size_t(p % extent2)];
  }
};

template <typename acc_t>
void unmasked_window_sums(const ConvGeometry& g, acc_t* sums) {
  const UnmaskedSums unmasked(g);
  at::parallel_for(0, g.out_positions(), grain(4), [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) sums[p] = acc_t(unmasked(p));
  });
}

}  // namespace

template <typename scalar_t>
void compute_mask_scales(const at::Tensor& mask, const ConvGeometry& g, at::Tensor& mask_scales,
                         at::Tensor& updated_mask) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t P = g.out_positions();
  const at::Tensor sums = at::empty({g.mask_batch, P}, mask_scales.options());
  acc_t* sums_data = sums.data_ptr<acc_t>();
  if (mask.defined()) {
    const at::Tensor plane = g.multi_channel_mask()
                                 ? at::sum(mask, {1}, /*keepdim=*/true, mask_scales.scalar_type())
                                 : mask;
    const at::Tensor width_scratch = at::empty({g.in_size[0] * g.in_size[1] * g.out_size[2]}, mask_scales.options());
    const at::Tensor height_scratch = at::empty({g.in_size[0] * g.out_size[1] * g.out_size[2]}, mask_scales.options());
    const auto run = [&](const auto& view) {
      const int64_t strides[kDims] = {view.s[2], view.s[3], view.s[4]};
      for (int64_t nm = 0; nm < g.mask_batch; ++nm)
        plane_window_sums(view.data + nm * view.s[0], strides, g, width_scratch.data_ptr<acc_t>(),
                          height_scratch.data_ptr<acc_t>(), sums_data + nm * P);
    };
    if (g.multi_channel_mask())
      run(StridedTensor<const acc_t>(plane));
    else
      run(StridedTensor<const scalar_t>(plane));
  } else {
    unmasked_window_sums(g, sums_data);
  }
  acc_t* scales = mask_scales.mutable_data_ptr<acc_t>();
  scalar_t* update = updated_mask.mutable_data_ptr<scalar_t>();
  const acc_t numerator = acc_t(g.ratio_numerator());
  at::parallel_for(0, g.mask_batch * P, grain(4), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t p = i % P, nm = i / P;
      const MaskScale<acc_t> scale = mask_scale(sums_data[i], numerator);
      const MaskScaleRows<acc_t> rows = mask_scale_rows(scales, g.mask_batch, P, nm);
      rows.ratio[p] = scale.ratio;
      rows.update[p] = scale.update;
      update[i] = static_cast<scalar_t>(scale.update);
    }
  });
}

double valid_fraction(const at::Tensor& mask_scales, const ConvGeometry& g) {
  const int64_t P = g.out_positions();
  if (g.mask_batch * P == 0) return 1.0;
  int64_t valid = 0;
  AT_DISPATCH_FLOATING_TYPES(mask_scales.scalar_type(), "valid_fraction", [&] {
    for (int64_t nm = 0; nm < g.mask_batch; ++nm) {
      const ImageScales<scalar_t> scales = image_scales<scalar_t>(mask_scales, g, nm);
      for (int64_t p = 0; p < P; ++p) valid += !scales.is_hole(p);
    }
  });
  return double(valid) / double(g.mask_batch * P);
}

bool scales_of_ones(const at::Tensor& mask_scales, const ConvGeometry& g) {
  const UnmaskedSums unmasked(g);
  const int64_t channels = std::max<int64_t>(g.mask_channels, 1), P = g.out_positions();
  bool ones = true;
  AT_DISPATCH_FLOATING_TYPES(mask_scales.scalar_type(), "scales_of_ones", [&] {
    const scalar_t numerator = scalar_t(g.ratio_numerator());
    // The expected scale of the last window sum seen (the same along most of a line).
    scalar_t last_sum = scalar_t(-1);
    MaskScale<scalar_t> expected{};
    for (int64_t nm = 0; nm < g.mask_batch && ones; ++nm) {
      const ImageScales<scalar_t> scales = image_scales<scalar_t>(mask_scales, g, nm);
      for (int64_t p = 0; p < P && ones; ++p) {
        const scalar_t sum = scalar_t(channels * unmasked(p));
        if (sum != last_sum) expected = mask_scale(sum, numerator), last_sum = sum;
        ones = scales.ratio[p] == expected.ratio && scales.update[p] == expected.update;
      }
    }
  });
  return ones;
}

template void compute_mask_scales<float>(const at::Tensor&, const ConvGeometry&, at::Tensor&, at::Tensor&);
template void compute_mask_scales<double>(const at::Tensor&, const ConvGeometry&, at::Tensor&, at::Tensor&);
template void compute_mask_scales<c10::Half>(const at::Tensor&, const ConvGeometry&, at::Tensor&, at::Tensor&);
template void compute_mask_scales<c10::BFloat16>(const at::Tensor&, const ConvGeometry&, at::Tensor&, at::Tensor&);

}  // namespace cpu
}  // namespace partialconv
