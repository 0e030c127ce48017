"""The CUDA kernels' own source (csrc/cuda/: the launches the extension makes, their plans and
workspaces), run on the CPU under the host emulation of the CUDA execution model
(tests/cuda_emulation/), against the float64 reference: tiling, the multistage cp.async pipeline,
tensor-core fragments, stride phases, split-K, the layout passes and the epilogues are checked on
every commit, without a GPU.

Every case runs under ASan/UBSan with cp.async copies landing at their covering wait (a read
before the wait sees stale data); the kernel variants also run under ThreadSanitizer with copies
landing when issued and at random legal moments (a stage refilled while another warp reads it is
a race), as emulation_build.KERNEL_TEST_RUNS recommends. Bank conflicts of the GEMM kernels'
shared-memory accesses (ldmatrix, cp.async, shared loads) must be 0."""
import re
import struct

import pytest
import torch
import torch.utils.cpp_extension

import emulation_build
from conftest import random_problem
from partialconv_cuda import partial_conv_reference
from partialconv_cuda.ops import conv_output_size

HARNESS = emulation_build.EMULATION_DIR / "run_partial_conv.cpp"
DTYPES = {torch.float64: 0, torch.float32: 1, torch.float16: 2, torch.bfloat16: 3}
ACTIVATIONS = {None: 0, "relu": 1, "leaky_relu": 2}
NORMALIZATIONS = {"window": 0, "sum": 1}
# The kernels' #pragma unroll means nothing to g++; c10's Half and BFloat16 come from torch.
EXTRA_FLAGS = ("-Wno-unknown-pragmas", f"-I{torch.utils.cpp_extension.include_paths()[0]}")
RUN_TIMEOUT_S = 900


@pytest.fixture(scope="session")
def harness(tmp_path_factory):
    return emulation_build.build_sanitized(HARNESS, tmp_path_factory.mktemp("emulation"), "run_partial_conv",
                                           extra_flags=EXTRA_FLAGS)


def spatial(values, dims, fill):
    """A per-dimension value as the harness's 3 dimensions (leading `fill`)."""
    values = tuple(values) if isinstance(values, (tuple, list)) else (values,) * dims
    return (fill,) * (3 - dims) + values


def run_emulated(binary, directory, case, dtype, x, m, w, b, grad, landing, vendor=False):
    """Forward and backward through the emulated kernels (vendor: the vendor path's passes around a
    host convolution); returns (dict of float64 tensors, stdout)."""
    dims = x.dim() - 2
    n, cin = x.shape[:2]
    cout = w.shape[0]
    header = [DTYPES[dtype], int(case.get("tf32", False)), case.get("index64", 0), case.get("channels_last", 0), dims,
              n, cin, cout, case["groups"], *spatial(x.shape[2:], dims, 1), *spatial(w.shape[2:], dims, 1),
              *spatial(case["stride"], dims, 1), *spatial(case["padding"], dims, 0), *spatial(case["dilation"], dims, 1),
              1 if m is None else m.shape[0], 0 if m is None else m.shape[1], int(b is not None),
              ACTIVATIONS[case["activation"]], 1, 1, int(b is not None), case.get("multiprocessors", 132),
              NORMALIZATIONS[case.get("normalization", "window")]]
    arrays = [t for t in (x, m, w, b, grad) if t is not None]
    case_file, result_file = directory / "case.bin", directory / "result.bin"
    with open(case_file, "wb") as f:
        f.write(struct.pack(f"<{len(header)}q", *header))
        f.write(struct.pack("<d", case.get("negative_slope", 0.2)))
        for t in arrays:  # without numpy, which the package does not need
            values = t.double().flatten().tolist()
            f.write(struct.pack(f"<{len(values)}d", *values))
    result = emulation_build.run(binary, *(["--vendor"] if vendor else []), str(case_file), str(result_file),
                                 timeout=RUN_TIMEOUT_S, cp_async=landing)
    assert result.returncode == 0, result.stdout + result.stderr
    values = torch.frombuffer(bytearray(result_file.read_bytes()), dtype=torch.float64)
    out_spatial = grad.shape[2:]
    mask_batch = 1 if m is None else m.shape[0]
    shapes = {"output": grad.shape, "updated_mask": (mask_batch, 1, *out_spatial),
              "mask_scales": (mask_batch, 2, *out_spatial), "grad_input": x.shape, "grad_weight": w.shape}
    if b is not None:
        shapes["grad_bias"] = b.shape
    results, offset = {}, 0
    for name, shape in shapes.items():
        count = torch.Size(shape).numel()
        results[name] = values[offset:offset + count].view(shape)
        offset += count
    assert offset == values.numel()
    return results, result.stdout


def expected(case, x, m, w, b, grad):
    """Float64 reference outputs and gradients for the (rounded) inputs the kernels saw."""
    leaves = [None if t is None else t.detach().to(torch.float64, copy=True).requires_grad_() for t in (x, w, b)]
    mask = None if m is None else m.double()
    kwargs = {k: case[k] for k in ("stride", "padding", "dilation", "groups", "activation")}
    normalization = case.get("normalization", "window")
    out, updated = partial_conv_reference(leaves[0], mask, leaves[1], leaves[2], normalization=normalization,
                                          negative_slope=case.get("negative_slope", 0.2), **kwargs)
    out.backward(grad.double())
    dims = x.dim() - 2
    conv = {1: torch.nn.functional.conv1d, 2: torch.nn.functional.conv2d, 3: torch.nn.functional.conv3d}[dims]
    source = torch.ones(1, 1, *x.shape[2:], dtype=torch.float64) if mask is None else mask
    window_sum = conv(source, torch.ones(1, source.shape[1], *w.shape[2:], dtype=torch.float64), None,
                      case["stride"], case["padding"], case["dilation"])
    window_size = source.shape[1] * w.shape[2:].numel() if normalization == "window" else 1
    update = window_sum.clamp(0, 1)
    ratio = torch.where(window_sum > 0, window_size / window_sum.clamp_min(1), 0)
    results = {"output": out.detach(), "updated_mask": update[:, :1], "mask_scales": torch.cat([ratio, update], 1),
               "grad_input": leaves[0].grad, "grad_weight": leaves[1].grad}
    if b is not None:
        results["grad_bias"] = leaves[2].grad
    return results


def make_inputs(case, dtype, seed):
    n, cin, cout = case.get("n", 2), case.get("cin", 4), case.get("cout", 6)
    size = case.get("size", (9, 11))
    mask_kind = "single" if case["mask"] == "big_hole" else case["mask"]
    x, m, w, b = random_problem(n=n, cin=cin, cout=cout, size=size, kernel=case["kernel"], groups=case["groups"],
                                bias=case.get("bias", True), mask=mask_kind, dtype=dtype, seed=seed)
    if case["mask"] == "big_hole":
        m[:, :, 2:20] = 0
    if case.get("poison_holes"):  # NaN and +-Inf where the mask is 0
        holes = (m == 0).expand_as(x)
        poison = torch.tensor([float("nan"), float("inf"), -float("inf")], dtype=x.dtype)
        x = torch.where(holes, poison[torch.arange(x.numel()).view(x.shape) % 3], x)
    dims = len(size)
    out = conv_output_size(size, case["kernel"], spatial(case["stride"], dims, 1)[3 - dims:],
                           spatial(case["padding"], dims, 0)[3 - dims:], spatial(case["dilation"], dims, 1)[3 - dims:])
    grad = torch.randn(n, cout, *out, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64).to(dtype)
    return x, m, w, b, grad


def compare(got, want, dtype, tf32=False):
    if dtype == torch.float64:
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        return
    eps = 2.0 ** -10 if tf32 else torch.finfo(dtype).eps
    scale = want.abs().amax().item() if want.numel() else 1.0
    torch.testing.assert_close(got, want, rtol=4 * eps, atol=8 * eps * max(scale, 1.0))


def check(case, dtype, harness, tmp_path, seed, runs=((emulation_build.ADDRESS, "wait"),), vendor=False):
    inputs = make_inputs(case, dtype, seed=seed)
    if case.get("poison_holes"):  # the reference sees the clean input: NaN in holes must not matter
        clean = list(inputs)
        clean[0] = torch.where((inputs[1] == 0).expand_as(inputs[0]), 0.0, inputs[0])
        want = expected(case, *clean)
    else:
        want = expected(case, *inputs)
    for sanitizer, landing in runs:
        got, stdout = run_emulated(harness[sanitizer], tmp_path, case, dtype, *inputs, landing=landing, vendor=vendor)
        for name in want:
            compare(got[name], want[name], dtype, tf32=case.get("tf32", False))
        assert "bank conflicts: 0\n" in stdout, stdout
    return stdout


def case_id(case):
    if isinstance(case, torch.dtype):
        return str(case).removeprefix("torch.")
    join = lambda v: "x".join(map(str, v)) if isinstance(v, (tuple, list)) else str(v)  # noqa: E731
    return (f"{len(case['kernel'])}d-k{join(case['kernel'])}-s{join(case['stride'])}-g{case['groups']}-{case['mask']}"
            f"-{case['activation']}" + (f"-n{case['n']}" if "n" in case else "")
            + (f"-c{case['cin']}x{case['cout']}" if "cin" in case else "") + ("-tf32" if case.get("tf32") else "")
            + (f"-sm{case['multiprocessors']}" if "multiprocessors" in case else "")
            + (f"-{case['normalization']}" if "normalization" in case else ""))


CASES = [
    dict(kernel=(3, 3), stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=1, mask="single", activation=None),
    dict(kernel=(7, 7), stride=(2, 2), padding=(3, 3), dilation=(1, 1), groups=1, mask="single", activation="relu", n=1, cin=3, cout=8, size=(19, 17)),
    dict(kernel=(5, 3), stride=(2, 1), padding=(2, 0), dilation=(1, 2), groups=2, mask="multi", activation="leaky_relu"),
    dict(kernel=(3, 3), stride=(1, 1), padding=(2, 2), dilation=(2, 2), groups=3, mask="batch1_multi", activation=None, cin=6, cout=9),
    dict(kernel=(1, 1), stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1, mask=None, activation="relu"),
    dict(kernel=(2, 4), stride=(3, 2), padding=(1, 3), dilation=(1, 1), groups=1, mask="soft", activation=None, bias=False),
    dict(kernel=(3, 3), stride=(2, 2), padding=(1, 1), dilation=(1, 1), groups=1, mask="batch1", activation="leaky_relu"),
    dict(kernel=(3, 3), stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=1, mask="empty", activation=None),
    # A hole over whole image rows: tiles of 128 rows of holes only skip their matrix work
    # (test_emulated_hole_tiles_skip_their_matrix_work counts it).
    dict(kernel=(3, 3), stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=1, mask="big_hole", activation="relu", n=2, cin=3, cout=5, size=(24, 24)),
    # Several tiles in both directions and 45 k-tiles (float64): with 132 multiprocessors the
    # reductions split (fixed-order sums), with one they do not.
    dict(kernel=(3, 3), stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=1, mask="single", activation=None, n=2, cin=40, cout=130, size=(20, 20)),
    dict(kernel=(3, 3), stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=1, mask="single", activation=None, n=2, cin=40, cout=130, size=(20, 20), multiprocessors=1),
    dict(kernel=(3, 3), stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=1, mask="single", activation=None, n=0),
    # 1-D and 3-D on the same kernels.
    dict(kernel=(5,), stride=(2,), padding=(2,), dilation=(1,), groups=2, mask="multi", activation="leaky_relu", size=(23,)),
    dict(kernel=(3, 3, 3), stride=(1, 2, 2), padding=(1, 1, 1), dilation=(1, 1, 1), groups=1, mask="single", activation="relu", size=(4, 7, 6)),
    dict(kernel=(3, 2, 3), stride=(2, 1, 1), padding=(0, 1, 2), dilation=(1, 2, 1), groups=2, mask="soft", activation=None, size=(5, 6, 5)),
]
# Reductions of many k-tiles with channels that fill whole chunks and several taps per k-tile,
# on each element type: 16-bit (k-tiles of 32), TF32 and float (16), double (8).
PIPELINE_CASES = [
    dict(kernel=(3, 3), stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=1, mask="single", activation="relu", n=1, cin=40, cout=24, size=(12, 11)),
    dict(kernel=(1, 1), stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1, mask=None, activation=None, n=1, cin=67, cout=131, size=(12, 11)),
]


# Every case also runs with the copies landing at one of the three legal moments (ASan): at the
# covering wait (a read before it sees stale data), at issue, or at random moments; the pipeline
# cases below add the ThreadSanitizer runs.
def landing_runs(landing):
    return ((emulation_build.ADDRESS, landing),)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_emulated_kernels_float64(case, harness, tmp_path):
    check(case, torch.float64, harness, tmp_path, seed=3, runs=landing_runs("wait"))


# normalization="sum" (ratio U / S instead of winsize * U / S): one constant of the mask-scales
# kernel that the fused and the vendor path share.
SUM_NORMALIZATION_CASES = [
    dict(kernel=(3, 3), stride=(2, 1), padding=(1, 1), dilation=(1, 1), groups=1, mask="multi", activation="relu",
         normalization="sum"),
    dict(kernel=(3, 3, 3), stride=(1, 2, 2), padding=(1, 1, 1), dilation=(1, 1, 1), groups=1, mask="single",
         activation=None, size=(4, 7, 6), normalization="sum"),
]


@pytest.mark.parametrize("vendor", [False, True], ids=["fused", "vendor"])
@pytest.mark.parametrize("case", SUM_NORMALIZATION_CASES, ids=case_id)
def test_emulated_sum_normalization(case, vendor, harness, tmp_path):
    check(case, torch.float64, harness, tmp_path, seed=5, vendor=vendor)


LOW_PRECISION = [(torch.float32, False), (torch.float32, True), (torch.float16, False), (torch.bfloat16, False)]


@pytest.mark.parametrize(("dtype", "tf32"), LOW_PRECISION, ids=["float32", "tf32", "float16", "bfloat16"])
@pytest.mark.parametrize("case", [CASES[1], CASES[2], CASES[3], CASES[8], CASES[12], CASES[13]], ids=case_id)
def test_emulated_kernels_low_precision(case, dtype, tf32, harness, tmp_path):
    check(dict(case, tf32=tf32), dtype, harness, tmp_path, seed=5, runs=landing_runs("random"))


@pytest.mark.parametrize(("dtype", "tf32"), [*LOW_PRECISION, (torch.float64, False)],
                         ids=["float32", "tf32", "float16", "bfloat16", "float64"])
@pytest.mark.parametrize("case", PIPELINE_CASES, ids=case_id)
def test_emulated_pipeline_every_copy_landing(case, dtype, tf32, harness, tmp_path):
    """Every kernel variant (element type) under ASan with copies landing at the wait, and under
    TSan with copies landing when issued and at random legal moments."""
    check(dict(case, tf32=tf32), dtype, harness, tmp_path, seed=7, runs=emulation_build.KERNEL_TEST_RUNS)


@pytest.mark.parametrize("layout", [dict(index64=1), dict(channels_last=1), dict(index64=1, channels_last=1)],
                         ids=["int64", "channels_last", "int64-channels_last"])
@pytest.mark.parametrize(("case", "dtype"), [(CASES[2], torch.float64), (CASES[13], torch.float64),
                                             (CASES[2], torch.float16), (CASES[2], torch.bfloat16)], ids=case_id)
def test_emulated_kernels_index_width_and_layout(case, dtype, layout, harness, tmp_path):
    check(dict(case, **layout), dtype, harness, tmp_path, seed=11, runs=landing_runs("issue"))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_emulated_nan_in_holes_is_never_read(dtype, harness, tmp_path):
    case = dict(CASES[8], poison_holes=True)
    check(case, dtype, harness, tmp_path, seed=13)


def mma_instructions(stdout):
    """The harness's counts of warp mma instructions: {"forward": n, "backward": n}."""
    return {p: int(re.search(rf"^{p} mma instructions: (\d+)$", stdout, re.M).group(1)) for p in ("forward", "backward")}


@pytest.mark.parametrize("dtype", [torch.float16, "tf32"], ids=str)
def test_emulated_hole_tiles_skip_their_matrix_work(dtype, harness, tmp_path):
    """Forward, tiles of output positions that are all holes run no matrix work: the big-hole case
    (whole tiles of holes) executes fewer mma instructions than the same shape without a mask,
    while holes scattered over every tile (40% of the pixels) save none; backward (which does not
    skip tiles) executes as many in all three. Outputs and gradients are checked against the
    reference in each run (no activation: a relu's derivative at outputs within rounding of 0
    would differ from the float64 reference's). Tensor-core element types only: float and double
    run on CUDA cores, whose steps the emulator does not count."""
    big_hole = dict(CASES[8], activation=None, tf32=dtype == "tf32")
    assert big_hole["mask"] == "big_hole"
    dtype = torch.float32 if dtype == "tf32" else dtype
    counts = {kind: mma_instructions(check(dict(big_hole, mask=kind), dtype, harness, tmp_path, seed=3))
              for kind in ("big_hole", "single", None)}
    assert counts[None]["forward"] > 0 and counts[None]["backward"] > 0, counts
    assert counts["big_hole"]["forward"] < counts["single"]["forward"] == counts[None]["forward"], counts
    assert counts["big_hole"]["backward"] == counts["single"]["backward"] == counts[None]["backward"], counts


@pytest.mark.parametrize(("case", "splits"), [(CASES[10], False), (CASES[9], True)], ids=["one-sm", "132-sms"])
def test_emulated_split_reduction(case, splits, harness, tmp_path):
    stdout = check(case, torch.float64, harness, tmp_path, seed=17)
    plans = [line for line in stdout.splitlines() if line.startswith(("forward:", "backward:"))]
    assert len(plans) == 2
    for plan in plans:
        slices = [int(n) for n in re.findall(r"reduction in (?:up to )?(\d+) slice", plan)]
        assert slices and (max(slices) > 1) == splits, plan


# The vendor path's passes (X*M, the epilogue, dL/dconv with dL/db, M * dL/dXm, and the mask
# scales), around a naive host convolution in cuDNN's place: every case in float64, the layouts,
# index widths and 16-bit types on a few, NaN in holes, and the passes' one shared-memory kernel
# (grad_bias) under ThreadSanitizer.
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_emulated_vendor_passes_float64(case, harness, tmp_path):
    check(case, torch.float64, harness, tmp_path, seed=19, vendor=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=case_id)
@pytest.mark.parametrize("layout", [dict(), dict(index64=1, channels_last=1)], ids=["nchw-int32", "channels_last-int64"])
@pytest.mark.parametrize("case", [CASES[2], CASES[3], CASES[13]], ids=case_id)
def test_emulated_vendor_passes_low_precision(case, layout, dtype, harness, tmp_path):
    check(dict(case, **layout), dtype, harness, tmp_path, seed=23, vendor=True)


def test_emulated_vendor_passes_nan_in_holes_and_threads(harness, tmp_path):
    check(dict(CASES[8], poison_holes=True, channels_last=1), torch.float16, harness, tmp_path, seed=29,
          runs=emulation_build.KERNEL_TEST_RUNS, vendor=True)


def test_dividers(harness):
    """The multiply-high dividers of the index decode equal / and % (int32 and int64)."""
    result = emulation_build.run(harness[emulation_build.ADDRESS], "--check-dividers", timeout=RUN_TIMEOUT_S)
    assert result.returncode == 0 and "0 failures" in result.stdout, result.stdout + result.stderr


def test_every_pconv_unet_layer_fills_a_wave(harness, tmp_path):
    """At the GPU benchmark's size (batch 8, 512x512, float16), every GEMM launch of every
    PConvUNet layer (forward, grad_weight, the stride phases of grad_input) has at least one block
    per multiprocessor of an H100/H200 (132): the reduction splits where the tiles are too few."""
    from bench.workloads import LAYER_NAMES, SUITE, layer_workloads

    case_file = tmp_path / "plan.bin"
    for workload in layer_workloads(SUITE, LAYER_NAMES, 8, 512, 512, [0.3]):
        layer = workload.layer
        k, s, pad = layer.kernel_size, layer.stride, layer.padding
        header = [DTYPES[torch.float16], 0, 0, 0, 2, 8, layer.in_channels, layer.out_channels, 1,
                  1, workload.height, workload.width, 1, k, k, 1, s, s, 0, pad, pad, 1, 1, 1,
                  8, layer.in_channels if layer.multi_channel else 1, int(layer.bias), 0, 1, 1, 1, 132, 0]
        case_file.write_bytes(struct.pack(f"<{len(header)}q", *header) + struct.pack("<d", 0.2))
        result = emulation_build.run(harness[emulation_build.ADDRESS], "--plan", str(case_file))
        assert result.returncode == 0, result.stderr
        launches = [line.split() for line in result.stdout.splitlines()]
        assert {name for name, _ in launches} == {"forward", "grad_weight", "grad_input"}
        for name, blocks in launches:
            assert int(blocks) >= 132, f"{layer.name} {name}: {blocks} blocks"
