// The vendor path of partial_conv, one code for every device: the masked input X*M fed to ATen's
// convolution (cuDNN on CUDA, oneDNN on the CPU), with the mask's saved scales (ratio, U per
// output position, computed beforehand by the backend) applied around it:
//   forward   Xm = X*M (exactly 0 where M = 0)   conv = convolution(Xm, W)
//             out = act((conv * ratio + b) * U), 0 in holes
//   backward  dL/dconv = g * act'(out) * ratio * U   dL/db = sum of g * act'(out) * U
//             (dL/dXm, dL/dW) = convolution_backward(dL/dconv, Xm, W)   dL/dX = M * dL/dXm
// No mask convolution: the window sums come from the backend (once per output position). The
// passes around the convolution are the device's own (ElementwisePasses): CUDA runs one kernel
// each (cuda/layout_kernels.cuh), the CPU ATen operations. On CUDA this is the path taken where the
// fused kernels do not apply or are not the faster; the CPU runs it when PARTIALCONV_CPU_PATH=vendor,
// so that machines without a GPU test this code.
#pragma once

#include <ATen/ATen.h>

#include <array>

#include "partial_conv.h"

namespace partialconv {
namespace vendor {

// The elementwise passes around the convolution, per device. The saved mask scales are laid out
// as partial_conv_math.h's mask_scale_rows describes: (mask_batch, 2, *out_spatial), ratio then U.
class ElementwisePasses {
 public:
  virtual ~ElementwisePasses() = default;
  // out = values * M, exactly 0 where M = 0 (NaN and Inf in holes never pass), over the input's
  // shape; mask defined.
  virtual void apply_mask(const at::Tensor& values, const at::Tensor& mask, const ConvGeometry& g,
                          at::Tensor& out) const = 0;
  // output = act((conv * ratio + b) * U), 0 in holes.
  virtual void epilogue(const at::Tensor& conv, const at::Tensor& bias, const at::Tensor& mask_scales,
                        const ForwardProblem& problem, at::Tensor& output) const = 0;
  // Returns dL/dconv = g * act'(out) * ratio * U in the input's dtype (undefined unless
  // need_grad_conv) and writes dL/db into grad_bias when it is defined. `output` is read only for
  // an activation.
  virtual at::Tensor scale_output_grad(const at::Tensor& grad_output, const at::Tensor& output,
                                       const at::Tensor& mask_scales, const ForwardProblem& problem,
                                       bool need_grad_conv, at::Tensor& grad_bias) const = 0;
};

// The passes from ATen operations (several elementwise operations each): the CPU's.
const ElementwisePasses& aten_passes();

// Writes output (allocated by allocate_forward_outputs) from the mask scales already computed.
void forward(const ElementwisePasses& passes, const at::Tensor& input, const at::Tensor& mask,
             const at::Tensor& weight, const at::Tensor& bias, const ForwardProblem& problem,
             const at::Tensor& mask_scales, at::Tensor& output);

// Writes the gradients output_mask asks for into the tensors of allocate_backward_outputs (never
// replaces them). `output` is read only for an activation.
void backward(const ElementwisePasses& passes, const at::Tensor& grad_output, const at::Tensor& input,
              const at::Tensor& mask, const at::Tensor& weight, const at::Tensor& output,
              const at::Tensor& mask_scales, const ForwardProblem& problem, std::array<bool, 3> output_mask,
              at::Tensor& grad_input, at::Tensor& grad_weight, at::Tensor& grad_bias);

}  // namespace vendor
}  // namespace partialconv
