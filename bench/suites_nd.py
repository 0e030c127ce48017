"""The 3-D and 1-D suites: the layers of a small video-inpainting partial-convolution U-Net with
holes that move across the frames, and the partial-padding convolutions of speech models on a
batch of padded sequences. Their workloads have the interface of bench.workloads.LayerWorkload,
so the runner, the contenders and the report treat every suite alike.

Video (VIDEO3D): a 3-D encoder-decoder like those of video inpainting papers (Free-Form Video
Inpainting with 3D gated convolutions, Chang et al. 2019; 3-D partial-convolution U-Nets):
the encoder halves height and width at each layer and keeps the frames (stride 1 x 2 x 2), with a
3 x 5 x 5 kernel first, a 1 x 5 x 5 (spatial only) second and 3 x 3 x 3 after, 32-64-128-128
channels; the decoder upsamples height and width (nearest), concatenates the encoder's skip and
runs a 3 x 3 x 3 stride-1 partial convolution on it with one mask channel per input channel, as
PConvUNet's decoder does in 2-D. The holes: an irregular 2-D mask (irregular_masks) that moves by
a seeded, constant velocity of a few pixels per frame (moving_masks), propagated through the
network's layers like bench.workloads.unet_layer_masks does in 2-D.

Speech (SPEECH1D): stride-1 convolutions of TTS models that use partial padding (NeMo's
ConvNorm(use_partial_padding=True), RAD-TTS): a batch of padded sequences whose mask is 1 up to
each one's length, the same mask for every layer as in those models (each ConvNorm gets the
sequence mask, not the previous layer's updated mask).
"""
import dataclasses
import math
from typing import Optional

import torch

from partialconv_cuda.masks import irregular_masks
from partialconv_cuda.ops import conv_output_size

from .contenders import CONV1D, CONV3D, NVIDIA, NVIDIA_PC3D, OURS, OURS_FUSED, OURS_VENDOR
from .workloads import ConvCost, concatenated_mask, layer_input_sizes, unet_layer_masks

VIDEO3D, SPEECH1D = "video3d", "speech1d"
VIDEO_NEGATIVE_SLOPE = 0.2  # the decoder's LeakyReLU, as in PConvUNet
# Lengths of a speech batch are drawn uniformly from [SHORTEST * L, L]: a quarter of the steps are
# padding on average.
SHORTEST = 0.5
SPEECH_PADDING = (1 - SHORTEST) / 2
# The contenders of each suite, in the order of the report's columns.
SUITE_CONTENDERS = {VIDEO3D: (NVIDIA_PC3D, NVIDIA, CONV3D, OURS, OURS_FUSED, OURS_VENDOR),
                    SPEECH1D: (NVIDIA, CONV1D, OURS, OURS_FUSED, OURS_VENDOR)}
SUITE_TITLES = {VIDEO3D: "Video suite (3-D U-Net, moving holes)", SPEECH1D: "Speech suite (1-D, padded sequences)"}


@dataclasses.dataclass(frozen=True)
class ConvLayer:
    """One partial convolution with a kernel, stride and dilation per spatial dimension; padding
    keeps the size at stride 1 (dilation * (kernel - 1) / 2)."""

    name: str
    in_channels: int
    out_channels: int
    kernel_size: tuple
    stride: tuple
    multi_channel: bool = False  # one mask channel per input channel
    activation: Optional[str] = None  # fused: None, 'relu' or 'leaky_relu'
    negative_slope: float = 0.01
    dilation: tuple = None  # None: 1 in every dimension
    bias: bool = True
    input_is_data: bool = False  # the network's input (video): it needs no gradient

    def __post_init__(self):
        if self.dilation is None:
            object.__setattr__(self, "dilation", (1,) * len(self.kernel_size))

    @property
    def padding(self):
        return tuple(d * (k - 1) // 2 for k, d in zip(self.kernel_size, self.dilation))

    @property
    def fused_activation(self):
        return self.activation

    def describe(self, size):
        """'32→64 3×3×3/1×2×2 at 8×64×64, 96-ch mask' for an input of this size."""
        times = "×".join
        dilation = f" dilation {times(map(str, self.dilation))}" if any(d > 1 for d in self.dilation) else ""
        mask = f", {self.in_channels}-ch mask" if self.multi_channel else ""
        return (f"{self.in_channels}→{self.out_channels} {times(map(str, self.kernel_size))}/"
                f"{times(map(str, self.stride))}{dilation} at {times(map(str, size))}{mask}")


def video_layers(channels=(3, 32, 64, 128, 128), out_channels=3):
    """The 3-D U-Net: enc1..enc4 then dec4..dec1 (dec_i takes the upsampled output below and the
    input of enc_i)."""
    kernels = ((3, 5, 5), (1, 5, 5), (3, 3, 3), (3, 3, 3))
    depth = len(kernels)
    layers = [ConvLayer(f"enc{i}", channels[i - 1], channels[i], kernels[i - 1], (1, 2, 2), activation="relu",
                        input_is_data=i == 1)
              for i in range(1, depth + 1)]
    for i in range(depth, 0, -1):
        last = i == 1
        layers.append(ConvLayer(
            f"dec{i}", channels[i] + channels[i - 1], out_channels if last else channels[i - 1], (3, 3, 3),
            (1, 1, 1), multi_channel=True, activation=None if last else "leaky_relu",
            negative_slope=VIDEO_NEGATIVE_SLOPE))
    return layers


VIDEO_LAYERS = video_layers()
VIDEO_LAYER_NAMES = [layer.name for layer in VIDEO_LAYERS]

# Stride-1 convolutions with partial padding as in NeMo's TTS models: RAD-TTS's text encoder
# (get_radtts_encoder: three 512-channel 5-tap ConvNorm(use_partial_padding=True), a masked instance
# norm and ReLU after each, so nothing is fused); 3-tap convolutions with ReLU of the ConvLSTMLinear
# kind that its attribute predictors are built from (widths vary with the configuration); a dilated
# 3-tap one like those of its WaveNet-style coupling layers (WN_RADTTS, dilation 2**i); and a 7-tap
# one for the long end of the kernel sizes.
SPEECH_LAYERS = [
    ConvLayer("enc_k5", 512, 512, (5,), (1,)),
    ConvLayer("pred_k3a", 512, 256, (3,), (1,), activation="relu"),
    ConvLayer("pred_k3b", 256, 256, (3,), (1,), activation="relu"),
    ConvLayer("wn_k3_d4", 512, 512, (3,), (1,), dilation=(4,)),
    ConvLayer("conv_k7", 256, 256, (7,), (1,), activation="relu"),
]
SPEECH_LAYER_NAMES = [layer.name for layer in SPEECH_LAYERS]


def moving_masks(batch, frames, height, width, hole_ratio, seed=0, speed=None):
    """(batch, 1, frames, height, width) masks, 1 = valid, whose holes move across the frames:
    each video gets an irregular hole mask (irregular_masks) drawn on a canvas larger than a frame,
    and frame t is the canvas seen through a window that moves by a constant, seeded velocity
    (vy, vx) of whole pixels per frame, |vy|, |vx| <= speed, not both 0 (speed: default
    max(1, min(height, width) // 32), 4 pixels per frame at 128x128). So frame t + 1 is frame t
    shifted by (-vy, -vx), with new pixels entering at one border. The canvas has hole_ratio of
    its pixels missing; a frame has about as many."""
    speed = max(1, min(height, width) // 32) if speed is None else speed
    if frames < 1 or speed < 0:
        raise ValueError(f"moving_masks: expected frames >= 1 and speed >= 0, got {frames}, {speed}")
    travel = (frames - 1) * speed
    canvas = irregular_masks(batch, height + travel, width + travel, hole_ratio, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    masks = torch.empty(batch, 1, frames, height, width)
    for b, (vy, vx) in enumerate(velocities(batch, speed, generator)):
        # Start where the path of the window stays on the canvas, centred along a slow axis.
        y0, x0 = (frames - 1) * (speed - vy) // 2, (frames - 1) * (speed - vx) // 2
        for t in range(frames):
            y, x = y0 + t * vy, x0 + t * vx
            masks[b, 0, t] = canvas[b, 0, y:y + height, x:x + width]
    return masks


def velocities(batch, speed, generator):
    """(vy, vx) per video: whole pixels per frame in [-speed, speed], not both 0 (unless speed is 0)."""
    result = []
    for _ in range(batch):
        while True:
            vy, vx = torch.randint(-speed, speed + 1, (2,), generator=generator).tolist()
            if vy or vx or not speed:
                break
        result.append((vy, vx))
    return result


def sequence_lengths(batch, length, seed=0):
    """Lengths of a padded batch, uniform in [SHORTEST * length, length], seeded."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(math.ceil(SHORTEST * length), length + 1, (batch,), generator=generator)


def sequence_masks(lengths, length):
    """(batch, 1, length): 1 up to each sequence's length, 0 in its padding."""
    return (torch.arange(length) < lengths.view(-1, 1, 1)).float()


@dataclasses.dataclass(frozen=True)
class NdWorkload(ConvCost):
    """One layer of the video or speech suite at one size. image_size: the clip (frames, height,
    width) or the padded length (length,); size: the layer's input."""

    kind: str  # VIDEO3D or SPEECH1D
    layer: ConvLayer
    batch: int
    image_size: tuple
    size: tuple
    holes: float  # the canvas's hole fraction (video) or the expected padding fraction (speech)

    @property
    def dims(self):
        return len(self.size)

    @property
    def kernel(self):
        return self.layer.kernel_size

    @property
    def in_size(self):
        return self.size

    @property
    def out_size(self):
        layer = self.layer
        return conv_output_size(self.size, layer.kernel_size, layer.stride, layer.padding, layer.dilation)

    @property
    def input_needs_grad(self):
        return not self.layer.input_is_data

    def conv_arguments(self):
        layer = self.layer
        return dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation,
                    activation=layer.fused_activation, negative_slope=layer.negative_slope)

    def record_fields(self):
        fields = {"batch": self.batch, "shape": self.layer.describe(self.size)}
        if self.kind == VIDEO3D:
            fields.update(zip(("frames", "height", "width"), self.size))
            fields.update(zip(("image_frames", "image_height", "image_width"), self.image_size))
        else:
            fields["length"] = self.size[0]
        return fields

    def mask(self, bank, set_index):
        seed = bank.seed + set_index
        if self.kind == VIDEO3D:
            key = (VIDEO3D, self.batch, self.image_size, self.holes, set_index)
            parts = bank.cached(key, lambda: unet_layer_masks(
                moving_masks(self.batch, *self.image_size, self.holes, seed=seed), VIDEO_LAYERS))
            return concatenated_mask(parts[self.layer.name], self.layer)
        key = (SPEECH1D, self.batch, self.image_size, set_index)
        return bank.cached(key, lambda: sequence_masks(sequence_lengths(self.batch, self.size[0], seed),
                                                       self.size[0]))


def video_workloads(names, batch, frames, size, holes):
    """Workloads of the named layers of the video U-Net for a batch of clips of frames x size x size."""
    image_size = (frames, size, size)
    sizes = layer_input_sizes(image_size, VIDEO_LAYERS)
    by_name = {layer.name: layer for layer in VIDEO_LAYERS}
    return [NdWorkload(VIDEO3D, by_name[name], batch, image_size, sizes[name], holes) for name in names]


def speech_workloads(names, batch, length):
    by_name = {layer.name: layer for layer in SPEECH_LAYERS}
    return [NdWorkload(SPEECH1D, by_name[name], batch, (length,), (length,), SPEECH_PADDING) for name in names]
