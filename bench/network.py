"""The whole-network workload: one PConvUNet training step (forward, loss, backward, Adam step),
with our layer and with the NVIDIA-style layer, from the same weights."""
import contextlib
import dataclasses
import functools

import torch

from partialconv_cuda import PartialConv2d
from partialconv_cuda.masks import irregular_masks
from partialconv_cuda.models import PConvUNet, ReferencePartialConv2d, inpainting_pixel_loss, pconv_unet_layers

from .contenders import NVIDIA, OURS
from .workloads import layer_workloads

NETWORK = "PConvUNet"
LAYER_FACTORIES = {OURS: PartialConv2d, NVIDIA: functools.partial(ReferencePartialConv2d, nan_safe=False)}
LEARNING_RATE = 2e-4  # the paper's initial training rate


def network_depth(height, width):
    """The paper's depth 8 where the image allows it: each encoder layer halves the image and the
    bottleneck must stay at least 2x2 (batch norm needs more than one value per channel)."""
    depth = 8
    while depth > 1 and (height % 2**depth or width % 2**depth or min(height, width) < 2 ** (depth + 1)):
        depth -= 1
    return depth


@dataclasses.dataclass(frozen=True)
class NetworkWorkload:
    batch: int
    height: int
    width: int
    holes: float
    depth: int

    def layer_workloads(self):
        layers = pconv_unet_layers(depth=self.depth)
        return layer_workloads(NETWORK, [layer.name for layer in layers], self.batch, self.height,
                               self.width, [self.holes], network=layers)

    def multiply_adds(self):
        """Forward multiply-adds of all partial convolutions."""
        return sum(workload.multiply_adds() for workload in self.layer_workloads())

    def gflop(self):
        """Convolution flops of forward + backward over all partial convolutions."""
        return sum(workload.gflop(backward=True) for workload in self.layer_workloads())


class TrainingStep:
    """call(i) runs one training step on input set i and returns its loss; every contender
    starts from the weights that `seed` gives."""

    def __init__(self, workload, contender, dtype, device, seed, set_count):
        torch.manual_seed(seed)
        self.model = PConvUNet(depth=workload.depth, layer_factory=LAYER_FACTORIES[contender]).to(device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=LEARNING_RATE)
        # float16 / bfloat16 train as people do: float32 weights under autocast.
        self.autocast = (contextlib.nullcontext if dtype == torch.float32
                         else functools.partial(torch.autocast, torch.device(device).type, dtype))
        generator = torch.Generator().manual_seed(seed)
        self.sets = [
            (torch.rand(workload.batch, 3, workload.height, workload.width, generator=generator).to(device),
             irregular_masks(workload.batch, workload.height, workload.width, workload.holes, seed=seed + i,
                             device=device))
            for i in range(set_count)
        ]

    def __call__(self, set_index):
        image, mask = self.sets[set_index % len(self.sets)]
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast():
            output, _ = self.model(image * mask, mask)
        loss = inpainting_pixel_loss(output.float(), image, mask)
        loss.backward()
        self.optimizer.step()
        return loss.detach()
