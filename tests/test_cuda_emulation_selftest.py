"""Self test of the host emulation of CUDA in tests/cuda_emulation, under the sanitizers.

The emulator lets CI, which has no GPU, run CUDA kernel source under ASan, UBSan and TSan. These
tests compile its self tests with g++ and check that kernels written for nvcc give the right
results, and that the kernel bugs the emulator promises to catch abort with a message or are
reported: barriers and collectives at different call sites, shared memory above the limits, and,
with the pipeline self test (the model mainloop for the production kernels), cp.async pipeline
races under each landing mode, bank conflicts and misaligned shared-memory accesses.
"""

import re
import signal
from pathlib import Path

import pytest

import emulation_build

SELFTEST_SOURCE = emulation_build.EMULATION_DIR / "selftest.cpp"
PIPELINE_SOURCE = emulation_build.EMULATION_DIR / "pipeline_selftest.cpp"


@pytest.fixture(scope="module")
def asan_ubsan_selftest(tmp_path_factory) -> Path:
    # -O0: under ASan and UBSan g++ builds it in 7 s instead of 11, and it still runs in a second.
    return emulation_build.build(SELFTEST_SOURCE,
                                 tmp_path_factory.mktemp("cuda_emulation") / "selftest_asan_ubsan",
                                 "-fsanitize=address,undefined", optimization="-O0")


def test_kernels_give_reference_results_under_asan_and_ubsan(asan_ubsan_selftest):
    emulation_build.assert_all_checks_passed(emulation_build.run(asan_ubsan_selftest))


# GCC 12's TSan needs its fixed address ranges free of randomized mappings: it dies with
# "unexpected memory mapping" on kernels with high ASLR entropy (vm.mmap_rnd_bits = 32, as on
# recent Ubuntu kernels). It works with 28, the setting where this test was written.
def test_kernels_have_no_data_races_under_tsan(tmp_path):
    binary = emulation_build.build(SELFTEST_SOURCE, tmp_path / "selftest_tsan", "-fsanitize=thread")
    emulation_build.assert_all_checks_passed(emulation_build.run(binary))


@pytest.mark.parametrize(
    ("misuse", "message"),
    [
        ("return-before-syncthreads", "only 16 of 64 threads of the block reached __syncthreads()"),
        ("return-before-shuffle", "only 16 of 32 lanes of the warp reached a warp intrinsic"),
        ("shuffle-in-partial-warp", "__shfl_down_sync() used in a partial warp of 16 lanes"),
        ("oversized-block", "launch: block (1025, 1, 1) is invalid"),
        ("syncthreads-at-different-sites",
         "__syncthreads() at different call sites: thread 0 in __syncthreads() at selftest.cpp:"),
        ("shuffle-at-different-sites",
         "warp collective at different call sites: lane 0 in __shfl_xor_sync() at selftest.cpp:"),
        ("syncwarp-against-shuffle",
         "warp collective at different call sites: lane 0 in __syncwarp() at selftest.cpp:"),
        ("dynamic-shared-above-48k",
         "launch: 49168 bytes of dynamic shared memory, but the kernel allows 49152; above 48 KB"),
        ("dynamic-shared-above-attribute",
         "launch: 81920 bytes of dynamic shared memory, but the kernel allows 65536"),
        ("dynamic-shared-above-sm80-limit",
         "launch: 166928 bytes of dynamic shared memory exceed the sm_80 limit of 166912 bytes"),
    ],
)
def test_kernel_misuse_aborts_with_a_message(asan_ubsan_selftest, misuse, message):
    run = emulation_build.run(asan_ubsan_selftest, misuse)
    assert run.returncode == -signal.SIGABRT, f"stdout:\n{run.stdout}\nstderr:\n{run.stderr}"
    assert f"cuda_emulation: {message}" in run.stderr


# ---------------------------------------------------------------------------------------------
# pipeline_selftest.cpp: cp.async landing moments, bank conflicts, shared-access wrappers.

@pytest.fixture(scope="module")
def pipeline_selftest(tmp_path_factory) -> dict:
    # -O0 under ASan/UBSan, as above: it builds in half the time and runs in seconds.
    directory = tmp_path_factory.mktemp("cuda_emulation")
    return {
        emulation_build.ADDRESS: emulation_build.build(
            PIPELINE_SOURCE, directory / "pipeline_asan_ubsan",
            emulation_build.SANITIZER_FLAGS[emulation_build.ADDRESS], optimization="-O0"),
        emulation_build.THREAD: emulation_build.build(
            PIPELINE_SOURCE, directory / "pipeline_tsan",
            emulation_build.SANITIZER_FLAGS[emulation_build.THREAD]),
    }


# The checks switch between the landing modes themselves; the environment's mode only decides
# the first launch's.
@pytest.mark.parametrize("sanitizer", [emulation_build.ADDRESS, emulation_build.THREAD])
def test_pipeline_emulation_passes(pipeline_selftest, sanitizer):
    emulation_build.assert_all_checks_passed(emulation_build.run(pipeline_selftest[sanitizer]))


RACE = "WARNING: ThreadSanitizer: data race"
WRONG = "pipeline_selftest: results differ from the reference"


# Each pipeline bug fails under the landing mode that exposes it: a stage refilled while another
# warp still reads it (no barrier between the reads and the refill) when copies land early, a
# read of a tile whose copies may be in flight when they land late; random landing exposes both.
@pytest.mark.parametrize(
    ("misuse", "cp_async", "sanitizer", "finding"),
    [
        ("refill-before-barrier", "issue", emulation_build.THREAD, RACE),
        ("no-trailing-barrier", "issue", emulation_build.THREAD, RACE),
        ("wait-too-few", "wait", emulation_build.THREAD, RACE),
        ("wait-too-few", "wait", emulation_build.ADDRESS, WRONG),
        ("refill-before-barrier", "random", emulation_build.THREAD, RACE),
        ("no-trailing-barrier", "random", emulation_build.THREAD, RACE),
        ("wait-too-few", "random", emulation_build.THREAD, RACE),
        ("wait-too-few", "random:7", emulation_build.THREAD, RACE),
    ],
)
def test_pipeline_race_is_caught(pipeline_selftest, misuse, cp_async, sanitizer, finding):
    result = emulation_build.run(pipeline_selftest[sanitizer], misuse, cp_async=cp_async)
    report = f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert result.returncode != 0, report
    assert finding in result.stderr, report
    if finding == RACE:  # the report points at the kernel
        assert "pipeline_selftest.cpp" in result.stderr, report


@pytest.mark.parametrize(
    ("misuse", "message"),
    [
        ("cp-async-src-size-above-size",
         r"cp_async\(\): src-size 9 is larger than the copy's 8 bytes"),
        ("cp-async-src-size-negative", r"cp_async_zfill\(\): src-size -1 is negative"),
        ("load-shared-128-misaligned",
         r"load_shared_128\(\): address 0x\w+ is not 16-byte aligned"),
        ("store-shared-64-misaligned", r"store_shared_64\(\): address 0x\w+ is not 8-byte aligned"),
        ("load-shared-32-misaligned", r"load_shared_32\(\): address 0x\w+ is not 4-byte aligned"),
    ],
)
def test_shared_access_misuse_aborts_with_a_message(pipeline_selftest, misuse, message):
    result = emulation_build.run(pipeline_selftest[emulation_build.ADDRESS], misuse)
    report = f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert result.returncode == -signal.SIGABRT, report
    assert re.search("cuda_emulation: " + message, result.stderr), report


# The unswizzled mainloop: every ldmatrix matrix takes 4 wavefronts instead of 1, at two call
# sites (A and B) of 64 warp instructions each; its cp.async writes are conflict-free.
UNSWIZZLED_REPORT = [
    "cuda_emulation: bank conflicts in a launch, by call site:",
    "ldmatrix of 16 bytes at pipeline_selftest.cpp:",
    "64 warp instructions took 1024 wavefronts where 256 suffice (768 extra)",
]


@pytest.mark.parametrize("policy", ["report", "fail"])
def test_bank_conflicts_are_reported_by_call_site(pipeline_selftest, policy):
    result = emulation_build.run(pipeline_selftest[emulation_build.ADDRESS], "unswizzled-gemm",
                                 bank_conflicts=policy)
    report = f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    for line in UNSWIZZLED_REPORT:
        assert line in result.stderr, report
    assert result.stderr.count("64 warp instructions took 1024 wavefronts") == 2, report
    assert "cp.async" not in result.stderr, report
    if policy == "fail":
        assert result.returncode == -signal.SIGABRT, report
        assert ("cuda_emulation: bank conflicts: 1536 extra wavefronts "
                "(PCONV_EMULATION_BANK_CONFLICTS=fail)") in result.stderr, report
    else:
        assert "misuse unswizzled-gemm was not caught" in result.stderr, report


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("cp_async", "sometimes",
         "PCONV_EMULATION_CP_ASYNC=sometimes: expected issue, wait, random or random:<seed>"),
        ("cp_async", "random:x", "PCONV_EMULATION_CP_ASYNC=random:x: the seed after random:"),
        ("bank_conflicts", "loud", "PCONV_EMULATION_BANK_CONFLICTS=loud: expected off, count,"),
        ("arch", "sm_70", "PCONV_EMULATION_ARCH=sm_70: expected sm_80, sm_86,"),
    ],
)
def test_bad_setting_aborts_with_a_message(pipeline_selftest, variable, value, message):
    result = emulation_build.run(pipeline_selftest[emulation_build.ADDRESS], **{variable: value})
    report = f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert result.returncode == -signal.SIGABRT, report
    assert f"cuda_emulation: {message}" in result.stderr, report
