// The two CPU paths of partial_conv (partial_conv_cpu.cpp chooses one per call):
//   packed positions (packed_path.cpp): only the output positions whose window sees a valid
//     pixel, im2col-packed with the mask applied and multiplied by the weight (GEMM: ATen's, or
//     for at most kFewPositions positions our own, few_positions_gemm.h);
//   dense bands (dense_path.cpp): slabs of the input copied with the mask applied and fed to
//     ATen's convolution (oneDNN), then one fused epilogue.
// Each takes the checked problem, the tensors, and the mask scales computed beforehand.
#pragma once

#include <ATen/ATen.h>

#include <array>

#include "../partial_conv.h"

namespace partialconv {
namespace cpu {

template <typename scalar_t>
void forward_packed(const at::Tensor& input, const at::Tensor& mask, const at::Tensor& weight,
                    const at::Tensor& bias, const ForwardProblem& problem, at::Tensor& output,
                    const at::Tensor& mask_scales);

template <typename scalar_t>
void backward_packed(const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& mask,
                     const at::Tensor& weight, const at::Tensor& output,
                     const at::Tensor& mask_scales, const ForwardProblem& problem,
                     std::array<bool, 3> output_mask, at::Tensor& grad_input,
                     at::Tensor& grad_weight, at::Tensor& grad_bias);

// Whether the dense path's forward copies its bands channels-last rather than channels-first, for
// bands of dtype band_dtype: whichever oneDNN convolves faster for the layer's shape
// (dense_path.cpp states the measurements).
bool channels_last_bands(const ConvGeometry& g, at::ScalarType band_dtype);

// Whether the dense backward has oneDNN make grad_input channels-last, for bands of dtype
// band_dtype (dense_path.cpp states the measurements).
bool channels_last_input_gradient(const ConvGeometry& g, at::ScalarType band_dtype);

// Whether the dense forward convolves the input as it is, with no masked copy (no mask or a mask
// of ones, whole images in the bands' dtype and layout; dense_path.cpp's input_is_bands).
bool dense_forward_reads_input(const at::Tensor& input, const at::Tensor& mask, const at::Tensor& mask_scales,
                               const ConvGeometry& g);

template <typename scalar_t>
void forward_bands(const at::Tensor& input, const at::Tensor& mask, const at::Tensor& weight,
                   const at::Tensor& bias, const ForwardProblem& problem, at::Tensor& output,
                   const at::Tensor& mask_scales);

// grad_input and grad_weight are made by backward_bands (undefined on the way in), so that the
// convolution's own gradients become them without a copy.
template <typename scalar_t>
void backward_bands(const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& mask,
                    const at::Tensor& weight, const at::Tensor& output,
                    const at::Tensor& mask_scales, const ForwardProblem& problem,
                    std::array<bool, 3> output_mask, at::Tensor& grad_input,
                    at::Tensor& grad_weight, at::Tensor& grad_bias);

}  // namespace cpu
}  // namespace partialconv

// Explicit instantiations of a path function template for the four dtypes, in its .cpp.
#define PCONV_INSTANTIATE_FOR_DTYPES(function, signature) \
  template void function<float> signature;                 \
  template void function<double> signature;                \
  template void function<c10::Half> signature;             \
  template void function<c10::BFloat16> signature;
