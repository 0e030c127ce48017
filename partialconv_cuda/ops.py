"""The functional API, plus what torch needs around the C++ ops: fake (meta) kernels for
torch.compile / torch.export, and autograd through the backward op."""
import torch
from torch.nn.modules.utils import _pair

from . import _extension  # noqa: F401  (loads the ops)

_ACTIVATIONS = ("none", "relu", "leaky_relu")


def activation_name(activation):
    """Normalises the activation argument (None, 'none', 'relu', 'leaky_relu') to the op's string."""
    if activation is None:
        return "none"
    if activation not in _ACTIVATIONS:
        raise ValueError(
            f"partial_conv2d: expected activation to be None, 'relu' or 'leaky_relu', got {activation!r}"
        )
    return activation


def _padding(padding, kernel_size, stride, dilation):
    """Numeric (pad_h, pad_w) for an int, a pair, or nn.Conv2d's 'valid' / 'same'."""
    if not isinstance(padding, str):
        return _pair(padding)
    if padding == "valid":
        return (0, 0)
    if padding != "same":
        raise ValueError(f"partial_conv2d: expected padding to be an int, a pair, 'valid' or 'same', got {padding!r}")
    if stride != (1, 1):
        raise ValueError(f"partial_conv2d: padding='same' needs stride 1, got stride {stride}")
    pads = []
    for k, d in zip(kernel_size, dilation):
        total = d * (k - 1)
        if total % 2:
            raise ValueError(
                "partial_conv2d: padding='same' with an even (dilated) kernel needs asymmetric "
                f"padding, which is not supported (kernel {tuple(kernel_size)}, dilation {dilation}); "
                "pad the input explicitly"
            )
        pads.append(total // 2)
    return tuple(pads)


def partial_conv2d(
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
):
    """Partial convolution: returns (output, updated_mask).

    input (N, C_in, H, W); mask None (all ones) or (N or 1, 1 or C_in, H, W) with 1 = valid and
    0 = hole; weight (C_out, C_in / groups, kH, kW); bias (C_out) or None.
    output = act((conv(input*mask, weight) * winsize / S * U + bias) * U), with S the window sum
    of the mask and U = clamp(S, 0, 1); updated_mask = U, shaped (N, 1, H', W') for a
    single-channel (or absent) mask and (N, C_out, H', W') for a multi-channel one (an expanded
    view). activation: None, 'relu' or 'leaky_relu' (with negative_slope >= 0).
    """
    stride, dilation = _pair(stride), _pair(dilation)
    padding = _padding(padding, weight.shape[2:], stride, dilation)
    output, updated_mask, _ = torch.ops.partialconv_cuda.partial_conv2d_forward(
        input, mask, weight, bias, stride, padding, dilation, groups,
        activation_name(activation), float(negative_slope),
    )
    channels = weight.shape[0] if mask is not None and mask.shape[1] > 1 else 1
    return output, updated_mask.expand(input.shape[0], channels, *updated_mask.shape[2:])


def _output_memory_format(input):
    # The rule of output_memory_format() in csrc/partial_conv2d.cpp.
    if input.dim() == 4 and not input.is_contiguous() and input.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _output_size(size, kernel, stride, padding, dilation):
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


@torch.library.register_fake("partialconv_cuda::partial_conv2d_forward")
def _forward_fake(input, mask, weight, bias, stride, padding, dilation, groups, activation, negative_slope):
    torch._check(input.dim() == 4, lambda: f"partial_conv2d: expected input to be a 4-D tensor, got {input.dim()}-D")
    torch._check(weight.dim() == 4, lambda: f"partial_conv2d: expected weight to be a 4-D tensor, got {weight.dim()}-D")
    n, _, height, width = input.shape
    out_h = _output_size(height, weight.shape[2], stride[0], padding[0], dilation[0])
    out_w = _output_size(width, weight.shape[3], stride[1], padding[1], dilation[1])
    torch._check(out_h >= 1 and out_w >= 1, lambda: "partial_conv2d: output size would be below 1x1")
    mask_batch = 1 if mask is None else mask.shape[0]
    output = torch.empty(
        (n, weight.shape[0], out_h, out_w), dtype=input.dtype, device=input.device,
        memory_format=_output_memory_format(input),
    )
    updated_mask = input.new_empty((mask_batch, 1, out_h, out_w))
    scales_dtype = torch.float64 if input.dtype == torch.float64 else torch.float32
    mask_scales = input.new_empty((mask_batch, 2, out_h, out_w), dtype=scales_dtype)
    return output, updated_mask, mask_scales


@torch.library.register_fake("partialconv_cuda::partial_conv2d_backward")
def _backward_fake(grad_output, input, mask, weight, output, mask_scales, stride, padding, dilation,
                   groups, activation, negative_slope, output_mask):
    grad_input = grad_weight = grad_bias = None
    if output_mask[0]:
        grad_input = torch.empty(input.shape, dtype=input.dtype, device=input.device,
                                 memory_format=_output_memory_format(input))
    if output_mask[1]:
        grad_weight = weight.new_empty(weight.shape)
    if output_mask[2]:
        grad_bias = weight.new_empty((weight.shape[0],))
    return grad_input, grad_weight, grad_bias


def _setup_context(ctx, inputs, output):
    input, mask, weight, bias, stride, padding, dilation, groups, activation, negative_slope = inputs
    out, _, mask_scales = output
    ctx.conv_args = (stride, padding, dilation, groups, activation, negative_slope)
    ctx.has_bias = bias is not None
    # The mask only reaches backward through its per-position scales and as the factor M of
    # grad_input; the activation's derivative is read off the output.
    ctx.save_for_backward(input, mask, weight, out if activation != "none" else None, mask_scales)
    ctx.mark_non_differentiable(output[1], mask_scales)


def _backward(ctx, grad_output, _grad_updated_mask, _grad_mask_scales):
    input, mask, weight, out, mask_scales = ctx.saved_tensors
    if torch.is_grad_enabled() and any(t.requires_grad for t in (grad_output, input, weight)):
        raise NotImplementedError(
            "partial_conv2d: double backward (autograd.grad(..., create_graph=True) through the "
            "layer) is not supported; use partialconv_cuda.partial_conv2d_reference for "
            "higher-order gradients"
        )
    needs = ctx.needs_input_grad
    output_mask = [needs[0], needs[2], ctx.has_bias and needs[3]]
    grad_input, grad_weight, grad_bias = torch.ops.partialconv_cuda.partial_conv2d_backward(
        grad_output, input, mask, weight, out, mask_scales, *ctx.conv_args, output_mask
    )
    return grad_input, None, grad_weight, grad_bias, None, None, None, None, None, None


torch.library.register_autograd(
    "partialconv_cuda::partial_conv2d_forward", _backward, setup_context=_setup_context
)
