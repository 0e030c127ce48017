"""Self test of the host emulation of CUDA in tests/cuda_emulation, under the sanitizers.

The emulator lets CI, which has no GPU, run CUDA kernel source under ASan, UBSan and TSan. These
tests compile its self test with g++ and check that kernels written for nvcc give the right
results, and that the kernel bugs the emulator promises to catch abort with a message.
"""

import signal
from pathlib import Path

import pytest

import emulation_build

SELFTEST_SOURCE = emulation_build.EMULATION_DIR / "selftest.cpp"


@pytest.fixture(scope="module")
def asan_ubsan_selftest(tmp_path_factory) -> Path:
    return emulation_build.build(SELFTEST_SOURCE,
                                 tmp_path_factory.mktemp("cuda_emulation") / "selftest_asan_ubsan",
                                 "-fsanitize=address,undefined")


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
