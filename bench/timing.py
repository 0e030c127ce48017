"""Timing and peak memory of one call, on the CPU or a CUDA GPU."""
import contextlib
import dataclasses
import math
import os
import statistics
import time

import torch


@dataclasses.dataclass(frozen=True)
class Policy:
    """How much to time: warmup untimed calls, then between min_repeats and repeats timed calls,
    as many as fit in max_time_s (estimated from the warm-up)."""

    warmup: int
    min_repeats: int
    repeats: int
    max_time_s: float


@dataclasses.dataclass(frozen=True)
class Measurement:
    median_ms: float
    p20_ms: float
    p80_ms: float
    repeats: int
    peak_mem_mb: float  # or None where it cannot be measured


def rotation_count(set_bytes, cache_bytes, memory_budget_bytes, most=16):
    """How many input sets to rotate through so that together they are twice the last-level
    cache (at least 2, at most `most`), within the memory budget."""
    wanted = min(most, max(2, math.ceil(2 * cache_bytes / max(set_bytes, 1))))
    return max(1, min(wanted, memory_budget_bytes // max(set_bytes, 1)))


class Clock:
    """Times calls on one device: CUDA events around each call on a GPU, perf_counter on the
    CPU. call(i) runs on input set i."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"

    def time_calls(self, call, start, count):
        if not self.cuda:
            times = []
            for i in range(start, start + count):
                begin = time.perf_counter_ns()
                call(i)
                times.append((time.perf_counter_ns() - begin) / 1e6)
            return times
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(count)]
        for i, (begin, end) in enumerate(events, start):
            begin.record()
            call(i)
            end.record()
        torch.cuda.synchronize(self.device)
        return [begin.elapsed_time(end) for begin, end in events]

    def peak_memory_mb(self, call):
        """Peak memory allocated during call() beyond what was allocated before it, in MiB:
        torch.cuda.max_memory_allocated on a GPU; on the CPU, the allocations of PyTorch's CPU
        allocator as recorded by the profiler (None if the profiler cannot record them)."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            before = torch.cuda.memory_allocated(self.device)
            call()
            torch.cuda.synchronize(self.device)
            return (torch.cuda.max_memory_allocated(self.device) - before) / 2**20
        try:
            with _stderr_silenced(), torch.profiler.profile(
                activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
            ) as profile:
                call()
            allocations = sorted(
                (event.start_ns(), event.nbytes())
                for event in profile.profiler.kineto_results.events() if event.name() == "[memory]"
            )
        except (AttributeError, RuntimeError):
            return None
        allocated = peak = 0
        for _, nbytes in allocations:  # frees are negative
            allocated += nbytes
            peak = max(peak, allocated)
        return peak / 2**20

    def measure(self, call, policy):
        """Warm up, time, then measure peak memory once (on input set 0)."""
        warmup = self.time_calls(call, 0, policy.warmup)
        estimate_ms = min(warmup) if warmup else 1.0
        repeats = min(policy.repeats, max(policy.min_repeats, int(policy.max_time_s * 1e3 / estimate_ms)))
        times = self.time_calls(call, policy.warmup, repeats)
        peak_mem_mb = self.peak_memory_mb(lambda: call(0))
        if len(times) == 1:
            return Measurement(times[0], times[0], times[0], 1, peak_mem_mb)
        quintiles = statistics.quantiles(times, n=5, method="inclusive")
        return Measurement(statistics.median(times), quintiles[0], quintiles[3], repeats, peak_mem_mb)


@contextlib.contextmanager
def _stderr_silenced():
    """The profiler's C++ side logs its start and stop on file descriptor 2; keep them off the
    progress bar."""
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def last_level_cache_bytes(device):
    """L2 of a GPU; the largest cache the CPU lists in sysfs (32 MiB if it lists none)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).L2_cache_size
    sizes = []
    for index in range(8):
        try:
            with open(f"/sys/devices/system/cpu/cpu0/cache/index{index}/size") as file:
                text = file.read().strip()
        except OSError:
            break
        units = {"K": 2**10, "M": 2**20, "G": 2**30}
        sizes.append(int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text))
    return max(sizes, default=32 * 2**20)
