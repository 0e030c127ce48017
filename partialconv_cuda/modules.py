"""PartialConv1d, PartialConv2d, PartialConv3d: drop-in replacements for NVIDIA's partial
convolution layers, as subclasses of nn.Conv1d / nn.Conv2d / nn.Conv3d."""
from torch import nn

from .ops import activation_name, normalization_name, partial_conv1d, partial_conv2d, partial_conv3d


class _PartialConvMixin:
    """What the three layers add to their nn.Conv*d: the mask, NVIDIA's keywords, a fused
    activation. Same constructor and state_dict as the nn.Conv*d (checkpoints of NVIDIA's
    PartialConv2d / PartialConv3d load unchanged), plus:
      multi_channel: the mask has one channel per input channel (else a single channel)
      return_mask:   forward returns (output, updated_mask) instead of output
      activation:    None, 'relu' or 'leaky_relu' (fused; negative_slope for leaky_relu)
      normalization: 'window' (the default: sum(1)/sum(M), the paper's and NVIDIA's) or 'sum'
                     (1/sum(M): for checkpoints of layers that divide by the mask sum alone)

    forward(input, mask=None): mask (N or 1, 1 or C_in, *spatial), 1 = valid, 0 = hole; None
    means all ones, which makes the layer partial-convolution-based padding (Liu et al. 2018b).
    Nothing is cached between calls. `mask_in=` is accepted as in NVIDIA's layers.
    """

    _functional = None  # partial_conv1d, partial_conv2d or partial_conv3d

    def __init__(self, *args, multi_channel=False, return_mask=False, activation=None,
                 negative_slope=0.01, normalization="window", **kwargs):
        super().__init__(*args, **kwargs)
        name = type(self).__name__
        if self.padding_mode != "zeros":
            raise ValueError(
                f"{name}: padding_mode must be 'zeros' (the padding counts as holes), got {self.padding_mode!r}"
            )
        self.multi_channel = multi_channel
        self.return_mask = return_mask
        self.activation = activation_name(activation, name)
        self.negative_slope = negative_slope
        self.normalization = normalization_name(normalization, name)

    def forward(self, input, mask=None, *, mask_in=None):
        name = type(self).__name__
        if mask_in is not None:
            if mask is not None:
                raise ValueError(f"{name}: pass the mask once, as mask or as mask_in")
            mask = mask_in
        if mask is not None and mask.dim() == input.dim():
            expected = self.in_channels if self.multi_channel else 1
            if mask.shape[1] != expected:
                raise ValueError(
                    f"{name}(multi_channel={self.multi_channel}): expected a mask with "
                    f"{expected} channel(s), got {mask.shape[1]}"
                    + ("" if self.multi_channel else "; use multi_channel=True for one mask channel per input channel")
                )
        output, updated_mask = type(self)._functional(
            input, mask, self.weight, self.bias, self.stride, self.padding, self.dilation,
            self.groups, self.activation, self.negative_slope, self.normalization,
        )
        if not self.return_mask:
            return output
        if self.multi_channel:
            updated_mask = updated_mask.expand(-1, self.out_channels, *updated_mask.shape[2:])
        return output, updated_mask

    def extra_repr(self):
        extra = []
        if self.multi_channel:
            extra.append("multi_channel=True")
        if self.return_mask:
            extra.append("return_mask=True")
        if self.activation != "none":
            extra.append(f"activation={self.activation!r}")
            if self.activation == "leaky_relu":
                extra.append(f"negative_slope={self.negative_slope}")
        if self.normalization != "window":
            extra.append(f"normalization={self.normalization!r}")
        return ", ".join([super().extra_repr()] + extra)


class PartialConv1d(_PartialConvMixin, nn.Conv1d):
    __doc__ = "Partial convolution layer in 1-D (e.g. speech: a padding mask), an nn.Conv1d with a mask.\n\n    " + _PartialConvMixin.__doc__
    _functional = staticmethod(partial_conv1d)


class PartialConv2d(_PartialConvMixin, nn.Conv2d):
    __doc__ = "Partial convolution layer (Liu et al., ECCV 2018), an nn.Conv2d with a mask.\n\n    " + _PartialConvMixin.__doc__
    _functional = staticmethod(partial_conv2d)


class PartialConv3d(_PartialConvMixin, nn.Conv3d):
    __doc__ = "Partial convolution layer in 3-D (video, volumes), an nn.Conv3d with a mask.\n\n    " + _PartialConvMixin.__doc__
    _functional = staticmethod(partial_conv3d)
