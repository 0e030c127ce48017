"""The CPU kernels' own loops (masked copies, window sums, epilogue, gradient passes, the
few-positions GEMMs) run on torch's OpenMP threads: the build compiles them with OpenMP, and they
stay exact when every loop is split between threads."""
import sys

import pytest
import torch

import partialconv_cuda
from conftest import check_case_against_reference


@pytest.mark.skipif(sys.platform == "darwin" or not torch._C.has_openmp,
                    reason="built without OpenMP here by design (see setup.py's openmp_flags)")
def test_built_with_openmp_where_torch_has_it():
    # Without it ATen's parallel_for (header code behind #ifdef _OPENMP) runs every loop on the
    # calling thread: until 2026-12-01 all of them ran on one of the CPU's cores.
    assert partialconv_cuda._extension.build_info.WITH_OPENMP
    assert "own loops run on torch's OpenMP threads" in partialconv_cuda.info.summary()


def _case(**changes):
    # Large enough that every parallel loop has several tasks (cpu_common.h's kMinWorkPerTask).
    case = dict(n=2, cin=16, cout=32, size=(64, 64), kernel=(3, 3), stride=1, padding=1, dilation=1,
                mask="single", activation="relu", dtype=torch.float32)
    case.update(changes)
    return case


CASES = {
    "single-mask": _case(),
    "multi-mask-channels-last-leaky": _case(mask="multi", channels_last=True, activation="leaky_relu"),
    "soft-mask-strided": _case(mask="soft", kernel=(5, 5), stride=2, padding=2),
    "hole-rows": _case(hole_rows=(1, 10, 40)),
    "3d": _case(n=1, cin=8, cout=16, size=(6, 24, 24), kernel=(3, 3, 3)),
    "few-positions": _case(n=1, cin=256, cout=256, size=(3, 3), stride=2, padding=0, mask="single"),
}


@pytest.mark.parametrize("path", ["dense", "packed", "vendor"])
@pytest.mark.parametrize("name", list(CASES))
def test_results_with_two_threads_match_the_reference(name, path, monkeypatch):
    monkeypatch.setenv("PARTIALCONV_CPU_PATH", path)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        check_case_against_reference(CASES[name])
    finally:
        torch.set_num_threads(threads)
