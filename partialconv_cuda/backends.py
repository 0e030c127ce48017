"""Settings of the CUDA path choice, like torch.backends.cudnn.

    partialconv_cuda.backends.benchmark = True

makes each CUDA call time the fused kernels and the vendor path (cuDNN) on its first run with a
given set of arguments (shapes, strides, dtype, mask kind, device, conv parameters) and use the
faster from then on. Off (the default), CUDA takes the vendor path unless PARTIALCONV_CUDA_PATH=fused
forces the fused kernels. Never timed: under torch.use_deterministic_algorithms(True) (the default
path, on every call) and under CUDA graph capture (the measured path, or the default).
`partialconv_cuda.info.forward_path(...)` says which path runs and why.
"""
import sys
import types

from . import _C


def clear_measured_paths():
    """Forgets the measured choices: the next call with each set of arguments times again."""
    _C._clear_measured_paths()


class _BackendsModule(types.ModuleType):
    @property
    def benchmark(self):
        """Whether CUDA calls time both paths on their first run and take the faster."""
        return _C._benchmark()

    @benchmark.setter
    def benchmark(self, enabled):
        if not isinstance(enabled, bool):
            raise TypeError(f"partialconv_cuda.backends.benchmark must be True or False, got {enabled!r}")
        _C._set_benchmark(enabled)


sys.modules[__name__].__class__ = _BackendsModule
