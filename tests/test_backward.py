"""Gradients: gradcheck in float64, and agreement with autograd through the reference."""
import pytest
import torch

from conftest import random_problem, to_device
from partialconv_cuda import info, partial_conv2d, partial_conv3d, partial_conv_reference
from test_forward import CASES, case_id

GRADCHECK_CASES = [
    dict(kernel=(3, 3), stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=1, mask="single", activation=None),
    dict(kernel=(3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2), groups=2, mask="multi", activation="relu"),
    dict(kernel=(5, 5), stride=(2, 2), padding=(2, 2), dilation=(1, 1), groups=1, mask="soft", activation="leaky_relu"),
    dict(kernel=(1, 3), stride=(1, 2), padding=(0, 1), dilation=(1, 1), groups=1, mask=None, activation=None),
    dict(kernel=(3, 3), stride=(1, 1), padding=(2, 2), dilation=(2, 2), groups=2, mask="batch1_multi", activation="leaky_relu"),
    dict(kernel=(2, 2), stride=(2, 2), padding=(0, 0), dilation=(1, 1), groups=1, mask="batch1", activation="relu"),
]


@pytest.mark.parametrize("case", GRADCHECK_CASES, ids=lambda c: f"k{c['kernel']}-g{c['groups']}-{c['mask']}-{c['activation']}")
@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck(case, bias, device):
    x, m, w, b = to_device(
        random_problem(n=2, cin=4, cout=4, size=(7, 6), kernel=case["kernel"], groups=case["groups"],
                       bias=bias, mask=case["mask"], seed=7),
        device,
    )
    kwargs = {k: case[k] for k in ("stride", "padding", "dilation", "groups", "activation")}
    kwargs["negative_slope"] = 0.1
    inputs = [t.requires_grad_() for t in (x, w) + ((b,) if bias else ())]

    def fn(x, w, b=None):
        return partial_conv2d(x, m, w, b, **kwargs)[0]

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("i", range(42), ids=lambda i: case_id(CASES[i]))
def test_gradients_match_reference_autograd(i, device):
    """The grid's cases: grad_input, grad_weight, grad_bias equal autograd through the reference."""
    case = CASES[i]
    x, m, w, b = to_device(
        random_problem(n=case["n"], cin=case["cin"], cout=case["cout"], size=case["size"],
                       kernel=case["kernel"], groups=case["groups"], bias=True,
                       mask=case["mask"], seed=i),
        device,
    )
    kwargs = dict(stride=case["stride"], padding=case["padding"], dilation=case["dilation"],
                  groups=case["groups"], activation=case["activation"], negative_slope=0.2)
    grads = []
    for fn in (partial_conv2d, partial_conv_reference):
        leaves = [t.detach().clone().requires_grad_() for t in (x, w, b)]
        out, _ = fn(leaves[0], m, leaves[1], leaves[2], **kwargs)
        upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(i),
                               dtype=out.dtype).to(device)
        out.backward(upstream)
        grads.append([t.grad for t in leaves])
    for ours, ref in zip(*grads):
        torch.testing.assert_close(ours, ref, rtol=1e-11, atol=1e-11)


def test_mask_gets_no_gradient_and_holes_get_zero(device):
    x, m, w, b = to_device(random_problem(n=2, cin=3, cout=4, size=(8, 8), mask="single"), device)
    x.requires_grad_()
    m.requires_grad_()
    out, _ = partial_conv2d(x, m, w, b, padding=1)
    out.sum().backward()  # an expanded (stride 0) grad_output
    assert m.grad is None
    holes = (m == 0).expand_as(x)
    assert (x.grad[holes] == 0).all() and (x.grad[~holes] != 0).any()


def test_nan_in_holes_gives_finite_gradients(device):
    x, m, w, b = to_device(random_problem(n=2, cin=3, cout=4, size=(8, 8), mask="single"), device)
    x = x.masked_fill(m == 0, float("nan")).requires_grad_()
    w.requires_grad_()
    out, _ = partial_conv2d(x, m, w, b, padding=1)
    out.square().sum().backward()
    assert x.grad.isfinite().all() and w.grad.isfinite().all()


def test_only_requested_gradients(device):
    x, m, w, b = to_device(random_problem(n=2, cin=2, cout=2, size=(5, 5)), device)
    w.requires_grad_()
    out, _ = partial_conv2d(x, m, w, b, padding=1)
    (grad_w,) = torch.autograd.grad(out.sum(), [w])
    ref, _ = partial_conv_reference(x, m, w, b, padding=1)
    (ref_w,) = torch.autograd.grad(ref.sum(), [w])
    torch.testing.assert_close(grad_w, ref_w, rtol=1e-12, atol=1e-12)


def test_double_backward_is_a_clear_error():
    """Backward may record a graph (torch.func.grad always does), but differentiating its result
    again raises instead of giving zeros."""
    x, m, w, b = random_problem(n=1, cin=2, cout=2, size=(5, 5))
    x.requires_grad_()
    out, _ = partial_conv2d(x, m, w, b, padding=1)
    (grad,) = torch.autograd.grad(out.square().sum(), x, create_graph=True)
    ref, _ = partial_conv_reference(x, m, w, b, padding=1)
    torch.testing.assert_close(grad, torch.autograd.grad(ref.square().sum(), x)[0], rtol=1e-12, atol=1e-12)
    with pytest.raises(NotImplementedError, match="second-order derivatives .* are not supported"):
        grad.sum().backward()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_gradients(dtype):
    x, m, w, b = random_problem(n=2, cin=4, cout=5, size=(9, 9), mask="single", dtype=dtype, seed=5)
    leaves = [t.requires_grad_() for t in (x, w, b)]
    out, _ = partial_conv2d(x, m, w, b, padding=1, activation="leaky_relu")
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    out.backward(upstream)
    exact = [t.detach().double().requires_grad_() for t in (x, w, b)]
    ref, _ = partial_conv_reference(exact[0], m.double(), exact[1], exact[2], padding=1, activation="leaky_relu")
    ref.backward(upstream.double())
    eps = torch.finfo(dtype).eps
    for ours, expected in zip(leaves, exact):
        assert ours.grad.dtype == dtype
        scale = expected.grad.abs().amax()
        torch.testing.assert_close(ours.grad.double(), expected.grad, rtol=4 * eps, atol=4 * eps * scale)


@pytest.mark.parametrize("shape", [
    # Rows of holes wide enough that some output rows see no valid pixel: several bands per image,
    # the first and last bands reaching into the padding by different amounts.
    dict(cin=3, size=(23, 9), kernel=(3, 3), stride=(1, 1), padding=(1, 1), dilation=(1, 1), stripes=True),
    dict(cin=3, size=(24, 7), kernel=(5, 3), stride=(2, 1), padding=(2, 1), dilation=(1, 1), stripes=True),
    dict(cin=2, size=(25, 8), kernel=(3, 3), stride=(1, 2), padding=(3, 1), dilation=(2, 1), stripes=True),
    # An image too large for one band (2^21 elements of masked input per band): three bands.
    dict(cin=16, size=(70, 4096), kernel=(3, 3), stride=(2, 2), padding=(1, 1), dilation=(1, 1), stripes=False),
], ids=["stripes-3x3", "stripes-5x3-s2", "stripes-dilated", "size-split"])
def test_dense_path_with_several_bands_matches_reference(shape, monkeypatch):
    monkeypatch.setenv("PARTIALCONV_CPU_PATH", "dense")
    g = torch.Generator().manual_seed(11)
    height, width = shape["size"]
    x = torch.randn(2, shape["cin"], height, width, generator=g, dtype=torch.float64)
    w = torch.randn(2, shape["cin"], *shape["kernel"], generator=g, dtype=torch.float64)
    b = torch.randn(2, generator=g, dtype=torch.float64)
    m = (torch.rand(2, 1, height, width, generator=g) > 0.3).double()
    if shape["stripes"]:
        m[:, :, 6:13] = 0  # 7 hole rows: wider than any window here
        m[1, :, 16:] = 0   # the second image also loses its bottom rows
    kwargs = dict(stride=shape["stride"], padding=shape["padding"], dilation=shape["dilation"],
                  activation="leaky_relu", negative_slope=0.2)
    results = []
    for fn in (partial_conv2d, partial_conv_reference):
        leaves = [t.clone().requires_grad_() for t in (x, w, b)]
        out, updated = fn(leaves[0], m, leaves[1], leaves[2], **kwargs)
        out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=out.dtype))
        results.append([out.detach(), updated] + [t.grad for t in leaves])
    if shape["stripes"]:
        empty_rows = (results[1][1] == 0).all(dim=-1)  # output rows no band covers
        assert empty_rows[0].any() and not empty_rows[0].all(), "the stripes should split image 0 into bands"
    for ours, ref in zip(*results):
        torch.testing.assert_close(ours, ref, rtol=1e-11, atol=1e-11)


CHANNELS_LAST_BAND_CASES = [
    # (the dense path copies bands channels-last for float32-accumulated layers with few output and
    # enough input channels: dense_path.cpp's channels_last_bands)
    dict(id="dec1-like", cin=20, cout=3, size=(23, 21), kernel=(3, 3), stride=1, padding=1, dilation=1,
         mask="multi", activation="leaky_relu"),
    dict(id="strided-dilated", cin=16, cout=32, size=(19, 17), kernel=(5, 3), stride=2, padding=(2, 1), dilation=(1, 2),
         mask="batch1", activation="relu"),
    dict(id="stripes", cin=17, cout=4, size=(24, 9), kernel=(3, 3), stride=1, padding=1, dilation=1,
         mask="stripes", activation=None),
    dict(id="input-channels-last", cin=16, cout=8, size=(13, 12), kernel=(3, 3), stride=1, padding=1, dilation=1,
         mask="multi", activation=None, layout="channels_last"),
    dict(id="narrowed-rows", cin=18, cout=5, size=(11, 10), kernel=(3, 3), stride=1, padding=2, dilation=2,
         mask="single", activation="leaky_relu", layout="narrowed_rows"),
    dict(id="wide-lines", cin=64, cout=2, size=(3, 1100), kernel=(3, 3), stride=1, padding=1, dilation=1,
         mask="multi", activation=None),
    dict(id="3d", cin=64, cout=3, size=(5, 6, 7), kernel=(3, 3, 3), stride=1, padding=1, dilation=1,
         mask="multi", activation="leaky_relu"),
    dict(id="bfloat16", cin=16, cout=3, size=(9, 10), kernel=(3, 3), stride=1, padding=1, dilation=1,
         mask="single", activation=None, dtype=torch.bfloat16),
]


@pytest.mark.parametrize("case", CHANNELS_LAST_BAND_CASES, ids=lambda c: c["id"])
def test_channels_last_bands_match_reference(case, monkeypatch):
    """Outputs, updated masks and gradients of layers whose dense-path forward copies its bands
    channels-last (forward_path says so) equal the float64 reference."""
    monkeypatch.setenv("PARTIALCONV_CPU_PATH", "dense")
    dtype = case.get("dtype", torch.float32)
    stripes = case["mask"] == "stripes"
    x, m, w, b = random_problem(n=2, cin=case["cin"], cout=case["cout"], size=case["size"], kernel=case["kernel"],
                                mask="single" if stripes else case["mask"], seed=17)
    if stripes:
        m[:, :, 6:13] = 0  # rows of holes wider than the window: several bands per image
    kwargs = dict(stride=case["stride"], padding=case["padding"], dilation=case["dilation"],
                  activation=case["activation"], negative_slope=0.2)
    spatial = len(case["size"])
    layer = {2: partial_conv2d, 3: partial_conv3d}[spatial]
    arrange = (lambda t: t) if "layout" not in case else (lambda t: _arranged(t, case["layout"]))
    xs, ms = arrange(x.to(dtype)), arrange(m.to(dtype))
    path = info.forward_path(xs, ms, w.to(dtype), case["stride"], case["padding"], case["dilation"])
    assert "with channels-last bands" in path, path
    leaves = [xs.detach().requires_grad_(), w.to(dtype).requires_grad_(), b.to(dtype).requires_grad_()]
    out, updated = layer(leaves[0], ms, leaves[1], leaves[2], **kwargs)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    out.backward(upstream.to(dtype))
    exact = [t.to(dtype).double().requires_grad_() for t in (x, w, b)]
    ref, ref_updated = partial_conv_reference(exact[0], m.to(dtype).double(), exact[1], exact[2], **kwargs)
    ref.backward(upstream)
    if stripes:
        assert (ref_updated[0, 0] == 0).all(dim=-1).any(), "the stripes should split image 0 into bands"
    # float32 sums of up to 64 * 27 products; bfloat16 results rounded once from float32 sums.
    tolerance = 1e-5 if dtype == torch.float32 else 2 * torch.finfo(dtype).eps
    torch.testing.assert_close(updated.double(), ref_updated, rtol=0, atol=0)
    for ours, expected in [(out, ref)] + [(t.grad, e.grad) for t, e in zip(leaves, exact)]:
        scale = expected.abs().amax().item()
        torch.testing.assert_close(ours.double(), expected, rtol=tolerance, atol=tolerance * scale)


def _arranged(t, layout):
    """t (N, C, H, W) with the same values in another memory layout."""
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "every_other_column":  # rows follow each other, elements 2 apart
        wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
        wide[..., ::2] = t
        return wide[..., ::2]
    wide = torch.zeros(*t.shape[:-1], t.shape[-1] + 5, dtype=t.dtype)  # narrowed: rows do not follow
    wide[..., : t.shape[-1]] = t
    return wide[..., : t.shape[-1]]


@pytest.mark.parametrize("layout", ["channels_last", "every_other_column", "narrowed_rows"])
@pytest.mark.parametrize("mask", ["single", "multi"])
def test_dense_path_layouts_match_contiguous(layout, mask, monkeypatch):
    """The dense path copies, scales and writes the lines of one depth as one line where they
    follow each other in memory (contiguous, channels_last, every other column) and line by line
    where they do not (a narrowed width): the same outputs and gradients either way, with the
    input, mask and incoming gradient in the layout."""
    monkeypatch.setenv("PARTIALCONV_CPU_PATH", "dense")
    x, m, w, b = random_problem(n=2, cin=3, cout=4, size=(9, 7), mask=mask, seed=13)
    upstream = torch.randn(2, 4, 5, 4, generator=torch.Generator().manual_seed(4), dtype=x.dtype)
    kwargs = dict(stride=2, padding=1, activation="leaky_relu", negative_slope=0.2)
    results = []
    for arrange in (lambda t: t, lambda t: _arranged(t, layout)):
        leaves = [arrange(x).detach().requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_()]
        out, updated = partial_conv2d(leaves[0], arrange(m), leaves[1], leaves[2], **kwargs)
        out.backward(arrange(upstream))
        results.append([out.detach(), updated] + [t.grad for t in leaves])
    for arranged, contiguous in zip(results[1], results[0]):
        torch.testing.assert_close(arranged, contiguous, rtol=1e-12, atol=1e-12)
