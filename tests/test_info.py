"""`python -m partialconv_cuda.info` and the build record."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import partialconv_cuda
from partialconv_cuda import info


def test_info_reports_the_build(tmp_path):
    # the package under test, wherever it was imported from (installed, or built in place)
    env = dict(os.environ, PYTHONPATH=str(Path(partialconv_cuda.__file__).parent.parent))
    text = subprocess.run([sys.executable, "-m", "partialconv_cuda.info"], check=True, cwd=tmp_path,
                          env=env, capture_output=True, text=True).stdout
    assert f"torch {torch.__version__}" in text
    assert "partialconv_cuda::partial_conv_forward: CPU" in text
    assert "CUDA kernels built: " + ("yes" if partialconv_cuda._extension.build_info.WITH_CUDA else "no") in text


def test_kernels_registered():
    kernels = info.compiled_kernels()
    assert "CPU" in kernels["partialconv_cuda::partial_conv_forward"]
    assert "CPU" in kernels["partialconv_cuda::partial_conv_backward"]
    assert "AutocastCPU" in kernels["partialconv_cuda::partial_conv_forward"]
    if partialconv_cuda._extension.build_info.WITH_CUDA:
        assert "CUDA" in kernels["partialconv_cuda::partial_conv_forward"]


def test_import_under_another_torch_fails_clearly(tmp_path):
    """A build record naming another torch makes the import fail with the rebuild command."""
    package = tmp_path / "partialconv_cuda"
    package.mkdir()
    source = partialconv_cuda._extension.__file__
    (package / "__init__.py").write_text("from . import _extension\n")
    (package / "_extension.py").write_text(open(source).read())
    (package / "_build_info.py").write_text("TORCH_VERSION = '1.0.0'\n")
    result = subprocess.run([sys.executable, "-c", "import partialconv_cuda"], cwd=tmp_path,
                            capture_output=True, text=True)
    assert result.returncode != 0
    assert "built against torch 1.0.0" in result.stderr and "--no-build-isolation" in result.stderr


def test_forward_path_reports_the_cpu_choice(monkeypatch):
    monkeypatch.delenv("PARTIALCONV_CPU_PATH", raising=False)
    x = torch.randn(1, 3, 32, 32)
    w = torch.randn(4, 3, 3, 3)
    mostly_valid = torch.ones(1, 1, 32, 32)
    mostly_valid[..., :4, :4] = 0
    mostly_holes = torch.zeros(1, 1, 32, 32)
    mostly_holes[..., :6, :] = 1
    dense = info.forward_path(x, mostly_valid, w, padding=1)
    assert dense.startswith("cpu: dense bands") and "(backward: dense bands" in dense
    assert "; 100% of output positions" in info.forward_path(x, None, w, padding=1)
    sparse = info.forward_path(x, mostly_holes, w, padding=1)
    assert sparse.startswith("cpu: packed positions") and "(backward: packed positions" in sparse
    assert "21.8% of output positions" in sparse and "below 25% forward, 30% backward" in sparse
    some_holes = torch.zeros(1, 1, 32, 32)
    some_holes[..., :8, :] = 1
    mixed = info.forward_path(x, some_holes, w, padding=1)  # 28.1%: dense forward, packed backward
    assert mixed.startswith("cpu: dense bands") and "(backward: packed positions" in mixed
    monkeypatch.setenv("PARTIALCONV_CPU_PATH", "packed")
    assert "forced by PARTIALCONV_CPU_PATH=packed" in info.forward_path(x, mostly_valid, w, padding=1)
    monkeypatch.setenv("PARTIALCONV_CPU_PATH", "fast")
    with pytest.raises(ValueError, match="PARTIALCONV_CPU_PATH must be 'auto', 'dense', 'packed' or 'vendor'"):
        info.forward_path(x, mostly_valid, w, padding=1)


@pytest.mark.cuda
def test_forward_path_reports_the_cuda_kernels(monkeypatch):
    monkeypatch.setenv("PARTIALCONV_CUDA_PATH", "fused")
    x = torch.randn(1, 3, 32, 32, device="cuda")
    path = info.forward_path(x, None, torch.randn(4, 3, 3, 3, device="cuda"), padding=1)
    assert path.startswith("cuda: fused implicit GEMM") and "32-bit indexing" in path


def test_backends_benchmark_flag():
    """partialconv_cuda.backends.benchmark reaches the library (tests/test_cuda.py checks what it
    does on CUDA; tests/test_path_choice.py the rule itself)."""
    backends = partialconv_cuda.backends
    assert backends.benchmark is False
    try:
        backends.benchmark = True
        assert backends.benchmark is True and partialconv_cuda._C._benchmark() is True
        with pytest.raises(TypeError, match="must be True or False"):
            backends.benchmark = 1
    finally:
        backends.benchmark = False
    assert partialconv_cuda._C._benchmark() is False
    backends.clear_measured_paths()
