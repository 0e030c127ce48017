"""The CUDA path choice of csrc/path_choice.h, run with a fake timer in a C++ program (under ASan +
UBSan and TSan): forced paths, unsupported shapes, deterministic mode, graph capture, benchmark mode
timing once per key, and concurrent first calls."""
import pytest

import emulation_build

SOURCE = emulation_build.ROOT / "tests" / "cpp" / "path_choice_test.cpp"


@pytest.fixture(scope="module")
def binaries(tmp_path_factory):
    return emulation_build.build_sanitized(SOURCE, tmp_path_factory.mktemp("path_choice"), "path_choice_test")


@pytest.mark.parametrize("sanitizer", [emulation_build.ADDRESS, emulation_build.THREAD])
def test_path_choice(binaries, sanitizer):
    result = emulation_build.run(binaries[sanitizer])
    emulation_build.assert_all_checks_passed(result)
    assert result.stdout.count("PASS ") == 15, result.stdout  # every check ran
