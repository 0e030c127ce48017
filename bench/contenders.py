"""The contenders: every way of computing one layer that the benchmark compares (PConvUNet's in
2-D, the video and speech suites' in 3-D and 1-D)."""
import contextlib
import dataclasses
import functools
import importlib.util
import os
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from partialconv_cuda import partial_conv1d, partial_conv2d, partial_conv3d, partial_conv_reference
from partialconv_cuda.models import DECODER_NEGATIVE_SLOPE

SEED, NVIDIA, CONV2D, OURS, OURS_COMPILED = "seed", "nvidia", "conv2d", "ours", "ours_compiled"
CONV1D, CONV3D, NVIDIA_PC3D = "conv1d", "conv3d", "nvidia_pc3d"
OURS_FUSED, OURS_VENDOR = "ours_fused", "ours_vendor"
# ours with each CUDA path forced (PARTIALCONV_CUDA_PATH), forward and backward: on CUDA only.
CUDA_PATHS = {OURS_FUSED: "fused", OURS_VENDOR: "vendor"}
CONTENDERS = (SEED, NVIDIA, CONV2D, OURS, OURS_FUSED, OURS_VENDOR, OURS_COMPILED)  # of the 2-D suites
PLAIN_CONVS = {1: CONV1D, 2: CONV2D, 3: CONV3D}  # no mask: not checked against the reference
ALL_CONTENDERS = CONTENDERS + (NVIDIA_PC3D, CONV3D, CONV1D)
# NVIDIA's PartialConv3d is loaded at run time from a checkout of github.com/NVIDIA/partialconv
# (or the file itself), never copied into this repository.
NVIDIA_DIR_ENV = "PARTIALCONV_NVIDIA_DIR"
NVIDIA_FILE = Path("models") / "partialconv3d.py"
NVIDIA_MISSING = ("NVIDIA's PartialConv3d not given: pass --nvidia-partialconv DIR (a checkout of "
                  f"github.com/NVIDIA/partialconv, or its {NVIDIA_FILE.as_posix()}) or set {NVIDIA_DIR_ENV}")
DESCRIPTIONS = {
    SEED: "the naive layer of the seed notes: a second full C_in->C_out convolution for the mask, "
          "masked_fill steps, a C_in-channel mask",
    NVIDIA: "NVIDIA-style pure PyTorch (partial_conv_reference, nan_safe=False): one 1-channel "
            "mask convolution plus elementwise renormalisation",
    CONV2D: "plain F.conv2d of the same shape (no mask): the floor without skipping holes",
    OURS: "partialconv_cuda.partial_conv2d",
    OURS_FUSED: "partialconv_cuda.partial_conv2d with the fused CUDA kernels forced (PARTIALCONV_CUDA_PATH=fused)",
    OURS_VENDOR: "partialconv_cuda.partial_conv2d with the CUDA vendor path forced (PARTIALCONV_CUDA_PATH=vendor: "
                 "X*M through cuDNN, window sums once per position)",
    OURS_COMPILED: "partialconv_cuda.partial_conv2d under torch.compile(fullgraph=True)",
    NVIDIA_PC3D: "NVIDIA's own PartialConv3d (models/partialconv3d.py of github.com/NVIDIA/partialconv, "
                 "loaded from --nvidia-partialconv), given the mask every call (mask_in=), multi_channel=True "
                 "for the decoder (its multi-channel mask convolution is a full C_in->C_out one), the "
                 "activation applied after it",
    CONV3D: "plain F.conv3d of the same shape (no mask): the floor without skipping holes",
    CONV1D: "plain F.conv1d of the same shape (no mask): the floor without skipping holes",
}
# `ours` and `nvidia` in the 1-D and 3-D suites: the same methods in those dimensions.
SUITE_DESCRIPTIONS = {
    OURS: "partialconv_cuda.partial_conv1d / partial_conv2d / partial_conv3d",
    OURS_FUSED: "ours with the fused CUDA kernels forced (PARTIALCONV_CUDA_PATH=fused)",
    OURS_VENDOR: "ours with the CUDA vendor path forced (PARTIALCONV_CUDA_PATH=vendor)",
    NVIDIA: "NVIDIA-style pure PyTorch (partial_conv_reference, nan_safe=False): one 1-channel mask "
            "convolution plus elementwise renormalisation; in 1-D this is what NeMo's partial-padding "
            "PartialConv1d computes (it adds 1e-6 to the window sum, a relative difference below 1e-6)",
}


def activate(output, activation, negative_slope=DECODER_NEGATIVE_SLOPE):
    if activation == "relu":
        return F.relu(output)
    if activation == "leaky_relu":
        return F.leaky_relu(output, negative_slope)
    return output


def nvidia_partialconv3d_file(path):
    """The file of NVIDIA's PartialConv3d under path: a checkout of NVIDIA/partialconv, its models
    folder, or the file itself. Raises FileNotFoundError with what to do when there is none."""
    if not path:
        raise FileNotFoundError(NVIDIA_MISSING)
    path = Path(path).expanduser()
    for candidate in (path, path / NVIDIA_FILE, path / NVIDIA_FILE.name):
        if candidate.is_file():
            return candidate.resolve()
    raise FileNotFoundError(f"NVIDIA's PartialConv3d: no {NVIDIA_FILE.as_posix()} under {path} "
                            f"(--nvidia-partialconv / {NVIDIA_DIR_ENV})")


@functools.lru_cache(maxsize=None)
def _load_partialconv3d(file):
    spec = importlib.util.spec_from_file_location("nvidia_partialconv3d", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.PartialConv3d


def nvidia_partialconv3d(path):
    """NVIDIA's PartialConv3d class, loaded from the file under path (see nvidia_partialconv3d_file)."""
    return _load_partialconv3d(nvidia_partialconv3d_file(path))


def nvidia_partialconv_path(option=None):
    """The --nvidia-partialconv option, else $PARTIALCONV_NVIDIA_DIR, else None."""
    return option or os.environ.get(NVIDIA_DIR_ENV) or None


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


@contextlib.contextmanager
def forced_cuda_path(path):
    """PARTIALCONV_CUDA_PATH=path inside (read by every call, forward and backward); None: as is."""
    if path is None:
        yield
        return
    before = os.environ.get("PARTIALCONV_CUDA_PATH")
    os.environ["PARTIALCONV_CUDA_PATH"] = path
    try:
        yield
    finally:
        if before is None:
            del os.environ["PARTIALCONV_CUDA_PATH"]
        else:
            os.environ["PARTIALCONV_CUDA_PATH"] = before


@dataclasses.dataclass(frozen=True)
class Contender:
    name: str
    # Builds forward's arguments from one LayerInputs, outside the timed region.
    prepare: Callable
    # The timed call: returns (output, updated_mask), updated_mask None for conv2d.
    forward: Callable

    def path(self):
        """The context every call of this contender (forward, and backward with it) runs in."""
        return forced_cuda_path(CUDA_PATHS.get(self.name))


def make_contenders(workload, names, nvidia_partialconv=None):
    """The named contenders for one layer workload (any dimension); nvidia_partialconv: where
    NVIDIA's PartialConv3d is (for NVIDIA_PC3D)."""
    layer = workload.layer
    conv_arguments = workload.conv_arguments()
    stride, padding, dilation = conv_arguments["stride"], conv_arguments["padding"], conv_arguments["dilation"]
    activation, negative_slope = conv_arguments["activation"], conv_arguments["negative_slope"]
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[workload.dims]
    partial_conv = {1: partial_conv1d, 2: partial_conv2d, 3: partial_conv3d}[workload.dims]

    def seed_arguments(inputs):
        mask = inputs.mask.expand(-1, layer.in_channels, -1, -1).contiguous()
        mask_weight = torch.full_like(inputs.weight, 1.0 / inputs.weight[0].numel())
        return inputs.input, mask, inputs.weight, inputs.bias, mask_weight

    def seed(input, mask, weight, bias, mask_weight):
        return seed_style_partial_conv2d(input, mask, weight, bias, mask_weight, stride, padding, activation)

    def nvidia(input, mask, weight, bias):
        return partial_conv_reference(input, mask, weight, bias, stride, padding, dilation,
                                      activation=activation, negative_slope=negative_slope, nan_safe=False)

    def plain(input, weight, bias):
        return activate(conv(input, weight, bias, stride, padding, dilation), activation, negative_slope), None

    def ours(input, mask, weight, bias):
        return partial_conv(input, mask, weight, bias, stride, padding, dilation,
                            activation=activation, negative_slope=negative_slope)

    def partial_arguments(inputs):
        return inputs.input, inputs.mask, inputs.weight, inputs.bias

    def plain_arguments(inputs):
        return inputs.input, inputs.weight, inputs.bias

    def nvidia_layer_arguments(inputs):
        """One NVIDIA PartialConv3d per input set, whose weight and bias are that set's tensors."""
        module = nvidia_partialconv3d(nvidia_partialconv)(
            layer.in_channels, layer.out_channels, layer.kernel_size, stride=stride, padding=padding,
            dilation=dilation, bias=inputs.bias is not None, multi_channel=layer.multi_channel,
            return_mask=True)
        del module.weight, module.bias  # plain attributes from here on, the same tensors as ours get
        module.weight, module.bias = inputs.weight, inputs.bias
        # Moved once here rather than in its first call (it moves it when its type differs from the input's).
        module.weight_maskUpdater = module.weight_maskUpdater.to(inputs.input)
        return module, inputs.input, inputs.mask

    def nvidia_layer(module, input, mask):
        output, updated_mask = module(input, mask_in=mask)
        return activate(output, activation, negative_slope), updated_mask

    arguments_and_forward = {
        SEED: (seed_arguments, seed),
        NVIDIA: (partial_arguments, nvidia),
        PLAIN_CONVS[workload.dims]: (plain_arguments, plain),
        OURS: (partial_arguments, ours),
        OURS_FUSED: (partial_arguments, ours),
        OURS_VENDOR: (partial_arguments, ours),
        OURS_COMPILED: (partial_arguments, ours),
        NVIDIA_PC3D: (nvidia_layer_arguments, nvidia_layer),
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
