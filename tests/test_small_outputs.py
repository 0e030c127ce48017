"""The CPU path choice for small outputs (partial_conv_cpu.cpp, small_output_through_onednn): a 2-D
float32 / float16 / bfloat16 batch of at most 64 output positions that ATen's convolution would run
through oneDNN (a batch above 1, a kernel above 3x3, or more than 20480 input elements) takes the
packed path whatever its holes; forward_path says so, and the results match the float64 reference."""
import pytest
import torch
from conftest import check_case_against_reference, random_problem
from partialconv_cuda import info

SMALL_OUTPUT = "which ATen's convolution would run through oneDNN: the packed path"


def _case(**changes):
    # 336 x 8 x 8 = 21504 input elements, 4 x 4 = 16 output positions (PConvUNet's enc6, narrower)
    case = dict(n=1, cin=336, cout=10, size=(8, 8), kernel=(3, 3), stride=2, padding=1, dilation=1,
                mask="single", activation="relu", dtype=torch.float32)
    case.update(changes)
    return case


CASES = {
    "enc6-like": _case(),
    "no-holes-leaky": _case(mask=None, activation="leaky_relu"),
    "multi-mask-64-positions": _case(cin=350, size=(8, 8), stride=1, mask="multi"),
    "batch-of-small-images": _case(n=3, cin=16, size=(4, 4), stride=1),  # 3 x 16 positions, 768 elements
    "kernel-5x5-small-input": _case(cin=16, kernel=(5, 5), padding=2),  # 1024 elements, but a 5x5 kernel
    "image-of-holes": _case(n=2, holes_in_image=0),
    "bfloat16": _case(dtype=torch.bfloat16),
}


@pytest.mark.parametrize("name", list(CASES))
def test_small_outputs_take_the_packed_path(name, monkeypatch):
    monkeypatch.delenv("PARTIALCONV_CPU_PATH", raising=False)
    path = check_case_against_reference(CASES[name])
    assert path.startswith("cpu: packed positions") and "(backward: packed positions" in path, path
    assert SMALL_OUTPUT in path, path


@pytest.mark.parametrize("dtype, n, cin, size, stride, why", [
    (torch.float32, 1, 320, (8, 8), 2, "20480 input elements: ATen's im2col, as the packed path's"),
    (torch.float32, 1, 336, (17, 15), 2, "9 x 8 = 72 output positions"),
    (torch.float32, 5, 16, (4, 4), 1, "5 x 16 = 80 output positions"),
    (torch.float64, 1, 336, (8, 8), 2, "float64: no oneDNN"),
])
def test_other_shapes_are_decided_by_the_valid_fraction(dtype, n, cin, size, stride, why, monkeypatch):
    monkeypatch.delenv("PARTIALCONV_CPU_PATH", raising=False)
    x, m, w, _ = random_problem(n=n, cin=cin, cout=4, size=size, mask=None, dtype=dtype)
    path = info.forward_path(x, m, w, stride=stride, padding=1)
    assert path.startswith("cpu: dense bands") and SMALL_OUTPUT not in path, (why, path)
