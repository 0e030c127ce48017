"""PartialConv2d: a drop-in replacement for NVIDIA's PartialConv2d layer."""
from torch import nn

from .ops import activation_name, partial_conv2d


class PartialConv2d(nn.Conv2d):
    """Partial convolution layer (Liu et al., ECCV 2018), an nn.Conv2d with a mask.

    Same constructor and state_dict as nn.Conv2d (checkpoints of NVIDIA's PartialConv2d load
    unchanged), plus:
      multi_channel: the mask has one channel per input channel (else a single channel)
      return_mask:   forward returns (output, updated_mask) instead of output
      activation:    None, 'relu' or 'leaky_relu' (fused; negative_slope for leaky_relu)

    forward(input, mask=None): mask (N or 1, 1 or C_in, H, W), 1 = valid, 0 = hole; None means
    all ones, which makes the layer partial-convolution-based padding (Liu et al. 2018b). Nothing
    is cached between calls. `mask_in=` is accepted as in NVIDIA's layer.
    """

    def __init__(self, *args, multi_channel=False, return_mask=False, activation=None,
                 negative_slope=0.01, **kwargs):
        super().__init__(*args, **kwargs)
        if self.padding_mode != "zeros":
            raise ValueError(
                f"PartialConv2d: padding_mode must be 'zeros' (the padding counts as holes), "
                f"got {self.padding_mode!r}"
            )
        self.multi_channel = multi_channel
        self.return_mask = return_mask
        self.activation = activation_name(activation)
        self.negative_slope = negative_slope

    def forward(self, input, mask=None, *, mask_in=None):
        if mask_in is not None:
            if mask is not None:
                raise ValueError("PartialConv2d: pass the mask once, as mask or as mask_in")
            mask = mask_in
        if mask is not None and mask.dim() == 4:
            expected = self.in_channels if self.multi_channel else 1
            if mask.shape[1] != expected:
                raise ValueError(
                    f"PartialConv2d(multi_channel={self.multi_channel}): expected a mask with "
                    f"{expected} channel(s), got {mask.shape[1]}"
                    + ("" if self.multi_channel else "; use multi_channel=True for one mask channel per input channel")
                )
        output, updated_mask = partial_conv2d(
            input, mask, self.weight, self.bias, self.stride, self.padding, self.dilation,
            self.groups, self.activation, self.negative_slope,
        )
        if not self.return_mask:
            return output
        if self.multi_channel:
            updated_mask = updated_mask.expand(-1, self.out_channels, -1, -1)
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
        return ", ".join([super().extra_repr()] + extra)
