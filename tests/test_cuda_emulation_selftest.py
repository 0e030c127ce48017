"""Self test of the host emulation of CUDA in tests/cuda_emulation, under the sanitizers.

The emulator lets CI, which has no GPU, run CUDA kernel source under ASan, UBSan and TSan. These
tests compile its self test with g++ and check that kernels written for nvcc give the right
results, and that the kernel bugs the emulator promises to catch abort with a message.
"""

import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

SELFTEST_SOURCE = Path(__file__).parent / "cuda_emulation" / "selftest.cpp"
COMMON_FLAGS = ["-std=c++20", "-O1", "-g", "-fno-omit-frame-pointer", "-pthread",
                "-Wall", "-Wextra", "-Werror"]
SANITIZER_OPTIONS = {
    "ASAN_OPTIONS": "detect_leaks=1",
    # UBSan and TSan report and carry on by default; make a finding fail the run.
    "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1",
    "TSAN_OPTIONS": "halt_on_error=1",
}
# A kernel bug the emulator cannot detect (see cuda_emulation.h) hangs: fail instead of waiting.
RUN_TIMEOUT_S = 120


def build_selftest(output: Path, sanitizer_flag: str) -> Path:
    compiler = shutil.which("g++")
    if compiler is None:
        pytest.fail("g++ is not installed; CI always has it, so this is a broken environment")
    command = [compiler, *COMMON_FLAGS, sanitizer_flag, str(SELFTEST_SOURCE), "-o", str(output)]
    build = subprocess.run(command, capture_output=True, text=True)
    assert build.returncode == 0, f"{' '.join(command)} failed:\n{build.stderr}"
    return output


def run_selftest(binary: Path, *arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(binary), *arguments], capture_output=True, text=True,
                          env={**os.environ, **SANITIZER_OPTIONS}, timeout=RUN_TIMEOUT_S)


def assert_all_checks_passed(run: subprocess.CompletedProcess) -> None:
    report = f"stdout:\n{run.stdout}\nstderr:\n{run.stderr}"
    assert run.returncode == 0, report
    assert "PASS" in run.stdout and "FAIL" not in run.stdout, report


@pytest.fixture(scope="module")
def asan_ubsan_selftest(tmp_path_factory) -> Path:
    return build_selftest(tmp_path_factory.mktemp("cuda_emulation") / "selftest_asan_ubsan",
                          "-fsanitize=address,undefined")


def test_kernels_give_reference_results_under_asan_and_ubsan(asan_ubsan_selftest):
    assert_all_checks_passed(run_selftest(asan_ubsan_selftest))


# GCC 12's TSan needs its fixed address ranges free of randomized mappings: it dies with
# "unexpected memory mapping" on kernels with high ASLR entropy (vm.mmap_rnd_bits = 32, as on
# recent Ubuntu kernels). It works with 28, the setting where this test was written.
def test_kernels_have_no_data_races_under_tsan(tmp_path):
    binary = build_selftest(tmp_path / "selftest_tsan", "-fsanitize=thread")
    assert_all_checks_passed(run_selftest(binary))


@pytest.mark.parametrize(
    ("misuse", "message"),
    [
        ("return-before-syncthreads", "only 16 of 64 threads of the block reached __syncthreads()"),
        ("return-before-shuffle", "only 16 of 32 lanes of the warp reached a warp intrinsic"),
        ("shuffle-in-partial-warp", "__shfl_down_sync() used in a partial warp of 16 lanes"),
        ("oversized-block", "launch: block (1025, 1, 1) is invalid"),
    ],
)
def test_kernel_misuse_aborts_with_a_message(asan_ubsan_selftest, misuse, message):
    run = run_selftest(asan_ubsan_selftest, misuse)
    assert run.returncode == -signal.SIGABRT, f"stdout:\n{run.stdout}\nstderr:\n{run.stderr}"
    assert f"cuda_emulation: {message}" in run.stderr
