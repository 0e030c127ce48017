"""Fused, exact partial convolution (Liu et al., ECCV 2018) for PyTorch."""
from importlib.metadata import PackageNotFoundError, version

from . import _extension  # noqa: F401  (loads the ops; fails clearly on a torch mismatch)
from .modules import PartialConv2d
from .ops import partial_conv2d
from .reference import partial_conv2d_reference

try:
    __version__ = version("partialconv_cuda")
except PackageNotFoundError:  # built in place for development, not installed
    __version__ = "0+unknown"

__all__ = ["PartialConv2d", "partial_conv2d", "partial_conv2d_reference", "__version__"]
