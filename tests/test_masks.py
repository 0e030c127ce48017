import pytest
import torch

from partialconv_cuda.masks import irregular_masks


def test_same_seed_same_masks_other_seed_other_masks():
    first = irregular_masks(3, 64, 48, 0.3, seed=7)
    assert torch.equal(first, irregular_masks(3, 64, 48, 0.3, seed=7))
    assert not torch.equal(first, irregular_masks(3, 64, 48, 0.3, seed=8))


def test_image_does_not_depend_on_batch_size():
    assert torch.equal(irregular_masks(2, 40, 40, 0.5, seed=3), irregular_masks(4, 40, 40, 0.5, seed=3)[:2])


@pytest.mark.parametrize("hole_ratio", [0.0, 0.1, 0.3, 0.5, 0.7])
@pytest.mark.parametrize("size", [(64, 64), (37, 90)])
def test_exact_hole_ratio_per_image(hole_ratio, size):
    height, width = size
    masks = irregular_masks(4, height, width, hole_ratio, seed=11)
    assert masks.shape == (4, 1, height, width) and masks.dtype == torch.float32
    assert ((masks == 0) | (masks == 1)).all()
    holes_per_image = (masks == 0).flatten(1).sum(1)
    assert holes_per_image.tolist() == [round(hole_ratio * height * width)] * 4


def test_images_differ_within_a_batch():
    masks = irregular_masks(2, 64, 64, 0.3, seed=0)
    assert not torch.equal(masks[0], masks[1])


def test_dtype_and_device():
    masks = irregular_masks(1, 16, 16, 0.2, dtype=torch.bfloat16, device="cpu")
    assert masks.dtype == torch.bfloat16 and masks.device.type == "cpu"


@pytest.mark.parametrize("hole_ratio", [-0.1, 1.0, 1.5])
def test_rejects_hole_ratio_outside_0_1(hole_ratio):
    with pytest.raises(ValueError, match="hole_ratio"):
        irregular_masks(1, 8, 8, hole_ratio)
