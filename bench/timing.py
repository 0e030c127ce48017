"""Timing and peak memory of calls side by side, on the CPU or a CUDA GPU."""
import contextlib
import ctypes
import dataclasses
import math
import os
import statistics
import time

import torch


def keep_freed_memory():
    """Makes glibc's malloc keep the memory the timed calls free, so that no call pays for
    page-faulting fresh memory in because of what the process happened to allocate before it.

    By default glibc returns freed memory at the top of its heap to the system and moves its mmap
    threshold with the sizes freed, so whether a call's tens of megabytes of temporaries are
    faulted in afresh depends on the rest of the process: a plain conv2d forward+backward of
    PConvUNet's dec1 shape (67->3 3x3 at 256x256) took 25 ms in a fresh process and 52 ms, call
    after call, once a 17.6 MB tensor had been allocated and kept (the same with any of our calls
    before it). With trimming off, the mmap threshold fixed at its 32 MB maximum and 512 MB of top
    padding it took 32-35 ms either way. The setting applies to every contender alike. Returns the
    note for the report, or None where the C library is not glibc."""
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        version = libc.gnu_get_libc_version().decode()
    except (OSError, AttributeError):
        return None
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3  # malloc.h
    settings = {m_trim_threshold: 2**31 - 1, m_top_pad: 512 << 20, m_mmap_threshold: 32 << 20}
    if not all(libc.mallopt(option, value) == 1 for option, value in settings.items()):
        return None
    return (f"glibc {version} malloc set to keep freed memory (mallopt: no trimming, mmap threshold 32 MB, "
            "512 MB top pad), so that timings do not depend on page faults of memory freed before")


@dataclasses.dataclass(frozen=True)
class Policy:
    """How much to time: warmup untimed calls of each contender, then between min_repeats and
    repeats timed calls of each, as many as fit in max_time_s per contender (estimated from the
    warm-up); min_repeats must be at least 2."""

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
    times_ms: list  # one per timed round, in round order (the same rounds for every contender)


def rotation_count(set_bytes, cache_bytes, memory_budget_bytes, most=16):
    """How many input sets to rotate through so that together they are twice the last-level
    cache (at least 2, at most `most`), within the memory budget."""
    wanted = min(most, max(2, math.ceil(2 * cache_bytes / max(set_bytes, 1))))
    return max(1, min(wanted, memory_budget_bytes // max(set_bytes, 1)))


class Clock:
    """Times calls on one device: CUDA events around each call on a GPU, perf_counter on the
    CPU. call(i) runs on input set i (modulo the number of sets)."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"

    def time_call(self, call, set_index):
        """Milliseconds of call(set_index)."""
        if not self.cuda:
            begin = time.perf_counter_ns()
            call(set_index)
            return (time.perf_counter_ns() - begin) / 1e6
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        call(set_index)
        end.record()
        end.synchronize()
        return begin.elapsed_time(end)

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

    def measure(self, calls, policy):
        """Times several calls side by side: warm-up rounds, then timed rounds in which every call
        runs once, in an order that rotates from round to round, so that a slow spell of the
        machine hits all of them alike; then the peak memory of each (on input set 0). Each timed
        call gets the next input set, so that no call finds the inputs the call before it read in
        cache (with one set for the whole round, each contender ran on the data the one before it
        had just read: small layers, whose inputs and weights fit in the cache, favoured whichever
        came second).

        calls: {name: call}. Returns {name: Measurement, or the exception the call raised}.
        """
        results, live = {}, dict(calls)

        def run(name, set_index):
            try:
                return self.time_call(live[name], set_index)
            except Exception as error:  # e.g. no kernel for this device; the others go on
                results[name] = error
                del live[name]
                if self.cuda:
                    torch.cuda.empty_cache()
                return None

        warmup = {name: [] for name in live}
        for i in range(policy.warmup):
            for name in list(live):
                warmup[name].append(run(name, i))
        round_ms = sum(min(warmup[name]) for name in live) if policy.warmup and live else 1.0
        rounds = min(policy.repeats,
                     max(policy.min_repeats, int(policy.max_time_s * 1e3 * len(live) / max(round_ms, 1e-3))))
        names = list(live)
        times = {name: [] for name in names}
        for r in range(rounds):
            for k in range(len(names)):
                name = names[(r + k) % len(names)]
                if name in live:
                    times[name].append(run(name, policy.warmup + r * len(names) + k))
        for name, call in list(live.items()):
            quintiles = statistics.quantiles(times[name], n=5, method="inclusive")
            median = statistics.median(times[name])
            # The interpolations round differently: p20 <= median <= p80 exactly, as the report assumes.
            results[name] = Measurement(median, min(quintiles[0], median), max(quintiles[3], median), rounds,
                                        self.peak_memory_mb(lambda: call(0)), list(times[name]))
        return results


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
