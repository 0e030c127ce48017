"""A 2-process DistributedDataParallel training step on CPU (gloo) with the layer inside."""
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from partialconv_cuda import PartialConv2d

WORLD_SIZE = 2


class TwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.encode = PartialConv2d(3, 8, 3, stride=2, padding=1, return_mask=True, activation="relu")
        self.decode = PartialConv2d(8, 3, 3, padding=1, return_mask=True)

    def forward(self, x, mask):
        y, mask = self.encode(x, mask)
        return self.decode(y, mask)[0]


def make_batch():
    generator = torch.Generator().manual_seed(42)
    x = torch.randn(4, 3, 16, 16, generator=generator)
    mask = (torch.rand(4, 1, 16, 16, generator=generator) > 0.3).float()
    return x, mask


def training_step(model, x, mask):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    loss = model(x, mask).square().mean()
    loss.backward()
    grads = [p.grad.detach().clone() for p in model.parameters()]
    optimizer.step()
    return grads, [p.detach().clone() for p in model.parameters()]


def worker(rank, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE)
    torch.set_num_threads(1)
    torch.manual_seed(0)  # identical initial weights on every rank
    model = DistributedDataParallel(TwoLayers())
    x, mask = make_batch()
    shard = slice(rank * 2, rank * 2 + 2)
    grads, params = training_step(model, x[shard], mask[shard])
    torch.save({"grads": grads, "params": params}, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_ddp_training_step_matches_single_process(tmp_path):
    mp.spawn(worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD_SIZE, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD_SIZE)]

    torch.manual_seed(0)
    single = TwoLayers()
    grads, params = training_step(single, *make_batch())
    for result in results:
        for ours, expected in zip(result["grads"], grads):
            torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)
        for ours, expected in zip(result["params"], params):
            torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)
    assert any(g.abs().max() > 0 for g in grads)
