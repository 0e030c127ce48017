"""The partial convolution contract in plain PyTorch, in 1, 2 and 3 spatial dimensions: the test
oracle and the "NVIDIA-style" baseline of the benchmarks (one mask convolution plus elementwise
renormalisation, as in NVIDIA's PartialConv2d / PartialConv3d).

    S     = window sum of M (zero padding counts as holes; a multi-channel mask also sums channels)
    U     = clamp(S, 0, 1)
    ratio = winsize / S * U where S > 0, else 0       (winsize = prod(kernel), or C_in*prod(kernel))
    out   = act((conv(X*M, W) * ratio + b) * U)

normalization="sum" replaces winsize by 1 (ratio = U / S: layers that divide by the mask sum
alone, like the seed's).

Unlike NVIDIA's files, U multiplies the output with and without a bias (the two differ only for
soft masks), and a fully masked window gives 0 rather than NaN in float16 (no 1e-8 added to S).
"""
import math

import torch
import torch.nn.functional as F
from torch.nn.modules.utils import _ntuple

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def partial_conv_reference(
    input,
    mask,
    weight,
    bias=None,
    stride=1,
    padding=0,
    dilation=1,
    groups=1,
    activation=None,
    negative_slope=0.01,
    nan_safe=True,
    normalization="window",
):
    """Returns (output, updated_mask) like partialconv_cuda.partial_conv1d/2d/3d, the dimension
    taken from the input's rank.

    nan_safe=True makes a pixel whose mask is exactly 0 contribute 0 even if the input holds NaN
    or Inf there (the contract); nan_safe=False computes X*M as NVIDIA's layer does, which
    spreads NaN from holes.
    """
    dims = input.dim() - 2
    conv = _CONV[dims]
    n, _, *spatial = input.shape
    out_channels, _, *kernel = weight.shape
    if not isinstance(padding, str):  # F.conv*d also take 'same' and 'valid'
        padding = _ntuple(dims)(padding)
    stride, dilation = _ntuple(dims)(stride), _ntuple(dims)(dilation)
    if mask is None:
        mask = input.new_ones(1, 1, *spatial)
    multi_channel = mask.shape[1] > 1
    with torch.no_grad():
        ones = torch.ones(1, mask.shape[1], *kernel, dtype=mask.dtype, device=mask.device)
        mask_sum = conv(mask, ones, None, stride, padding, dilation)
        if normalization not in ("window", "sum"):
            raise ValueError(f"normalization must be 'window' or 'sum', got {normalization!r}")
        window_size = mask.shape[1] * math.prod(kernel) if normalization == "window" else 1
        update = mask_sum.clamp(0, 1)
        ratio = torch.where(mask_sum > 0, window_size / mask_sum, 0) * update
    masked = input * mask
    if nan_safe:
        masked = torch.where(mask == 0, 0, masked)
    output = conv(masked, weight, None, stride, padding, dilation, groups) * ratio
    if bias is not None:
        output = output + bias.view(1, -1, *[1] * dims)
    output = output * update
    if activation == "relu":
        output = F.relu(output)
    elif activation == "leaky_relu":
        output = F.leaky_relu(output, negative_slope)
    elif activation not in (None, "none"):
        raise ValueError(f"activation must be None, 'relu' or 'leaky_relu', got {activation!r}")
    channels = out_channels if multi_channel else 1
    return output, update.expand(n, channels, *update.shape[2:])
