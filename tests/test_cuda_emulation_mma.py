"""The tensor-core instructions of the CUDA host emulation and the kernel API over them.

csrc/cuda/warp_mma.cuh gives the kernels mma.sync, ldmatrix and cp.async: inline PTX under nvcc,
the emulator's versions (tests/cuda_emulation/warp_mma_emulation.h) on the CPU. These tests run
the emulator's self test of them (fragment layouts, number formats, a cp.async + ldmatrix + mma
GEMM pipeline per input type) under ASan/UBSan and under TSan, check its misuse aborts, and have
ptxas assemble every function's inline PTX for sm_80 and sm_90, which CI can do without a GPU.
"""

import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

import emulation_build

SELFTEST_SOURCE = emulation_build.EMULATION_DIR / "mma_selftest.cpp"
NVCC_SOURCE = emulation_build.ROOT / "tests" / "nvcc" / "warp_mma_instructions.cu"


def find_nvcc():
    cuda_home = os.environ.get("CUDA_HOME")
    candidates = [cuda_home and Path(cuda_home) / "bin" / "nvcc", shutil.which("nvcc"),
                  "/usr/local/cuda/bin/nvcc"]
    return next((str(c) for c in candidates if c and Path(c).is_file()), None)


NVCC = find_nvcc()


@pytest.fixture(scope="module")
def asan_ubsan_selftest(tmp_path_factory) -> Path:
    # -O0: under ASan and UBSan g++ builds it in half the time of -O1 (12 s against 25 s here),
    # far more than the second or two -O0 adds to the run.
    return emulation_build.build(SELFTEST_SOURCE,
                                 tmp_path_factory.mktemp("cuda_emulation") / "mma_asan_ubsan",
                                 "-fsanitize=address,undefined", optimization="-O0")


def test_tensor_core_emulation_under_asan_and_ubsan(asan_ubsan_selftest):
    emulation_build.assert_all_checks_passed(emulation_build.run(asan_ubsan_selftest))


# A missing __syncthreads() between cp_async_wait and another warp's ldmatrix is a race TSan
# reports. (TSan's ASLR caveat: see test_cuda_emulation_selftest.py.)
def test_tensor_core_emulation_has_no_data_races_under_tsan(tmp_path):
    binary = emulation_build.build(SELFTEST_SOURCE, tmp_path / "mma_tsan", "-fsanitize=thread")
    emulation_build.assert_all_checks_passed(emulation_build.run(binary))


@pytest.mark.parametrize(
    ("misuse", "message"),
    [
        ("ldmatrix-misaligned-row", "ldmatrix(): lane 3 gives row address"),
        ("cp-async-misaligned", "cp_async(): a copy of 16 bytes from"),
        ("mma-in-partial-warp", "mma_m16n8k16_f16() used in a partial warp of 16 lanes"),
        ("ldmatrix-at-different-sites",
         "warp collective at different call sites: lane 0 in ldmatrix() at mma_selftest.cpp:"),
    ],
)
def test_tensor_core_misuse_aborts_with_a_message(asan_ubsan_selftest, misuse, message):
    result = emulation_build.run(asan_ubsan_selftest, misuse)
    report = f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert result.returncode == -signal.SIGABRT, report
    assert f"cuda_emulation: {message}" in result.stderr


@pytest.mark.skipif(NVCC is None, reason="no nvcc (CI has one at /usr/local/cuda/bin/nvcc)")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_inline_ptx_assembles_without_spills(tmp_path, arch):
    command = [NVCC, "-std=c++17", f"-arch={arch}", "-c", "-Xptxas=-v",
               f"-I{emulation_build.ROOT / 'csrc'}", str(NVCC_SOURCE), "-o", str(tmp_path / "x.o")]
    result = subprocess.run(command, capture_output=True, text=True)
    report = result.stdout + result.stderr
    print(report)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{report}"
    spills = re.findall(r"(\d+) bytes spill (?:stores|loads)", report)
    assert spills and all(count == "0" for count in spills), report
