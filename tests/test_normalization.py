"""normalization='sum' (1/sum(M), the seed's layer) next to the default 'window' (sum(1)/sum(M)):
the seed's own layer, the reference, gradients, and every dimension."""
import pytest
import torch
from torch import nn

from conftest import random_problem, stable_seed, to_device
from partialconv_cuda import PartialConv2d, partial_conv1d, partial_conv2d, partial_conv3d, partial_conv_reference

FUNCTIONS = {1: partial_conv1d, 2: partial_conv2d, 3: partial_conv3d}


class SeedPartialConv2d(nn.Module):
    """The layer of the seed notes (shared/seed/000_a2297d9a9b2ec929.txt), copied as it is: the mask
    convolution is a full C_in -> C_out one with weights 1, the output divided by its sum alone.
    (Its default bias=False fails in forward, which reads input_conv.bias; the test passes True.)"""

    def __init__(self, in_channels, out_channels, bias=False):
        super().__init__()
        self.input_conv = nn.Conv2d(in_channels, out_channels, 3, 2, 1, bias=bias)
        self.mask_conv = nn.Conv2d(in_channels, out_channels, 3, 2, 1, bias=False)
        self.activation = nn.ReLU()
        nn.init.constant_(self.mask_conv.weight, 1.0)
        for param in self.mask_conv.parameters():
            param.requires_grad = False

    def forward(self, input_x, mask):
        # output = W^T dot (X .* M) + b
        output = self.input_conv(input_x * mask)
        with torch.no_grad():
            # mask = (1.M) + 0 = M
            output_mask = self.mask_conv(mask)
        output_bias = self.input_conv.bias.view(1, -1, 1, 1).expand_as(output)
        mask_is_zero = (output_mask == 0)
        # mask_sum is the sum of the binary mask at every partial convolution location
        mask_sum = output_mask.masked_fill_(mask_is_zero, 1.0)
        # output = (W^T dot (X .* M) + b - b) / M_sum + b ; if M_sum > 0
        output = (output - output_bias) / mask_sum + output_bias
        # output = 0 if M_sum == 0
        output = output.masked_fill_(mask_is_zero, 0.0)
        # update the mask
        new_mask = torch.ones_like(output)
        new_mask = new_mask.masked_fill_(mask_is_zero, 0.0)
        output = self.activation(output)
        return output, new_mask


@pytest.mark.parametrize("holes", [0.0, 0.4, 0.9])
def test_seed_layer_matches_sum_normalization(holes, device):
    """Same weights, a multi-channel mask (different holes per channel): ours with
    normalization='sum' gives the seed layer's outputs and updated masks."""
    torch.manual_seed(stable_seed(("seed layer", holes)))
    seed_layer = SeedPartialConv2d(5, 7, bias=True).double()
    ours = PartialConv2d(5, 7, 3, 2, 1, multi_channel=True, return_mask=True, activation="relu",
                         normalization="sum").double()
    ours.load_state_dict(seed_layer.input_conv.state_dict())
    x = torch.randn(2, 5, 17, 14, dtype=torch.float64)
    mask = (torch.rand(2, 5, 17, 14) >= holes).double()
    want_output, want_mask = seed_layer(x, mask)
    got_output, got_mask = ours.to(device)(x.to(device), mask.to(device))
    assert holes < 0.9 or (want_mask == 0).any()  # windows of holes only reach the output
    torch.testing.assert_close(got_output.cpu(), want_output, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_mask.cpu(), want_mask, rtol=0, atol=0)


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("mask", ["single", "multi", "soft", None])
def test_sum_normalization_matches_reference(dims, mask, device):
    """Against the float64 reference, forward and gradcheck, in every dimension and mask kind;
    and 'sum' is 'window' divided by winsize wherever the window sees a valid pixel."""
    seed = stable_seed(("sum", dims, mask))
    size, kernel = ((9,), (3,)) if dims == 1 else ((5, 6), (3, 2)) if dims == 2 else ((3, 4, 4), (2, 3, 2))
    x, m, w, b = random_problem(cin=2, cout=3, size=size, kernel=kernel, mask=mask or "single", seed=seed)
    m = None if mask is None else m
    x, m, w, b = to_device((x, m, w, b), device)
    function = FUNCTIONS[dims]
    got, got_mask = function(x, m, w, b, padding=1, activation="leaky_relu", normalization="sum")
    want, want_mask = partial_conv_reference(x, m, w, b, padding=1, activation="leaky_relu", normalization="sum")
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got_mask, want_mask)
    window = function(x, m, w, None, padding=1)[0]
    summed = function(x, m, w, None, padding=1, normalization="sum")[0]
    winsize = (m.shape[1] if m is not None else 1) * w[0, 0].numel()
    assert not torch.equal(window, summed)
    torch.testing.assert_close(summed * winsize, window, rtol=1e-10, atol=1e-10)
    inputs = tuple(t.detach().requires_grad_() for t in (x, w, b))
    assert torch.autograd.gradcheck(
        lambda x, w, b: function(x, m, w, b, padding=1, normalization="sum")[0], inputs,
        eps=1e-6, atol=1e-8, rtol=1e-6)


def test_bad_normalization_is_a_clear_error():
    x, m, w, _ = random_problem()
    with pytest.raises(ValueError, match="normalization"):
        partial_conv2d(x, m, w, normalization="mean")
    with pytest.raises(ValueError, match="normalization"):
        PartialConv2d(4, 6, 3, normalization="count")
    with pytest.raises(ValueError, match="normalization"):
        torch.ops.partialconv_cuda.partial_conv_forward(x, m, w, None, [1, 1], [0, 0], [1, 1], 1, "none", 0.0, "mean")
