"""What the benchmark runs: the partial convolutions of PConvUNet (the layer suite and the
hole-ratio sweep), their inputs, and the multiply-adds and minimum bytes each one needs. The
pieces that do not depend on the dimension (the costs, the mask propagation through a U-Net, the
inputs) serve the 1-D and 3-D suites of bench/suites_nd.py too."""
import dataclasses
import math

import torch
import torch.nn.functional as F
from torch.nn.modules.utils import _ntuple

from partialconv_cuda.masks import irregular_masks
from partialconv_cuda.models import DECODER_NEGATIVE_SLOPE, UNetLayer, pconv_unet_layers
from partialconv_cuda.ops import conv_output_size

PAPER_LAYERS = pconv_unet_layers()
LAYER_NAMES = [layer.name for layer in PAPER_LAYERS]
SUITE = "layers"
HOLE_SWEEP = "holes"


class ConvCost:
    """Multiply-adds, flops and minimum bytes of one partial convolution, in any dimension. Needs
    self.layer (in_channels, out_channels, bias, multi_channel, fused_activation), self.batch,
    self.kernel, self.in_size, self.out_size and self.input_needs_grad."""

    def multiply_adds(self):
        layer = self.layer
        return (self.batch * layer.out_channels * layer.in_channels * math.prod(self.kernel)
                * math.prod(self.out_size))

    def gflop(self, backward):
        """2 flops per multiply-add: forward, plus grad_weight and (unless the input is the data)
        grad_input in backward."""
        products = 1 + (1 + self.input_needs_grad if backward else 0)
        return 2 * products * self.multiply_adds() / 1e9

    def min_bytes(self, backward, element_size, with_mask=True):
        """Bytes each tensor of the problem needs to be read or written once."""
        layer = self.layer
        in_positions, out_positions = math.prod(self.in_size), math.prod(self.out_size)
        inputs = self.batch * layer.in_channels * in_positions
        outputs = self.batch * layer.out_channels * out_positions
        weights = layer.out_channels * layer.in_channels * math.prod(self.kernel) + layer.bias * layer.out_channels
        masks = 0
        if with_mask:
            mask_channels = layer.in_channels if layer.multi_channel else 1
            masks = self.batch * (mask_channels * in_positions + out_positions)
        elements = inputs + masks + weights + outputs
        if backward:  # read grad_output, input, mask and weight; write the gradients
            elements += outputs + inputs + masks + 2 * weights + inputs * self.input_needs_grad
            if layer.fused_activation is not None:
                elements += outputs  # the output, for the activation's derivative
        return elements * element_size


@dataclasses.dataclass(frozen=True)
class LayerWorkload(ConvCost):
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

    dims = 2

    @property
    def kernel(self):
        return (self.layer.kernel_size,) * 2

    @property
    def in_size(self):
        return (self.height, self.width)

    @property
    def out_size(self):
        layer = self.layer
        return conv_output_size(self.in_size, self.kernel, (layer.stride,) * 2, (layer.padding,) * 2, (1, 1))

    @property
    def input_needs_grad(self):
        return self.layer.name != "enc1"  # the first layer's input is the image

    def conv_arguments(self):
        """Keyword arguments of partial_conv2d / partial_conv_reference besides the tensors."""
        layer = self.layer
        return dict(stride=layer.stride, padding=layer.padding, dilation=1,
                    activation=layer.fused_activation, negative_slope=DECODER_NEGATIVE_SLOPE)

    def record_fields(self):
        """The geometry this workload's records carry."""
        return {"batch": self.batch, "height": self.height, "width": self.width,
                "image_height": self.image_height, "image_width": self.image_width}

    def mask(self, bank, set_index):
        """The layer's mask of input set set_index (a MaskBank caches what it is made from)."""
        layer = self.layer
        if self.kind == SUITE:
            def propagated():
                image_mask = irregular_masks(self.batch, self.image_height, self.image_width, self.holes,
                                             seed=bank.seed + set_index)
                return unet_layer_masks(image_mask)
            key = (SUITE, self.batch, self.image_height, self.image_width, self.holes, set_index)
            return concatenated_mask(bank.cached(key, propagated)[layer.name], layer)
        key = (HOLE_SWEEP, self.batch, self.height, self.width, self.holes, set_index)
        mask = bank.cached(key, lambda: irregular_masks(self.batch, self.height, self.width, self.holes,
                                                        seed=bank.seed + set_index))
        channels = layer.in_channels if layer.multi_channel else 1
        return mask.expand(-1, channels, -1, -1).contiguous()


def updated_mask(mask, layer):
    """The updated mask U = clamp(S, 0, 1) of a binary single-channel mask: 1 exactly where the
    layer's window holds a valid pixel, which is max pooling over the window with the
    convolution's kernel, stride and dilation, after the convolution's zero padding (holes)."""
    dims = mask.dim() - 2
    pool = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[dims]
    padding = _ntuple(dims)(layer.padding)
    # Padded here rather than by the pooling, which allows no more than half the undilated kernel.
    padded = F.pad(mask, [p for p in reversed(padding) for _ in range(2)])
    return pool(padded, layer.kernel_size, layer.stride, 0, getattr(layer, "dilation", 1))


def unet_layer_masks(image_mask, layers=PAPER_LAYERS):
    """The input mask of every layer inside a U-Net like PConvUNet (encoder layers, then as many
    decoder layers taking the upsampled output below and the skip of the same size) as
    {name: [(mask, channels), ...]} with single-channel masks: one part for an encoder layer, two
    for a decoder layer (the upsampled mask and the skip's), whose input mask is their
    concatenation along channels. 1, 2 or 3 spatial dimensions, from image_mask's rank."""
    depth = len(layers) // 2
    parts = {}
    skips = [(image_mask, layers[0].in_channels)]
    mask = image_mask
    for layer in layers[:depth]:
        parts[layer.name] = [(mask, layer.in_channels)]
        mask = updated_mask(mask, layer)
        skips.append((mask, layer.out_channels))
    skips.pop()
    channels = layers[depth - 1].out_channels
    for layer in layers[depth:]:
        skip, skip_channels = skips.pop()
        mask = F.interpolate(mask, size=skip.shape[2:], mode="nearest")
        parts[layer.name] = [(mask, channels), (skip, skip_channels)]
        # A multi-channel window holds a valid pixel where either part does.
        mask = updated_mask(torch.maximum(mask, skip), layer)
        channels = layer.out_channels
    return parts


def concatenated_mask(parts, layer):
    """The layer's mask from unet_layer_masks parts: one channel, or one per input channel."""
    if not layer.multi_channel:
        return parts[0][0]
    n, _, *size = parts[-1][0].shape
    return torch.cat([mask.expand(n, channels, *size) for mask, channels in parts], 1)


def layer_input_sizes(image_size, network):
    """{name: input size} of every layer of a U-Net for an image (or clip) of image_size."""
    return {name: tuple(parts[0][0].shape[2:])
            for name, parts in unet_layer_masks(torch.ones(1, 1, *image_size), network).items()}


def layer_workloads(kind, names, batch, height, width, hole_ratios, network=PAPER_LAYERS):
    """Workloads of the named layers of `network` at the sizes they have inside it for a
    height x width image (deep layers bottom out at 1x1 for small images)."""
    sizes = layer_input_sizes((height, width), network)
    by_name = {layer.name: layer for layer in network}
    return [
        LayerWorkload(kind, by_name[name], batch, height, width, *sizes[name], holes)
        for holes in hole_ratios for name in names
    ]


@dataclasses.dataclass
class LayerInputs:
    """One set of inputs for a layer workload; the benchmark rotates through several."""

    input: torch.Tensor
    mask: torch.Tensor  # (N, 1, *size), or (N, C_in, *size) for a multi-channel layer
    weight: torch.Tensor
    bias: torch.Tensor  # or None
    grad_output: torch.Tensor  # or None (forward only)

    def differentiable(self):
        return [t for t in (self.input, self.weight, self.bias) if t is not None and t.requires_grad]

    def nbytes(self):
        return sum(t.numel() * t.element_size() for t in vars(self).values() if t is not None)


class MaskBank:
    """Masks for the workloads, made once per (workload geometry, set) and shared by every
    contender and dtype, so all of them see the same holes."""

    def __init__(self, seed):
        self.seed = seed
        self._cache = {}

    def cached(self, key, make):
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def layer_mask(self, workload, set_index):
        return workload.mask(self, set_index)

    def hole_fraction(self, workload):
        """Fraction of hole pixels in the mask the layer actually gets (first set)."""
        return 1.0 - self.layer_mask(workload, 0).mean().item()


def make_inputs(workload, masks, set_index, dtype, device, backward):
    """Inputs of set `set_index`: random input and weights (variance-preserving scale), the
    workload's mask, and for backward a random grad_output; seeded by the set index."""
    layer = workload.layer
    generator = torch.Generator().manual_seed(masks.seed * 1000 + set_index)
    fan_in = layer.in_channels * math.prod(workload.kernel)

    def random(*shape, scale=1.0, requires_grad=False):
        values = torch.randn(*shape, generator=generator) * scale
        return values.to(dtype=dtype, device=device).requires_grad_(backward and requires_grad)

    input = random(workload.batch, layer.in_channels, *workload.in_size, requires_grad=workload.input_needs_grad)
    weight = random(layer.out_channels, layer.in_channels, *workload.kernel,
                    scale=1 / math.sqrt(fan_in), requires_grad=True)
    bias = random(layer.out_channels, scale=0.1, requires_grad=True) if layer.bias else None
    grad_output = random(workload.batch, layer.out_channels, *workload.out_size) if backward else None
    mask = masks.layer_mask(workload, set_index).to(dtype=dtype, device=device)
    return LayerInputs(input, mask, weight, bias, grad_output)
