"""Shared test helpers: random problems, masks, and the CUDA marker."""
import atexit
import os
import shutil
import sys
import tempfile
import zlib
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

# The benchmark package (bench/) is not installed; its tests import it from the source tree. It is
# appended, not prepended, so that `partialconv_cuda` still resolves to the installed package.
sys.path.append(str(Path(__file__).resolve().parent.parent))
# A fresh Inductor cache per test session: its FX graph cache does not key on an op's fake
# implementation, so a cache from an older build can replay stale output shapes.
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="partialconv_inductor_")
    atexit.register(shutil.rmtree, os.environ["TORCHINDUCTOR_CACHE_DIR"], ignore_errors=True)

CUDA = torch.cuda.is_available()
# Where the op runs: the CPU's paths, each forced (PARTIALCONV_CPU_PATH; "vendor" is the code of
# the CUDA vendor path, run here on the CPU), and CUDA's two paths, each forced
# (PARTIALCONV_CUDA_PATH).
BACKENDS = [pytest.param("cpu:dense", id="cpu-dense"), pytest.param("cpu:packed", id="cpu-packed"),
            pytest.param("cpu:vendor", id="cpu-vendor"),
            pytest.param("cuda:fused", id="cuda-fused", marks=pytest.mark.cuda),
            pytest.param("cuda:vendor", id="cuda-vendor", marks=pytest.mark.cuda)]


@pytest.fixture(params=BACKENDS)
def device(request, monkeypatch):
    """The device a test runs on; for the CPU also the path its kernels take. On CUDA float32 runs
    exactly (TF32 off, as these tests compare with float32 tolerances); tests/test_cuda.py checks
    the TF32 kernels."""
    device, _, path = request.param.partition(":")
    monkeypatch.setenv("PARTIALCONV_CPU_PATH" if device == "cpu" else "PARTIALCONV_CUDA_PATH", path)
    if device == "cuda":
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    return device


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU; skipped without one")


def pytest_collection_modifyitems(config, items):
    if CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none visible)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def stable_seed(case):
    """A seed from the case itself, the same in every process (hash() of a str is salted per
    process), so that a failure reproduces from its test id."""
    return zlib.crc32(str(case).encode()) % 1000


def random_mask(kind, n, channels, *spatial, generator, dtype=torch.float64, hole_ratio=0.4):
    """A mask of the given kind: None, 'single' (N,1,*spatial), 'multi' (N,C,*spatial), 'soft'
    (values in [0, 1] with exact zeros), 'batch1' (1,1,*spatial), 'batch1_multi' (1,C,*spatial),
    'empty' (all holes)."""
    if kind is None:
        return None
    shape = {
        "single": (n, 1, *spatial),
        "multi": (n, channels, *spatial),
        "soft": (n, 1, *spatial),
        "batch1": (1, 1, *spatial),
        "batch1_multi": (1, channels, *spatial),
        "empty": (n, 1, *spatial),
    }[kind]
    if kind == "empty":
        return torch.zeros(shape, dtype=dtype)
    valid = (torch.rand(shape, generator=generator) >= hole_ratio).to(dtype)
    if kind == "soft":
        valid = valid * torch.rand(shape, generator=generator, dtype=torch.float64).to(dtype)
    return valid


def random_problem(*, n=2, cin=4, cout=6, size=(9, 11), kernel=(3, 3), groups=1, bias=True,
                   mask="single", dtype=torch.float64, seed=0, hole_ratio=0.4):
    """(input, mask, weight, bias) on CPU, random (never zeros); len(size) == len(kernel) spatial
    dimensions."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cin, *size, generator=generator, dtype=torch.float64).to(dtype)
    w = torch.randn(cout, cin // groups, *kernel, generator=generator, dtype=torch.float64).to(dtype)
    b = torch.randn(cout, generator=generator, dtype=torch.float64).to(dtype) if bias else None
    m = random_mask(mask, n, cin, *size, generator=generator, dtype=dtype, hole_ratio=hole_ratio)
    return x, m, w, b


def check_case_against_reference(case):
    """Runs a case (a dict: n, cin, cout, size, kernel, stride, padding, dilation, mask, activation;
    optional groups, dtype, holes_in_image: an image made all holes, hole_rows: (image, first, last)
    rows made holes, edit: a function (x, mask) -> (x, mask) of the float64 problem, channels_last:
    the input made channels-last) through the op, forward and backward, and asserts outputs,
    updated masks and gradients equal the float64 reference; returns forward_path's line."""
    from partialconv_cuda import info, partial_conv1d, partial_conv2d, partial_conv3d, partial_conv_reference

    dtype = case.get("dtype", torch.float64)
    x, m, w, b = random_problem(n=case["n"], cin=case["cin"], cout=case["cout"], size=case["size"],
                                kernel=case["kernel"], groups=case.get("groups", 1), mask=case["mask"], seed=23)
    if "holes_in_image" in case:
        m[case["holes_in_image"]] = 0
    if "hole_rows" in case:
        image, first, last = case["hole_rows"]
        m[image, :, first:last] = 0
    if "edit" in case:
        x, m = case["edit"](x, m)
    conv = dict(stride=case["stride"], padding=case["padding"], dilation=case["dilation"],
                groups=case.get("groups", 1))
    kwargs = dict(conv, activation=case["activation"], negative_slope=0.2)
    ms = None if m is None else m.to(dtype)
    leaves = [t.to(dtype).detach().clone().requires_grad_() for t in (x, w, b)]  # not x, w, b themselves
    if case.get("channels_last"):
        layout = {4: torch.channels_last, 5: torch.channels_last_3d}[x.dim()]
        leaves[0] = leaves[0].detach().contiguous(memory_format=layout).requires_grad_()
    path = info.forward_path(leaves[0].detach(), ms, leaves[1].detach(), **conv)
    layer = {1: partial_conv1d, 2: partial_conv2d, 3: partial_conv3d}[len(case["size"])]
    out, updated = layer(leaves[0], ms, leaves[1], leaves[2], **kwargs)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    out.backward(upstream.to(dtype))
    exact = [t.to(dtype).double().detach().clone().requires_grad_() for t in (x, w, b)]
    ref, ref_updated = partial_conv_reference(exact[0], None if m is None else ms.double(), *exact[1:], **kwargs)
    ref.backward(upstream)
    # float32 sums of up to a few thousand products; bfloat16 results rounded once from float32 sums.
    tolerance = {torch.float64: 1e-12, torch.float32: 1e-5}.get(dtype, 2 * torch.finfo(dtype).eps)
    torch.testing.assert_close(updated.double(), ref_updated, rtol=0, atol=0)
    for ours, expected in [(out, ref)] + [(t.grad, e.grad) for t, e in zip(leaves, exact)]:
        scale = expected.abs().amax().item()
        torch.testing.assert_close(ours.double(), expected, rtol=tolerance, atol=tolerance * scale)
    return path


def to_device(tensors, device):
    return [None if t is None else t.to(device) for t in tensors]


def nvidia_formula(layer, x, mask):
    """NVIDIA's PartialConv2d / PartialConv3d forward (models/partialconv2d.py, partialconv3d.py)
    written from its formula, for binary masks: a ones-kernel convolution of the mask,
    ratio = winsize / (S + 1e-8) * U, out = ((conv + b) - b) * ratio + b, times U when there is a
    bias."""
    dims = x.dim() - 2
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[dims]
    ones = torch.ones(1, mask.shape[1], *layer.kernel_size, dtype=x.dtype, device=x.device)
    update = conv(mask, ones, None, layer.stride, layer.padding, layer.dilation)
    ratio = ones.numel() / (update + 1e-8)
    update = update.clamp(0, 1)
    ratio = ratio * update
    raw = conv(x * mask, layer.weight, layer.bias, layer.stride, layer.padding, layer.dilation, layer.groups)
    if layer.bias is None:
        return raw * ratio
    b = layer.bias.view(1, -1, *[1] * dims)
    return ((raw - b) * ratio + b) * update
