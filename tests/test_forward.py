"""The op against the float64 pure-PyTorch reference, over a randomized grid of problems."""
import random

import pytest
import torch

from conftest import random_mask, random_problem, stable_seed, to_device
from partialconv_cuda import partial_conv2d, partial_conv_reference

MASK_KINDS = [None, "single", "multi", "soft", "batch1", "batch1_multi", "empty"]
ACTIVATIONS = [None, "relu", "leaky_relu"]


def random_cases(count, seed):
    """Conv configurations: kernels 1..7 square and rectangular, stride, padding, dilation, groups,
    every mask kind, bias on/off, every activation."""
    rng = random.Random(seed)
    cases = []
    for i in range(count):
        kh, kw = rng.randint(1, 7), rng.randint(1, 7)
        if i % 3 == 0:
            kw = kh
        groups = rng.choice([1, 1, 2, 3])
        case = dict(
            n=rng.choice([1, 2, 3]),
            cin=groups * rng.randint(1, 3),
            cout=groups * rng.randint(1, 3),
            kernel=(kh, kw),
            stride=(rng.randint(1, 3), rng.randint(1, 3)),
            padding=(rng.randint(0, 3), rng.randint(0, 3)),
            dilation=(rng.randint(1, 2), rng.randint(1, 2)),
            groups=groups,
            mask=MASK_KINDS[i % len(MASK_KINDS)],
            bias=rng.random() < 0.7,
            activation=ACTIVATIONS[i % len(ACTIVATIONS)],
        )
        # big enough for the dilated kernel, odd sizes to catch index slips
        case["size"] = (rng.randint(case["dilation"][0] * (kh - 1) + 1, 15),
                        rng.randint(case["dilation"][1] * (kw - 1) + 1, 15))
        cases.append(case)
    return cases


CASES = random_cases(84, seed=1234)


def run_both(case, device, dtype=torch.float64, seed=0):
    x, m, w, b = to_device(
        random_problem(n=case["n"], cin=case["cin"], cout=case["cout"], size=case["size"],
                       kernel=case["kernel"], groups=case["groups"], bias=case["bias"],
                       mask=case["mask"], dtype=dtype, seed=seed),
        device,
    )
    kwargs = dict(stride=case["stride"], padding=case["padding"], dilation=case["dilation"],
                  groups=case["groups"], activation=case["activation"], negative_slope=0.2)
    return partial_conv2d(x, m, w, b, **kwargs), partial_conv_reference(x, m, w, b, **kwargs), (x, m, w, b)


def case_id(case):
    return ("k{kernel[0]}x{kernel[1]}-s{stride[0]}{stride[1]}-p{padding[0]}{padding[1]}"
            "-d{dilation[0]}{dilation[1]}-g{groups}-{mask}-b{bias:d}-{activation}".format(**case))


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_matches_reference_float64(case, device):
    (out, mask_out), (ref, ref_mask), _ = run_both(case, device, seed=stable_seed(case))
    assert out.shape == ref.shape and mask_out.shape == ref_mask.shape
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(mask_out, ref_mask, rtol=0, atol=0)
    # not a vacuous comparison: wherever a window sees a valid pixel there are real values
    if (ref_mask > 0).any():
        assert out.abs().max() > 0


def test_grid_covers_the_contract():
    assert sum(c["mask"] != "empty" for c in CASES) > 60
    kinds = {c["mask"] for c in CASES}
    assert kinds == set(MASK_KINDS)
    assert {c["activation"] for c in CASES} == set(ACTIVATIONS)
    assert {c["groups"] for c in CASES} >= {1, 2, 3}
    assert any(c["kernel"][0] != c["kernel"][1] for c in CASES)
    assert {c["kernel"][0] for c in CASES} == set(range(1, 8))
    assert any(c["dilation"] != (1, 1) for c in CASES) and any(c["stride"] != (1, 1) for c in CASES)


@pytest.mark.parametrize("case", CASES[:24], ids=case_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_close_to_float64(dtype, case, device):
    """Half types accumulate in float: on the same (rounded) inputs the result is the float64
    result rounded once (and below, at most 2x the error of the pure-PyTorch layer in that dtype)."""
    (out, mask_out), _, (x, m, w, b) = run_both(case, device, dtype=dtype)
    exact, exact_mask = partial_conv_reference(
        *[None if t is None else t.double() for t in (x, m, w, b)],
        stride=case["stride"], padding=case["padding"], dilation=case["dilation"],
        groups=case["groups"], activation=case["activation"], negative_slope=0.2)
    assert out.dtype == dtype and mask_out.dtype == dtype
    eps = torch.finfo(dtype).eps
    scale = exact.abs().amax().clamp_min(1)
    torch.testing.assert_close(out.double(), exact, rtol=2 * eps, atol=8 * eps * scale)
    torch.testing.assert_close(mask_out.double(), exact_mask, rtol=eps, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_no_worse_than_pytorch_layer(dtype, device):
    errors_ours, errors_pytorch = [], []
    for case in CASES[:24]:
        if case["mask"] == "empty":
            continue
        (out, _), (ref_low, _), (x, m, w, b) = run_both(case, device, dtype=dtype)
        exact, _ = partial_conv_reference(
            *[None if t is None else t.double() for t in (x, m, w, b)],
            stride=case["stride"], padding=case["padding"], dilation=case["dilation"],
            groups=case["groups"], activation=case["activation"], negative_slope=0.2)
        errors_ours.append((out.double() - exact).abs().max().item())
        errors_pytorch.append((ref_low.double() - exact).abs().max().item())
    assert max(errors_ours) <= 2 * max(errors_pytorch)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_nan_and_inf_in_holes_contribute_nothing(dtype, device):
    x, m, w, b = random_problem(n=2, cin=3, cout=5, size=(12, 10), mask="single", dtype=dtype)
    m[0, :, :6] = 0  # a region wide enough for fully masked windows
    hole = (m == 0).expand_as(x)
    poisoned = x.clone()
    poisoned[hole] = float("nan")
    poisoned[hole & (torch.arange(x.numel()).view_as(x) % 2 == 0)] = float("inf")
    x, poisoned, m, w, b = to_device([x, poisoned, m, w, b], device)
    out, mask_out = partial_conv2d(poisoned, m, w, b, padding=1)
    clean_out, _ = partial_conv2d(x.masked_fill(m == 0, 0), m, w, b, padding=1)
    assert not out.isnan().any() and not out.isinf().any()
    assert torch.equal(out, clean_out)
    assert (mask_out == 0).any(), "the test needs fully masked windows"
    # the pure-PyTorch product X*M spreads NaN from holes; the reference's nan_safe mode does not
    ref_unsafe, _ = partial_conv_reference(poisoned, m, w, b, padding=1, nan_safe=False)
    assert ref_unsafe.isnan().any()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("activation", [None, "leaky_relu"])
def test_holes_are_exactly_zero_even_with_bias(dtype, device, activation):
    x, m, w, b = to_device(random_problem(n=2, cin=3, cout=4, size=(16, 16), mask="single", dtype=dtype), device)
    m[:, :, 4:12, 4:12] = 0
    b = b.abs() + 1  # a bias that would show through
    out, mask_out = partial_conv2d(x, m, w, b, padding=1, activation=activation)
    holes = (mask_out == 0).expand_as(out)
    assert holes.any()
    assert (out[holes] == 0).all()
    assert (out[~holes] != 0).any()


def test_layouts_give_the_same_numbers(device):
    """Non-contiguous, channels_last and expanded inputs need no copy and change nothing."""
    x, m, w, b = to_device(random_problem(n=3, cin=4, cout=6, size=(13, 9), mask="multi"), device)
    kwargs = dict(stride=2, padding=1)
    expected, expected_mask = partial_conv2d(x, m, w, b, **kwargs)

    out, mask_out = partial_conv2d(x.to(memory_format=torch.channels_last),
                                   m.to(memory_format=torch.channels_last),
                                   w.to(memory_format=torch.channels_last), b, **kwargs)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, expected, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(mask_out, expected_mask, rtol=0, atol=0)

    wide = torch.randn(3, 8, 13, 18, dtype=x.dtype, device=device)
    wide[:, ::2, :, ::2] = x
    sliced = wide[:, ::2, :, ::2]
    assert not sliced.is_contiguous()
    out, _ = partial_conv2d(sliced, m, w, b[::1], **kwargs)
    torch.testing.assert_close(out, expected, rtol=1e-13, atol=1e-13)

    single = m[:, :1]
    expanded = single[:1].expand(3, 1, 13, 9)  # stride 0 in batch
    out, _ = partial_conv2d(x, expanded, w, b, **kwargs)
    ref, _ = partial_conv2d(x, single[:1].contiguous(), w, b, **kwargs)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_empty_batch(device):
    x, m, w, b = to_device(random_problem(n=0, cin=2, cout=3, size=(6, 6), mask="single"), device)
    x.requires_grad_()
    w.requires_grad_()
    out, mask_out = partial_conv2d(x, m, w, b, padding=1)
    assert out.shape == (0, 3, 6, 6) and mask_out.shape == (0, 1, 6, 6)
    out.sum().backward()
    assert x.grad.shape == x.shape and torch.equal(w.grad, torch.zeros_like(w))


def test_updated_mask_shapes(device):
    generator = torch.Generator().manual_seed(3)
    x, _, w, b = to_device(random_problem(n=4, cin=3, cout=5, size=(8, 8), mask=None), device)
    single = random_mask("batch1", 4, 3, 8, 8, generator=generator).to(device)
    multi = random_mask("multi", 4, 3, 8, 8, generator=generator).to(device)
    assert partial_conv2d(x, None, w, b)[1].shape == (4, 1, 6, 6)
    assert partial_conv2d(x, single, w, b)[1].shape == (4, 1, 6, 6)
    updated = partial_conv2d(x, multi, w, b)[1]
    assert updated.shape == (4, 5, 6, 6)
    assert updated.stride(1) == 0, "multi-channel masks return an expanded view, not C_out copies"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_results_survive_later_calls(dtype, device):
    """Results never alias memory a later call reuses (the CPU dense path keeps per-thread scratch
    buffers between calls and hands a whole-image convolution's result over as the output): the
    first call's output and gradients are unchanged by later calls of other sizes and dtypes, and
    every call matches the reference."""
    generator = torch.Generator().manual_seed(stable_seed(("survive", dtype)))

    def call(size, channels, call_dtype):
        x = torch.randn(1, channels, size, size, generator=generator, dtype=call_dtype)
        m = (torch.rand(1, 1, size, size, generator=generator) > 0.3).to(call_dtype)
        w = torch.randn(4, channels, 3, 3, generator=generator, dtype=call_dtype)
        x, m, w = to_device((x, m, w), device)
        x.requires_grad_(True)
        w.requires_grad_(True)
        out, _ = partial_conv2d(x, m, w, padding=1)
        grad_x, grad_w = torch.autograd.grad(out, (x, w), torch.ones_like(out))
        expected = partial_conv_reference(x.double(), m.double(), w.double(), padding=1)[0]
        torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
        return out.detach(), grad_x, grad_w

    first = call(24, 6, dtype)
    kept = [t.clone() for t in first]
    for size, channels, later_dtype in [(24, 6, dtype), (40, 8, torch.float32), (12, 3, torch.float64)]:
        call(size, channels, later_dtype)
    for result, copy in zip(first, kept):
        assert torch.equal(result, copy)
