"""The dense CPU backward's channels-last input gradient (dense_path.cpp, channels_last_input_gradient):
for a strided 2-D convolution (float32/float16/bfloat16) that ATen runs through oneDNN and whose
grad_input is large beside the weight, oneDNN makes grad_input channels-last in a call of its own
and our M pass transposes it to grad_input's layout. Each case
checks that forward_path reports that backward, then every result against the float64 reference."""
import pytest
import torch

from conftest import check_case_against_reference, random_problem
from partialconv_cuda import info, partial_conv2d, partial_conv_reference

CHANNELS_LAST_GRAD = "with grad_input computed channels-last"


def _case(**changes):
    case = dict(n=2, cin=8, cout=12, size=(20, 24), kernel=(3, 3), stride=2, padding=1, dilation=1,
                mask="single", activation="relu", dtype=torch.float32)
    case.update(changes)
    return case


CASES = {
    "single-mask": _case(),
    "multi-mask-leaky": _case(mask="multi", activation="leaky_relu"),
    "soft-mask-no-activation": _case(mask="soft", activation="none", kernel=(5, 5), padding=2),
    "no-mask": _case(mask=None),
    "mask-of-ones": _case(edit=lambda x, m: (x, torch.ones_like(m))),
    "broadcast-mask": _case(n=3, mask="batch1"),
    "strided-dilated": _case(kernel=(5, 5), stride=2, padding=3, dilation=2, size=(23, 30)),
    "uneven-kernel-one-strided-dimension": _case(kernel=(1, 3), stride=(1, 2), padding=(0, 1), size=(17, 19)),
    "channels-last-input": _case(mask="multi", channels_last=True),
    "odd-channels": _case(cin=5, cout=3, size=(13, 37)),
    "image-of-holes": _case(n=3, holes_in_image=1),
    "bfloat16": _case(dtype=torch.bfloat16),
    "float16": _case(dtype=torch.float16, mask="multi"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_channels_last_input_gradient_matches_the_reference(name, monkeypatch):
    monkeypatch.setenv("PARTIALCONV_CPU_PATH", "dense")
    path = check_case_against_reference(CASES[name])
    assert CHANNELS_LAST_GRAD in path


def test_input_gradient_alone_matches_the_reference(monkeypatch):
    # No weight gradient asked: the channels-last call is the only convolution of the backward.
    monkeypatch.setenv("PARTIALCONV_CPU_PATH", "dense")
    x, m, w, b = random_problem(n=2, cin=8, cout=12, size=(20, 24), seed=4)
    conv = dict(stride=(2, 2), padding=(1, 1), dilation=(1, 1))
    ours_x = x.float().requires_grad_()
    out, _ = partial_conv2d(ours_x, m.float(), w.float(), b.float(), **conv)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    (grad,) = torch.autograd.grad(out, ours_x, upstream.float())
    exact_x = x.float().double().requires_grad_()
    ref, _ = partial_conv_reference(exact_x, m, w.float().double(), b.float().double(), **conv)
    (expected,) = torch.autograd.grad(ref, exact_x, upstream)
    torch.testing.assert_close(grad.double(), expected, rtol=1e-5, atol=1e-5 * expected.abs().amax().item())


@pytest.mark.parametrize("dtype, cin, cout, size, kernel, stride", [
    (torch.float64, 8, 12, (20, 24), (3, 3), 2),  # not oneDNN's dtype
    (torch.float32, 64, 256, (8, 8), (3, 3), 2),  # weight 8x the input: channels-first stays faster
    (torch.float32, 64, 12, (20, 24), (3, 3), 1),  # stride 1: oneDNN's gradient comes channels-first
    (torch.float32, 8, 12, (20, 24), (3, 3), 2),  # one image of 3840 elements: ATen's im2col, no oneDNN
])
def test_channels_first_input_gradient_where_it_does_not_pay(dtype, cin, cout, size, kernel, stride):
    x, m, w, _ = random_problem(n=1, cin=cin, cout=cout, size=size, kernel=kernel, dtype=dtype)
    path = info.forward_path(x, m, w, stride=stride, padding=1, dilation=1)
    assert "dense bands" in path.split("(backward: ")[1]
    assert CHANNELS_LAST_GRAD not in path
