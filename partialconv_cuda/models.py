"""PConvUNet, the image inpainting network of Liu et al. (ECCV 2018), and a pure-PyTorch
("NVIDIA-style") layer with the same parameters to run it with."""
import dataclasses
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .modules import PartialConv2d
from .reference import partial_conv_reference

# (output channels, kernel size) of PConv1..PConv8, the encoder of the paper.
ENCODER = ((64, 7), (128, 5), (256, 5), (512, 3), (512, 3), (512, 3), (512, 3), (512, 3))
DECODER_NEGATIVE_SLOPE = 0.2
HOLE_LOSS_WEIGHT = 6.0


@dataclasses.dataclass(frozen=True)
class UNetLayer:
    """One partial convolution of PConvUNet, with the shapes it sees."""

    name: str  # enc1..enc8 (PConv1-8), then dec8..dec1 (PConv9-16)
    in_channels: int
    out_channels: int
    kernel_size: int
    stride: int
    scale: int  # the layer's input is image_size / scale
    multi_channel: bool  # one mask channel per input channel (the concatenated decoder masks)
    batch_norm: bool
    activation: Optional[str]  # 'relu', 'leaky_relu' (slope DECODER_NEGATIVE_SLOPE) or None

    @property
    def padding(self):
        return self.kernel_size // 2

    @property
    def bias(self):
        return not self.batch_norm  # a bias before batch norm would be cancelled by it

    @property
    def fused_activation(self):
        """The activation the partial convolution applies itself: all but batch norm's."""
        return None if self.batch_norm else self.activation


def pconv_unet_layers(in_channels=3, out_channels=3, depth=8):
    """The 2 * depth partial convolutions of PConvUNet, encoder first; depth 8 is the paper's."""
    if not 1 <= depth <= len(ENCODER):
        raise ValueError(f"PConvUNet: expected depth in [1, {len(ENCODER)}], got {depth}")
    channels = [in_channels] + [c for c, _ in ENCODER[:depth]]
    layers = [
        UNetLayer(f"enc{i}", channels[i - 1], channels[i], ENCODER[i - 1][1], 2, 2 ** (i - 1),
                  multi_channel=False, batch_norm=i > 1, activation="relu")
        for i in range(1, depth + 1)
    ]
    for i in range(depth, 0, -1):
        last = i == 1
        # Input: the upsampled output of the layer below (channels[i]) and the skip (channels[i-1]).
        layers.append(UNetLayer(
            f"dec{i}", channels[i] + channels[i - 1], out_channels if last else channels[i - 1], 3, 1,
            2 ** (i - 1), multi_channel=True, batch_norm=not last, activation=None if last else "leaky_relu",
        ))
    return layers


class ReferencePartialConv2d(PartialConv2d):
    """PartialConv2d computed by partial_conv_reference in plain PyTorch: one mask convolution
    plus elementwise renormalisation, the work NVIDIA's PartialConv2d does. Same constructor,
    parameters and state_dict as PartialConv2d, so the same weights load into both.

    nan_safe=False (the default) computes X*M like NVIDIA's layer, so a NaN under a hole spreads;
    nan_safe=True zeroes holes exactly like PartialConv2d.
    """

    def __init__(self, *args, nan_safe=False, **kwargs):
        super().__init__(*args, **kwargs)
        self.nan_safe = nan_safe

    def forward(self, input, mask=None):
        output, updated_mask = partial_conv_reference(
            input, mask, self.weight, self.bias, self.stride, self.padding, self.dilation,
            self.groups, self.activation, self.negative_slope, nan_safe=self.nan_safe,
            normalization=self.normalization,
        )
        return (output, updated_mask) if self.return_mask else output


class PConvBlock(nn.Module):
    """A partial convolution, then batch norm and the activation (fused into the convolution
    when there is no batch norm in between)."""

    def __init__(self, layer, layer_factory):
        super().__init__()
        self.conv = layer_factory(
            layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
            bias=layer.bias, multi_channel=layer.multi_channel, return_mask=True,
            activation=layer.fused_activation,
            negative_slope=DECODER_NEGATIVE_SLOPE,
        )
        self.norm = nn.BatchNorm2d(layer.out_channels) if layer.batch_norm else None
        self.activation = layer.activation

    def forward(self, input, mask):
        output, updated_mask = self.conv(input, mask)
        if self.norm is not None:
            output = self.norm(output)
            if self.activation == "relu":
                output = F.relu(output)
            elif self.activation == "leaky_relu":
                output = F.leaky_relu(output, DECODER_NEGATIVE_SLOPE)
        # Every output channel shares one updated mask; keep one channel of it.
        return output, updated_mask[:, :1]


class PConvUNet(nn.Module):
    """The inpainting U-Net of Liu et al., "Image Inpainting for Irregular Holes Using Partial
    Convolutions" (ECCV 2018), section 3.3.

    Encoder PConv1-8: 7x7, 5x5, 5x5, then 3x3 kernels, stride 2, 64-128-256-512-512-512-512-512
    channels, batch norm (except PConv1) and ReLU. Decoder PConv9-16: nearest upsampling x2 of the
    image and the mask, concatenation with the encoder skip (feature maps with feature maps, masks
    with masks), 3x3 stride-1 partial convolution, batch norm and LeakyReLU(0.2); the last layer
    maps to out_channels with a bias and no batch norm or activation. Layers followed by batch
    norm have no bias.

    Masks: the encoder carries a single-channel mask (every channel of a feature map has the same
    holes). The decoder's concatenation joins two different masks, so its layers take one mask
    channel per input channel (multi_channel=True), as NVIDIA's multi-channel partial convolution
    does; with identical channels this gives exactly the single-channel result.

    depth: encoder layers (8 in the paper); height and width must be multiples of 2**depth
    (256 for the paper's depth 8). layer_factory: PartialConv2d (ours, the default) or
    ReferencePartialConv2d, or any class with their constructor; the state_dict is the same.

    forward(image, mask) -> (output, updated_mask): image (N, in_channels, H, W), mask
    (N or 1, 1, H, W) with 1 = valid, 0 = hole; output (N, out_channels, H, W), updated_mask
    (N, 1, H, W).
    """

    def __init__(self, in_channels=3, out_channels=3, depth=8, layer_factory=PartialConv2d):
        super().__init__()
        self.depth = depth
        self.layers = pconv_unet_layers(in_channels, out_channels, depth)
        self.blocks = nn.ModuleDict((layer.name, PConvBlock(layer, layer_factory)) for layer in self.layers)

    def forward(self, image, mask):
        height, width = image.shape[2:]
        multiple = 2 ** self.depth
        if height % multiple or width % multiple:
            raise ValueError(
                f"PConvUNet(depth={self.depth}): expected height and width to be multiples of "
                f"{multiple}, got {height}x{width}"
            )
        mask = mask.expand(image.shape[0], 1, height, width)
        skips = [(image, mask)]
        blocks = list(self.blocks.values())
        output = image
        for block in blocks[:self.depth]:
            output, mask = block(output, mask)
            skips.append((output, mask))
        skips.pop()  # the deepest encoder output is the decoder's input, not a skip
        for block in blocks[self.depth:]:
            skip, skip_mask = skips.pop()
            output = F.interpolate(output, scale_factor=2, mode="nearest")
            mask = F.interpolate(mask, scale_factor=2, mode="nearest")
            n, _, h, w = skip.shape
            mask = torch.cat([mask.expand(n, output.shape[1], h, w), skip_mask.expand(n, skip.shape[1], h, w)], 1)
            output, mask = block(torch.cat([output, skip], 1), mask)
        return output, mask


def inpainting_pixel_loss(output, target, mask):
    """The per-pixel terms of the paper's loss, L_valid + 6 L_hole (mean absolute errors over
    the valid and the hole pixels' share of the image); mask (N or 1, 1, H, W), 1 = valid."""
    error = (output - target).abs()
    return (error * mask).mean() + HOLE_LOSS_WEIGHT * (error * (1 - mask)).mean()
