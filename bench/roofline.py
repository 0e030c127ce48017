"""The floor under each measured time: what this device could do at best, measured in the same run.

A layer cannot run faster than max(FLOPs / peak FLOP rate, minimum bytes / peak bandwidth). Both peaks
are measured at the start of each dtype's runs: the best rate of a large square matrix product or of a
large 3x3 convolution (whichever is faster: on some CPUs oneDNN's convolution beats the BLAS matrix
product by 2x), and the best rate of a large copy (bytes read plus bytes written). They are what PyTorch
reaches on this device, not datasheet numbers: the floor is a bound the benchmark itself observed, and a
slow spell during the calibration would make it optimistic.
"""
import time

import torch
import torch.nn.functional as F

# Matrix side, convolution (batch, channels, size) and copy size: large enough to reach the peak, small
# enough to take a second or so.
GPU_MATMUL_SIZE, CPU_MATMUL_SIZE = 8192, 1024
GPU_CONV, CPU_CONV = (32, 256, 64), (1, 256, 32)
GPU_COPY_BYTES, CPU_COPY_BYTES = 1 << 30, 1 << 27
REPEATS = 5


def _best_seconds(function, device, repeats=REPEATS):
    """Shortest of `repeats` timed calls after one warm-up call."""
    function()
    best = float("inf")
    for _ in range(repeats):
        if device == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            function()
            end.record()
            end.synchronize()
            seconds = begin.elapsed_time(end) / 1e3
        else:
            start = time.perf_counter()
            function()
            seconds = time.perf_counter() - start
        best = min(best, seconds)
    return best


def measure_peaks(device, dtype, matmul_dtype=None):
    """{'tflops', 'gbps', 'matmul_dtype', 'how'}: the best matrix-product or convolution rate (in
    matmul_dtype, by default dtype) and copy rate (in dtype) on `device`."""
    gpu = device == "cuda"
    matmul_dtype = matmul_dtype or dtype
    n = GPU_MATMUL_SIZE if gpu else CPU_MATMUL_SIZE
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=matmul_dtype, generator=generator)
    b = torch.randn(n, n, device=device, dtype=matmul_dtype, generator=generator)
    matmul_tflops = 2 * n**3 / _best_seconds(lambda: torch.mm(a, b), device) / 1e12
    del a, b
    batch, channels, size = GPU_CONV if gpu else CPU_CONV
    x = torch.randn(batch, channels, size, size, device=device, dtype=matmul_dtype, generator=generator)
    w = torch.randn(channels, channels, 3, 3, device=device, dtype=matmul_dtype, generator=generator)
    conv_flop = 2 * batch * size * size * channels * channels * 9
    conv_tflops = conv_flop / _best_seconds(lambda: F.conv2d(x, w, padding=1), device) / 1e12
    del x, w
    elements = (GPU_COPY_BYTES if gpu else CPU_COPY_BYTES) // torch.empty((), dtype=dtype).element_size()
    source = torch.ones(elements, device=device, dtype=dtype)
    target = torch.empty_like(source)
    copy_seconds = _best_seconds(lambda: target.copy_(source), device)
    copy_bytes = 2 * source.numel() * source.element_size()
    del source, target
    tf32 = (f", TF32 {'on' if torch.backends.cuda.matmul.allow_tf32 else 'off'}"
            if gpu and matmul_dtype == torch.float32 else "")
    name = str(matmul_dtype).removeprefix("torch.")
    return {
        "tflops": max(matmul_tflops, conv_tflops),
        "gbps": copy_bytes / copy_seconds / 1e9,
        "matmul_dtype": name,
        "how": f"best of {REPEATS} of each in {name}{tf32}: {n}x{n} torch.mm {matmul_tflops:.3g} TFLOP/s, "
               f"{channels}->{channels} 3x3 conv2d at {batch}x{size}x{size} {conv_tflops:.3g} TFLOP/s; "
               f"{copy_bytes // 2 >> 20} MiB copy_ counted as read + write",
    }


def floor_ms(gflop, min_bytes, peaks):
    """The least time the work could take on a device with these peaks, in ms."""
    compute_ms = gflop / peaks["tflops"]  # GFLOP / (TFLOP/s) = ms
    memory_ms = min_bytes / (peaks["gbps"] * 1e6)  # bytes / (GB/s) = ms * 1e6
    return max(compute_ms, memory_ms)
