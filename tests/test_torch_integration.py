"""The ops inside torch's machinery: opcheck, torch.compile, torch.export, autocast."""
import pytest
import torch

from conftest import random_problem, to_device
from partialconv_cuda import PartialConv2d, partial_conv2d, partial_conv_reference

FORWARD = torch.ops.partialconv_cuda.partial_conv_forward.default
BACKWARD = torch.ops.partialconv_cuda.partial_conv_backward.default


def forward_samples(device):
    samples = []
    for mask, bias, groups, activation, dtype in [
        ("single", True, 1, "none", torch.float64),
        ("multi", False, 2, "relu", torch.float32),
        (None, True, 1, "leaky_relu", torch.float64),
        ("batch1", True, 2, "none", torch.float32),
    ]:
        x, m, w, b = to_device(random_problem(n=2, cin=4, cout=4, size=(7, 6), groups=groups, bias=bias,
                                              mask=mask, dtype=dtype), device)
        x.requires_grad_()
        w.requires_grad_()
        samples.append((x, m, w, b, [2, 1], [1, 1], [1, 1], groups, activation, 0.1))
    channels_last = samples[0][0].detach().to(memory_format=torch.channels_last).requires_grad_()
    samples.append((channels_last,) + samples[0][1:])
    return samples


def test_opcheck_forward(device):
    for args in forward_samples(device):
        torch.library.opcheck(FORWARD, args)


def test_opcheck_backward(device):
    for args in forward_samples(device):
        x, m, w, b, stride, padding, dilation, groups, activation, slope = args
        with torch.no_grad():
            out, _, mask_scales = FORWARD(*args)
        grad = torch.randn_like(out)
        for output_mask in ([True, True, True], [True, False, False], [False, True, b is not None]):
            torch.library.opcheck(BACKWARD, (grad, x.detach(), m, w.detach(), out, mask_scales, stride, padding,
                                             dilation, groups, activation, slope, output_mask))


def test_compile_fullgraph_forward_and_backward(device):
    torch._dynamo.reset()
    torch.manual_seed(0)
    first = PartialConv2d(3, 8, 3, padding=1, return_mask=True, activation="relu").to(device)
    second = PartialConv2d(8, 4, 3, stride=2, padding=1, return_mask=True).to(device)

    def net(x, m):
        y, m = first(x, m)
        return second(y, m)

    compiled = torch.compile(net, fullgraph=True)
    x = torch.randn(2, 3, 16, 16, device=device)
    m = (torch.rand(2, 1, 16, 16, device=device) > 0.4).float()
    expected, expected_mask = net(x, m)
    expected.square().sum().backward()
    grads = [p.grad.clone() for p in (*first.parameters(), *second.parameters())]
    for p in (*first.parameters(), *second.parameters()):
        p.grad = None
    out, out_mask = compiled(x, m)
    out.square().sum().backward()
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(out_mask, expected_mask)
    for ours, ref in zip([p.grad for p in (*first.parameters(), *second.parameters())], grads):
        torch.testing.assert_close(ours, ref)


def test_compile_dynamic_shapes():
    torch._dynamo.reset()
    layer = PartialConv2d(2, 3, 3, padding=1)
    compiled = torch.compile(layer, fullgraph=True, dynamic=True)
    for size in [(5, 7), (9, 4), (6, 6)]:
        x = torch.randn(2, 2, *size)
        m = (torch.rand(1, 1, *size) > 0.3).float()
        torch.testing.assert_close(compiled(x, m), layer(x, m))


def test_export():
    layer = PartialConv2d(3, 4, 3, padding=1, return_mask=True)
    x = torch.randn(1, 3, 8, 8)
    m = (torch.rand(1, 1, 8, 8) > 0.5).float()
    exported = torch.export.export(layer, (x, m))
    assert any(node.target == FORWARD for node in exported.graph.nodes)
    out, mask = exported.module()(x, m)
    expected, expected_mask = layer(x, m)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(mask, expected_mask)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast(device, dtype):
    torch.manual_seed(0)
    layer = PartialConv2d(3, 5, 3, padding=1, return_mask=True).to(device)
    x = torch.randn(2, 3, 10, 10, device=device)
    m = (torch.rand(2, 1, 10, 10, device=device) > 0.5).float()
    m[:, :, :5] = 0  # fully masked windows
    with torch.autocast(device, dtype=dtype):
        out, mask = layer(x, m)
        conv = torch.nn.functional.conv2d(x, layer.weight)
    assert conv.dtype == dtype, "the comparison assumes conv2d autocasts to this dtype"
    assert out.dtype == dtype and mask.dtype == dtype
    assert not out.isnan().any() and (out[(mask == 0).expand_as(out)] == 0).all()
    low = [t.detach().to(dtype).double() for t in (x, m, layer.weight, layer.bias)]
    ref, _ = partial_conv_reference(*low, padding=1)
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(out.detach().double(), ref, rtol=2 * eps, atol=8 * eps * ref.abs().max().item())
    out.float().sum().backward()
    assert layer.weight.grad.dtype == torch.float32 and layer.weight.grad.isfinite().all()
