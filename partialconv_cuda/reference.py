"""The partial convolution contract in plain PyTorch: the test oracle and the "NVIDIA-style"
baseline of the benchmarks (one mask convolution plus elementwise renormalisation, as in NVIDIA's
PartialConv2d).

    S     = window sum of M (zero padding counts as holes; a multi-channel mask also sums channels)
    U     = clamp(S, 0, 1)
    ratio = winsize / S * U where S > 0, else 0       (winsize = kh*kw, or Cin*kh*kw)
    out   = act((conv(X*M, W) * ratio + b) * U)

Unlike NVIDIA's file, U multiplies the output with and without a bias (the two differ only for
soft masks), and a fully masked window gives 0 rather than NaN in float16 (no 1e-8 added to S).
"""
import torch
import torch.nn.functional as F
from torch.nn.modules.utils import _pair


def partial_conv2d_reference(
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
):
    """Returns (output, updated_mask) like partialconv_cuda.partial_conv2d.

    nan_safe=True makes a pixel whose mask is exactly 0 contribute 0 even if the input holds NaN
    or Inf there (the contract); nan_safe=False computes X*M as NVIDIA's layer does, which
    spreads NaN from holes.
    """
    n, in_channels, height, width = input.shape
    out_channels, _, kh, kw = weight.shape
    if not isinstance(padding, str):  # F.conv2d also takes 'same' and 'valid'
        padding = _pair(padding)
    stride, dilation = _pair(stride), _pair(dilation)
    if mask is None:
        mask = input.new_ones(1, 1, height, width)
    multi_channel = mask.shape[1] > 1
    with torch.no_grad():
        ones = torch.ones(1, mask.shape[1], kh, kw, dtype=mask.dtype, device=mask.device)
        mask_sum = F.conv2d(mask, ones, None, stride, padding, dilation)
        window_size = mask.shape[1] * kh * kw
        update = mask_sum.clamp(0, 1)
        ratio = torch.where(mask_sum > 0, window_size / mask_sum, 0) * update
    masked = input * mask
    if nan_safe:
        masked = torch.where(mask == 0, 0, masked)
    output = F.conv2d(masked, weight, None, stride, padding, dilation, groups) * ratio
    if bias is not None:
        output = output + bias.view(1, -1, 1, 1)
    output = output * update
    if activation == "relu":
        output = F.relu(output)
    elif activation == "leaky_relu":
        output = F.leaky_relu(output, negative_slope)
    elif activation not in (None, "none"):
        raise ValueError(f"activation must be None, 'relu' or 'leaky_relu', got {activation!r}")
    channels = out_channels if multi_channel else 1
    return output, update.expand(n, channels, *update.shape[2:])
