"""The tensor-core instructions of the CUDA kernels and of the CUDA host emulation.

csrc/cuda/warp_mma.cuh gives the kernels mma.sync, ldmatrix and cp.async: inline PTX under nvcc,
the emulator's versions on the CPU. These tests have ptxas assemble every function's inline PTX
for sm_80 and sm_90, which CI can do without a GPU.
"""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

import emulation_build

NVCC_SOURCE = emulation_build.ROOT / "tests" / "nvcc" / "warp_mma_instructions.cu"


def find_nvcc():
    cuda_home = os.environ.get("CUDA_HOME")
    candidates = [cuda_home and Path(cuda_home) / "bin" / "nvcc", shutil.which("nvcc"),
                  "/usr/local/cuda/bin/nvcc"]
    return next((str(c) for c in candidates if c and Path(c).is_file()), None)


NVCC = find_nvcc()


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
