"""The functional API (partial_conv1d, partial_conv2d, partial_conv3d: one op underneath, its
dimension taken from the input's rank), and the autograd the C++ ops cannot give themselves:
forward mode (torch.func.jvp, jacfwd) through the forward op, and the torch.func transforms. Plain
reverse mode is the ops' C++ Autograd kernels (csrc/autograd/); the fake kernels that
torch.compile and torch.export run are C++ Meta kernels (csrc/meta/) sharing the backends'
argument checks."""
import torch
from torch.autograd import forward_ad
from torch.nn.modules.utils import _pair, _single, _triple

from . import _extension  # noqa: F401  (loads the ops)
from .export_onnx import partial_conv_forward_in_standard_ops

_FORWARD = torch.ops.partialconv_cuda.partial_conv_forward.default
_BACKWARD = torch.ops.partialconv_cuda.partial_conv_backward.default
_ACTIVATIONS = ("none", "relu", "leaky_relu")
_NORMALIZATIONS = ("window", "sum")
_TUPLE = {1: _single, 2: _pair, 3: _triple}
_INPUT_SHAPE = {1: "(N, C, L)", 2: "(N, C, H, W)", 3: "(N, C, D, H, W)"}


def activation_name(activation, name="partial_conv"):
    """Normalises the activation argument (None, 'none', 'relu', 'leaky_relu') to the op's string."""
    if activation is None:
        return "none"
    if activation not in _ACTIVATIONS:
        raise ValueError(
            f"{name}: expected activation to be None, 'relu' or 'leaky_relu', got {activation!r}"
        )
    return activation


def _padding(padding, kernel_size, stride, dilation, name):
    """Numeric padding per spatial dimension for an int, a tuple, or nn.Conv*d's 'valid' / 'same'."""
    dims = len(kernel_size)
    if not isinstance(padding, str):
        return _per_dimension(padding, dims)
    if padding == "valid":
        return (0,) * dims
    if padding != "same":
        raise ValueError(
            f"{name}: expected padding to be an int, a tuple, 'valid' or 'same', got {padding!r}"
        )
    if any(s != 1 for s in stride):
        raise ValueError(f"{name}: padding='same' needs stride 1, got stride {tuple(stride)}")
    pads = []
    for k, d in zip(kernel_size, dilation):
        total = d * (k - 1)
        if total % 2:
            raise ValueError(
                f"{name}: padding='same' with an even (dilated) kernel needs asymmetric padding, "
                f"which is not supported (kernel {tuple(kernel_size)}, dilation {tuple(dilation)}); "
                "pad the input explicitly"
            )
        pads.append(total // 2)
    return tuple(pads)


def conv_output_size(size, kernel, stride, padding, dilation):
    """Output size of the convolution per spatial dimension (all tuples): the formula the C++ ops
    use (csrc/partial_conv_math.h), for Python callers (benchmarks, tests) that need it first."""
    return tuple((n + 2 * p - d * (k - 1) - 1) // s + 1
                 for n, k, s, p, d in zip(size, kernel, stride, padding, dilation))


def _per_dimension(value, dims):
    """nn.Conv*d's argument rule (an int repeated per spatial dimension, a sequence as a tuple:
    its length is the op's check), with the common int case first."""
    return (value,) * dims if isinstance(value, int) else _TUPLE[dims](value)


def conv_arguments(dims, weight, stride, padding, dilation, name):
    """(stride, padding, dilation) as the op takes them: one int per spatial dimension."""
    stride, dilation = _per_dimension(stride, dims), _per_dimension(dilation, dims)
    return stride, _padding(padding, weight.shape[2:], stride, dilation, name), dilation


def _transformed():
    """Whether forward-mode AD or a torch.func transform is active: then the call needs
    PartialConvFunction (below); plain eager and reverse-mode calls take the op directly, whose
    C++ autograd costs far less (autograd.Function.apply binds its arguments through
    inspect.signature) but gives neither tangents nor functorch support."""
    return forward_ad._current_level >= 0 or torch._C._functorch.maybe_current_level() is not None


def normalization_name(normalization, name="partial_conv"):
    """Checks the normalization argument: 'window' (sum(1)/sum(M)) or 'sum' (1/sum(M))."""
    if normalization not in _NORMALIZATIONS:
        raise ValueError(f"{name}: expected normalization to be 'window' or 'sum', got {normalization!r}")
    return normalization


def _partial_conv(dims, input, mask, weight, bias, stride, padding, dilation, groups, activation,
                  negative_slope, normalization):
    name = f"partial_conv{dims}d"
    if input.dim() != dims + 2:
        raise ValueError(
            f"{name}: expected input to be a {dims + 2}-D tensor {_INPUT_SHAPE[dims]}, got a "
            f"{input.dim()}-D tensor of shape {list(input.shape)}"
        )
    stride, padding, dilation = conv_arguments(dims, weight, stride, padding, dilation, name)
    params = ConvParams(stride, padding, dilation, groups, activation_name(activation, name),
                        float(negative_slope), normalization_name(normalization, name))
    # torch.onnx.export traces the op's formula in standard operators (export_onnx.py);
    # is_exporting() first: it is the cheap check of the two.
    if torch.compiler.is_exporting() and torch.onnx.is_in_onnx_export():
        output, updated_mask, _ = partial_conv_forward_in_standard_ops(input, mask, weight, bias, *params)
    # torch.compile cannot trace an autograd.Function with a jvp: it traces the op, whose reverse
    # mode is its C++ Autograd kernel.
    elif not torch.compiler.is_compiling() and _transformed():
        output, updated_mask, _ = PartialConvFunction.apply(input, mask, weight, bias, params)
    else:
        output, updated_mask, _ = _FORWARD(input, mask, weight, bias, *params)
    batch = input.shape[0]
    if mask is not None and mask.shape[1] > 1:
        return output, updated_mask.expand(batch, weight.shape[0], *updated_mask.shape[2:])
    if updated_mask.shape[0] != batch:  # one mask for the whole batch
        return output, updated_mask.expand(batch, *updated_mask.shape[1:])
    return output, updated_mask


_DOC = """Partial convolution in {dims} spatial dimension{s}: returns (output, updated_mask).

    input {shape}; mask None (all ones) or (N or 1, 1 or C_in, {spatial}) with 1 = valid and
    0 = hole; weight (C_out, C_in / groups, {kernel}); bias (C_out) or None. stride, padding and
    dilation: an int or one per spatial dimension; padding also 'valid' or (stride 1) 'same'.
    output = act((conv(input*mask, weight) * winsize / S * U + bias) * U), with S the window sum
    of the mask, U = clamp(S, 0, 1) and winsize = prod(kernel) (C_in * prod(kernel) for a
    multi-channel mask); updated_mask = U, shaped (N, 1, ...) for a single-channel (or absent)
    mask and (N, C_out, ...) for a multi-channel one (an expanded view). activation: None, 'relu'
    or 'leaky_relu' (with negative_slope >= 0). normalization: 'window' (the formula above, the
    paper's sum(1)/sum(M)) or 'sum' (winsize replaced by 1: 1/sum(M), as layers that divide by
    the mask sum alone compute).
    """


def partial_conv1d(input, mask, weight, bias=None, stride=1, padding=0, dilation=1, groups=1,
                   activation=None, negative_slope=0.01, normalization="window"):
    return _partial_conv(1, input, mask, weight, bias, stride, padding, dilation, groups, activation,
                         negative_slope, normalization)


def partial_conv2d(input, mask, weight, bias=None, stride=1, padding=0, dilation=1, groups=1,
                   activation=None, negative_slope=0.01, normalization="window"):
    return _partial_conv(2, input, mask, weight, bias, stride, padding, dilation, groups, activation,
                         negative_slope, normalization)


def partial_conv3d(input, mask, weight, bias=None, stride=1, padding=0, dilation=1, groups=1,
                   activation=None, negative_slope=0.01, normalization="window"):
    return _partial_conv(3, input, mask, weight, bias, stride, padding, dilation, groups, activation,
                         negative_slope, normalization)


for _dims, _function in ((1, partial_conv1d), (2, partial_conv2d), (3, partial_conv3d)):
    _function.__doc__ = _DOC.format(
        dims=_dims, s="" if _dims == 1 else "s", shape=_INPUT_SHAPE[_dims],
        spatial=_INPUT_SHAPE[_dims][7:-1], kernel={1: "kL", 2: "kH, kW", 3: "kD, kH, kW"}[_dims])


class ConvParams:
    """The non-tensor arguments of the ops, in their order, as one object: the autograd.Functions
    below take it whole, so that torch.func does not flatten its lists into their leaves."""

    __slots__ = ("stride", "padding", "dilation", "groups", "activation", "negative_slope", "normalization")

    def __init__(self, stride, padding, dilation, groups, activation, negative_slope, normalization="window"):
        self.stride, self.padding, self.dilation = stride, padding, dilation
        self.groups, self.activation, self.negative_slope = groups, activation, negative_slope
        self.normalization = normalization

    def __iter__(self):
        """The forward op's arguments after the tensors."""
        return iter((*self.backward_args(), self.normalization))

    def backward_args(self):
        """The backward op's arguments between the tensors and output_mask (the normalization is
        in the saved ratio already)."""
        return (self.stride, self.padding, self.dilation, self.groups, self.activation,
                self.negative_slope)


class BackwardRequest:
    """The conv parameters and which gradients to compute, opaque to torch.func like ConvParams."""

    __slots__ = ("params", "output_mask")

    def __init__(self, params, output_mask):
        self.params, self.output_mask = params, output_mask


def _activation_derivative(output, params):
    """d act(y) / dy read off the output (for negative_slope >= 0, output > 0 exactly when y > 0)."""
    slope = 0.0 if params.activation == "relu" else params.negative_slope
    return torch.where(output > 0, output.new_ones(()), output.new_full((), slope))


_NO_SECOND_ORDER = (
    "partial_conv: second-order derivatives (double backward, hessians, forward mode over reverse "
    "mode) through the layer are not supported; use partialconv_cuda.partial_conv_reference for "
    "them"
)


class _FirstOrderBackward(torch.autograd.Function):
    """partial_conv_backward for PartialConvFunction, whose own derivatives raise a clear error:
    backward may run with create_graph=True (torch.func.grad and jacrev always do), but
    differentiating its result again is refused instead of silently giving zeros. (The backward
    op's C++ Autograd kernel refuses the same way, but functorch refuses C++ autograd Functions
    before it could say why.)"""

    generate_vmap_rule = True

    @staticmethod
    def forward(grad_output, input, mask, weight, out, mask_scales, request):
        return _BACKWARD(grad_output, input, mask, weight, out, mask_scales, *request.params.backward_args(),
                         request.output_mask)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, *grads):
        raise NotImplementedError(_NO_SECOND_ORDER)

    @staticmethod
    def jvp(ctx, *tangents):
        raise NotImplementedError(_NO_SECOND_ORDER)


class PartialConvFunction(torch.autograd.Function):
    """Autograd of partial_conv_forward for calls of the functions above under forward-mode AD or
    a torch.func transform: the reverse mode of the op's C++ kernel, plus forward mode and
    functorch support (which a C++ autograd Function cannot give).

    Forward mode uses that the output before the activation, (conv(X*M, W) * ratio + b) * U, is
    linear in X, W and b for a fixed mask:
        d out = act'(out) * (partial_conv(dX, M, W, db) + partial_conv(X, M, dW, None)),
    two more forward calls without activation. The mask gets no gradient (nor tangent). vmap runs
    the ops once per batch element (torch's fallback for ops without a batching rule)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(input, mask, weight, bias, params):
        return _FORWARD(input, mask, weight, bias, *params)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, mask, weight, bias, params = inputs
        out, updated_mask, mask_scales = output
        ctx.params = params
        ctx.has_bias = bias is not None
        # As the C++ kernel saves: the mask reaches backward only through its per-position scales
        # and as the factor M of grad_input; the activation's derivative is read off the output.
        saved = (input, mask, weight, out if params.activation != "none" else None, mask_scales)
        ctx.save_for_backward(*saved)
        ctx.save_for_forward(*saved)
        ctx.mark_non_differentiable(updated_mask, mask_scales)

    @staticmethod
    def backward(ctx, grad_output, _grad_updated_mask, _grad_mask_scales):
        input, mask, weight, out, mask_scales = ctx.saved_tensors
        needs = ctx.needs_input_grad
        output_mask = [needs[0], needs[2], ctx.has_bias and needs[3]]
        grad_input, grad_weight, grad_bias = _FirstOrderBackward.apply(
            grad_output, input, mask, weight, out, mask_scales, BackwardRequest(ctx.params, output_mask))
        return grad_input, None, grad_weight, grad_bias, None

    @staticmethod
    def jvp(ctx, input_tangent, _mask_tangent, weight_tangent, bias_tangent, _params):
        input, mask, weight, out, _ = ctx.saved_tensors
        params = ctx.params
        linear = (params.stride, params.padding, params.dilation, params.groups, "none", 0.0, params.normalization)
        tangent = None
        if input_tangent is not None or bias_tangent is not None:
            dx = input_tangent if input_tangent is not None else torch.zeros_like(input)
            tangent = _FORWARD(dx, mask, weight, bias_tangent, *linear)[0]
        if weight_tangent is not None:
            term = _FORWARD(input, mask, weight_tangent, None, *linear)[0]
            tangent = term if tangent is None else tangent + term
        if tangent is not None and params.activation != "none":
            tangent = tangent * _activation_derivative(out, params)
        return tangent, None, None
