"""Builds and runs the C++ test programs of tests/cuda_emulation (the host emulation of CUDA) with
g++ under the sanitizers; shared by the tests that run them.

How an emulated kernel test should run (rule 11 of tests/cuda_emulation/cuda_emulation.h): the
emulator itself does not track memory, so shared-memory races are found by ThreadSanitizer, and
when cp.async copies land decides which pipeline races can show. KERNEL_TEST_RUNS lists the runs
every case needs (at least every kernel variant: stage count, tile shape, data type):

    binaries = emulation_build.build_sanitized(source, directory, "run_kernels")
    for sanitizer, landing in emulation_build.KERNEL_TEST_RUNS:
        result = emulation_build.run(binaries[sanitizer], case_file, cp_async=landing)

ASan/UBSan with `wait` (a read before the covering wait sees stale data: wrong results), TSan with
`issue` (a stage refilled while another warp still reads it is a race) and with `random` (both, at
random legal moments). Pass bank_conflicts="fail" to make any bank conflict abort the run.
"""

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
ADDRESS = "address"
THREAD = "thread"
SANITIZER_FLAGS = {ADDRESS: "-fsanitize=address,undefined", THREAD: "-fsanitize=thread"}
# PCONV_EMULATION_CP_ASYNC values: when a cp.async copy writes shared memory.
CP_ASYNC_LANDINGS = ("issue", "wait", "random")
# (sanitizer, cp.async landing) of the runs every emulated kernel test case needs; see above.
KERNEL_TEST_RUNS = ((ADDRESS, "wait"), (THREAD, "issue"), (THREAD, "random"))


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


def build_sanitized(source: Path, directory: Path, name: str, optimization: str = "-O1",
                    extra_flags: tuple = ()) -> dict:
    """`source` built once per sanitizer: {ADDRESS: ASan+UBSan binary, THREAD: TSan binary}."""
    return {sanitizer: build(source, directory / f"{name}_{sanitizer}", flag, optimization,
                             extra_flags)
            for sanitizer, flag in SANITIZER_FLAGS.items()}


def run(binary: Path, *arguments: str, timeout: float = RUN_TIMEOUT_S, cp_async: str = None,
        bank_conflicts: str = None, arch: str = None) -> subprocess.CompletedProcess:
    """cp_async ("issue", "wait", "random" or "random:<seed>"), bank_conflicts ("off", "count",
    "report", "fail") and arch ("sm_80", "sm_90", ...) set PCONV_EMULATION_CP_ASYNC,
    PCONV_EMULATION_BANK_CONFLICTS and PCONV_EMULATION_ARCH for this run (cuda_emulation.h); None
    leaves what the environment says (by default random, count and sm_80)."""
    settings = {"PCONV_EMULATION_CP_ASYNC": cp_async,
                "PCONV_EMULATION_BANK_CONFLICTS": bank_conflicts, "PCONV_EMULATION_ARCH": arch}
    env = {**os.environ, **SANITIZER_OPTIONS,
           **{name: value for name, value in settings.items() if value is not None}}
    return subprocess.run([str(binary), *arguments], capture_output=True, text=True, env=env,
                          timeout=timeout)


def assert_all_checks_passed(result: subprocess.CompletedProcess) -> None:
    report = f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert result.returncode == 0, report
    assert "PASS" in result.stdout and "FAIL" not in result.stdout, report
