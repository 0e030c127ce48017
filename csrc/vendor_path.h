// The vendor path of partial_conv, one code for every device: the masked input X*M fed to ATen's
// convolution (cuDNN on CUDA, oneDNN on the CPU), with the mask's saved scales (ratio, U per
// output position, computed beforehand by the backend) applied around it:
//   forward   Xm = X*M (exactly 0 where M = 0)   conv = convolution(Xm, W)
//             out = act((conv * ratio + b) * U), 0 in holes
//   backward  dL/dconv = g * act'(out) * ratio * U   dL/db = sum of g * act'(out) * U
//             (dL/dXm, dL/dW) = convolution_backward(dL/dconv, Xm, W)   dL/dX = M * dL/dXm
// No mask convolution: the window sums come from the backend (once per output position). On CUDA
// this is the path taken where the fused kernels do not apply or are not the faster; the CPU runs
// it when PARTIALCONV_CPU_PATH=vendor, so that machines without a GPU test the CUDA path's glue.
#pragma once

#include <ATen/ATen.h>

#include <array>

#include "partial_conv.h"

namespace partialconv {
namespace vendor {

// Writes output (allocated by allocate_forward_outputs) from the mask scales already computed.
void forward(const at::Tensor& input, const at::Tensor& mask, const at::Tensor& weight, const at::Tensor& bias,
             const ForwardProblem& problem, const at::Tensor& mask_scales, at::Tensor& output);

// Writes the gradients output_mask asks for into the tensors of allocate_backward_outputs (never
// replaces them). `output` is read only for an activation.
void backward(const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& mask,
              const at::Tensor& weight, const at::Tensor& output, const at::Tensor& mask_scales,
              const ForwardProblem& problem, std::array<bool, 3> output_mask, at::Tensor& grad_input,
              at::Tensor& grad_weight, at::Tensor& grad_bias);

}  // namespace vendor
}  // namespace partialconv
