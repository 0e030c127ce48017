"""The CPU's few-positions GEMM kernels (csrc/cpu/few_positions_gemm.cpp): the packed path runs a
chunk of at most 8 output positions through them, and the path choice takes the packed path for
every batch of at most 8 output positions (PConvUNet's deepest layers). Outputs, updated masks and
gradients against the float64 reference, with the kernels' row, position and K tails, groups, 1-D
to 3-D, half types, images without a valid window, and the baseline (non-AVX2) build of them."""
import os
import subprocess
import sys

import pytest
import torch
from conftest import check_case_against_reference as check_against_reference, random_problem
from partialconv_cuda import info, partial_conv2d

FEW_POSITIONS = "the packed path with its own few-positions GEMM kernels"

CASES = [
    # K = 70 * 9 (no multiple of the 8- and 24-wide vector tiles), 13 output channels (none of the 3-
    # or 4-row tiles), 4 positions
    dict(id="tails", n=1, cin=70, cout=13, size=(2, 2), kernel=(3, 3), stride=1, padding=1, dilation=1,
         mask="multi", activation="leaky_relu"),
    dict(id="one-position", n=1, cin=33, cout=7, size=(3, 3), kernel=(3, 3), stride=2, padding=0, dilation=1,
         mask="single", activation="relu"),
    # 1, 2 and 3 positions run tiles of that many positions and 8, 6 and 4 rows: 19, 13 and 11
    # output channels are whole tiles and a tail
    dict(id="one-position-row-tiles", n=1, cin=9, cout=19, size=(1, 1), kernel=(3, 3), stride=1, padding=1,
         dilation=1, mask=None, activation=None, dtype=torch.float32),
    dict(id="two-positions", n=1, cin=30, cout=13, size=(1, 2), kernel=(3, 3), stride=1, padding=1, dilation=1,
         mask="multi", activation="relu"),
    dict(id="three-positions", n=1, cin=21, cout=11, size=(3,), kernel=(3,), stride=1, padding=1, dilation=1,
         mask=None, activation="leaky_relu"),
    dict(id="batch-shared-mask", n=2, cin=40, cout=9, size=(2, 2), kernel=(3, 3), stride=1, padding=1, dilation=1,
         mask="batch1", activation=None),
    dict(id="first-image-all-holes", n=2, cin=16, cout=5, size=(2, 2), kernel=(3, 3), stride=1, padding=1,
         dilation=1, mask="single", activation="leaky_relu", holes_in_image=0),
    dict(id="groups", n=1, cin=24, cout=12, groups=3, size=(2, 3), kernel=(3, 3), stride=1, padding=1, dilation=1,
         mask="multi", activation=None),
    dict(id="dilated", n=1, cin=19, cout=6, size=(2, 3), kernel=(3, 3), stride=1, padding=2, dilation=2,
         mask=None, activation="relu"),
    dict(id="1d", n=1, cin=50, cout=11, size=(7,), kernel=(3,), stride=2, padding=1, dilation=1,
         mask="single", activation="leaky_relu"),
    dict(id="3d", n=1, cin=10, cout=5, size=(2, 2, 2), kernel=(3, 3, 3), stride=1, padding=1, dilation=1,
         mask="multi", activation=None),
    dict(id="float32", n=1, cin=100, cout=17, size=(2, 2), kernel=(3, 3), stride=1, padding=1, dilation=1,
         mask="multi", activation="leaky_relu", dtype=torch.float32),
    dict(id="bfloat16", n=1, cin=20, cout=6, size=(3, 3), kernel=(3, 3), stride=2, padding=1, dilation=1,
         mask="single", activation=None, dtype=torch.bfloat16),
]

@pytest.mark.parametrize("case", CASES, ids=lambda c: c["id"])
def test_few_positions_match_reference(case, monkeypatch):
    """A batch of at most 8 output positions takes the packed path with the few-positions kernels
    (forward_path says so), whatever its holes, and matches the reference."""
    monkeypatch.delenv("PARTIALCONV_CPU_PATH", raising=False)
    path = check_against_reference(case)
    assert path.startswith("cpu: packed positions") and "(backward: packed positions" in path, path
    assert FEW_POSITIONS in path, path


def test_nine_positions_or_three_images_are_not_few(monkeypatch):
    """The path choice's bounds: 9 output positions, or 3 images, are decided by the valid fraction
    (the dense path's batched convolution); 8 positions in 2 images are few."""
    monkeypatch.delenv("PARTIALCONV_CPU_PATH", raising=False)
    x, m, w, _ = random_problem(n=1, cin=4, cout=3, size=(3, 3), mask=None)
    path = info.forward_path(x, m, w, padding=1)
    assert path.startswith("cpu: dense bands") and FEW_POSITIONS not in path, path
    x, m, w, _ = random_problem(n=3, cin=4, cout=3, size=(1, 1), mask=None)
    assert FEW_POSITIONS not in info.forward_path(x, m, w, padding=1)
    x, m, w, _ = random_problem(n=2, cin=4, cout=3, size=(2, 2), mask=None)
    path = info.forward_path(x, m, w, padding=1)
    assert FEW_POSITIONS in path and "8 output positions in 2 image(s)" in path, path


def test_few_positions_chunk_after_a_gemm_chunk(monkeypatch):
    """Forced packed path with 66 positions (no mask: all valid) and K = 4200: a chunk of 64
    positions (packed_path.cpp's least per GEMM) through ATen's GEMM, then one of 2 through the
    few-positions kernels, which add to the weight gradient the first wrote."""
    monkeypatch.setenv("PARTIALCONV_CPU_PATH", "packed")
    check_against_reference(dict(n=1, cin=1400, cout=5, size=(66,), kernel=(3,), stride=1, padding=1, dilation=1,
                                 mask=None, activation="leaky_relu"))


def test_few_positions_gradcheck(monkeypatch):
    monkeypatch.delenv("PARTIALCONV_CPU_PATH", raising=False)
    x, m, w, b = random_problem(n=2, cin=5, cout=3, size=(2, 2), mask="multi", seed=3)
    inputs = [t.requires_grad_() for t in (x, w, b)]
    assert torch.autograd.gradcheck(
        lambda x, w, b: partial_conv2d(x, m, w, b, padding=1, activation="leaky_relu", negative_slope=0.2)[0],
        inputs)


def test_baseline_kernels_match_reference():
    """ATEN_CPU_CAPABILITY=default runs the kernels' baseline (SSE2) build: the same results."""
    script = (
        "import sys; sys.path.insert(0, %r)\n"
        "from test_few_positions import CASES, check_against_reference\n"
        "for case in CASES: check_against_reference(case)\n"
        "print('checked', len(CASES))\n" % os.path.dirname(__file__))
    environment = dict(os.environ, ATEN_CPU_CAPABILITY="default", PARTIALCONV_CPU_PATH="auto")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=environment)
    assert result.returncode == 0, result.stderr
    assert f"checked {len(CASES)}" in result.stdout
