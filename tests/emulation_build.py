"""Builds and runs the C++ test programs of tests/cuda_emulation (the host emulation of CUDA) with
g++ under the sanitizers; shared by the tests that run them."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EMULATION_DIR = ROOT / "tests" / "cuda_emulation"
COMMON_FLAGS = ["-std=c++20", "-g", "-fno-omit-frame-pointer", "-pthread",
                "-Wall", "-Wextra", "-Werror", f"-I{EMULATION_DIR}", f"-I{ROOT / 'csrc'}"]
SANITIZER_OPTIONS = {
    "ASAN_OPTIONS": "detect_leaks=1",
    # UBSan and TSan report and carry on by default; make a finding fail the run.
    "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1",
    "TSAN_OPTIONS": "halt_on_error=1",
}
# A kernel bug the emulator cannot detect (see cuda_emulation.h) hangs: fail instead of waiting.
RUN_TIMEOUT_S = 120


def build(source: Path, output: Path, sanitizer_flag: str, optimization: str = "-O1",
          extra_flags: tuple = ()) -> Path:
    """`optimization` -O0 where compiling under the sanitizers takes much longer than running."""
    compiler = shutil.which("g++")
    if compiler is None:
        pytest.fail("g++ is not installed; CI always has it, so this is a broken environment")
    command = [compiler, *COMMON_FLAGS, optimization, sanitizer_flag, *extra_flags, str(source),
               "-o", str(output)]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stderr}"
    return output


def run(binary: Path, *arguments: str, timeout: float = RUN_TIMEOUT_S) -> subprocess.CompletedProcess:
    return subprocess.run([str(binary), *arguments], capture_output=True, text=True,
                          env={**os.environ, **SANITIZER_OPTIONS}, timeout=timeout)


def assert_all_checks_passed(result: subprocess.CompletedProcess) -> None:
    report = f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert result.returncode == 0, report
    assert "PASS" in result.stdout and "FAIL" not in result.stdout, report
