"""The contenders: every way of computing one PConvUNet layer that the benchmark compares."""
import dataclasses
from typing import Callable

import torch
import torch.nn.functional as F

from partialconv_cuda import partial_conv2d, partial_conv_reference
from partialconv_cuda.models import DECODER_NEGATIVE_SLOPE

SEED, NVIDIA, CONV2D, OURS, OURS_COMPILED = "seed", "nvidia", "conv2d", "ours", "ours_compiled"
CONTENDERS = (SEED, NVIDIA, CONV2D, OURS, OURS_COMPILED)
DESCRIPTIONS = {
    SEED: "the naive layer of the seed notes: a second full C_in->C_out convolution for the mask, "
          "masked_fill steps, a C_in-channel mask",
    NVIDIA: "NVIDIA-style pure PyTorch (partial_conv_reference, nan_safe=False): one 1-channel "
            "mask convolution plus elementwise renormalisation",
    CONV2D: "plain F.conv2d of the same shape (no mask): the floor without skipping holes",
    OURS: "partialconv_cuda.partial_conv2d",
    OURS_COMPILED: "partialconv_cuda.partial_conv2d under torch.compile(fullgraph=True)",
}


def activate(output, activation):
    if activation == "relu":
        return F.relu(output)
    if activation == "leaky_relu":
        return F.leaky_relu(output, DECODER_NEGATIVE_SLOPE)
    return output


def seed_style_partial_conv2d(input, mask, weight, bias, mask_weight, stride, padding, activation):
    """The seed notes' layer generalised to any shape: mask (N, C_in, H, W); mask_weight is the
    mask convolution's (C_out, C_in, kh, kw) weight, all 1 / (C_in*kh*kw), so that dividing by
    its output applies the formula's sum(1)/sum(M)."""
    output = F.conv2d(input * mask, weight, bias, stride, padding)
    with torch.no_grad():
        output_mask = F.conv2d(mask, mask_weight, None, stride, padding)
    mask_is_zero = output_mask == 0
    mask_sum = output_mask.masked_fill_(mask_is_zero, 1.0)
    if bias is None:
        output = output / mask_sum
    else:
        output_bias = bias.view(1, -1, 1, 1).expand_as(output)
        output = (output - output_bias) / mask_sum + output_bias
    output = output.masked_fill_(mask_is_zero, 0.0)
    new_mask = torch.ones_like(output).masked_fill_(mask_is_zero, 0.0)
    return activate(output, activation), new_mask


@dataclasses.dataclass(frozen=True)
class Contender:
    name: str
    # Builds forward's arguments from one LayerInputs, outside the timed region.
    prepare: Callable
    # The timed call: returns (output, updated_mask), updated_mask None for conv2d.
    forward: Callable


def make_contenders(workload, names):
    """The named contenders for one layer workload."""
    layer = workload.layer
    stride, padding, activation = layer.stride, layer.padding, layer.fused_activation

    def seed_arguments(inputs):
        mask = inputs.mask.expand(-1, layer.in_channels, -1, -1).contiguous()
        mask_weight = torch.full_like(inputs.weight, 1.0 / inputs.weight[0].numel())
        return inputs.input, mask, inputs.weight, inputs.bias, mask_weight

    def seed(input, mask, weight, bias, mask_weight):
        return seed_style_partial_conv2d(input, mask, weight, bias, mask_weight, stride, padding, activation)

    def nvidia(input, mask, weight, bias):
        return partial_conv_reference(input, mask, weight, bias, stride, padding,
                                        activation=activation, nan_safe=False)

    def conv2d(input, weight, bias):
        return activate(F.conv2d(input, weight, bias, stride, padding), activation), None

    def ours(input, mask, weight, bias):
        return partial_conv2d(input, mask, weight, bias, stride, padding, activation=activation)

    def partial_arguments(inputs):
        return inputs.input, inputs.mask, inputs.weight, inputs.bias

    def conv2d_arguments(inputs):
        return inputs.input, inputs.weight, inputs.bias

    arguments_and_forward = {
        SEED: (seed_arguments, seed),
        NVIDIA: (partial_arguments, nvidia),
        CONV2D: (conv2d_arguments, conv2d),
        OURS: (partial_arguments, ours),
        OURS_COMPILED: (partial_arguments, ours),
    }
    contenders = []
    for name in names:
        prepare, forward = arguments_and_forward[name]
        contenders.append(Contender(name, prepare, compiled(forward) if name == OURS_COMPILED else forward))
    return contenders


def compiled(function):
    """torch.compile of function with a fresh cache (so no earlier workload's recompiles count
    towards the limit, past which torch would fall back to eager); fullgraph=True makes a graph
    break an error rather than a silent partial compile."""
    torch._dynamo.reset()
    return torch.compile(function, fullgraph=True, dynamic=False)
