"""CUDA-only checks (the shared grid in the other files also runs on CUDA through the device
fixture), each on both CUDA paths (the fused kernels and the vendor path, forced):
CPU/CUDA agreement on large shapes, 64-bit indexing, CUDA graphs, streams, determinism; and the
choice between the paths (partialconv_cuda.backends.benchmark, shapes only the vendor path takes)."""
import pytest
import torch

import partialconv_cuda
from conftest import random_problem
from partialconv_cuda import PartialConv2d, info, partial_conv1d, partial_conv2d, partial_conv3d, partial_conv_reference

pytestmark = pytest.mark.cuda


@pytest.fixture(params=["fused", "vendor"], autouse=True)
def cuda_path(request, monkeypatch):
    """Every test here runs on each CUDA path, forced; tests of the choice unset it."""
    monkeypatch.setenv("PARTIALCONV_CUDA_PATH", request.param)
    return request.param


@pytest.fixture
def benchmark_mode(monkeypatch):
    """partialconv_cuda.backends.benchmark on, nothing measured yet, no path forced."""
    monkeypatch.delenv("PARTIALCONV_CUDA_PATH")
    partialconv_cuda.backends.clear_measured_paths()
    partialconv_cuda.backends.benchmark = True
    yield
    partialconv_cuda.backends.benchmark = False
    partialconv_cuda.backends.clear_measured_paths()


def cuda_copy(tensors):
    return [None if t is None else t.cuda() for t in tensors]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [
    dict(n=4, cin=64, cout=128, size=(64, 64), kernel=(5, 5), stride=2, padding=2, mask="single"),
    dict(n=2, cin=256, cout=96, size=(33, 47), kernel=(3, 3), stride=1, padding=1, mask="multi"),
    dict(n=3, cin=3, cout=64, size=(128, 96), kernel=(7, 7), stride=2, padding=3, mask="batch1"),
], ids=["5x5-s2", "3x3-multi", "7x7-batch1-mask"])
def test_cpu_and_cuda_agree_on_large_shapes(shape, dtype):
    x, m, w, b = random_problem(n=shape["n"], cin=shape["cin"], cout=shape["cout"], size=shape["size"],
                                kernel=shape["kernel"], mask=shape["mask"], dtype=dtype, seed=1)
    kwargs = dict(stride=shape["stride"], padding=shape["padding"], activation="leaky_relu", negative_slope=0.2)
    results = []
    for device in ("cpu", "cuda"):
        leaves = [t.to(device).requires_grad_() for t in (x, w, b)]
        mask = m.to(device)
        out, updated = partial_conv2d(leaves[0], mask, leaves[1], leaves[2], **kwargs)
        upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=dtype).to(device)
        out.backward(upstream)
        results.append([out, updated] + [t.grad for t in leaves])
    tol = dict(rtol=1e-11, atol=1e-10) if dtype == torch.float64 else dict(rtol=2e-4, atol=2e-4)
    for cpu, cuda in zip(*results):
        torch.testing.assert_close(cuda.cpu(), cpu, **tol)


def test_past_2_31_elements_uses_64bit_indexing():
    """An input of more than 2^31 elements: offsets past int32 must be right. Compared with the
    reference on a crop at the far end of the tensor."""
    n, c, h, w = 2, 4, 16384, 16400  # 2.15e9 elements, 4.3 GB in float16
    assert n * c * h * w > 2**31
    x = torch.empty(n, c, h, w, dtype=torch.float16, device="cuda")
    x.normal_(generator=torch.Generator("cuda").manual_seed(0))
    mask = (torch.rand(1, 1, h, w, device="cuda") > 0.3).half()
    weight = torch.randn(2, c, 3, 3, device="cuda").half()
    bias = torch.randn(2, device="cuda").half()
    out, _ = partial_conv2d(x, mask, weight, bias, padding=1)
    crop = (slice(n - 1, n), slice(None), slice(h - 40, h), slice(w - 40, w))
    ref, _ = partial_conv_reference(x[crop].double(), mask[:, :, h - 40:, w - 40:].double(),
                                      weight.double(), bias.double(), padding=1)
    # the crop's own border is padding for the reference: compare its interior
    torch.testing.assert_close(out[crop][..., 1:-1, 1:-1].double(), ref[..., 1:-1, 1:-1], rtol=2e-3, atol=2e-3)
    del x, out


def test_cuda_graph_capture_and_replay():
    torch.manual_seed(0)
    layer = PartialConv2d(8, 16, 3, padding=1, return_mask=True, activation="relu").cuda()
    x = torch.randn(2, 8, 32, 32, device="cuda", requires_grad=True)
    m = (torch.rand(2, 1, 32, 32, device="cuda") > 0.4).float()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # warm up outside the graph
            out, _ = layer(x, m)
            out.sum().backward()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    layer.zero_grad(set_to_none=True)
    x.grad = None
    with torch.cuda.graph(graph):
        static_out, static_mask = layer(x, m)
        static_out.sum().backward()
    for seed in range(3):
        with torch.no_grad():
            x.copy_(torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)).cuda())
            m.copy_((torch.rand(m.shape, generator=torch.Generator().manual_seed(seed + 10)) > 0.4).float().cuda())
        x.grad.zero_()
        layer.weight.grad.zero_()
        graph.replay()
        torch.cuda.synchronize()
        ref, ref_mask = partial_conv_reference(x.detach(), m, layer.weight.detach(), layer.bias.detach(),
                                                 padding=1, activation="relu")
        torch.testing.assert_close(static_out, ref, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(static_mask, ref_mask)
        assert x.grad.abs().sum() > 0


def test_runs_on_the_current_stream():
    x, m, w, b = cuda_copy(random_problem(n=4, cin=16, cout=32, size=(64, 64), dtype=torch.float32))
    expected, _ = partial_conv2d(x, m, w, b, padding=1)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(50_000_000)  # keeps the stream busy: a kernel on another stream would race
        out, _ = partial_conv2d(x, m, w, b, padding=1)
    torch.cuda.current_stream().wait_stream(side)
    torch.testing.assert_close(out, expected)


def test_weight_gradient_is_deterministic():
    x, m, w, b = cuda_copy(random_problem(n=8, cin=32, cout=64, size=(64, 64), dtype=torch.float32, seed=4))
    grads = []
    torch.use_deterministic_algorithms(True)
    try:
        for _ in range(3):
            weight = w.clone().requires_grad_()
            out, _ = partial_conv2d(x, m, weight, b, padding=1)
            out.square().sum().backward()
            grads.append(weight.grad)
    finally:
        torch.use_deterministic_algorithms(False)
    assert all(torch.equal(grads[0], g) for g in grads[1:])


def test_compiled_layer_on_cuda_matches_eager():
    torch._dynamo.reset()
    layer = PartialConv2d(4, 8, 3, padding=1, return_mask=True).cuda().half()
    compiled = torch.compile(layer, fullgraph=True)
    x = torch.randn(2, 4, 24, 24, device="cuda", dtype=torch.float16)
    m = (torch.rand(2, 1, 24, 24, device="cuda") > 0.5).half()
    out, mask = compiled(x, m)
    ref, ref_mask = layer(x, m)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(mask, ref_mask)


@pytest.mark.parametrize("dims", [1, 3])
def test_cpu_and_cuda_agree_in_1d_and_3d(dims):
    size, kernel = ((200,), (5,)) if dims == 1 else ((6, 20, 18), (3, 5, 5))
    x, m, w, b = random_problem(n=2, cin=24, cout=40, size=size, kernel=kernel, mask="multi", seed=3)
    function = partial_conv1d if dims == 1 else partial_conv3d
    kwargs = dict(stride=2, padding=2, activation="relu")
    results = []
    for device in ("cpu", "cuda"):
        leaves = [t.to(device).requires_grad_() for t in (x, w, b)]
        out, updated = function(leaves[0], m.to(device), leaves[1], leaves[2], **kwargs)
        out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=out.dtype).to(device))
        results.append([out, updated] + [t.grad for t in leaves])
    for cpu, cuda in zip(*results):
        torch.testing.assert_close(cuda.cpu(), cpu, rtol=1e-11, atol=1e-10)


@pytest.mark.parametrize("allow_tf32", [True, False])
def test_float32_follows_the_cudnn_tf32_flag(allow_tf32, monkeypatch, cuda_path):
    """float32 runs on TF32 tensor cores when torch.backends.cudnn.allow_tf32 (conv2d's flag,
    default True) allows it, else exactly on CUDA cores (cuDNN follows the same flag)."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", allow_tf32)
    x, m, w, b = cuda_copy(random_problem(n=2, cin=64, cout=64, size=(32, 32), dtype=torch.float32, seed=6))
    path = info.forward_path(x, m, w, padding=1)
    if cuda_path == "fused":
        assert ("TF32 tensor cores" in path) == allow_tf32 and ("exactly on CUDA cores" in path) != allow_tf32
    out, _ = partial_conv2d(x, m, w, b, padding=1)
    ref, _ = partial_conv_reference(*[t.double() for t in (x, m, w, b)], padding=1)
    error = ((out.double() - ref).abs().max() / ref.abs().max()).item()
    assert error < (5e-3 if allow_tf32 else 1e-5), error


def test_more_images_than_a_grid_dimension_holds():
    """70000 images: the layout passes loop over gridDim.y (at most 65535)."""
    x = torch.randn(70000, 2, 4, 4, device="cuda")
    m = (torch.rand(70000, 1, 4, 4, device="cuda") > 0.3).float()
    w = torch.randn(3, 2, 3, 3, device="cuda")
    out, _ = partial_conv2d(x, m, w, None, padding=1)
    ref, _ = partial_conv_reference(x[-5:].double(), m[-5:].double(), w.double(), None, padding=1)
    torch.testing.assert_close(out[-5:].double(), ref, rtol=1e-4, atol=1e-4)


def test_forward_path_names_the_forced_path(cuda_path):
    x, m, w, _ = cuda_copy(random_problem(n=1, cin=3, cout=4, size=(32, 32), dtype=torch.float32))
    path = info.forward_path(x, m, w, padding=1)
    assert path.startswith(f"cuda: {cuda_path}") and "forced by PARTIALCONV_CUDA_PATH" in path


def test_the_paths_agree(cuda_path, monkeypatch):
    """The forced path against the other one, in 16-bit, forward and backward."""
    x, m, w, b = cuda_copy(random_problem(n=2, cin=32, cout=48, size=(40, 36), mask="multi", dtype=torch.float16,
                                          seed=8))
    results = {}
    for path in ("fused", "vendor"):
        monkeypatch.setenv("PARTIALCONV_CUDA_PATH", path)
        leaves = [t.clone().requires_grad_() for t in (x, w, b)]
        out, updated = partial_conv2d(leaves[0], m, leaves[1], leaves[2], stride=2, padding=1, activation="relu")
        out.backward(torch.ones_like(out))
        results[path] = [out, updated] + [t.grad for t in leaves]
    for fused, vendor in zip(results["fused"], results["vendor"]):
        scale = fused.float().abs().max().clamp_min(1)
        torch.testing.assert_close(vendor.float() / scale, fused.float() / scale, rtol=0, atol=2e-2)


def test_benchmark_mode_times_once_per_call_and_reuses(benchmark_mode):
    x, m, w, b = cuda_copy(random_problem(n=2, cin=16, cout=32, size=(48, 48), dtype=torch.float32, seed=9))
    assert "the default until measured" in info.forward_path(x, m, w, padding=1)
    ref, _ = partial_conv_reference(*[t.double() for t in (x, m, w, b)], padding=1)
    for _ in range(2):  # the first call times both paths, the second reuses the measurement
        out, _ = partial_conv2d(x, m, w, b, padding=1)
        torch.testing.assert_close(out.double(), ref, rtol=5e-3, atol=5e-3)
        path = info.forward_path(x, m, w, padding=1)
        assert "measured on the first call: fused" in path.split("(backward")[0], path
    # another layout is another call
    assert "the default until measured" in info.forward_path(x.to(memory_format=torch.channels_last), m, w, padding=1)


def test_deterministic_mode_never_times(benchmark_mode):
    x, m, w, b = cuda_copy(random_problem(n=2, cin=16, cout=32, size=(48, 48), dtype=torch.float32, seed=9))
    torch.use_deterministic_algorithms(True)
    try:
        partial_conv2d(x, m, w, b, padding=1)
        path = info.forward_path(x, m, w, padding=1)
    finally:
        torch.use_deterministic_algorithms(False)
    assert "deterministic algorithms: never timed" in path
    assert "the default until measured" in info.forward_path(x, m, w, padding=1)


def test_graph_capture_never_times(benchmark_mode):
    layer = PartialConv2d(8, 16, 3, padding=1, return_mask=True).cuda()
    x = torch.randn(2, 8, 32, 32, device="cuda")
    m = (torch.rand(2, 1, 32, 32, device="cuda") > 0.4).float()
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.no_grad():
        with torch.cuda.graph(graph):  # a timing sync inside the capture would fail it
            static_out, _ = layer(x, m)
    graph.replay()
    torch.cuda.synchronize()
    ref, _ = partial_conv_reference(x, m, layer.weight.detach(), layer.bias.detach(), padding=1)
    torch.testing.assert_close(static_out, ref, rtol=1e-4, atol=1e-4)
    assert "the default until measured" in info.forward_path(x, m, layer.weight, padding=1)


def test_shapes_the_fused_kernels_do_not_take_run_on_the_vendor_path(monkeypatch):
    """More groups than gridDim.z holds: the vendor path takes them unless fused is forced."""
    groups = 70000
    x = torch.randn(1, groups, 6, 6, device="cuda")
    m = (torch.rand(1, 1, 6, 6, device="cuda") > 0.3).float()
    w = torch.randn(groups, 1, 3, 3, device="cuda")
    with pytest.raises(ValueError, match="PARTIALCONV_CUDA_PATH=fused, but the fused kernels do not take this call"):
        monkeypatch.setenv("PARTIALCONV_CUDA_PATH", "fused")
        partial_conv2d(x, m, w, None, padding=1, groups=groups)
    monkeypatch.delenv("PARTIALCONV_CUDA_PATH")
    assert "the fused kernels do not take this call: groups must be at most" in info.forward_path(
        x, m, w, padding=1, groups=groups)
    out, _ = partial_conv2d(x, m, w, None, padding=1, groups=groups)
    ref, _ = partial_conv_reference(x[:, -3:].double(), m.double(), w[-3:].double(), None, padding=1, groups=3)
    torch.testing.assert_close(out[:, -3:].double(), ref, rtol=1e-4, atol=1e-4)


def test_a_bad_path_name_is_refused(monkeypatch):
    monkeypatch.setenv("PARTIALCONV_CUDA_PATH", "fast")
    x, m, w, _ = cuda_copy(random_problem(n=1, cin=3, cout=4, size=(8, 8), dtype=torch.float32))
    with pytest.raises(ValueError, match="PARTIALCONV_CUDA_PATH must be 'auto', 'fused' or 'vendor'"):
        partial_conv2d(x, m, w, None, padding=1)
