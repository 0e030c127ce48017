"""Fused, exact partial convolution (Liu et al., ECCV 2018) for PyTorch, in 1, 2 and 3 spatial
dimensions."""
from importlib.metadata import PackageNotFoundError, version

from . import _extension  # noqa: F401  (loads the ops; fails clearly on a torch mismatch)
from . import backends
from .modules import PartialConv1d, PartialConv2d, PartialConv3d
from .ops import partial_conv1d, partial_conv2d, partial_conv3d
from .reference import partial_conv_reference

try:
    __version__ = version("partialconv_cuda")
except PackageNotFoundError:  # built in place for development, not installed
    __version__ = "0+unknown"

__all__ = [
    "PartialConv1d", "PartialConv2d", "PartialConv3d",
    "partial_conv1d", "partial_conv2d", "partial_conv3d",
    "partial_conv_reference", "backends", "__version__",
]
