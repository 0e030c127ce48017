"""ONNX export: partial_conv_forward written in standard PyTorch operators, which
torch.onnx.export (dynamo=True) translates into standard ONNX operators only: Conv (the masked
convolution, and the mask's window sum as a Conv with a ones kernel), Equal and Where (holes
give 0 even under NaN input), Greater, Reciprocal, Mul and Clip (the ratio and the updated
mask), Add (the bias), Relu or LeakyRelu, and shape plumbing (Shape, Concat, Reshape,
Squeeze, Expand, an integer Div for output sizes; Cast for float16).

torch 2.14's exporter takes translations of custom ops only per call (custom_translation_table):
its registry is rebuilt from torch's own tables at every export, with no public way to add to
them. So the formula replaces the op before the exporter sees it:

- partial_conv1d/2d/3d, and the layers through them, call partial_conv_forward_in_standard_ops
  instead of the op while torch.onnx.export traces them (torch.onnx.is_in_onnx_export()): a
  plain `torch.onnx.export(model, args, dynamo=True)` needs no extra argument. Eager calls,
  torch.compile and torch.export outside ONNX export keep the fused op.
- An ExportedProgram that already holds the op (torch.export.export of the model) is lowered
  with `exported.run_decompositions(ONNX_DECOMPOSITIONS)` before torch.onnx.export.

The formula is reference.py's (with nan_safe=True), returning the op's outputs.
"""
import math

import torch
import torch.nn.functional as F

from . import _extension  # noqa: F401  (loads the op that ONNX_DECOMPOSITIONS names)

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def partial_conv_forward_in_standard_ops(input, mask, weight, bias, stride, padding, dilation, groups,
                                         activation, negative_slope, normalization="window"):
    """torch.ops.partialconv_cuda.partial_conv_forward (same arguments, same outputs) in standard
    PyTorch operators:

        S     = conv(M, ones(1, C_M, *kernel))          window sum of the mask (padding = holes)
        U     = clamp(S, 0, 1)
        ratio = where(S > 0, winsize / S, 0) * U        winsize = C_M * prod(kernel), or 1 for 'sum'
        out   = act((conv(where(M == 0, 0, X*M), W) * ratio + b) * U)

    Returns (output, updated_mask, mask_scales): output (N, C_out, *out_spatial) in the input's
    dtype, updated_mask U (mask batch, 1, *out_spatial) in the input's dtype, mask_scales
    [ratio, U] stacked along dim 1 (float32, float64 for a float64 input), which only the op's
    backward reads (dead code in an exported inference graph, which drops it). The mask
    statistics and the renormalisation run in that float32 / float64 dtype (for float16 input
    too, like the op); only the masked convolution runs in the input's dtype. A None mask is
    all ones, C_M = 1.
    """
    dims = input.dim() - 2
    conv = _CONV[dims]
    kernel = weight.shape[2:]
    scale_dtype = torch.float64 if input.dtype == torch.float64 else torch.float32
    if mask is None:
        window_mask = input.new_ones((1, 1, *input.shape[2:]), dtype=scale_dtype)
    else:
        window_mask = mask.to(scale_dtype)
    mask_channels = window_mask.shape[1]
    ones = torch.ones(1, mask_channels, *kernel, dtype=scale_dtype, device=input.device)
    mask_sum = conv(window_mask, ones, None, stride, padding, dilation)
    update = mask_sum.clamp(0, 1)
    window_size = mask_channels * math.prod(kernel) if normalization == "window" else 1
    ratio = torch.where(mask_sum > 0, window_size / mask_sum, 0) * update

    # A hole (M exactly 0) contributes 0 even where the input holds NaN or Inf.
    masked = input if mask is None else torch.where(mask == 0, 0, input * mask)
    output = conv(masked, weight, None, stride, padding, dilation, groups).to(scale_dtype) * ratio
    if bias is not None:
        output = output + bias.to(scale_dtype).view(1, -1, *[1] * dims)
    output = output * update
    if activation == "relu":
        output = F.relu(output)
    elif activation == "leaky_relu":
        output = F.leaky_relu(output, negative_slope)
    mask_scales = torch.cat([ratio, update], 1)
    return output.to(input.dtype), update.to(input.dtype), mask_scales


# For ExportedProgram.run_decompositions: replaces the op by the formula above.
ONNX_DECOMPOSITIONS = {
    torch.ops.partialconv_cuda.partial_conv_forward.default: partial_conv_forward_in_standard_ops,
}
