import pytest
import torch

from partialconv_cuda import PartialConv2d
from partialconv_cuda.masks import irregular_masks
from partialconv_cuda.models import PConvUNet, ReferencePartialConv2d, inpainting_pixel_loss, pconv_unet_layers


def multiply_adds(layer, size):
    side = size // layer.scale // layer.stride
    return layer.out_channels * layer.in_channels * layer.kernel_size ** 2 * side * side


def test_paper_architecture_and_its_multiply_adds():
    layers = pconv_unet_layers()
    assert [layer.name for layer in layers] == [f"enc{i}" for i in range(1, 9)] + [f"dec{i}" for i in range(8, 0, -1)]
    assert [(l.in_channels, l.out_channels, l.kernel_size, l.stride) for l in layers[:4]] == [
        (3, 64, 7, 2), (64, 128, 5, 2), (128, 256, 5, 2), (256, 512, 3, 2)]
    assert [(l.in_channels, l.out_channels) for l in layers[-4:]] == [(768, 256), (384, 128), (192, 64), (67, 3)]
    assert all(l.kernel_size == 3 and l.stride == 1 and l.multi_channel for l in layers[8:])
    # The paper's 16 layers: about 38 GMAC per 512x512 image.
    assert sum(multiply_adds(layer, 512) for layer in layers) / 1e9 == pytest.approx(38.0, abs=0.1)


def test_same_parameters_for_both_layers():
    ours, reference = PConvUNet(depth=3), PConvUNet(depth=3, layer_factory=ReferencePartialConv2d)
    assert ours.state_dict().keys() == reference.state_dict().keys()
    reference.load_state_dict(ours.state_dict())
    assert isinstance(ours.blocks["enc1"].conv, PartialConv2d)


@pytest.mark.parametrize("mask_batch", [2, 1])
def test_ours_and_reference_agree_in_float64(mask_batch):
    torch.manual_seed(0)
    ours = PConvUNet(depth=3).double()
    reference = PConvUNet(depth=3, layer_factory=ReferencePartialConv2d).double()
    reference.load_state_dict(ours.state_dict())
    image = torch.randn(2, 3, 24, 32, dtype=torch.float64)
    mask = irregular_masks(mask_batch, 24, 32, 0.4, seed=1, dtype=torch.float64)
    results = []
    for model in (ours, reference):
        output, updated_mask = model(image, mask)
        loss = inpainting_pixel_loss(output, image, mask)
        loss.backward()
        results.append((output, updated_mask, loss, [p.grad for p in model.parameters()]))
    (output, updated_mask, loss, grads), (ref_output, ref_mask, ref_loss, ref_grads) = results
    assert output.shape == (2, 3, 24, 32) and updated_mask.shape == (2, 1, 24, 32)
    torch.testing.assert_close(output, ref_output, rtol=1e-10, atol=1e-10)
    assert torch.equal(updated_mask, ref_mask)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=0)
    for grad, ref_grad in zip(grads, ref_grads):
        torch.testing.assert_close(grad, ref_grad, rtol=1e-8, atol=1e-10)


def test_holes_of_the_input_do_not_reach_the_output():
    model = PConvUNet(depth=2).double().eval()
    image = torch.randn(1, 3, 16, 16, dtype=torch.float64)
    mask = irregular_masks(1, 16, 16, 0.5, seed=2, dtype=torch.float64)
    poisoned = torch.where(mask == 0, torch.full_like(image, 1e6), image)
    torch.testing.assert_close(model(image, mask)[0], model(poisoned, mask)[0])


def test_rejects_sizes_that_are_not_multiples_of_two_to_the_depth():
    with pytest.raises(ValueError, match="multiples of 256"):
        PConvUNet()(torch.zeros(1, 3, 128, 128), torch.ones(1, 1, 128, 128))
