"""Every bad input gets a clear error naming the argument and what was expected."""
import pytest
import torch

from conftest import random_problem
from partialconv_cuda import PartialConv2d, partial_conv1d, partial_conv2d, partial_conv3d


def good():
    x, m, w, b = random_problem(n=2, cin=4, cout=6, size=(8, 8), groups=2, dtype=torch.float32)
    return dict(input=x, mask=m, weight=w, bias=b, stride=1, padding=1, dilation=1, groups=2)


def call(**changes):
    args = good()
    args.update(changes)
    return partial_conv2d(**args)


def test_good_arguments_work():
    call()


BAD = [
    (dict(input=torch.randn(4, 8, 8)), ValueError, "expected input to be a 4-D tensor"),
    (dict(weight=torch.randn(6, 2, 3)), ValueError, "expected weight to be a 4-D tensor"),
    (dict(mask=torch.ones(8, 8)), ValueError, "expected mask to be a 4-D tensor"),
    (dict(mask=torch.ones(2, 2, 8, 8)), ValueError, "expected mask to have 1 channel .* or 4"),
    (dict(mask=torch.ones(3, 1, 8, 8)), ValueError, "expected mask batch size 1 or 2"),
    (dict(mask=torch.ones(2, 1, 8, 7)), ValueError, "expected mask spatial size 8x8"),
    (dict(mask=torch.ones(2, 1, 8, 8, dtype=torch.float64)), TypeError, "expected mask to have the input's dtype"),
    (dict(mask=torch.ones(2, 1, 8, 8, dtype=torch.bool)), TypeError, "expected mask to have the input's dtype"),
    (dict(weight=torch.randn(6, 2, 3, 3, dtype=torch.float64)), TypeError, "expected weight to have the input's dtype"),
    (dict(bias=torch.randn(6, dtype=torch.float16)), TypeError, "expected bias to have the input's dtype"),
    (dict(bias=torch.randn(5)), ValueError, r"expected bias of shape \[6\]"),
    (dict(input=torch.ones(2, 4, 8, 8, dtype=torch.int32), weight=torch.ones(6, 2, 3, 3, dtype=torch.int32), mask=None, bias=None),
     TypeError, "expected input of dtype float32, float64, float16 or bfloat16"),
    (dict(groups=3), ValueError, r"input channels \(4\) to be divisible by groups \(3\)"),
    (dict(input=torch.randn(2, 6, 8, 8), weight=torch.randn(5, 3, 3, 3), bias=None, mask=None),
     ValueError, r"output channels \(5\) to be divisible by groups \(2\)"),
    (dict(weight=torch.randn(6, 4, 3, 3)), ValueError, "expected weight.size.1. to be input channels / groups = 2"),
    (dict(groups=0), ValueError, "expected groups to be positive"),
    (dict(stride=0), ValueError, "expected stride to be positive"),
    (dict(dilation=(1, 0)), ValueError, "expected dilation to be positive"),
    (dict(padding=-1), ValueError, "expected padding to be non-negative"),
    (dict(padding=0, weight=torch.randn(6, 2, 9, 3)), ValueError, "output size would be 0x6 .* expected at least 1 along every dimension"),
    (dict(stride=(1, 1, 1)), ValueError, "expected stride to have 2 elements"),
    (dict(activation="gelu"), ValueError, "expected activation to be None, 'relu' or 'leaky_relu'"),
    (dict(activation="leaky_relu", negative_slope=-0.1), ValueError, "expected negative_slope >= 0"),
    (dict(padding="same", stride=2), ValueError, "padding='same' needs stride 1"),
    (dict(padding="same", weight=torch.randn(6, 2, 2, 2)), ValueError, "padding='same' with an even"),
    (dict(padding="full"), ValueError, "expected padding to be an int, a tuple, 'valid' or 'same'"),
]


@pytest.mark.parametrize("changes, error, message", BAD, ids=[m for _, _, m in BAD])
def test_bad_argument(changes, error, message):
    with pytest.raises(error, match=message):
        call(**changes)


def test_layer_errors():
    with pytest.raises(ValueError, match="padding_mode must be 'zeros'"):
        PartialConv2d(3, 3, 3, padding=1, padding_mode="reflect")
    with pytest.raises(ValueError, match="expected activation"):
        PartialConv2d(3, 3, 3, activation="tanh")
    layer = PartialConv2d(3, 4, 3)
    with pytest.raises(ValueError, match=r"expected a mask with 1 channel\(s\), got 3; use multi_channel=True"):
        layer(torch.randn(1, 3, 6, 6), torch.ones(1, 3, 6, 6))
    with pytest.raises(ValueError, match=r"multi_channel=True\): expected a mask with 3 channel"):
        PartialConv2d(3, 4, 3, multi_channel=True)(torch.randn(1, 3, 6, 6), torch.ones(1, 1, 6, 6))
    with pytest.raises(ValueError, match="pass the mask once"):
        layer(torch.randn(1, 3, 6, 6), torch.ones(1, 1, 6, 6), mask_in=torch.ones(1, 1, 6, 6))


def test_backward_op_checks_its_inputs():
    args = good()
    out, _, mask_scales = torch.ops.partialconv_cuda.partial_conv_forward(
        args["input"], args["mask"], args["weight"], args["bias"], [1, 1], [1, 1], [1, 1], 2, "none", 0.0)
    backward = torch.ops.partialconv_cuda.partial_conv_backward
    common = (args["input"], args["mask"], args["weight"], None)
    with pytest.raises(ValueError, match=r"expected grad_output of shape \[2, 6, 8, 8\]"):
        backward(out[:, :3], *common, mask_scales, [1, 1], [1, 1], [1, 1], 2, "none", 0.0, [True, True, True])
    with pytest.raises(ValueError, match=r"expected mask_scales of shape \[2, 2, 8, 8\]"):
        backward(out, *common, mask_scales[:1], [1, 1], [1, 1], [1, 1], 2, "none", 0.0, [True, True, True])
    with pytest.raises(TypeError, match="expected mask_scales of dtype Float"):
        backward(out, *common, mask_scales.double(), [1, 1], [1, 1], [1, 1], 2, "none", 0.0, [True, True, True])
    with pytest.raises(ValueError, match="the forward output is needed"):
        backward(out, *common, mask_scales, [1, 1], [1, 1], [1, 1], 2, "relu", 0.0, [True, True, True])


@pytest.mark.cuda
def test_device_mismatch():
    args = good()
    with pytest.raises(ValueError, match="expected weight on the input's device"):
        call(weight=args["weight"].cuda())
    with pytest.raises(ValueError, match="expected mask on the input's device"):
        call(input=args["input"].cuda(), weight=args["weight"].cuda(), bias=args["bias"].cuda())


def good_nd(dims):
    size, kernel = ((12,), (3,)) if dims == 1 else ((5, 6, 7), (3, 3, 3))
    x, m, w, b = random_problem(n=2, cin=4, cout=6, size=size, kernel=kernel, groups=2, dtype=torch.float32)
    return dict(input=x, mask=m, weight=w, bias=b, stride=1, padding=1, dilation=1, groups=2)


# (dims, changes, error, message): every wrong shape of the 1-D and 3-D functions.
BAD_ND = [
    (1, dict(input=torch.randn(2, 4, 3, 12)), ValueError, r"partial_conv1d: expected input to be a 3-D tensor \(N, C, L\)"),
    (1, dict(weight=torch.randn(6, 2, 3, 3)), ValueError, r"partial_conv1d: expected weight to be a 3-D tensor \(C_out, C_in / groups, kL\)"),
    (1, dict(mask=torch.ones(2, 1, 1, 12)), ValueError, r"partial_conv1d: expected mask to be a 3-D tensor \(N or 1, 1 or C_in, L\)"),
    (1, dict(mask=torch.ones(2, 1, 11)), ValueError, r"partial_conv1d: expected mask spatial size 12 \(the input's\), got 11"),
    (1, dict(mask=torch.ones(2, 3, 12)), ValueError, "expected mask to have 1 channel .* or 4"),
    (1, dict(stride=(1, 1)), ValueError, r"partial_conv1d: expected stride to have 1 element \(L\), got 2"),
    (1, dict(padding=(1, 1)), ValueError, "expected padding to have 1 element"),
    (1, dict(dilation=0), ValueError, "expected dilation to be positive"),
    (1, dict(weight=torch.randn(6, 2, 15)), ValueError, r"output size would be 0 for input 12, kernel 15"),
    (1, dict(padding="same", weight=torch.randn(6, 2, 4)), ValueError, "padding='same' with an even"),
    (3, dict(input=torch.randn(2, 4, 6, 7)), ValueError, r"partial_conv3d: expected input to be a 5-D tensor \(N, C, D, H, W\)"),
    (3, dict(weight=torch.randn(6, 2, 3, 3)), ValueError, r"partial_conv3d: expected weight to be a 5-D tensor \(C_out, C_in / groups, kD, kH, kW\)"),
    (3, dict(mask=torch.ones(2, 1, 6, 7)), ValueError, r"partial_conv3d: expected mask to be a 5-D tensor \(N or 1, 1 or C_in, D, H, W\)"),
    (3, dict(mask=torch.ones(2, 1, 5, 6, 8)), ValueError, r"expected mask spatial size 5x6x7 \(the input's\), got 5x6x8"),
    (3, dict(mask=torch.ones(3, 1, 5, 6, 7)), ValueError, "expected mask batch size 1 or 2"),
    (3, dict(mask=torch.ones(2, 1, 5, 6, 7, dtype=torch.float64)), TypeError, "expected mask to have the input's dtype"),
    (3, dict(bias=torch.randn(7)), ValueError, r"expected bias of shape \[6\]"),
    (3, dict(weight=torch.randn(6, 4, 3, 3, 3)), ValueError, "expected weight.size.1. to be input channels / groups = 2"),
    (3, dict(groups=3), ValueError, r"input channels \(4\) to be divisible by groups \(3\)"),
    (3, dict(stride=(1, 2)), ValueError, r"expected stride to have 3 elements \(D, H, W\), got 2"),
    (3, dict(stride=(1, 0, 1)), ValueError, "expected stride to be positive"),
    (3, dict(padding=(0, -1, 0)), ValueError, "expected padding to be non-negative"),
    (3, dict(padding=0, weight=torch.randn(6, 2, 6, 3, 3)), ValueError, r"output size would be 0x4x5 for input 5x6x7, kernel 6x3x3"),
    (3, dict(padding="same", stride=(1, 2, 1)), ValueError, "padding='same' needs stride 1"),
    (3, dict(activation="tanh"), ValueError, "partial_conv3d: expected activation to be None, 'relu' or 'leaky_relu'"),
]


@pytest.mark.parametrize("dims, changes, error, message", BAD_ND, ids=[f"{d}d-{m}" for d, _, _, m in BAD_ND])
def test_bad_argument_1d_and_3d(dims, changes, error, message):
    args = dict(good_nd(dims), **changes)
    function = partial_conv1d if dims == 1 else partial_conv3d
    function(**good_nd(dims))
    with pytest.raises(error, match=message):
        function(**args)


@pytest.mark.parametrize("rank", [2, 6])
def test_op_takes_one_to_three_spatial_dimensions(rank):
    x = torch.randn(*(2,) * rank)
    with pytest.raises(ValueError, match=r"partial_conv: expected input to be a 3-D, 4-D or 5-D tensor .* got a "
                       f"{rank}-D tensor"):
        torch.ops.partialconv_cuda.partial_conv_forward(x, None, x, None, [1], [0], [1], 1, "none", 0.0)
