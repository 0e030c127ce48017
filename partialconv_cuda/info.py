"""`python -m partialconv_cuda.info`: what this build of partialconv_cuda is and can run."""
import torch

from . import __version__
from ._extension import build_info

OPS = ("partialconv_cuda::partial_conv_forward", "partialconv_cuda::partial_conv_backward")
BACKENDS = ("CPU", "CUDA", "Meta", "AutocastCPU", "AutocastCUDA")
# Spatial dimensions each backend's kernels run.
SPATIAL_DIMS = {"CPU": (1, 2, 3), "CUDA": (1, 2, 3)}


def compiled_kernels():
    """{op: [dispatch keys with a registered kernel]}, read from torch's dispatcher."""
    return {
        op: [key for key in BACKENDS if torch._C._dispatch_has_kernel_for_dispatch_key(op, key)]
        for op in OPS
    }


def forward_path(input, mask, weight, stride=1, padding=0, dilation=1, groups=1):
    """Which kernels partial_conv1d/2d/3d would run for these arguments, and why, as one line of
    text. Runs no convolution (on the CPU it counts the mask's windows, which decide the path)."""
    from .ops import conv_arguments

    dims = weight.dim() - 2
    stride, padding, dilation = conv_arguments(dims, weight, stride, padding, dilation,
                                               f"partial_conv{dims}d")
    return torch.ops.partialconv_cuda.forward_path(input, mask, weight, stride, padding, dilation, groups)


def summary():
    lines = [
        f"partialconv_cuda {__version__}",
        f"torch {torch.__version__} (built against torch {build_info.TORCH_VERSION})",
        f"CUDA kernels built: {'yes' if build_info.WITH_CUDA else 'no'}"
        + (f" (torch CUDA {build_info.TORCH_CUDA_VERSION}, TORCH_CUDA_ARCH_LIST={build_info.CUDA_ARCH_LIST})"
           if build_info.WITH_CUDA else ""),
    ]
    for op, keys in compiled_kernels().items():
        lines.append(f"  {op}: {', '.join(keys) or 'none'}")
    for backend, dims in SPATIAL_DIMS.items():
        if backend == "CPU" or build_info.WITH_CUDA:
            lines.append(f"  {backend} spatial dimensions: {', '.join(f'{d}-D' for d in dims)}")
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(index)
            lines.append(f"GPU {index}: {torch.cuda.get_device_name(index)} (sm_{major}{minor})")
    else:
        lines.append("GPU: none visible (CUDA ops cannot run here)")
    threads = "torch's OpenMP threads" if getattr(build_info, "WITH_OPENMP", False) else "one thread (built without OpenMP)"
    lines.append(f"CPU threads: {torch.get_num_threads()}; the CPU kernels' own loops run on {threads}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(summary())
