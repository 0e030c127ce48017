"""The ops inside torch's machinery: opcheck, torch.compile, torch.export, autocast."""
import pytest
import torch

from conftest import random_problem, to_device
from partialconv_cuda import (PartialConv1d, PartialConv2d, PartialConv3d, partial_conv1d, partial_conv2d,
                              partial_conv3d, partial_conv_reference)

FORWARD = torch.ops.partialconv_cuda.partial_conv_forward.default
BACKWARD = torch.ops.partialconv_cuda.partial_conv_backward.default


SIZES = {1: (11,), 2: (7, 6), 3: (5, 6, 4)}
STRIDES = {1: [2], 2: [2, 1], 3: [1, 2, 1]}
CHANNELS_LAST = {2: torch.channels_last, 3: torch.channels_last_3d}


def forward_samples(device, dims=2):
    samples = []
    for mask, bias, groups, activation, dtype in [
        ("single", True, 1, "none", torch.float64),
        ("multi", False, 2, "relu", torch.float32),
        (None, True, 1, "leaky_relu", torch.float64),
        ("batch1", True, 2, "none", torch.float32),
    ]:
        x, m, w, b = to_device(random_problem(n=2, cin=4, cout=4, size=SIZES[dims], kernel=(3,) * dims,
                                              groups=groups, bias=bias, mask=mask, dtype=dtype), device)
        x.requires_grad_()
        w.requires_grad_()
        samples.append((x, m, w, b, STRIDES[dims], [1] * dims, [1] * dims, groups, activation, 0.1))
    if dims in CHANNELS_LAST:
        channels_last = samples[0][0].detach().to(memory_format=CHANNELS_LAST[dims]).requires_grad_()
        samples.append((channels_last,) + samples[0][1:])
    return samples


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_opcheck_forward(device, dims):
    for args in forward_samples(device, dims):
        torch.library.opcheck(FORWARD, args)


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_opcheck_backward(device, dims):
    for args in forward_samples(device, dims):
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


LAYERS = {1: PartialConv1d, 2: PartialConv2d, 3: PartialConv3d}
FUNCTIONS = {1: partial_conv1d, 2: partial_conv2d, 3: partial_conv3d}


@pytest.mark.parametrize("dims", [1, 3])
def test_compile_fullgraph_and_export_in_1d_and_3d(dims):
    torch._dynamo.reset()
    torch.manual_seed(0)
    first = LAYERS[dims](3, 8, 3, padding=1, return_mask=True, activation="relu")
    second = LAYERS[dims](8, 4, 3, stride=2, padding=1, return_mask=True, multi_channel=True)

    def net(x, m):
        y, m = first(x, m)
        return second(y, m.expand(-1, 8, *m.shape[2:]))

    size = (2, 3, 16) if dims == 1 else (2, 3, 6, 8, 8)
    x = torch.randn(size)
    m = (torch.rand(size[0], 1, *size[2:]) > 0.4).float()
    expected, expected_mask = net(x, m)
    expected.square().sum().backward()
    grads = [p.grad.clone() for p in (*first.parameters(), *second.parameters())]
    for p in (*first.parameters(), *second.parameters()):
        p.grad = None
    out, out_mask = torch.compile(net, fullgraph=True)(x, m)
    out.square().sum().backward()
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(out_mask, expected_mask)
    for ours, ref in zip([p.grad for p in (*first.parameters(), *second.parameters())], grads):
        torch.testing.assert_close(ours, ref)
    exported = torch.export.export(first, (x, m))
    assert any(node.target == FORWARD for node in exported.graph.nodes)
    torch.testing.assert_close(exported.module()(x, m)[0], first(x, m)[0])


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_torch_func_transforms_match_the_reference(dims):
    """Forward mode (jvp, jacfwd) gave all-zero tangents and reverse-mode transforms (jacrev, grad)
    failed before PartialConvFunction; vmap runs the op per batch element."""
    x, m, w, b = random_problem(n=1, cin=2, cout=3, size=(5,) * dims, kernel=(3,) * dims, seed=3)
    kwargs = dict(padding=1, activation="leaky_relu", negative_slope=0.1)

    def ours(x, w, b):
        return FUNCTIONS[dims](x, m, w, b, **kwargs)[0]

    def reference(x, w, b):
        return partial_conv_reference(x, m, w, b, **kwargs)[0]

    tangents = tuple(torch.randn_like(t) for t in (x, w, b))
    (out, tangent), (ref, ref_tangent) = (torch.func.jvp(f, (x, w, b), tangents) for f in (ours, reference))
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    assert tangent.abs().max() > 0
    torch.testing.assert_close(tangent, ref_tangent, rtol=1e-12, atol=1e-12)
    for transform in (torch.func.jacfwd, torch.func.jacrev):
        for got, want in zip(transform(ours, argnums=(0, 1, 2))(x, w, b), transform(reference, argnums=(0, 1, 2))(x, w, b)):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    grad = torch.func.grad(lambda x: ours(x, w, b).square().sum())(x)
    torch.testing.assert_close(grad, torch.func.grad(lambda x: reference(x, w, b).square().sum())(x),
                               rtol=1e-12, atol=1e-12)
    batch = torch.stack([x[0], -x[0]]).unsqueeze(1)
    torch.testing.assert_close(torch.func.vmap(lambda x: ours(x, w, b))(batch),
                               torch.stack([reference(x, w, b) for x in batch]), rtol=1e-12, atol=1e-12)
    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(x, tangents[0])
        forward_tangent = torch.autograd.forward_ad.unpack_dual(ours(dual, w, b)).tangent
    torch.testing.assert_close(forward_tangent, torch.func.jvp(lambda x: reference(x, w, b), (x,), tangents[:1])[1],
                               rtol=1e-12, atol=1e-12)
    with pytest.raises(NotImplementedError, match="second-order derivatives"):
        torch.func.hessian(lambda x: ours(x, w, b).sum())(x)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_3d(dtype):
    torch.manual_seed(0)
    layer = PartialConv3d(3, 5, 3, padding=1, return_mask=True)
    x = torch.randn(2, 3, 4, 6, 6)
    m = (torch.rand(2, 1, 4, 6, 6) > 0.5).float()
    with torch.autocast("cpu", dtype=dtype):
        out, mask = layer(x, m)
    assert out.dtype == dtype and mask.dtype == dtype
    low = [t.detach().to(dtype).double() for t in (x, m, layer.weight, layer.bias)]
    ref, _ = partial_conv_reference(*low, padding=1)
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(out.detach().double(), ref, rtol=2 * eps, atol=8 * eps * ref.abs().max().item())


def test_compiled_autograd_traces_backward():
    """torch's compiled autograd traces the backward graph through the op's C++ autograd node
    (which it refuses when a node has non-differentiable outputs) and gives eager's gradients."""
    torch.manual_seed(0)
    layer = PartialConv2d(3, 4, 3, padding=1, activation="relu")
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    m = (torch.rand(2, 1, 8, 8) > 0.3).float()

    def gradients():
        return torch.autograd.grad(layer(x, m).square().sum(), [x, layer.weight, layer.bias])

    expected = gradients()
    with torch._dynamo.compiled_autograd._enable(torch.compile(backend="eager")):
        got = gradients()
    for ours, want in zip(got, expected):
        torch.testing.assert_close(ours, want, rtol=1e-6, atol=1e-6)
