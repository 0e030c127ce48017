"""The CUDA kernels' own source, run on the CPU under the host emulation of the CUDA execution
model (tests/cuda_emulation/), against the float64 reference: indexing, tiling, bounds, barriers,
split-K and the epilogues are checked on every commit, without a GPU. Built with ASan and UBSan;
a few cases also run under ThreadSanitizer to catch races between the emulated threads."""
import struct

import pytest
import torch
import torch.utils.cpp_extension

import emulation_build
from conftest import random_problem
from partialconv_cuda import partial_conv_reference

HARNESS = emulation_build.EMULATION_DIR / "run_partial_conv2d.cpp"
DTYPES = {torch.float64: 0, torch.float32: 1, torch.float16: 2, torch.bfloat16: 3}
ACTIVATIONS = {None: 0, "relu": 1, "leaky_relu": 2}
SANITIZERS = {"address": "-fsanitize=address,undefined", "thread": "-fsanitize=thread"}
# The kernels' #pragma unroll means nothing to g++; c10's Half and BFloat16 come from torch.
EXTRA_FLAGS = ("-Wno-unknown-pragmas", f"-I{torch.utils.cpp_extension.include_paths()[0]}")
RUN_TIMEOUT_S = 600


@pytest.fixture(scope="session")
def harness(tmp_path_factory):
    directory = tmp_path_factory.mktemp("emulation")
    return {name: emulation_build.build(HARNESS, directory / f"run_partial_conv2d_{name}", flag,
                                        extra_flags=EXTRA_FLAGS)
            for name, flag in SANITIZERS.items()}


def run_emulated(binary, directory, case, x, m, w, b, grad):
    """Forward and backward through the emulated kernels; returns a dict of float64 tensors."""
    n, cin, height, width = x.shape
    cout, _, kh, kw = w.shape
    header = [DTYPES[x.dtype], case.get("index64", 0), case.get("channels_last", 0),
              n, cin, height, width, cout, kh, kw, *case["stride"], *case["padding"],
              *case["dilation"], case["groups"],
              1 if m is None else m.shape[0], 0 if m is None else m.shape[1],
              int(b is not None), ACTIVATIONS[case["activation"]], 1, 1, int(b is not None),
              case.get("multiprocessors", 132)]
    arrays = [t for t in (x, m, w, b, grad) if t is not None]
    case_file, result_file = directory / "case.bin", directory / "result.bin"
    with open(case_file, "wb") as f:
        f.write(struct.pack(f"<{len(header)}q", *header))
        f.write(struct.pack("<d", case.get("negative_slope", 0.2)))
        for t in arrays:
            f.write(t.double().contiguous().numpy().tobytes())
    result = emulation_build.run(binary, str(case_file), str(result_file), timeout=RUN_TIMEOUT_S)
    assert result.returncode == 0, result.stdout + result.stderr
    values = torch.frombuffer(bytearray(result_file.read_bytes()), dtype=torch.float64)
    out_h, out_w = grad.shape[2:]
    mask_batch = 1 if m is None else m.shape[0]
    shapes = {"output": grad.shape, "updated_mask": (mask_batch, 1, out_h, out_w),
              "mask_scales": (mask_batch, 2, out_h, out_w), "grad_input": x.shape, "grad_weight": w.shape}
    if b is not None:
        shapes["grad_bias"] = b.shape
    results, offset = {}, 0
    for name, shape in shapes.items():
        count = torch.Size(shape).numel()
        results[name] = values[offset:offset + count].view(shape)
        offset += count
    assert offset == values.numel()
    return results


def expected(case, x, m, w, b, grad):
    """Float64 reference outputs and gradients for the (rounded) inputs the kernels saw."""
    leaves = [None if t is None else t.double().requires_grad_() for t in (x, w, b)]
    mask = None if m is None else m.double()
    kwargs = {k: case[k] for k in ("stride", "padding", "dilation", "groups", "activation")}
    out, updated = partial_conv_reference(leaves[0], mask, leaves[1], leaves[2],
                                            negative_slope=case.get("negative_slope", 0.2), **kwargs)
    out.backward(grad.double())
    kh, kw = w.shape[2:]
    source = torch.ones(1, 1, *x.shape[2:], dtype=torch.float64) if mask is None else mask
    window_sum = torch.nn.functional.conv2d(
        source, torch.ones(1, source.shape[1], kh, kw, dtype=torch.float64), None,
        case["stride"], case["padding"], case["dilation"])
    window_size = source.shape[1] * kh * kw
    update = window_sum.clamp(0, 1)
    ratio = torch.where(window_sum > 0, window_size / window_sum.clamp_min(1), 0)
    results = {"output": out.detach(), "updated_mask": update, "mask_scales": torch.cat([ratio, update], 1),
               "grad_input": leaves[0].grad, "grad_weight": leaves[1].grad}
    if b is not None:
        results["grad_bias"] = leaves[2].grad
    return results


CASES = [
    dict(kernel=(3, 3), stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=1, mask="single", activation=None),
    dict(kernel=(7, 7), stride=(2, 2), padding=(3, 3), dilation=(1, 1), groups=1, mask="single", activation="relu", n=1, cin=3, cout=8, size=(19, 17)),
    dict(kernel=(5, 3), stride=(2, 1), padding=(2, 0), dilation=(1, 2), groups=2, mask="multi", activation="leaky_relu"),
    dict(kernel=(3, 3), stride=(1, 1), padding=(2, 2), dilation=(2, 2), groups=3, mask="batch1_multi", activation=None, cin=6, cout=9),
    dict(kernel=(1, 1), stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1, mask=None, activation="relu"),
    dict(kernel=(2, 4), stride=(3, 2), padding=(1, 3), dilation=(1, 1), groups=1, mask="soft", activation=None, bias=False),
    dict(kernel=(3, 3), stride=(2, 2), padding=(1, 1), dilation=(1, 1), groups=1, mask="batch1", activation="leaky_relu"),
    dict(kernel=(3, 3), stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=1, mask="empty", activation=None),
    # a hole over whole image rows, so whole row tiles see no valid pixel: the forward skips their
    # matrix work (10 of 18 tiles of 64 rows, 4 of 9 of 128)
    dict(kernel=(3, 3), stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=1, mask="big_hole", activation="relu", n=2, cin=3, cout=5, size=(24, 24)),
    # enough rows and output channels for several tiles in both directions and a split-K grad_weight
    dict(kernel=(3, 3), stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=1, mask="single", activation=None, n=2, cin=5, cout=70, size=(36, 33)),
    dict(kernel=(3, 3), stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=1, mask="single", activation=None, n=2, cin=5, cout=70, size=(36, 33), multiprocessors=1),
    dict(kernel=(3, 3), stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=1, mask="single", activation=None, n=0),
]


# float16 and bfloat16 run on the tensor-core matrix core: 128x64 block tiles, the reduction walked
# 32 at a time. Here: several tiles and k-steps, the last ones partial, in every product (forward
# 132 x 131, grad_input 132 x 67, grad_weight 131 x 67; reductions 67, 131 and 132); a split-K
# grad_weight (1122 output positions: slices of 576 and 546); skipped tiles; the empty batch.
# Groups: CASES[2:4] in the low-precision test; int64 and channels_last: the layout test.
TENSOR_CORE_CASES = [
    dict(kernel=(1, 1), stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1, mask="single", activation="relu", n=1, cin=67, cout=131, size=(12, 11)),
    dict(kernel=(3, 3), stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=1, mask="single", activation=None, n=1, cin=2, cout=3, size=(33, 34)),
    CASES[8],
    CASES[11],
]
HALF_DTYPES = [torch.float16, torch.bfloat16]


def make_inputs(case, dtype, seed):
    n, cin, cout = case.get("n", 2), case.get("cin", 4), case.get("cout", 6)
    size = case.get("size", (9, 11))
    mask_kind = "single" if case["mask"] == "big_hole" else case["mask"]
    x, m, w, b = random_problem(n=n, cin=cin, cout=cout, size=size, kernel=case["kernel"], groups=case["groups"],
                                bias=case.get("bias", True), mask=mask_kind, dtype=dtype, seed=seed)
    if case["mask"] == "big_hole":
        m[:, :, 2:20, :] = 0
    out_h = (size[0] + 2 * case["padding"][0] - case["dilation"][0] * (case["kernel"][0] - 1) - 1) // case["stride"][0] + 1
    out_w = (size[1] + 2 * case["padding"][1] - case["dilation"][1] * (case["kernel"][1] - 1) - 1) // case["stride"][1] + 1
    grad = torch.randn(n, cout, out_h, out_w, generator=torch.Generator().manual_seed(seed + 1),
                       dtype=torch.float64).to(dtype)
    return x, m, w, b, grad


def compare(got, want, dtype):
    if dtype == torch.float64:
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        return
    eps = torch.finfo(dtype).eps
    scale = want.abs().amax().item() if want.numel() else 1.0
    torch.testing.assert_close(got, want, rtol=4 * eps, atol=8 * eps * max(scale, 1.0))


def case_id(case):
    if isinstance(case, torch.dtype):
        return str(case).removeprefix("torch.")
    return "k{kernel[0]}x{kernel[1]}-s{stride[0]}{stride[1]}-g{groups}-{mask}-{activation}".format(**case) + (
        f"-n{case['n']}" if "n" in case else "") + (f"-c{case['cin']}x{case['cout']}" if "cin" in case else "") + (
        f"-sm{case['multiprocessors']}" if "multiprocessors" in case else "")


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_emulated_kernels_float64(case, harness, tmp_path):
    inputs = make_inputs(case, torch.float64, seed=3)
    got = run_emulated(harness["address"], tmp_path, case, *inputs)
    want = expected(case, *inputs)
    for name in want:
        compare(got[name], want[name], torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, *HALF_DTYPES], ids=case_id)
@pytest.mark.parametrize("case", CASES[1:4], ids=case_id)
def test_emulated_kernels_low_precision(case, dtype, harness, tmp_path):
    inputs = make_inputs(case, dtype, seed=5)
    got = run_emulated(harness["address"], tmp_path, case, *inputs)
    want = expected(case, *inputs)
    for name in want:
        compare(got[name], want[name], dtype)


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=case_id)
@pytest.mark.parametrize("case", TENSOR_CORE_CASES, ids=case_id)
def test_emulated_tensor_core_kernels(case, dtype, harness, tmp_path):
    inputs = make_inputs(case, dtype, seed=7)
    got = run_emulated(harness["address"], tmp_path, case, *inputs)
    want = expected(case, *inputs)
    for name in want:
        compare(got[name], want[name], dtype)


@pytest.mark.parametrize("layout", [dict(index64=1), dict(channels_last=1), dict(index64=1, channels_last=1)],
                         ids=["int64", "channels_last", "int64-channels_last"])
@pytest.mark.parametrize(("case", "dtype"), [(CASES[2], torch.float64), (CASES[9], torch.float64),
                                             *((CASES[2], dtype) for dtype in HALF_DTYPES)], ids=case_id)
def test_emulated_kernels_index_width_and_layout(case, dtype, layout, harness, tmp_path):
    case = dict(case, **layout)
    inputs = make_inputs(case, dtype, seed=11)
    got = run_emulated(harness["address"], tmp_path, case, *inputs)
    want = expected(case, *inputs)
    for name in want:
        compare(got[name], want[name], dtype)


# CASES[1] walks the tensor-core core through several k-steps and row tiles.
@pytest.mark.parametrize(("case", "dtype"), [(CASES[2], torch.float32), (CASES[8], torch.float32),
                                             (CASES[1], torch.float16)], ids=case_id)
def test_emulated_kernels_race_free(case, dtype, harness, tmp_path):
    """ThreadSanitizer: every shared-memory access of the emulated block is ordered by a barrier."""
    inputs = make_inputs(case, dtype, seed=13)
    got = run_emulated(harness["thread"], tmp_path, case, *inputs)
    want = expected(case, *inputs)
    for name in want:
        compare(got[name], want[name], dtype)


def test_dividers(harness):
    """The multiply-high dividers of the index decode equal / and % (int32 and int64)."""
    result = emulation_build.run(harness["address"], "--check-dividers", timeout=RUN_TIMEOUT_S)
    assert result.returncode == 0 and "0 failures" in result.stdout, result.stdout + result.stderr
