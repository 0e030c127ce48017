"""Times the CPU kernel's two paths, forced with PARTIALCONV_CPU_PATH, as the valid fraction falls:
the measurement behind the path thresholds in csrc/cpu/partial_conv_cpu.cpp (bench/NOTES.md).

    python -m bench.cpu_paths [--layers enc2,dec2] [--threads 2]
"""
import argparse
import os
import time

import torch

import partialconv_cuda
from partialconv_cuda.masks import irregular_masks
from partialconv_cuda.models import pconv_unet_layers

from .timing import keep_freed_memory

HOLE_RATIOS = (0.3, 0.5, 0.7, 0.8, 0.9, 0.95)
IMAGE_SIZE = 256  # the CPU benchmark's image: enc2 and dec2 see 128x128


def median_ms(function, repeats):
    function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return sorted(times)[repeats // 2] * 1e3


def time_path(path, x, mask, w, b, conv):
    """(forward ms, forward + backward ms) with the CPU path forced to `path`."""
    def forward_backward():
        out, _ = partialconv_cuda.partial_conv2d(x, mask, w, b, **conv)
        torch.autograd.grad(out.sum(), (x, w, b))

    before = os.environ.get("PARTIALCONV_CPU_PATH")
    os.environ["PARTIALCONV_CPU_PATH"] = path
    try:
        with torch.no_grad():
            forward = median_ms(lambda: partialconv_cuda.partial_conv2d(x, mask, w, b, **conv), 7)
        return forward, median_ms(forward_backward, 5)
    finally:
        if before is None:
            del os.environ["PARTIALCONV_CPU_PATH"]
        else:
            os.environ["PARTIALCONV_CPU_PATH"] = before


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", default="enc2,dec2", help="PConvUNet layers, comma-separated")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(keep_freed_memory() or "malloc left at its defaults (not glibc)")
    layers = {layer.name: layer for layer in pconv_unet_layers()}
    generator = torch.Generator().manual_seed(0)
    print("| layer | holes | valid | fwd dense | fwd packed | fwd+bwd dense | fwd+bwd packed |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name in args.layers.split(","):
        layer = layers[name]
        size = IMAGE_SIZE // layer.scale
        cin, k = layer.in_channels, layer.kernel_size
        x = torch.randn(1, cin, size, size, generator=generator, requires_grad=True)
        w = torch.randn(layer.out_channels, cin, k, k, generator=generator, requires_grad=True)
        b = torch.randn(layer.out_channels, generator=generator, requires_grad=True)
        conv = dict(stride=layer.stride, padding=k // 2)
        for holes in HOLE_RATIOS:
            mask = irregular_masks(1, size, size, holes, seed=1)
            if layer.multi_channel:
                mask = mask.expand(1, cin, size, size).contiguous()
            with torch.no_grad():
                valid = partialconv_cuda.partial_conv2d(x, mask, w, **conv)[1].mean().item()
            row = [time_path(path, x, mask, w, b, conv) for path in ("dense", "packed")]
            (dense_f, dense_fb), (packed_f, packed_fb) = row
            print(f"| {name} | {holes:.0%} | {valid:.1%} | {dense_f:.1f} | {packed_f:.1f} | {dense_fb:.1f} | "
                  f"{packed_fb:.1f} |", flush=True)


if __name__ == "__main__":
    main()
