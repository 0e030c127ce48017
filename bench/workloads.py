"""What the benchmark runs: the partial convolutions of PConvUNet (the layer suite and the
hole-ratio sweep), their inputs, and the multiply-adds and minimum bytes each one needs."""
import dataclasses
import math

import torch
import torch.nn.functional as F

from partialconv_cuda.masks import irregular_masks
from partialconv_cuda.models import UNetLayer, pconv_unet_layers

PAPER_LAYERS = pconv_unet_layers()
LAYER_NAMES = [layer.name for layer in PAPER_LAYERS]
SUITE = "layers"
HOLE_SWEEP = "holes"


@dataclasses.dataclass(frozen=True)
class LayerWorkload:
    """One layer of PConvUNet at one input size and hole ratio.

    kind SUITE: the layer gets the mask it sees inside PConvUNet, propagated from an irregular
    image mask with `holes` of its pixels missing. kind HOLE_SWEEP: an irregular mask with
    `holes` of its pixels missing is drawn at the layer's own input size (the same on every
    channel of a multi-channel mask).
    """

    kind: str
    layer: UNetLayer
    batch: int
    image_height: int
    image_width: int
    height: int  # of the layer's input
    width: int
    holes: float

    @property
    def out_size(self):
        layer = self.layer
        return tuple((size + 2 * layer.padding - layer.kernel_size) // layer.stride + 1
                     for size in (self.height, self.width))

    @property
    def input_needs_grad(self):
        return self.layer.name != "enc1"  # the first layer's input is the image

    def multiply_adds(self):
        layer = self.layer
        out_h, out_w = self.out_size
        return self.batch * layer.out_channels * layer.in_channels * layer.kernel_size ** 2 * out_h * out_w

    def gflop(self, backward):
        """2 flops per multiply-add: forward, plus grad_weight and (unless the input is the image)
        grad_input in backward."""
        products = 1 + (1 + self.input_needs_grad if backward else 0)
        return 2 * products * self.multiply_adds() / 1e9

    def min_bytes(self, backward, element_size, with_mask=True):
        """Bytes each tensor of the problem needs to be read or written once."""
        layer = self.layer
        out_h, out_w = self.out_size
        inputs = self.batch * layer.in_channels * self.height * self.width
        outputs = self.batch * layer.out_channels * out_h * out_w
        weights = layer.out_channels * layer.in_channels * layer.kernel_size ** 2 + layer.bias * layer.out_channels
        masks = 0
        if with_mask:
            mask_channels = layer.in_channels if layer.multi_channel else 1
            masks = self.batch * (mask_channels * self.height * self.width + out_h * out_w)
        elements = inputs + masks + weights + outputs
        if backward:  # read grad_output, input, mask and weight; write the gradients
            elements += outputs + inputs + masks + 2 * weights + inputs * self.input_needs_grad
            if layer.fused_activation is not None:
                elements += outputs  # the output, for the activation's derivative
        return elements * element_size


def unet_layer_masks(image_mask, layers=PAPER_LAYERS):
    """The input mask of every layer inside PConvUNet as {name: [(mask, channels), ...]} with
    single-channel masks: one part for an encoder layer, two for a decoder layer (the upsampled
    mask and the skip's), whose input mask is their concatenation along channels."""
    depth = len(layers) // 2
    parts = {}
    skips = [(image_mask, layers[0].in_channels)]
    mask = image_mask
    for layer in layers[:depth]:
        parts[layer.name] = [(mask, layer.in_channels)]
        # The updated mask is 1 where the window holds a valid pixel; max pooling pads with -inf,
        # so the zero padding counts as a hole as in the convolution.
        mask = F.max_pool2d(mask, layer.kernel_size, layer.stride, layer.padding)
        skips.append((mask, layer.out_channels))
    skips.pop()
    channels = layers[depth - 1].out_channels
    for layer in layers[depth:]:
        skip, skip_channels = skips.pop()
        mask = F.interpolate(mask, size=skip.shape[2:], mode="nearest")
        parts[layer.name] = [(mask, channels), (skip, skip_channels)]
        mask = F.max_pool2d(torch.maximum(mask, skip), layer.kernel_size, layer.stride, layer.padding)
        channels = layer.out_channels
    return parts


def concatenated_mask(parts, layer):
    """The layer's mask from unet_layer_masks parts: one channel, or one per input channel."""
    if not layer.multi_channel:
        return parts[0][0]
    n, _, h, w = parts[-1][0].shape
    return torch.cat([mask.expand(n, channels, h, w) for mask, channels in parts], 1)


def layer_workloads(kind, names, batch, height, width, hole_ratios, network=PAPER_LAYERS):
    """Workloads of the named layers of `network` at the sizes they have inside it for a
    height x width image (deep layers bottom out at 1x1 for small images)."""
    sizes = {name: parts[0][0].shape[2:]
             for name, parts in unet_layer_masks(torch.ones(1, 1, height, width), network).items()}
    by_name = {layer.name: layer for layer in network}
    return [
        LayerWorkload(kind, by_name[name], batch, height, width, *sizes[name], holes)
        for holes in hole_ratios for name in names
    ]


@dataclasses.dataclass
class LayerInputs:
    """One set of inputs for a layer workload; the benchmark rotates through several."""

    input: torch.Tensor
    mask: torch.Tensor  # (N, 1, H, W), or (N, C_in, H, W) for a multi-channel layer
    weight: torch.Tensor
    bias: torch.Tensor  # or None
    grad_output: torch.Tensor  # or None (forward only)

    def differentiable(self):
        return [t for t in (self.input, self.weight, self.bias) if t is not None and t.requires_grad]

    def nbytes(self):
        return sum(t.numel() * t.element_size() for t in vars(self).values() if t is not None)


class MaskBank:
    """Irregular masks for the workloads, made once per (workload geometry, set) and shared by
    every contender and dtype, so all of them see the same holes."""

    def __init__(self, seed):
        self.seed = seed
        self._cache = {}

    def layer_mask(self, workload, set_index):
        layer = workload.layer
        if workload.kind == SUITE:
            key = (SUITE, workload.batch, workload.image_height, workload.image_width, workload.holes, set_index)
            if key not in self._cache:
                image_mask = irregular_masks(workload.batch, workload.image_height, workload.image_width,
                                             workload.holes, seed=self.seed + set_index)
                self._cache[key] = unet_layer_masks(image_mask)
            return concatenated_mask(self._cache[key][layer.name], layer)
        key = (HOLE_SWEEP, workload.batch, workload.height, workload.width, workload.holes, set_index)
        if key not in self._cache:
            self._cache[key] = irregular_masks(workload.batch, workload.height, workload.width,
                                               workload.holes, seed=self.seed + set_index)
        mask = self._cache[key]
        channels = layer.in_channels if layer.multi_channel else 1
        return mask.expand(-1, channels, -1, -1).contiguous()

    def hole_fraction(self, workload):
        """Fraction of hole pixels in the mask the layer actually gets (first set)."""
        return 1.0 - self.layer_mask(workload, 0).mean().item()


def make_inputs(workload, masks, set_index, dtype, device, backward):
    """Inputs of set `set_index`: random input and weights (variance-preserving scale), the
    workload's mask, and for backward a random grad_output; seeded by the set index."""
    layer = workload.layer
    generator = torch.Generator().manual_seed(masks.seed * 1000 + set_index)
    fan_in = layer.in_channels * layer.kernel_size ** 2

    def random(*shape, scale=1.0, requires_grad=False):
        values = torch.randn(*shape, generator=generator) * scale
        return values.to(dtype=dtype, device=device).requires_grad_(backward and requires_grad)

    input = random(workload.batch, layer.in_channels, workload.height, workload.width,
                   requires_grad=workload.input_needs_grad)
    weight = random(layer.out_channels, layer.in_channels, layer.kernel_size, layer.kernel_size,
                    scale=1 / math.sqrt(fan_in), requires_grad=True)
    bias = random(layer.out_channels, scale=0.1, requires_grad=True) if layer.bias else None
    grad_output = random(workload.batch, layer.out_channels, *workload.out_size) if backward else None
    mask = masks.layer_mask(workload, set_index).to(dtype=dtype, device=device)
    return LayerInputs(input, mask, weight, bias, grad_output)
