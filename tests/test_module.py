"""PartialConv2d as a drop-in for NVIDIA's layer and nn.Conv2d."""
import pytest
import torch
from torch import nn

from conftest import nvidia_formula, random_problem, to_device
from partialconv_cuda import PartialConv2d, partial_conv_reference


@pytest.mark.parametrize("multi_channel", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_nvidia_formula_for_binary_masks(multi_channel, bias, device):
    torch.manual_seed(0)
    layer = PartialConv2d(4, 6, 3, stride=2, padding=1, bias=bias, multi_channel=multi_channel,
                          return_mask=True).double().to(device)
    x, m, _, _ = to_device(random_problem(n=2, cin=4, size=(10, 9), mask="multi" if multi_channel else "single"), device)
    out, mask_out = layer(x, m)
    torch.testing.assert_close(out, nvidia_formula(layer, x, m), rtol=1e-7, atol=1e-7)
    assert mask_out.shape == (2, 6 if multi_channel else 1, 5, 5)


def test_same_constructor_and_state_dict_as_conv2d():
    conv = nn.Conv2d(3, 8, (5, 3), stride=2, padding=(2, 1), dilation=1, groups=1, bias=True)
    layer = PartialConv2d(3, 8, (5, 3), stride=2, padding=(2, 1), dilation=1, groups=1, bias=True)
    assert list(layer.state_dict()) == list(conv.state_dict()) == ["weight", "bias"]
    layer.load_state_dict(conv.state_dict(), strict=True)
    x = torch.randn(1, 3, 12, 12)
    # all-ones mask and no padding taps: a partial convolution is a plain convolution
    inner = PartialConv2d(3, 8, 3)
    inner_conv = nn.Conv2d(3, 8, 3)
    inner.load_state_dict(inner_conv.state_dict())
    torch.testing.assert_close(inner(x, torch.ones(1, 1, 12, 12)), inner_conv(x))
    assert "multi_channel" not in repr(conv) and "activation='relu'" in repr(PartialConv2d(3, 3, 3, activation="relu"))


def test_nvidia_keyword_arguments():
    layer = PartialConv2d(2, 2, 3, padding=1, multi_channel=True, return_mask=True)
    x = torch.randn(1, 2, 6, 6)
    m = (torch.rand(1, 2, 6, 6) > 0.3).float()
    out, mask = layer(x, mask_in=m)
    ref, ref_mask = partial_conv_reference(x, m, layer.weight, layer.bias, padding=1)
    torch.testing.assert_close(out, ref)
    assert mask.shape == (1, 2, 6, 6)


def test_no_stale_cache_between_calls():
    """NVIDIA's layer caches the mask ratio and reuses it for a later call without a mask; ours
    computes it every time."""
    torch.manual_seed(1)
    layer = PartialConv2d(3, 4, 3, padding=1, return_mask=True).double()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    m = (torch.rand(2, 1, 8, 8) > 0.5).double()
    for inp, mask in [(x, m), (x, None), (torch.randn(1, 3, 5, 7, dtype=torch.float64), None), (x, m)]:
        out, mask_out = layer(inp, mask)
        ref, ref_mask = partial_conv_reference(inp, mask, layer.weight, layer.bias, padding=1)
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(mask_out, ref_mask)


def test_mask_none_is_partial_convolution_padding():
    """With mask=None the border windows are rescaled by (window size / taps inside the image)."""
    layer = PartialConv2d(1, 1, 3, padding=1, bias=False).double()
    with torch.no_grad():
        layer.weight.fill_(1.0)
    out = layer(torch.ones(1, 1, 4, 4, dtype=torch.float64))
    torch.testing.assert_close(out, torch.full_like(out, 9.0))  # a plain conv would give 4 and 6 at the border


@pytest.mark.parametrize("activation", ["relu", "leaky_relu"])
def test_fused_activation(activation):
    layer = PartialConv2d(3, 5, 3, padding=1, activation=activation, negative_slope=0.2).double()
    x, m, _, _ = random_problem(n=2, cin=3, size=(7, 7))
    ref, _ = partial_conv_reference(x, m, layer.weight, layer.bias, padding=1, activation=activation, negative_slope=0.2)
    out = layer(x, m)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    assert (out < 0).any() == (activation == "leaky_relu")


def test_string_padding():
    layer = PartialConv2d(2, 3, 5, padding="same", dilation=2).double()
    x, m, _, _ = random_problem(n=1, cin=2, size=(9, 9))
    out = layer(x, m)
    ref, _ = partial_conv_reference(x, m, layer.weight, layer.bias, padding=4, dilation=2)
    torch.testing.assert_close(out, ref)
    valid = PartialConv2d(2, 3, 3, padding="valid").double()
    assert valid(x, m).shape == (1, 3, 7, 7)


def test_training_step_updates_weights():
    torch.manual_seed(0)
    model = nn.Sequential(PartialConv2d(3, 8, 3, padding=1, activation="relu"), PartialConv2d(8, 3, 3, padding=1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(2, 3, 16, 16)
    before = [p.detach().clone() for p in model.parameters()]
    loss = model(x).square().mean()
    loss.backward()
    optimizer.step()
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
