"""The CPU dense path convolves consecutive images whose band plan is the whole image as one
batched band (dense_path.cpp's images_in_band: oneDNN runs a batch of small images far faster
than its images one by one). Outputs, updated masks and gradients against the float64 reference
where groups form, end at an image with bands of its own (a stripe of holes wider than the
window), end at the band size (two images of 3.1 M elements), are the whole batch (the output
written in place), and with channels-last bands, 1-D, 3-D and half types."""
import pytest
import torch
from conftest import check_case_against_reference

CASES = [
    # image 2's stripe of holes splits it into two bands: groups [0, 1], [2], [3, 4]
    dict(id="group-ends-at-a-banded-image", n=5, cin=6, cout=5, size=(14, 9), kernel=(3, 3), stride=1, padding=1,
         dilation=1, mask="single", activation="leaky_relu", hole_rows=(2, 4, 10)),
    dict(id="shared-mask", n=3, cin=5, cout=4, size=(7, 8), kernel=(3, 3), stride=2, padding=1, dilation=1,
         mask="batch1", activation="relu"),
    dict(id="channels-last-bands", n=3, cin=16, cout=3, size=(9, 10), kernel=(3, 3), stride=1, padding=1, dilation=1,
         mask="multi", activation=None, dtype=torch.float32),
    dict(id="whole-batch-in-place", n=4, cin=8, cout=6, size=(6, 7), kernel=(3, 3), stride=1, padding=1, dilation=1,
         mask="single", activation="relu", dtype=torch.float32),
    # 48 * 256 * 256 elements an image: two images fill a band of 2^23, the third is a band alone
    dict(id="groups-end-at-the-band-size", n=3, cin=48, cout=2, size=(256, 256), kernel=(3, 3), stride=1,
         padding=1, dilation=1, mask="single", activation=None),
    dict(id="1d", n=3, cin=7, cout=4, size=(20,), kernel=(3,), stride=2, padding=1, dilation=1, mask=None,
         activation="leaky_relu"),
    dict(id="3d", n=2, cin=4, cout=3, size=(4, 5, 6), kernel=(3, 3, 3), stride=1, padding=1, dilation=1,
         mask="multi", activation="relu"),
    dict(id="bfloat16", n=3, cin=6, cout=4, size=(8, 8), kernel=(3, 3), stride=1, padding=2, dilation=2,
         mask="single", activation=None, dtype=torch.bfloat16),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c["id"])
def test_batched_bands_match_reference(case, monkeypatch):
    monkeypatch.setenv("PARTIALCONV_CPU_PATH", "dense")
    path = check_case_against_reference(case)
    assert path.startswith("cpu: dense bands"), path
