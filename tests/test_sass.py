"""python -m bench.sass, the main-loop instruction mix read from SASS: its loop finding on small
hand-written listings, and its numbers and --check verdicts on real SASS, from the kernels of
tests/nvcc/sass_*.cu compiled to cubins for sm_80 and sm_90 (no GPU needed)."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench import sass

REPO = Path(__file__).resolve().parent.parent
ARCHS = ["sm_80", "sm_90"]
PIPELINED = REPO / "tests" / "nvcc" / "sass_pipelined_mma.cu"
DIVISION_NESTED = REPO / "tests" / "nvcc" / "sass_division_nested.cu"


def find_nvcc():
    cuda_home = os.environ.get("CUDA_HOME")
    candidates = [cuda_home and Path(cuda_home) / "bin" / "nvcc", shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"]
    return next((str(c) for c in candidates if c and Path(c).is_file()), None)


NVCC, CUOBJDUMP = find_nvcc(), sass.find_cuobjdump()
needs_cuda_tools = pytest.mark.skipif(
    NVCC is None or CUOBJDUMP is None,
    reason=f"needs nvcc and cuobjdump (CI has both: nvcc in /usr/local/cuda/bin, cuobjdump in torch's triton); "
           f"found nvcc={NVCC}, cuobjdump={CUOBJDUMP}")


def listing(functions, arch="sm_80"):
    """cuobjdump -sass text for {mangled name: ["0010 @P0 BRA 0x40", ...]}."""
    lines = ["", f"\tcode for {arch}", f"\t.target\t{arch}", ""]
    for name, instructions in functions.items():
        lines.append(f"\t\tFunction : {name}")
        lines.append('\t.headerflags\t@"EF_CUDA_SM80 EF_CUDA_VIRTUAL_SM(EF_CUDA_SM80)"')
        for instruction in instructions:
            address, text = instruction.split(" ", 1)
            lines.append(f"        /*{address}*/   {text.strip():>12} ;   /* 0x000000000000794d */")
            lines.append("                                 /* 0x000fea0003800000 */")
        lines.append("\t\t..........")
    return "\n".join(lines) + "\n"


# A main loop 0020-0100 (two back-edges to 0020, one predicated) with a loop nested in it
# (0030-0050), a forward branch, a never-executed LDS, an HFMA2.MMA (no MMA), calls to a division
# subroutine and to one that does not divide, and a call that leaves the loop (its target reaches
# EXIT, not RET); then a smaller loop of one HMMA after the EXIT, and the trap branch to itself.
NESTED = [
    "0000 MOV R1, c[0x0][0x28]",
    "0010 @!P0 BRA 0x110",
    "0020 LDGSTS.E.BYPASS.128 [R2], [R4.64], P3",
    "0030 IADD3 R0, R0, 0x1, RZ",
    "0040 LDG.E.U16 R5, [R6.64]",
    "0050 @P1 BRA 0x30",
    "0060 BAR.SYNC.DEFER_BLOCKING 0x0",
    "0070 @!PT LDS RZ, [RZ]",
    "0080 HMMA.16816.F32 R8, R12, R16, R8",
    "0090 HMMA.16816.F32 R8, R12, R18, R8",
    "00a0 HFMA2.MMA R3, -RZ, RZ, 0, 0",
    "00b0 @P4 BRA 0xd0",
    "00c0 CALL.REL.NOINC 0x180",
    "00d0 CALL.REL.NOINC 0x1c0",
    "00e0 @P2 BRA 0x20",
    "00f0 @P0 CALL.REL.NOINC 0x110",
    "0100 BRA 0x20",
    "0110 BSYNC B0",
    "0120 EXIT",
    "0130 HMMA.16816.F32 R8, R12, R16, R8",
    "0140 @P0 BRA 0x130",
    "0150 EXIT",
    "0160 NOP",
    "0170 NOP",
    "0180 I2F.U32.RP R3, R2",
    "0190 MUFU.RCP R3, R3",
    "01a0 F2I.FTZ.U32.TRUNC.NTZ R3, R3",
    "01b0 RET.REL.NODEC R2 0x0",
    "01c0 MUFU.RSQ R3, R3",
    "01d0 RET.REL.NODEC R2 0x0",
    "01e0 BRA 0x1e0",
]
# An outer loop (0010-0060) around an inner one (0020-0040) that holds its every MMA.
OUTER_AROUND_INNER = [
    "0000 MOV R1, c[0x0][0x28]",
    "0010 IADD3 R0, R0, 0x1, RZ",
    "0020 HMMA.16816.F32 R8, R12, R16, R8",
    "0030 IADD3 R2, R2, 0x1, RZ",
    "0040 @P1 BRA 0x20",
    "0050 ISETP.GE.AND P0, PT, R0, 0x4, PT",
    "0060 @!P0 BRA 0x10",
    "0070 EXIT",
]
SIMT = [
    "0000 FFMA R0, R1, R2, R0",
    "0010 @P0 BRA 0x0",
    "0020 FFMA R0, R1, R2, R0",
    "0030 FFMA R0, R1, R3, R0",
    "0040 @P1 BRA 0x20",
    "0050 EXIT",
    "0060 BRA 0x60",
]
STRAIGHT = ["0000 HMMA.16816.F32 R8, R12, R16, R8", "0010 EXIT", "0020 BRA 0x20"]


def mix_of(instructions):
    (function,) = sass.parse_sass(listing({"_Z1fv": instructions}))
    loop, tensor_cores = sass.main_loop(function)
    return sass.loop_mix(function, loop, tensor_cores) if loop else None


def test_parse_reads_every_instruction_with_its_predicate_and_arch():
    functions = sass.parse_sass(listing({"_Z1fv": NESTED, "_Z1gv": SIMT}, arch="sm_90"))
    assert [(f.mangled, f.arch, len(f.instructions)) for f in functions] == [("_Z1fv", "sm_90", len(NESTED)),
                                                                              ("_Z1gv", "sm_90", len(SIMT))]
    branch = functions[0].instructions[14]
    assert (branch.address, branch.predicate, branch.opcode, branch.target()) == (0xe0, "@P2", "BRA", 0x20)


def test_main_loop_counts_and_nesting():
    mix = mix_of(NESTED)
    assert (mix["start"], mix["end"]) == ("0020", "0100")  # the last back-edge to 0020 ends it
    assert mix["instructions"] == 15
    assert mix["mma"] == 2  # HMMA; HFMA2.MMA is no MMA, the HMMA at 0130 is in another loop
    assert mix["non_mma_per_mma"] == 6.5
    assert mix["nested_loops"] == ["0030-0050"]  # the back-edges to 0020 and the forward branch are no nest
    assert mix["ldgsts"] == {"LDGSTS.E.BYPASS.128": 1}
    assert mix["global_loads"] == {"LDG.E.U16": 1}
    assert mix["lds"] == {}  # @!PT LDS never runs
    assert mix["bar"] == 1
    assert mix["division"] == {"CALL (division subroutine)": 1}  # 0180 divides; 0110 is no subroutine


def test_check_reasons():
    reasons = sass.misses(mix_of(NESTED))
    assert len(reasons) == 3, reasons
    assert "loop nested inside the main loop (0030-0050)" in reasons[0]
    assert "division-like instructions (CALL (division subroutine) x1)" in reasons[1]
    assert "6.5 non-MMA instructions per MMA" in reasons[2]


def test_ties_go_to_the_innermost_loop():
    mix = mix_of(OUTER_AROUND_INNER)
    assert (mix["start"], mix["end"], mix["mma"], mix["nested_loops"]) == ("0020", "0040", 1, [])


def test_without_mma_the_loop_with_most_fma_is_reported_without_tensor_cores():
    mix = mix_of(SIMT)
    assert (mix["start"], mix["end"], mix["fma"], mix["tensor_cores"]) == ("0020", "0040", 2, False)
    assert mix_of(STRAIGHT) is None  # no loop: the branch to itself is the trap, not a loop


def test_short_names():
    assert sass.short_name("void partialconv::cuda::implicit_gemm_kernel<partialconv::cuda::ForwardGemm<"
                           "c10::Half, float, int, partialconv::cuda::TensorCoreCore<c10::Half> > >("
                           "partialconv::cuda::ForwardGemm<c10::Half, float, int, partialconv::cuda::"
                           "TensorCoreCore<c10::Half> >)") == \
        "implicit_gemm_kernel<ForwardGemm<Half, float, int, TensorCoreCore<Half>>>"
    assert sass.short_name("void a::K<a::B<a::C<a::D<int>, 2> > >(int)") == "K<B<C<D<...>, 2>>>"
    assert sass.short_name("simt_dot(float const*, float*, int)") == "simt_dot"


@pytest.fixture(scope="module")
def cubins(tmp_path_factory):
    """{(source stem, arch): cubin}, each compiled once for the module."""
    folder = tmp_path_factory.mktemp("sass")
    built = {}
    for source in (PIPELINED, DIVISION_NESTED):
        for arch in ARCHS:
            cubin = folder / f"{source.stem}_{arch}.cubin"
            command = [NVCC, "-std=c++17", f"-arch={arch}", "-cubin", f"-I{REPO / 'csrc'}", str(source),
                       "-o", str(cubin)]
            result = subprocess.run(command, capture_output=True, text=True)
            assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout}{result.stderr}"
            built[source.stem, arch] = cubin
    return built


def record(cubins, source, arch, kernel):
    (found,) = [r for r in sass.analyse(cubins[source.stem, arch], CUOBJDUMP) if r["kernel"] == kernel]
    assert found["arch"] == arch
    return found


@needs_cuda_tools
@pytest.mark.parametrize("arch", ARCHS)
def test_pipelined_mma_loop_meets_the_target(cubins, arch):
    found = record(cubins, PIPELINED, arch, "pipelined_mma")
    mix = found["main_loop"]
    assert mix["tensor_cores"] and mix["mma"] == 16  # 2 x 4 mma per k-step, 2 k-steps per k-tile
    assert {sass._width(opcode) for opcode in mix["ldgsts"]} == {"128"}
    assert sum(mix["ldgsts"].values()) == 4 and mix["global_loads"] == {}
    assert sum(mix["ldsm"].values()) == 8
    assert (mix["bar"], mix["depbar"], mix["ldgdepbar"]) == (1, 1, 1)
    assert mix["nested_loops"] == [] and mix["division"] == {}
    assert mix["non_mma_per_mma"] <= sass.MAX_NON_MMA_PER_MMA
    assert found["misses"] == []


@needs_cuda_tools
@pytest.mark.parametrize("arch", ARCHS)
def test_gathering_dividing_loop_misses_the_target(cubins, arch):
    found = record(cubins, DIVISION_NESTED, arch, "gathered_mma")
    mix = found["main_loop"]
    assert mix["tensor_cores"] and mix["mma"] == 2
    assert len(mix["nested_loops"]) >= 1  # the gather loop
    assert mix["ldgsts"] == {} and sum(mix["global_loads"].values()) >= 3
    divisions = {sass._division_kind(opcode) for opcode in mix["division"]}
    assert {"I2F", "RCP", "F2I", "CALL"} <= divisions, mix["division"]
    assert mix["bar"] == 2
    reasons = " | ".join(found["misses"])
    for expected in ("loop nested", "no 16-byte global loads", "narrower than 16 bytes", "division-like",
                     "2 BAR", "non-MMA instructions per MMA"):
        assert expected in reasons


@needs_cuda_tools
def test_simt_loop_is_reported_without_tensor_cores(cubins):
    found = record(cubins, DIVISION_NESTED, "sm_80", "simt_dot")
    assert found["main_loop"]["fma"] >= 1 and found["main_loop"]["mma"] == 0
    assert found["misses"] is None


@needs_cuda_tools
@pytest.mark.parametrize(("source", "returncode"), [(PIPELINED, 0), (DIVISION_NESTED, 1)])
def test_check_exit_status_and_json(cubins, tmp_path, source, returncode):
    out = tmp_path / "sass.json"
    command = [sys.executable, "-m", "bench.sass", "--library", str(cubins[source.stem, "sm_90"]), "--check",
               "--json", str(out), "--cuobjdump", CUOBJDUMP]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    assert result.returncode == returncode, result.stdout + result.stderr
    kernels = json.loads(out.read_text())["kernels"]
    assert {k["kernel"] for k in kernels} == ({"pipelined_mma"} if returncode == 0 else {"gathered_mma", "simt_dot"})
    if returncode:
        assert "gathered_mma [sm_90]" in result.stdout and "loop nested inside the main loop" in result.stdout


@needs_cuda_tools
def test_kernel_filter(cubins):
    records = sass.analyse(cubins[DIVISION_NESTED.stem, "sm_80"], CUOBJDUMP, kernel_pattern="simt")
    assert [r["kernel"] for r in records] == ["simt_dot"]
