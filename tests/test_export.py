"""Export of the layers for deployment: ONNX (torch.onnx.export with dynamo=True, run in
onnxruntime on the CPU) and AOTInductor packages, each compared with our op in eager mode."""
import zipfile

import pytest
import torch
from torch.export import Dim

from partialconv_cuda import PartialConv1d, PartialConv2d, PartialConv3d
from partialconv_cuda.export_onnx import ONNX_DECOMPOSITIONS
from partialconv_cuda.masks import irregular_masks
from partialconv_cuda.models import PConvUNet

FORWARD = torch.ops.partialconv_cuda.partial_conv_forward.default
LAYERS = {1: PartialConv1d, 2: PartialConv2d, 3: PartialConv3d}
# Export sizes, and the other sizes the same ONNX model must run at (dynamic batch and spatial axes).
EXPORT_SIZES = {1: (2, (13,)), 2: (2, (9, 11)), 3: (2, (5, 6, 7))}
OTHER_SIZES = {1: (3, (17,)), 2: (3, (12, 7)), 3: (1, (7, 5, 6))}
# The operators the README's Export section lists, all in onnx-tensorrt's operator matrix for
# TensorRT 10 (opsets 9 to 20): the exported graphs may hold these and no others.
TENSORRT_OPS = {
    "Add", "BatchNormalization", "Cast", "Clip", "Concat", "Conv", "Div", "Equal", "Expand", "Greater",
    "LeakyRelu", "Mul", "Reciprocal", "Relu", "Reshape", "Resize", "Shape", "Slice", "Squeeze", "Where",
}
# float32: onnxruntime's Conv sums a window's C_in/groups * prod(kernel) products in another order
# than our kernels, so the two differ by a few float32 ulps of the window's sum of |w * x| (up to
# 5e-7 in these cases): a relative tolerance alone cannot bound that for outputs near 0, where the
# products cancel.
FLOAT32_TOLERANCE = dict(rtol=1e-5, atol=1e-5)
# float16: the graph rounds its Conv's sum to float16 before renormalising it in float32, and
# rounds the result again: a float16 ulp (2^-10) apart from a single rounding, relative to
# |conv * ratio| (below 8 here) where the bias cancels it, hence the absolute part.
FLOAT16_TOLERANCE = dict(rtol=1e-3, atol=5e-3)


def holed_mask(shape, kernel, dilation, generator):
    """A random binary mask (40% holes) plus a block of holes at the origin as wide as the dilated
    kernel, so that the first output position of every batch sees holes only."""
    mask = (torch.rand(shape, generator=generator) >= 0.4).float()
    extent = dilation * (kernel - 1) + 1
    mask[(slice(None), slice(None)) + (slice(0, extent),) * (len(shape) - 2)] = 0
    assert 0 < mask.sum() < mask.numel(), "a test mask needs holes and valid pixels"
    return mask


def layer_inputs(case, batch, spatial, generator):
    """(input, mask) for a layer case: random input with NaN and Inf at hole pixels (which must
    contribute 0), the mask None, (N, 1, ...), (N, C_in, ...) or (1, 1, ...)."""
    x = torch.randn(batch, case.in_channels, *spatial, generator=generator)
    if case.mask is None:
        return x, None
    mask_shape = {"single": (batch, 1), "multi": (batch, case.in_channels), "batch1": (1, 1)}[case.mask]
    mask = holed_mask((*mask_shape, *spatial), case.kernel, case.dilation, generator)
    poison = torch.where(torch.rand(x.shape, generator=generator) < 0.5, float("nan"), float("inf"))
    return torch.where(mask == 0, poison, x), mask


class LayerCase:
    def __init__(self, dims, mask, activation=None, normalization="window", bias=True, stride=1,
                 dilation=1, groups=1, padding=1, kernel=3, in_channels=4, out_channels=6):
        self.dims, self.mask, self.activation, self.normalization = dims, mask, activation, normalization
        self.bias, self.stride, self.dilation, self.groups = bias, stride, dilation, groups
        self.padding, self.kernel = padding, kernel
        self.in_channels, self.out_channels = in_channels, out_channels

    def layer(self, dtype=torch.float32):
        return LAYERS[self.dims](
            self.in_channels, self.out_channels, self.kernel, self.stride, self.padding, self.dilation,
            self.groups, self.bias, multi_channel=self.mask == "multi", return_mask=True,
            activation=self.activation, negative_slope=0.1, normalization=self.normalization,
        ).to(dtype).eval()

    def dynamic_shapes(self):
        """Batch and spatial axes dynamic, for the input and the mask alike (a batch-1 mask keeps
        its batch of 1)."""
        axes = {0: Dim.DYNAMIC, **{2 + d: Dim.DYNAMIC for d in range(self.dims)}}
        if self.mask is None:
            return (axes, None)
        return (axes, {a: d for a, d in axes.items() if not (a == 0 and self.mask == "batch1")})


LAYER_CASES = {
    "1d-single-relu-stride2": LayerCase(1, "single", "relu", stride=2),
    "1d-none-nobias-dilation2": LayerCase(1, None, bias=False, dilation=2, padding=2),
    "1d-multi-leaky-sum-groups2": LayerCase(1, "multi", "leaky_relu", "sum", groups=2),
    "2d-single": LayerCase(2, "single"),
    "2d-multi-relu-nobias-stride2": LayerCase(2, "multi", "relu", bias=False, stride=2),
    "2d-batch1-leaky-sum-dilation2-groups2": LayerCase(2, "batch1", "leaky_relu", "sum", dilation=2, groups=2),
    "2d-none-relu-sum": LayerCase(2, None, "relu", "sum"),
    "2d-multi-sum-groups2-valid-kernel5": LayerCase(2, "multi", None, "sum", groups=2, padding=0, kernel=5),
    "3d-single-relu-stride2": LayerCase(3, "single", "relu", stride=2),
    "3d-multi-leaky-nobias-dilation2": LayerCase(3, "multi", "leaky_relu", bias=False, dilation=2, padding=2),
    "3d-none-sum": LayerCase(3, None, normalization="sum"),
}


def onnx_session(model_proto):
    onnxruntime = pytest.importorskip("onnxruntime")
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    return onnxruntime.InferenceSession(model_proto.SerializeToString(), options,
                                        providers=["CPUExecutionProvider"])


def run_onnx(session, *inputs):
    names = [i.name for i in session.get_inputs()]
    feeds = {name: t.numpy() for name, t in zip(names, [t for t in inputs if t is not None])}
    return [torch.from_numpy(array) for array in session.run(None, feeds)]


def export_onnx(model, args, dynamic_shapes=None):
    pytest.importorskip("onnxscript")  # torch.onnx.export's translator
    pytest.importorskip("onnx")
    return torch.onnx.export(model, args, dynamo=True, dynamic_shapes=dynamic_shapes, verbose=False).model_proto


def assert_standard_onnx(model_proto):
    """Only operators of the default ONNX domain, all of them ones TensorRT imports, and no local
    functions (nothing of a custom domain to resolve)."""
    custom = [(node.domain, node.op_type) for node in model_proto.graph.node if node.domain not in ("", "ai.onnx")]
    assert not custom, f"nodes of a non-standard domain: {custom}"
    assert not model_proto.functions, f"local functions: {[f.name for f in model_proto.functions]}"
    assert {node.op_type for node in model_proto.graph.node} <= TENSORRT_OPS, \
        f"operators outside the documented set: {({n.op_type for n in model_proto.graph.node} - TENSORRT_OPS)}"


@pytest.mark.parametrize("name", LAYER_CASES)
def test_layer_exports_to_standard_onnx_with_dynamic_axes(name):
    case = LAYER_CASES[name]
    torch.manual_seed(0)
    layer = case.layer()
    generator = torch.Generator().manual_seed(1)
    batch, spatial = EXPORT_SIZES[case.dims]
    example = layer_inputs(case, batch, spatial, generator)
    model_proto = export_onnx(layer, example, case.dynamic_shapes())
    assert_standard_onnx(model_proto)
    assert [node.op_type for node in model_proto.graph.node].count("Conv") == 2  # X*M and the window sum of M
    session = onnx_session(model_proto)
    for batch, spatial in (EXPORT_SIZES[case.dims], OTHER_SIZES[case.dims]):
        x, mask = layer_inputs(case, batch, spatial, generator)
        with torch.no_grad():
            expected, expected_mask = layer(x, mask)
        output, updated_mask = run_onnx(session, x, mask)
        torch.testing.assert_close(output, expected, **FLOAT32_TOLERANCE)
        torch.testing.assert_close(updated_mask, expected_mask, rtol=0, atol=0)
        if mask is not None:
            holes = expected_mask == 0
            assert holes.any(), "the case needs fully masked windows"
            assert (output.masked_select(holes.expand_as(output)) == 0).all()


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_float16_layer_runs_in_onnxruntime(dims):
    """onnxruntime's CPU provider runs every operator of the float16 graph (Conv included), so
    the whole layer is compared, at the export size."""
    case = LayerCase(dims, "multi", "leaky_relu")
    torch.manual_seed(0)
    layer = case.layer(torch.float16)
    generator = torch.Generator().manual_seed(1)
    x, mask = (t.half() for t in layer_inputs(case, *EXPORT_SIZES[dims], generator))
    model_proto = export_onnx(layer, (x, mask))
    assert_standard_onnx(model_proto)
    session = onnx_session(model_proto)
    with torch.no_grad():
        expected, expected_mask = layer(x, mask)
    output, updated_mask = run_onnx(session, x, mask)
    assert output.dtype == updated_mask.dtype == torch.float16
    torch.testing.assert_close(output, expected, **FLOAT16_TOLERANCE)
    torch.testing.assert_close(updated_mask, expected_mask, rtol=0, atol=0)


def unet_inputs(batch, height, width, seed):
    image = torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))
    mask = irregular_masks(batch, height, width, 0.4, seed=seed)
    return torch.where(mask == 0, float("nan"), image), mask


def test_pconv_unet_exports_to_standard_onnx_with_dynamic_axes():
    torch.manual_seed(0)
    model = PConvUNet(depth=2).eval()
    # depth 2: height and width multiples of 4.
    batch, height, width = Dim("batch"), Dim("height"), Dim("width")
    axes = {0: batch, 2: 4 * height, 3: 4 * width}
    model_proto = export_onnx(model, unet_inputs(2, 16, 16, seed=1), (axes, axes))
    assert_standard_onnx(model_proto)
    session = onnx_session(model_proto)
    for size in ((2, 16, 16), (3, 24, 32)):
        image, mask = unet_inputs(*size, seed=2)
        with torch.no_grad():
            expected, expected_mask = model(image, mask)
        output, updated_mask = run_onnx(session, image, mask)
        torch.testing.assert_close(output, expected, **FLOAT32_TOLERANCE)
        torch.testing.assert_close(updated_mask, expected_mask, rtol=0, atol=0)


def test_exported_program_with_the_op_exports_after_onnx_decompositions():
    """A torch.export program holds the op itself; ONNX_DECOMPOSITIONS replaces it by its formula."""
    case = LayerCase(2, "multi", "relu", "sum", groups=2)
    torch.manual_seed(0)
    layer = case.layer()
    generator = torch.Generator().manual_seed(1)
    x, mask = layer_inputs(case, *EXPORT_SIZES[2], generator)
    exported = torch.export.export(layer, (x, mask))
    assert any(node.target == FORWARD for node in exported.graph.nodes)
    model_proto = export_onnx(exported.run_decompositions(ONNX_DECOMPOSITIONS), ())
    assert_standard_onnx(model_proto)
    with torch.no_grad():
        expected, expected_mask = layer(x, mask)
    output, updated_mask = run_onnx(onnx_session(model_proto), x, mask)
    torch.testing.assert_close(output, expected, **FLOAT32_TOLERANCE)
    torch.testing.assert_close(updated_mask, expected_mask, rtol=0, atol=0)


def test_aoti_package_of_pconv_unet_runs_our_op(tmp_path):
    """AOTInductor compiles the exported PConvUNet into a package whose wrapper calls our op (a
    custom op with a C++ kernel runs through AOTInductor's proxy executor); loaded back, it gives
    the eager outputs."""
    torch.manual_seed(0)
    model = PConvUNet(depth=2).eval()
    image, mask = unet_inputs(2, 16, 16, seed=1)
    with torch.no_grad():
        exported = torch.export.export(model, (image, mask))
        assert any(node.target == FORWARD for node in exported.graph.nodes)
        package = torch._inductor.aoti_compile_and_package(exported, package_path=str(tmp_path / "unet.pt2"))
        with zipfile.ZipFile(package) as archive:  # the wrapper's extern kernel calls, as JSON
            extern_calls = "".join(archive.read(name).decode() for name in archive.namelist()
                                   if name.endswith("wrapper.json"))
        assert "partialconv_cuda::partial_conv_forward" in extern_calls
        loaded = torch._inductor.aoti_load_package(package)
        expected = model(image, mask)
        outputs = loaded(image, mask)
    for output, reference in zip(outputs, expected):
        torch.testing.assert_close(output, reference, **FLOAT32_TOLERANCE)
