"""The defects that fuzzing the CPU path found (issue 9), each with the test that failed before
its fix: crashes run in a subprocess, so that a crash fails the test instead of ending the run."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import partialconv_cuda
from conftest import random_problem
from partialconv_cuda import partial_conv1d, partial_conv2d, partial_conv3d, partial_conv_reference

FORWARD = torch.ops.partialconv_cuda.partial_conv_forward.default
BACKWARD = torch.ops.partialconv_cuda.partial_conv_backward.default
PACKAGE_ROOT = str(Path(partialconv_cuda.__file__).resolve().parent.parent)
CPU_PATHS = ["dense", "packed", "vendor"]


def run_python(code, **env):
    """Runs code in a fresh interpreter with the package these tests imported (the installed one, or
    the in-place build); returns the CompletedProcess. It runs in PACKAGE_ROOT, because `python -c`
    puts its working directory first on sys.path: in the source tree of an installed package, the
    unbuilt source directory would shadow it."""
    environment = dict(os.environ, PYTHONPATH=PACKAGE_ROOT, **env)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=environment, cwd=PACKAGE_ROOT, timeout=300)


def assert_ran(result):
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert "OK" in result.stdout, result.stdout + result.stderr


# ---------------------------------------------------------------------------------------------
# Process crashes (SIGFPE): a division by zero in the dense path's band sizing.

@pytest.mark.parametrize("cpu_path", ["auto", *CPU_PATHS])
def test_empty_batch_of_width_zero_does_not_crash(cpu_path):
    assert_ran(run_python("""
        import torch
        from partialconv_cuda import partial_conv2d
        x = torch.zeros(0, 1, 5, 0, requires_grad=True)
        out, mask = partial_conv2d(x, torch.ones(0, 1, 5, 0), torch.randn(1, 1, 3, 3), padding=2)
        assert out.shape == (0, 1, 7, 2) and mask.shape == (0, 1, 7, 2)
        out.sum().backward()
        assert x.grad.shape == x.shape
        print("OK")
    """, PARTIALCONV_CPU_PATH=cpu_path))


@pytest.mark.parametrize("cpu_path", CPU_PATHS)
def test_input_of_width_zero_gives_holes_and_zero_gradients(cpu_path):
    assert_ran(run_python("""
        import torch
        from partialconv_cuda import partial_conv2d
        x = torch.zeros(2, 3, 5, 0, requires_grad=True)
        w = torch.randn(4, 3, 3, 3, requires_grad=True)
        b = torch.randn(4, requires_grad=True)
        out, mask = partial_conv2d(x, torch.ones(2, 1, 5, 0), w, b, padding=2)
        assert out.shape == (2, 4, 7, 2) and (out == 0).all() and (mask == 0).all()
        out.square().sum().backward()
        assert x.grad.shape == x.shape and (w.grad == 0).all() and (b.grad == 0).all()
        print("OK")
    """, PARTIALCONV_CPU_PATH=cpu_path))


@pytest.mark.parametrize("cpu_path", CPU_PATHS)
def test_huge_stride_does_not_crash(cpu_path):
    """stride 2^62: the dense path's band size product C_in * W * stride wrapped to 0."""
    assert_ran(run_python("""
        import torch
        from partialconv_cuda import partial_conv2d, partial_conv_reference
        g = torch.Generator().manual_seed(0)
        # 4 channels x width 5 x 2^62 wraps to 0 in int64
        x = torch.randn(1, 4, 5, 5, generator=g, dtype=torch.float64, requires_grad=True)
        m = (torch.rand(1, 1, 5, 5, generator=g) > 0.3).double()
        w = torch.randn(3, 4, 3, 3, generator=g, dtype=torch.float64)
        out, _ = partial_conv2d(x, m, w, None, stride=2**62, padding=1)
        ref, _ = partial_conv_reference(x, m, w, None, stride=8, padding=1)  # the same single window
        assert out.shape == (1, 3, 1, 1)
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
        out.sum().backward()
        print("OK")
    """, PARTIALCONV_CPU_PATH=cpu_path))


@pytest.mark.parametrize("cpu_path", CPU_PATHS)
def test_huge_dilation_allocates_by_the_input_not_the_window(cpu_path):
    """dilation = padding = 3e7 made the dense path size its band buffer by the dilated window
    (8.6 GB). Run under an address-space limit of 3 GB more than the interpreter uses."""
    assert_ran(run_python("""
        import resource
        import torch
        from partialconv_cuda import partial_conv2d, partial_conv_reference
        with open("/proc/self/statm") as statm:
            used = int(statm.read().split()[0]) * resource.getpagesize()
        resource.setrlimit(resource.RLIMIT_AS, (used + 3 * 2**30, resource.RLIM_INFINITY))
        g = torch.Generator().manual_seed(1)
        x = torch.randn(2, 6, 5, 5, generator=g, dtype=torch.float64, requires_grad=True)
        m = (torch.rand(2, 1, 5, 5, generator=g) > 0.3).double()
        w = torch.randn(3, 6, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
        out, updated = partial_conv2d(x, m, w, None, padding=30_000_000, dilation=30_000_000)
        # Only the centre tap of every window lies in the image: a 1x1 convolution, rescaled by 9.
        ref, ref_updated = partial_conv_reference(x, m, w[:, :, 1:2, 1:2] * 9, None)
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(updated, ref_updated)
        out.square().sum().backward()
        assert x.grad.isfinite().all() and w.grad[:, :, 0, 0].abs().max() == 0
        print("OK")
    """, PARTIALCONV_CPU_PATH=cpu_path))


# ---------------------------------------------------------------------------------------------
# Unchecked int64 overflow in the output-size arithmetic.

@pytest.mark.parametrize("changes", [dict(padding=2**63 - 1), dict(dilation=2**62), dict(padding=(1, 2**62))],
                         ids=["padding-2^63-1", "dilation-2^62", "padding-2^62"])
def test_overflowing_geometry_is_a_clear_error_in_eager_and_compile(changes):
    x, m, w, b = random_problem(n=2, cin=3, cout=6, size=(5, 5), dtype=torch.float32)
    message = "expected the padded input .* and the dilated kernel .* to stay below 2\\^62"
    with pytest.raises(ValueError, match=message):
        partial_conv2d(x, m, w, b, **changes)
    torch._dynamo.reset()
    compiled = torch.compile(lambda x, m, w, b: partial_conv2d(x, m, w, b, **changes), fullgraph=True)
    with pytest.raises(Exception, match=message):
        compiled(x, m, w, b)


# ---------------------------------------------------------------------------------------------
# The fake kernel applies the same checks and messages as the real one.

def good_args():
    x, m, w, b = random_problem(n=2, cin=4, cout=6, size=(8, 8), groups=2, dtype=torch.float32)
    return dict(input=x, mask=m, weight=w, bias=b, stride=[1, 1], padding=[1, 1], dilation=[1, 1], groups=2,
                activation="none", negative_slope=0.0)


BAD_FOR_FAKE = {
    "mask-channels": dict(mask=torch.ones(2, 3, 8, 8)),
    "mask-spatial": dict(mask=torch.ones(2, 1, 8, 7)),
    "mask-batch": dict(mask=torch.ones(3, 1, 8, 8)),
    "integer-dtype": dict(input=torch.ones(2, 4, 8, 8, dtype=torch.int32), weight=torch.ones(6, 2, 3, 3, dtype=torch.int32),
                          mask=None, bias=None),
    "weight-cin": dict(weight=torch.randn(6, 4, 3, 3)),
    "bias-length": dict(bias=torch.randn(5)),
    "groups": dict(groups=3),
    "negative-slope": dict(activation="leaky_relu", negative_slope=-0.5),
    "stride-0": dict(stride=[0, 1]),
    "stride-length": dict(stride=[1, 1, 1]),
    "weight-rank": dict(weight=torch.randn(6, 2, 3, 3, 3)),
    "output-too-small": dict(padding=[0, 0], weight=torch.randn(6, 2, 9, 3)),
}


@pytest.mark.parametrize("changes", BAD_FOR_FAKE.values(), ids=BAD_FOR_FAKE.keys())
def test_fake_kernel_raises_the_real_kernels_error(changes):
    args = dict(good_args(), **changes)
    with pytest.raises(Exception) as real:
        FORWARD(**args)
    with FakeTensorMode() as mode:
        fake = {k: mode.from_tensor(v) if isinstance(v, torch.Tensor) else v for k, v in args.items()}
        with pytest.raises(type(real.value)) as faked:
            FORWARD(**fake)
    assert str(faked.value) == str(real.value)


def test_compile_of_a_wrong_model_fails_at_compile_time_with_the_same_message():
    args = dict(good_args(), mask=torch.ones(2, 3, 8, 8))
    with pytest.raises(ValueError) as real:
        FORWARD(**args)
    torch._dynamo.reset()
    with pytest.raises(Exception, match="expected mask to have 1 channel .* or 4 .* got 3"):
        torch.compile(lambda **kw: FORWARD(**kw), fullgraph=True, backend="aot_eager")(**args)
    with pytest.raises(Exception, match="expected mask to have 1 channel .* or 4 .* got 3"):
        torch.export.export(_Call(), (), dict(args))
    assert "expected mask to have 1 channel" in str(real.value)


class _Call(torch.nn.Module):
    def forward(self, **kwargs):
        return FORWARD(**kwargs)


def test_fake_backward_checks_too():
    args = good_args()
    out, _, mask_scales = FORWARD(**args)
    common = (args["input"], args["mask"], args["weight"], None)
    narrow_grad = out[:, :3].contiguous()
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for t in (narrow_grad, *common, mask_scales)]
        with pytest.raises(ValueError, match=r"expected grad_output of shape \[2, 6, 8, 8\]"):
            BACKWARD(*fake, [1, 1], [1, 1], [1, 1], 2, "none", 0.0, [True, True, True])


# ---------------------------------------------------------------------------------------------
# Meta arguments with a CPU input returned uninitialised memory.

@pytest.mark.parametrize("argument", ["mask", "weight", "bias"])
def test_meta_argument_with_a_cpu_input_is_refused(argument):
    args = good_args()
    args[argument] = args[argument].to("meta")
    with pytest.raises(ValueError, match=f"expected {argument} on the input's device cpu, got meta"):
        FORWARD(**args)
    x, m, w, b = random_problem(n=2, cin=4, cout=6, size=(8, 8), dtype=torch.float32)
    x.requires_grad_()
    if argument != "bias":
        out, _ = partial_conv2d(x, m, w, b, padding=1)
        arguments = {"mask": m, "weight": w}
        arguments[argument] = arguments[argument].to("meta")
        _, _, scales = FORWARD(x, m, w, b, [1, 1], [1, 1], [1, 1], 1, "none", 0.0)
        with pytest.raises(ValueError, match=f"expected {argument} on the input's device cpu, got meta"):
            BACKWARD(out, x, arguments["mask"], arguments["weight"], None, scales, [1, 1], [1, 1], [1, 1], 1,
                     "none", 0.0, [True, True, True])


def test_meta_tensors_everywhere_give_shapes():
    args = {k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in good_args().items()}
    out, updated, scales = FORWARD(**args)
    assert out.device.type == "meta" and out.shape == (2, 6, 8, 8) and scales.shape == (2, 2, 8, 8)


# ---------------------------------------------------------------------------------------------
# C_out = 0: forward worked, backward raised ATen's error on the dense path.

@pytest.mark.parametrize("cpu_path", CPU_PATHS)
@pytest.mark.parametrize("dims", [1, 2, 3])
def test_no_output_channels(dims, cpu_path, monkeypatch):
    monkeypatch.setenv("PARTIALCONV_CPU_PATH", cpu_path)
    function = {1: partial_conv1d, 2: partial_conv2d, 3: partial_conv3d}[dims]
    x, m, w, b = random_problem(n=2, cin=3, cout=0, size=(5,) * dims, kernel=(3,) * dims)
    x.requires_grad_()
    w.requires_grad_()
    b.requires_grad_()
    out, mask = function(x, m, w, b, padding=1)
    assert out.shape == (2, 0, *(5,) * dims)
    torch.autograd.backward(out, torch.ones_like(out))
    assert torch.equal(x.grad, torch.zeros_like(x)) and w.grad.shape == w.shape and b.grad.shape == (0,)


# ---------------------------------------------------------------------------------------------
# NaN or -inf in the mask: forward gave 0 (a hole) and backward NaN; both follow the formula now.

@pytest.mark.parametrize("cpu_path", CPU_PATHS)
@pytest.mark.parametrize("poison", [float("nan"), float("-inf"), float("inf")], ids=["nan", "-inf", "+inf"])
def test_non_finite_mask_values_propagate_like_the_formula(poison, cpu_path, monkeypatch):
    monkeypatch.setenv("PARTIALCONV_CPU_PATH", cpu_path)
    x, m, w, b = random_problem(n=2, cin=3, cout=4, size=(9, 9))
    m[0, 0, 4, 4] = poison
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    out, updated = partial_conv2d(leaves[0], m, leaves[1], leaves[2], padding=1)
    ref, ref_updated = partial_conv_reference(x, m, w, b, padding=1)
    touched = torch.zeros_like(ref, dtype=torch.bool)
    touched[0, :, 3:6, 3:6] = True  # the windows that read the poisoned pixel
    assert out[touched].isnan().all() and not out[~touched].isnan().any()
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12, equal_nan=True)
    torch.testing.assert_close(updated, ref_updated, equal_nan=True)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=out.dtype)
    out.backward(upstream)
    assert leaves[1].grad.isnan().any(), "forward and backward agree: the weight sees the poisoned windows"
    if poison == float("-inf"):
        return  # the formula's gradient there mixes 0 * inf; ours is NaN over the whole window
    ref_leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    partial_conv_reference(ref_leaves[0], m, ref_leaves[1], ref_leaves[2], padding=1)[0].backward(upstream)
    for ours, expected in zip(leaves, ref_leaves):
        torch.testing.assert_close(ours.grad, expected.grad, rtol=1e-12, atol=1e-12, equal_nan=True)
