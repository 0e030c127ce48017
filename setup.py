"""Builds partialconv_cuda._C.

The C++ CPU kernels are always built. The CUDA kernels (csrc/cuda/*.cu) are built when a CUDA
toolkit (CUDA_HOME) and a CUDA build of torch are found, GPU or not, or when FORCE_CUDA=1.
Environment:
  FORCE_CUDA=1            build the CUDA kernels (fails clearly if they cannot be built)
  TORCH_CUDA_ARCH_LIST    GPU architectures; default "8.0;9.0+PTX" when no GPU is visible
  MAX_JOBS                parallel compile jobs (ninja)
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import torch
from packaging.version import Version
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = Path(__file__).resolve().parent
DEFAULT_ARCH_LIST = "8.0;9.0+PTX"


def env_flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def nvcc_version():
    text = subprocess.check_output([os.path.join(CUDA_HOME, "bin", "nvcc"), "--version"], text=True)
    match = re.search(r"release (\d+\.\d+)", text)
    if match is None:
        raise RuntimeError(f"cannot read the nvcc version from:\n{text}")
    return Version(match.group(1))


def cuda_decision():
    """(build CUDA?, why)."""
    if env_flag("FORCE_CUDA"):
        if CUDA_HOME is None:
            raise RuntimeError("FORCE_CUDA=1 but no CUDA toolkit was found: set CUDA_HOME")
        return True, "FORCE_CUDA=1"
    if CUDA_HOME is None:
        return False, "no CUDA toolkit found (set CUDA_HOME to build the CUDA kernels)"
    if not (Path(CUDA_HOME) / "include" / "cuda_runtime.h").exists():
        return False, f"CUDA_HOME={CUDA_HOME} holds no CUDA toolkit (no include/cuda_runtime.h); set CUDA_HOME"
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is a CPU-only build"
    return True, f"CUDA toolkit at {CUDA_HOME} and torch built with CUDA {torch.version.cuda}"


def check_cuda_versions():
    nvcc = nvcc_version()
    if torch.version.cuda is None:
        raise RuntimeError("the CUDA kernels need a CUDA build of torch; this torch is CPU-only")
    torch_cuda = Version(torch.version.cuda)
    if nvcc.major != torch_cuda.major:
        raise RuntimeError(
            f"nvcc {nvcc} (CUDA_HOME={CUDA_HOME}) does not match torch's CUDA {torch_cuda}: "
            "the major versions must agree; point CUDA_HOME at a matching toolkit"
        )
    return nvcc


def check_arch_list(arch_list):
    """The kernels use sm_80 instructions (mma.sync m16n8k16, ldmatrix, cp.async)."""
    if arch_list is None:  # torch builds for the visible GPUs
        capabilities = [torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())]
        old = [f"{major}.{minor}" for major, minor in capabilities if major < 8]
    else:
        entries = arch_list.replace(",", ";").replace(" ", ";").split(";")
        old = [e for e in entries if e and Version(re.match(r"[0-9.]+", e).group(0)).major < 8]
    if old:
        raise RuntimeError(
            f"partialconv_cuda's CUDA kernels need compute capability 8.0 or newer (tensor-core "
            f"instructions of sm_80); TORCH_CUDA_ARCH_LIST asks for {', '.join(old)}. Set "
            "TORCH_CUDA_ARCH_LIST to 8.0 or newer targets, or build without CUDA (CUDA_HOME unset)."
        )


def write_build_info(with_cuda, arch_list, with_openmp):
    """Records what this build is, so that importing it under another torch fails clearly."""
    info = ROOT / "partialconv_cuda" / "_build_info.py"
    info.write_text(
        "# Written by setup.py when partialconv_cuda._C was built; do not edit.\n"
        f"TORCH_VERSION = {torch.__version__!r}\n"
        f"TORCH_CUDA_VERSION = {torch.version.cuda!r}\n"
        f"WITH_CUDA = {with_cuda!r}\n"
        f"CUDA_ARCH_LIST = {arch_list!r}\n"
        f"WITH_OPENMP = {with_openmp!r}\n"
    )


def openmp_flags():
    """(compile flags, link flags) that let at::parallel_for use torch's OpenMP threads. ATen's
    OpenMP parallel_for is header code behind #ifdef _OPENMP: compiled without OpenMP, every
    parallel loop of the CPU kernels runs on the calling thread alone. Empty where torch has no
    OpenMP, or on macOS (Apple's clang has no -fopenmp; the loops run on one thread there)."""
    if not torch._C.has_openmp or sys.platform == "darwin":
        return [], []
    if sys.platform == "win32":
        return ["/openmp"], []
    return ["-fopenmp"], ["-fopenmp"]


def extension():
    with_cuda, why = cuda_decision()
    sources = sorted(str(p.relative_to(ROOT)) for pattern in ("*.cpp", "*/*.cpp") for p in (ROOT / "csrc").glob(pattern))
    # -fno-trapping-math lets g++ vectorise the branchy elementwise loops (masking, epilogue);
    # the kernels never rely on floating-point exceptions.
    openmp_compile, openmp_link = openmp_flags()
    cxx_flags = ["-O3", "-fno-trapping-math"] + openmp_compile
    arch_list = None
    if with_cuda:
        nvcc = check_cuda_versions()
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCH_LIST
        check_arch_list(os.environ.get("TORCH_CUDA_ARCH_LIST"))
        arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST", "the visible GPU's")
        sources += sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cuda").glob("*.cu"))
        print(f"partialconv_cuda: building CPU + CUDA kernels ({why}); nvcc {nvcc}, "
              f"TORCH_CUDA_ARCH_LIST={arch_list}")
        ext = CUDAExtension(
            "partialconv_cuda._C",
            sources,
            extra_compile_args={
                "cxx": cxx_flags,
                # -Xptxas -v prints registers, spills and shared memory of every kernel.
                "nvcc": ["-O3", "-lineinfo", "-Xptxas=-v"],
            },
            extra_link_args=openmp_link,
        )
    else:
        print(f"partialconv_cuda: building CPU kernels only ({why})")
        ext = CppExtension("partialconv_cuda._C", sources, extra_compile_args={"cxx": cxx_flags},
                           extra_link_args=openmp_link)
    print(f"partialconv_cuda: torch {torch.__version__}, MAX_JOBS={os.environ.get('MAX_JOBS', 'unset (ninja default)')}, "
          f"CPU loops {'on torch OpenMP threads (' + ' '.join(openmp_compile) + ')' if openmp_compile else 'on one thread (no OpenMP)'}")
    write_build_info(with_cuda, arch_list, bool(openmp_compile))
    return ext


setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension},
)
