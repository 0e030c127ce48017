"""Partial convolution in 1 and 3 spatial dimensions (partial_conv1d / partial_conv3d and their
layers) against the float64 reference, over a randomised grid: forward, gradients, gradcheck, half
precision, layouts, empty batches, NaN in holes, and the layers against nn.Conv1d / nn.Conv3d and
NVIDIA's PartialConv3d. The 2-D grid is tests/test_forward.py and tests/test_backward.py."""
import random

import pytest
import torch
from torch import nn

from conftest import nvidia_formula, random_problem, stable_seed, to_device
from partialconv_cuda import (PartialConv1d, PartialConv3d, partial_conv1d, partial_conv3d,
                              partial_conv_reference)

FUNCTIONS = {1: partial_conv1d, 3: partial_conv3d}
LAYERS = {1: PartialConv1d, 3: PartialConv3d}
CONVS = {1: nn.Conv1d, 3: nn.Conv3d}
MASK_KINDS = [None, "single", "multi", "soft", "batch1", "batch1_multi", "empty"]
ACTIVATIONS = [None, "relu", "leaky_relu"]
# Largest input extent per dimension: 1-D sequences are long, 3-D volumes small (cost).
MAX_SIZE = {1: 24, 3: 8}


def random_cases(dims, count, seed):
    """Kernels 1..5 per axis, mixed strides, padding and dilation per axis, groups, every mask
    kind, bias on/off, every activation."""
    rng = random.Random(seed)
    cases = []
    for i in range(count):
        kernel = tuple(rng.randint(1, 5) for _ in range(dims))
        if dims == 3 and i % 4 == 0:
            kernel = (rng.randint(1, 3),) + (rng.randint(1, 5),) * 2  # the video kernels: 3x5x5 and the like
        groups = rng.choice([1, 1, 2, 3])
        dilation = tuple(rng.randint(1, 2) for _ in range(dims))
        case = dict(
            n=rng.choice([1, 2, 3]),
            cin=groups * rng.randint(1, 3),
            cout=groups * rng.randint(1, 3),
            kernel=kernel,
            stride=tuple(rng.randint(1, 3) for _ in range(dims)),
            padding=tuple(rng.randint(0, 3) for _ in range(dims)),
            dilation=dilation,
            groups=groups,
            mask=MASK_KINDS[i % len(MASK_KINDS)],
            bias=rng.random() < 0.7,
            activation=ACTIVATIONS[i % len(ACTIVATIONS)],
        )
        case["size"] = tuple(rng.randint(d * (k - 1) + 1, max(d * (k - 1) + 1, MAX_SIZE[dims]))
                             for k, d in zip(kernel, dilation))
        cases.append(case)
    return cases


CASES = {1: random_cases(1, 42, seed=4242), 3: random_cases(3, 35, seed=4343)}
GRID = [(dims, case) for dims, cases in CASES.items() for case in cases]


def case_id(case):
    join = "x".join
    return (f"k{join(map(str, case['kernel']))}-s{join(map(str, case['stride']))}"
            f"-p{join(map(str, case['padding']))}-d{join(map(str, case['dilation']))}-g{case['groups']}"
            f"-{case['mask']}-b{case['bias']:d}-{case['activation']}")


def conv_kwargs(case):
    return dict(stride=case["stride"], padding=case["padding"], dilation=case["dilation"],
                groups=case["groups"], activation=case["activation"], negative_slope=0.2)


def problem(case, device, dtype=torch.float64, seed=0):
    return to_device(random_problem(n=case["n"], cin=case["cin"], cout=case["cout"], size=case["size"],
                                    kernel=case["kernel"], groups=case["groups"], bias=case["bias"],
                                    mask=case["mask"], dtype=dtype, seed=seed), device)


def test_grid_covers_the_contract():
    for dims, cases in CASES.items():
        assert {c["mask"] for c in cases} == set(MASK_KINDS)
        assert {c["activation"] for c in cases} == set(ACTIVATIONS)
        assert {c["groups"] for c in cases} >= {1, 2, 3}
        assert {k for c in cases for k in c["kernel"]} == set(range(1, 6))
        assert any(any(s > 1 for s in c["stride"]) for c in cases)
        assert any(any(d > 1 for d in c["dilation"]) for c in cases)
        assert any(len(set(c["stride"])) > 1 for c in cases) or dims == 1
        assert sum(c["bias"] for c in cases) not in (0, len(cases))


@pytest.mark.parametrize(("dims", "case"), GRID, ids=[f"{d}d-{case_id(c)}" for d, c in GRID])
def test_matches_reference_float64(dims, case, device):
    x, m, w, b = problem(case, device, seed=stable_seed(case))
    out, mask_out = FUNCTIONS[dims](x, m, w, b, **conv_kwargs(case))
    ref, ref_mask = partial_conv_reference(x, m, w, b, **conv_kwargs(case))
    assert out.shape == ref.shape and mask_out.shape == ref_mask.shape
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(mask_out, ref_mask, rtol=0, atol=0)
    if (ref_mask > 0).any():  # not a vacuous comparison: the valid windows give real values (before a
        # relu, which may zero all of a small output)
        before_activation, _ = partial_conv_reference(x, m, w, b, **dict(conv_kwargs(case), activation=None))
        assert before_activation.abs().max() > 0


GRADIENT_GRID = [(dims, i) for dims in (1, 3) for i in range(24)]


@pytest.mark.parametrize(("dims", "i"), GRADIENT_GRID, ids=[f"{d}d-{case_id(CASES[d][i])}" for d, i in GRADIENT_GRID])
def test_gradients_match_reference_autograd(dims, i, device):
    case = CASES[dims][i]
    x, m, w, b = problem(dict(case, bias=True), device, seed=i)
    grads = []
    for fn in (FUNCTIONS[dims], partial_conv_reference):
        leaves = [t.detach().clone().requires_grad_() for t in (x, w, b)]
        out, _ = fn(leaves[0], m, leaves[1], leaves[2], **conv_kwargs(case))
        upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(i), dtype=out.dtype).to(device)
        out.backward(upstream)
        grads.append([t.grad for t in leaves])
    for ours, ref in zip(*grads):
        torch.testing.assert_close(ours, ref, rtol=1e-11, atol=1e-11)


GRADCHECK_CASES = {
    1: [dict(kernel=(3,), stride=(1,), padding=(1,), dilation=(1,), groups=1, mask="single", activation=None),
        dict(kernel=(5,), stride=(2,), padding=(2,), dilation=(1,), groups=2, mask="multi", activation="leaky_relu"),
        dict(kernel=(2,), stride=(1,), padding=(1,), dilation=(2,), groups=1, mask="soft", activation="relu")],
    3: [dict(kernel=(3, 3, 3), stride=(1, 1, 1), padding=(1, 1, 1), dilation=(1, 1, 1), groups=1, mask="single", activation=None),
        dict(kernel=(3, 2, 2), stride=(1, 2, 1), padding=(1, 0, 1), dilation=(1, 1, 2), groups=2, mask="multi", activation="leaky_relu"),
        dict(kernel=(1, 3, 3), stride=(2, 1, 1), padding=(0, 1, 1), dilation=(1, 1, 1), groups=1, mask=None, activation="relu")],
}
GRADCHECK_GRID = [(dims, case) for dims, cases in GRADCHECK_CASES.items() for case in cases]


@pytest.mark.parametrize(("dims", "case"), GRADCHECK_GRID,
                         ids=[f"{d}d-k{'x'.join(map(str, c['kernel']))}-{c['mask']}" for d, c in GRADCHECK_GRID])
@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck(dims, case, bias, device):
    size = (9,) if dims == 1 else (4, 5, 4)
    x, m, w, b = to_device(random_problem(n=2, cin=4, cout=4, size=size, kernel=case["kernel"],
                                          groups=case["groups"], bias=bias, mask=case["mask"], seed=7), device)
    kwargs = {k: case[k] for k in ("stride", "padding", "dilation", "groups", "activation")}
    inputs = [t.requires_grad_() for t in (x, w) + ((b,) if bias else ())]

    def fn(x, w, b=None):
        return FUNCTIONS[dims](x, m, w, b, negative_slope=0.1, **kwargs)[0]

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-8, rtol=1e-6)


LOW_PRECISION_GRID = [(dims, case) for dims in (1, 3) for case in CASES[dims][:14]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("dims", "case"), LOW_PRECISION_GRID, ids=[f"{d}d-{case_id(c)}" for d, c in LOW_PRECISION_GRID])
def test_low_precision_close_to_float64(dims, case, dtype, device):
    """Half types accumulate in float: on the same (rounded) inputs, the float64 result rounded
    once (the tolerance of the 2-D test)."""
    x, m, w, b = problem(case, device, dtype=dtype)
    out, mask_out = FUNCTIONS[dims](x, m, w, b, **conv_kwargs(case))
    exact, exact_mask = partial_conv_reference(*[None if t is None else t.double() for t in (x, m, w, b)],
                                               **conv_kwargs(case))
    assert out.dtype == dtype and mask_out.dtype == dtype
    eps = torch.finfo(dtype).eps
    scale = exact.abs().amax().clamp_min(1)
    torch.testing.assert_close(out.double(), exact, rtol=2 * eps, atol=8 * eps * scale)
    torch.testing.assert_close(mask_out.double(), exact_mask, rtol=eps, atol=0)


def test_channels_last_3d_needs_no_copy_and_changes_nothing():
    x, m, w, b = random_problem(n=2, cin=4, cout=5, size=(5, 7, 6), kernel=(3, 3, 3), mask="multi")
    expected, expected_mask = partial_conv3d(x, m, w, b, stride=(1, 2, 1), padding=1)
    cl = torch.channels_last_3d
    out, mask_out = partial_conv3d(x.to(memory_format=cl), m.to(memory_format=cl), w.to(memory_format=cl), b,
                                   stride=(1, 2, 1), padding=1)
    assert out.is_contiguous(memory_format=cl) and not out.is_contiguous()
    torch.testing.assert_close(out, expected, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(mask_out, expected_mask, rtol=0, atol=0)
    x = x.to(memory_format=cl).requires_grad_()
    out, _ = partial_conv3d(x, m, w, b, stride=(1, 2, 1), padding=1)
    out.sum().backward()
    assert x.grad.is_contiguous(memory_format=cl)


def test_strided_1d_input_changes_nothing():
    x, m, w, b = random_problem(n=3, cin=4, cout=2, size=(17,), kernel=(3,), mask="single")
    expected, _ = partial_conv1d(x, m, w, b, padding=1)
    wide = torch.randn(17, 3, 8, dtype=x.dtype).permute(1, 2, 0)  # (N, 2C, L), channels fastest
    wide[:, ::2] = x
    out, _ = partial_conv1d(wide[:, ::2], m.expand(3, 1, 17), w, b, padding=1)
    torch.testing.assert_close(out, expected, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("dims", [1, 3])
def test_empty_batch(dims, device):
    size, kernel = ((6,), (3,)) if dims == 1 else ((4, 5, 3), (3, 3, 3))
    x, m, w, b = to_device(random_problem(n=0, cin=2, cout=3, size=size, kernel=kernel), device)
    x.requires_grad_()
    w.requires_grad_()
    out, mask_out = FUNCTIONS[dims](x, m, w, b, padding=1)
    assert out.shape == (0, 3, *size) and mask_out.shape == (0, 1, *size)
    out.sum().backward()
    assert x.grad.shape == x.shape and torch.equal(w.grad, torch.zeros_like(w))


@pytest.mark.parametrize("dims", [1, 3])
def test_nan_and_inf_in_holes_contribute_nothing(dims, device):
    size, kernel = ((30,), (3,)) if dims == 1 else ((6, 7, 5), (3, 3, 3))
    x, m, w, b = random_problem(n=2, cin=3, cout=4, size=size, kernel=kernel)
    m[0, :, :4] = 0  # wide enough for windows of holes only
    poisoned = x.masked_fill((m == 0).expand_as(x), float("nan"))
    x, poisoned, m, w, b = to_device([x, poisoned, m, w, b], device)
    out, mask_out = FUNCTIONS[dims](poisoned, m, w, b, padding=1)
    assert out.isfinite().all() and (mask_out == 0).any()
    assert torch.equal(out, FUNCTIONS[dims](x.masked_fill(m == 0, 0), m, w, b, padding=1)[0])
    leaf = poisoned.clone().requires_grad_()
    FUNCTIONS[dims](leaf, m, w.requires_grad_(), b, padding=1)[0].square().sum().backward()
    assert leaf.grad.isfinite().all() and w.grad.isfinite().all()


# ---------------------------------------------------------------------------------------------
# The layers.

@pytest.mark.parametrize("dims", [1, 3])
def test_same_constructor_and_state_dict_as_conv(dims):
    kernel = 3 if dims == 1 else (3, 5, 5)
    conv = CONVS[dims](4, 8, kernel, stride=2, padding=1, bias=True)
    layer = LAYERS[dims](4, 8, kernel, stride=2, padding=1, bias=True, multi_channel=True, return_mask=True)
    assert isinstance(layer, CONVS[dims])
    assert list(layer.state_dict()) == list(conv.state_dict()) == ["weight", "bias"]
    layer.load_state_dict(conv.state_dict(), strict=True)
    assert "multi_channel=True" in repr(layer) and "multi_channel" not in repr(conv)
    # An all-ones mask and no padding taps: a plain convolution.
    inner, inner_conv = LAYERS[dims](4, 8, 3), CONVS[dims](4, 8, 3)
    inner.load_state_dict(inner_conv.state_dict())
    x = torch.randn(2, 4, *(12,) * dims)
    torch.testing.assert_close(inner(x, torch.ones(1, 1, *(12,) * dims)), inner_conv(x))


@pytest.mark.parametrize("multi_channel", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_partial_conv3d_matches_nvidia_for_binary_masks(multi_channel, bias):
    """NVIDIA's PartialConv3d (models/partialconv3d.py) adds 1e-8 to S; binary masks agree within it."""
    torch.manual_seed(0)
    layer = PartialConv3d(4, 6, (3, 5, 5), stride=(1, 2, 2), padding=(1, 2, 2), bias=bias,
                          multi_channel=multi_channel, return_mask=True).double()
    x, m, _, _ = random_problem(n=2, cin=4, size=(5, 9, 8), kernel=(3, 5, 5),
                                mask="multi" if multi_channel else "single")
    out, mask_out = layer(x, m)
    torch.testing.assert_close(out, nvidia_formula(layer, x, m), rtol=1e-7, atol=1e-7)
    assert mask_out.shape == (2, 6 if multi_channel else 1, 5, 5, 4)


def test_nvidia_partial_conv3d_checkpoint_loads():
    """NVIDIA's PartialConv3d is an nn.Conv3d whose mask updater is a plain attribute: its
    state_dict is the Conv3d's."""
    nvidia_like = nn.Conv3d(3, 4, 3, padding=1)
    nvidia_like.weight_maskUpdater = torch.ones(1, 1, 3, 3, 3)  # not in the state_dict
    layer = PartialConv3d(3, 4, 3, padding=1)
    layer.load_state_dict(nvidia_like.state_dict(), strict=True)
    assert torch.equal(layer.weight, nvidia_like.weight)


@pytest.mark.parametrize("dims", [1, 3])
def test_layer_keywords_mask_none_and_activation(dims):
    layer = LAYERS[dims](2, 3, 3, padding=1, multi_channel=True, return_mask=True, activation="leaky_relu",
                         negative_slope=0.2).double()
    x = torch.randn(2, 2, *(6,) * dims, dtype=torch.float64)
    m = (torch.rand(2, 2, *(6,) * dims) > 0.3).double()
    out, mask = layer(x, mask_in=m)
    ref, ref_mask = partial_conv_reference(x, m, layer.weight, layer.bias, padding=1, activation="leaky_relu",
                                           negative_slope=0.2)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    assert mask.shape == (2, 3, *(6,) * dims)
    # mask=None: partial-convolution padding, border windows rescaled
    ones = LAYERS[dims](1, 1, 3, padding=1, bias=False).double()
    with torch.no_grad():
        ones.weight.fill_(1.0)
    out = ones(torch.ones(1, 1, *(4,) * dims, dtype=torch.float64))
    torch.testing.assert_close(out, torch.full_like(out, 3.0 ** dims))
    with pytest.raises(ValueError, match=rf"PartialConv{dims}d\(multi_channel=True\): expected a mask with 2 channel"):
        layer(x, torch.ones(2, 1, *(6,) * dims, dtype=torch.float64))
