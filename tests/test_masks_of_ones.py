"""Where X*M is X (no mask, or a mask whose every element is 1: the deep layers of an inpainting
U-Net see no holes), the CPU dense path convolves the input itself instead of a masked copy and
takes the convolution's input gradient as it is (dense_path.cpp's mask_is_ones and
input_is_bands). Outputs, updated masks and gradients against the float64 reference, and
forward_path's word on whether the input itself was convolved: masks of ones of every form, a
batch split into bands at the band size, channels-last bands, and the cases that must not take
it: masks whose window sums look like ones but whose elements are not (pairs of 0 and 2; a hole
that no window reads), an image with a hole, windows all padding, a dtype that needs converting,
an input in the other layout."""
import pytest
import torch
from conftest import check_case_against_reference

INPUT_ITSELF = "with the input itself as the bands"


def ones(x, m):
    return x, torch.ones_like(m)


def expanded_ones(x, m):
    """A single-channel mask of ones seen as C_in channels with stride 0."""
    return x, torch.ones(m.shape[0], 1, *m.shape[2:], dtype=m.dtype).expand_as(m)


def zero_and_two_pairs(x, m):
    """Along the width, 0 then 2 in every window of a 2-wide stride-2 kernel: each window sums to
    its count, as a mask of ones would, yet X*M is not X."""
    m = torch.ones_like(m)
    m[..., 0::2] = 0
    m[..., 1::2] = 2
    return x, m


def hole_no_window_reads(x, m):
    """Ones but for a hole (holding NaN in the input) at an odd position, which a 1x1 stride-2
    convolution never reads."""
    m = torch.ones_like(m)
    m[0, :, 1, 1] = 0
    x = x.clone()
    x[0, :, 1, 1] = float("nan")
    return x, m


def ones_but_one_pixel(x, m):
    m = torch.ones_like(m)
    m[1, 0, 2, 3] = 0
    return x, m


COMMON = dict(stride=1, padding=1, dilation=1, kernel=(3, 3))
CASES = [
    dict(COMMON, id="ones-single", n=2, cin=5, cout=4, size=(7, 9), mask="single", activation="relu", edit=ones,
         input_itself=True),
    dict(COMMON, id="ones-multi", n=2, cin=5, cout=4, size=(7, 9), mask="multi", activation=None, edit=ones,
         input_itself=True),
    dict(COMMON, id="no-mask", n=3, cin=4, cout=3, size=(6, 8), mask=None, activation="leaky_relu",
         input_itself=True),
    dict(COMMON, id="ones-expanded", n=2, cin=6, cout=4, size=(8, 7), mask="multi", activation="relu",
         edit=expanded_ones, input_itself=True),
    dict(COMMON, id="ones-shared-by-the-batch", n=3, cin=4, cout=5, size=(6, 6), mask="batch1", activation=None,
         edit=ones, input_itself=True),
    dict(COMMON, id="ones-stride-2-groups", n=2, cin=6, cout=4, size=(9, 8), mask="multi", activation="relu",
         edit=ones, groups=2, stride=2, input_itself=True),
    # 48 * 256 * 256 elements an image: images 0 and 1 are one band, image 2 a band alone (a slice
    # of the input's batch)
    dict(COMMON, id="ones-bands-at-the-band-size", n=3, cin=48, cout=2, size=(256, 256), mask="single",
         activation=None, edit=ones, input_itself=True),
    # few output channels, many input ones: channels-last bands, which a channels-last input is
    dict(COMMON, id="ones-channels-last-bands", n=2, cin=16, cout=3, size=(9, 10), mask="multi", activation=None,
         edit=ones, dtype=torch.float32, channels_last=True, input_itself=True),
    dict(COMMON, id="ones-channels-last-bands-contiguous-input", n=2, cin=16, cout=3, size=(9, 10), mask="multi",
         activation=None, edit=ones, dtype=torch.float32, input_itself=False),
    dict(COMMON, id="ones-channels-last-input", n=2, cin=5, cout=6, size=(7, 8), mask="single", activation="relu",
         edit=ones, channels_last=True, input_itself=False),
    dict(COMMON, id="ones-1d", n=2, cin=4, cout=3, size=(17,), kernel=(3,), mask="multi", activation=None, edit=ones,
         input_itself=True),
    dict(COMMON, id="ones-3d", n=2, cin=3, cout=4, size=(4, 5, 6), kernel=(3, 3, 3), mask="single",
         activation="relu", edit=ones, input_itself=True),
    dict(COMMON, id="ones-bfloat16", n=2, cin=5, cout=4, size=(7, 9), mask="multi", activation=None, edit=ones,
         dtype=torch.bfloat16, input_itself=False),
    dict(COMMON, id="window-sums-of-ones-from-0-and-2", n=2, cin=3, cout=4, size=(6, 8), kernel=(2, 2), stride=2,
         padding=0, mask="multi", activation=None, edit=zero_and_two_pairs, input_itself=False),
    dict(COMMON, id="hole-no-window-reads", n=2, cin=3, cout=4, size=(6, 6), kernel=(1, 1), stride=2, padding=0,
         mask="single", activation=None, edit=hole_no_window_reads, input_itself=False),
    dict(COMMON, id="ones-but-one-pixel", n=2, cin=4, cout=3, size=(6, 7), mask="multi", activation="relu",
         edit=ones_but_one_pixel, input_itself=False),
    # padding 3 around a 3x3 kernel: the first and last output rows see only padding (holes), so
    # the images are not one band each
    dict(COMMON, id="ones-windows-all-padding", n=2, cin=3, cout=4, size=(5, 5), padding=3, mask="single",
         activation=None, edit=ones, input_itself=False),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c["id"])
def test_masks_of_ones_match_reference(case, monkeypatch):
    monkeypatch.setenv("PARTIALCONV_CPU_PATH", "dense")
    path = check_case_against_reference(case)
    assert path.startswith("cpu: dense bands"), path
    assert (INPUT_ITSELF in path) == case["input_itself"], path
