"""python -m bench: times partial convolution side by side (seed-style layer, NVIDIA-style layer,
plain conv2d, ours, ours under torch.compile) on the PConvUNet layers of Liu et al. 2018, a
hole-ratio sweep and a whole-network training step (suite unet2d); on the layers of a 3-D
video-inpainting U-Net with moving holes, against NVIDIA's own PartialConv3d too (suite video3d);
and on the partial-padding convolutions of speech models over padded sequences (suite speech1d);
on this machine's GPU or CPU; prints the tables and writes JSON, Markdown and a PNG plot to
bench/results/."""
import argparse
import dataclasses
import datetime
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from partialconv_cuda import partial_conv_reference

from . import THREADS_PINNED
from .contenders import CONTENDERS as CONTENDERS_2D
from .contenders import (ALL_CONTENDERS, CUDA_PATHS, NVIDIA, NVIDIA_DIR_ENV, NVIDIA_PC3D, OURS, OURS_COMPILED,
                          PLAIN_CONVS, make_contenders, nvidia_partialconv3d_file, nvidia_partialconv_path)
from .network import NETWORK, NetworkWorkload, TrainingStep, network_depth
from .progress import Progress
from .roofline import floor_ms, measure_peaks
from .report import FWD, FWD_BWD, TRAIN_STEP, markdown, write_plot
from .suites_nd import (SPEECH1D, SPEECH_LAYER_NAMES, SUITE_CONTENDERS, VIDEO3D, VIDEO_LAYER_NAMES,
                        speech_workloads, video_workloads)
from .timing import Clock, Measurement, Policy, keep_freed_memory, last_level_cache_bytes, rotation_count
from .workloads import HOLE_SWEEP, LAYER_NAMES, SUITE, MaskBank, layer_workloads, make_inputs

REPO = Path(__file__).resolve().parent.parent
UNET2D = "unet2d"  # the PConvUNet layer suite, the hole sweep and the network step
SUITES = (UNET2D, VIDEO3D, SPEECH1D)
# (batch, frames, side) of the video clips and (batch, length) of the speech batches: on a GPU, on
# the CPU, in --quick, and on a CPU without native support for a half dtype (see resolve_settings).
VIDEO_SIZES = {"gpu": (4, 16, 256), "cpu": (1, 8, 128), "quick": (1, 4, 16), "slow_half": (1, 4, 32)}
SPEECH_SIZES = {"gpu": (16, 2048), "cpu": (4, 2048), "quick": (2, 64), "slow_half": (2, 128)}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
SWEEP_LAYERS = ("enc2", "dec2")
SWEEP_HOLES = (0.0, 0.1, 0.3, 0.5, 0.7)
QUICK_COMPILED_LAYER = "enc2"
# Largest error of a contender's output relative to the largest float64 reference value.
TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}
TF32_TOLERANCE = 5e-3


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes and few repeats: a smoke run (under 2 minutes on a 2-core CPU)")
    parser.add_argument("--suite", default="all",
                        help=f"comma-separated suites, or 'all' (default): {', '.join(SUITES)}")
    parser.add_argument("--device", help="cuda or cpu (default: cuda when a GPU is visible)")
    parser.add_argument("--dtype", help="comma-separated: float32,float16,bfloat16 "
                        "(default: all three on a GPU, float32,bfloat16 on the CPU)")
    parser.add_argument("--batch", type=int, help="unet2d: images per batch (default: 8 on a GPU, 1 on the CPU)")
    parser.add_argument("--size", type=int, help="unet2d: image side in pixels (default: 512 on a GPU, 256 on the "
                        "CPU; 64 for a half dtype on a CPU without native support for it)")
    parser.add_argument("--video-batch", type=int, help="video3d: clips per batch (default: 4 on a GPU, 1 on the CPU)")
    parser.add_argument("--frames", type=int, help="video3d: frames per clip (default: 16 on a GPU, 8 on the CPU)")
    parser.add_argument("--video-size", type=int, help="video3d: frame side in pixels (default: 256 on a GPU, 128 "
                        "on the CPU; 4 frames of 32 for a half dtype on a CPU without native support for it)")
    parser.add_argument("--video-layers", default="all",
                        help=f"video3d layers, 'all' or 'none' ({','.join(VIDEO_LAYER_NAMES)})")
    parser.add_argument("--speech-batch", type=int, help="speech1d: sequences per batch (default: 16 on a GPU, "
                        "4 on the CPU; 2 for a half dtype on a CPU without native support for it)")
    parser.add_argument("--length", type=int, help="speech1d: padded length in steps; the sequences' lengths are "
                        "uniform in [length/2, length] (default 2048; 128 for a half dtype on a CPU without "
                        "native support for it)")
    parser.add_argument("--speech-layers", default="all",
                        help=f"speech1d layers, 'all' or 'none' ({','.join(SPEECH_LAYER_NAMES)})")
    parser.add_argument("--nvidia-partialconv", metavar="DIR",
                        help="video3d: a checkout of github.com/NVIDIA/partialconv (or its models/partialconv3d.py) "
                        f"for the {NVIDIA_PC3D} contender (default: ${NVIDIA_DIR_ENV}); without it that "
                        "contender is reported as failed")
    parser.add_argument("--holes", type=float, default=0.3,
                        help="hole fraction of the image masks of the layer suite and the network, and of the "
                        "video suite's moving masks (default 0.3)")
    parser.add_argument("--layers", default="all", help=f"comma-separated layers of the unet2d suite, 'all' or "
                        f"'none' ({','.join(LAYER_NAMES)})")
    parser.add_argument("--sweep-layers", default=",".join(SWEEP_LAYERS),
                        help="layers of the hole-ratio sweep, or 'none' (default %(default)s)")
    parser.add_argument("--sweep-holes", default=",".join(map(str, SWEEP_HOLES)),
                        help="hole fractions of the sweep (default %(default)s)")
    parser.add_argument("--contenders", default=",".join(ALL_CONTENDERS),
                        help="default %(default)s; each suite runs those of them it has")
    parser.add_argument("--passes", default=f"{FWD},{FWD_BWD}", help="default %(default)s")
    parser.add_argument("--no-network", action="store_true", help="unet2d: skip the whole-network training step")
    parser.add_argument("--network-rounds", type=int,
                        help="unet2d: fewest timed rounds of the training step (default 20; 3 with --quick); "
                        "more where --repeats and --max-time allow")
    parser.add_argument("--repeats", type=int, help="most timed calls per contender (default: 50 GPU, 10 CPU)")
    parser.add_argument("--min-repeats", type=int, help="fewest timed calls, however slow (default: 10 GPU, 5 CPU)")
    parser.add_argument("--max-time", type=float,
                        help="seconds of timed calls per contender and measurement, beyond which only "
                        "--min-repeats are made (default 2)")
    parser.add_argument("--warmup", type=int, help="untimed calls first (default: 5 GPU, 2 CPU)")
    parser.add_argument("--threads", type=int, help="CPU threads (default: torch's, %d here)" % torch.get_num_threads())
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--default-malloc", action="store_true",
                        help="CPU: leave glibc's malloc at its defaults; by default the benchmark makes it keep "
                             "freed memory, so that timings do not vary with page faults (bench/NOTES.md)")
    parser.add_argument("--no-plot", action="store_true")
    return parser.parse_args(argv)


@dataclasses.dataclass
class Settings:
    device: str
    dtypes: list
    batch: int
    sizes: dict  # dtype name -> image side (unet2d)
    holes: float
    layers: list
    sweep_layers: list
    sweep_holes: list
    contenders: list
    passes: list
    network: bool
    policy: Policy
    network_policy: Policy  # the training step's: at least network_rounds rounds (resolve_settings)
    most_input_sets: int
    compiled_layers: list  # suite layers that ours_compiled runs on (all of them but in --quick)
    threads: int
    seed: int
    quick: bool
    suites: list
    video: dict  # dtype name -> [batch, frames, side] (video3d)
    speech: dict  # dtype name -> [batch, length] (speech1d)
    video_layers: list
    speech_layers: list
    nvidia_partialconv: str  # the file of NVIDIA's PartialConv3d; else the path given, or None


def _names(text, allowed, what):
    if text == "none":
        return []
    names = list(allowed) if text == "all" else [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in allowed]
    if unknown:
        raise SystemExit(f"python -m bench: unknown {what} {unknown}; expected some of {list(allowed)}")
    return names


def native_cpu_support(dtype):
    """Whether oneDNN runs this half dtype natively on this CPU; without it PyTorch's CPU
    convolution in that dtype takes a much slower path."""
    if dtype == torch.bfloat16:
        return torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return torch.ops.mkldnn._is_mkldnn_fp16_supported()


def resolve_settings(args):
    """Settings for this device, plus notes on every choice a reader should know about."""
    notes = []
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("python -m bench: --device cuda, but torch sees no CUDA GPU")
    gpu = device == "cuda"
    dtype_names = _names(args.dtype or ("float32,float16,bfloat16" if gpu else "float32,bfloat16"), DTYPES, "dtype")
    suites = _names(args.suite, SUITES, "suites")
    unet2d = UNET2D in suites
    if args.quick:
        batch, default_size = args.batch or 1, 16
        policy = Policy(args.warmup or 1, args.min_repeats or 3, args.repeats or 3, args.max_time or 0.2)
        most_input_sets = 4
        notes.append("--quick: tiny sizes, 3 timed calls per measurement and at most 4 input sets, to check "
                     "that everything runs; the numbers are not meaningful")
    else:
        batch, default_size = args.batch or (8 if gpu else 1), 512 if gpu else 256
        policy = Policy(args.warmup or (5 if gpu else 2), args.min_repeats or (10 if gpu else 5),
                        args.repeats or (50 if gpu else 10), args.max_time or 2.0)
        most_input_sets = 16
    if policy.min_repeats < 2 or policy.repeats < policy.min_repeats:
        raise SystemExit("python -m bench: expected 2 <= --min-repeats <= --repeats (a spread needs 2 timings)")
    # The training step's speedup is a few percent, and its per-round ratio moves by about ±5% on
    # this 2-core VM (0.97-1.10 over 20 rounds at 2026-12-01): the 5 rounds that --max-time allowed
    # a 0.6 s step gave 0.95x in one run and 1.03x in the next, against 1.05x over 20.
    network_rounds = args.network_rounds or (3 if args.quick else 20)
    if network_rounds < 2:
        raise SystemExit("python -m bench: expected --network-rounds >= 2 (a spread needs 2 timings)")
    network_policy = dataclasses.replace(policy, min_repeats=max(policy.min_repeats, network_rounds),
                                         repeats=max(policy.repeats, network_rounds))
    sizes, video, speech = {}, {}, {}
    kind = "quick" if args.quick else "gpu" if gpu else "cpu"
    for name in dtype_names:
        sizes[name] = args.size or default_size
        slow_half = not (gpu or args.quick or DTYPES[name] == torch.float32 or native_cpu_support(DTYPES[name]))
        video_batch, frames, side = VIDEO_SIZES["slow_half" if slow_half else kind]
        video[name] = [args.video_batch or video_batch, args.frames or frames, args.video_size or side]
        speech_batch, length = SPEECH_SIZES["slow_half" if slow_half else kind]
        speech[name] = [args.speech_batch or speech_batch, args.length or length]
        if slow_half:
            if not args.size:
                sizes[name] = 64
            smaller = ([f"unet2d at {sizes[name]}×{sizes[name]}"] * (unet2d and not args.size)
                       + [f"video3d at {video[name][1]} frames of {video[name][2]}×{video[name][2]}, batch "
                          f"{video[name][0]}"] * (VIDEO3D in suites and not (args.frames and args.video_size))
                       + [f"speech1d at length {speech[name][1]}, batch {speech[name][0]}"]
                       * (SPEECH1D in suites and not (args.speech_batch and args.length)))
            if not smaller:
                continue
            instructions = "AVX-512 BF16 or AMX" if DTYPES[name] == torch.bfloat16 else "AVX-512 FP16 or AMX-FP16"
            notes.append(f"{name} runs {', '.join(smaller)}: this CPU has no native {name} support "
                         f"({instructions}), so PyTorch's own {name} convolution, which the seed, nvidia and conv "
                         "contenders use, falls back to a slow path (here 75-250× slower than float32 in 2-D, "
                         "more in 1-D and 3-D); at the float32 sizes this run would take hours. Ours computes in "
                         "float32 internally and is not slowed down the same way, so its large lead in this dtype "
                         "here measures that fallback, not partial convolution")
    threads = args.threads or torch.get_num_threads()
    layers = _names(args.layers, LAYER_NAMES, "layers") if unet2d else []
    compiled_layers = layers
    contenders = _names(args.contenders, ALL_CONTENDERS, "contenders")
    cuda_paths = [c for c in contenders if c in CUDA_PATHS]
    if device != "cuda" and cuda_paths:
        contenders = [c for c in contenders if c not in CUDA_PATHS]
        notes.append(f"{', '.join(cuda_paths)}: CUDA's two paths, each forced; not run on the {device}")
    # The file if there is one, else what was given (the contender then fails saying what is missing).
    nvidia_partialconv = nvidia_partialconv_path(args.nvidia_partialconv)
    if VIDEO3D in suites and NVIDIA_PC3D in contenders:
        try:
            nvidia_partialconv = str(nvidia_partialconv3d_file(nvidia_partialconv))
            notes.append(f"{NVIDIA_PC3D}: NVIDIA's PartialConv3d from {nvidia_partialconv}")
        except FileNotFoundError as missing:
            notes.append(f"{NVIDIA_PC3D} is reported as failed: {missing}")
    if args.quick and OURS_COMPILED in contenders and unet2d:
        compiled_layers = [name for name in layers if name == QUICK_COMPILED_LAYER]
        notes.append(f"--quick: {OURS_COMPILED} runs on the suite's {QUICK_COMPILED_LAYER} only "
                     f"({'' if compiled_layers else 'not in --layers, so on no layer; '}compiling "
                     "every layer would take about a minute)")
    settings = Settings(
        device=device, dtypes=dtype_names, batch=batch, sizes=sizes, holes=args.holes,
        layers=layers,
        sweep_layers=_names(args.sweep_layers, LAYER_NAMES, "sweep layers") if unet2d else [],
        sweep_holes=[float(h) for h in args.sweep_holes.split(",")] if args.sweep_holes != "none" and unet2d else [],
        contenders=contenders,
        passes=_names(args.passes, (FWD, FWD_BWD), "passes"),
        network=unet2d and not args.no_network, policy=policy, network_policy=network_policy,
        most_input_sets=most_input_sets,
        compiled_layers=compiled_layers, threads=threads, seed=args.seed, quick=args.quick,
        suites=suites, video=video if VIDEO3D in suites else {}, speech=speech if SPEECH1D in suites else {},
        video_layers=_names(args.video_layers, VIDEO_LAYER_NAMES, "video layers") if VIDEO3D in suites else [],
        speech_layers=_names(args.speech_layers, SPEECH_LAYER_NAMES, "speech layers") if SPEECH1D in suites else [],
        nvidia_partialconv=nvidia_partialconv,
    )
    for name, size in sizes.items():
        depth = network_depth(size, size)
        if settings.network and depth < 8:
            notes.append(f"the {name} network is PConvUNet of depth {depth}, not 8: at {size}×{size} the "
                         "paper's depth would shrink the bottleneck below 2×2 (depth 8 needs 512×512)")
    if gpu:
        notes.append(f"cudnn.benchmark on; TF32 for float32 convolutions "
                     f"{'on' if torch.backends.cudnn.allow_tf32 else 'off'} (PyTorch's default), matmuls "
                     f"{'on' if torch.backends.cuda.matmul.allow_tf32 else 'off'}")
    else:
        pinning = (f"pinned to cores (OMP_PROC_BIND={os.environ['OMP_PROC_BIND']}, OMP_PLACES={os.environ['OMP_PLACES']})"
                   if THREADS_PINNED else "not pinned (torch was loaded before bench set OMP_PROC_BIND)")
        notes.append(f"CPU: {threads} threads (torch.set_num_threads) {pinning}, "
                     f"{torch.backends.cpu.get_cpu_capability()} kernels; ms are perf_counter wall times of each call")
        allocator = None if args.default_malloc else keep_freed_memory()
        notes.append(allocator or "malloc left at its defaults (--default-malloc, or not glibc): timings include "
                                  "page faults of memory freed before")
    return settings, notes


def device_name(device):
    if device == "cuda":
        return torch.cuda.get_device_name()
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            model = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model}, {os.cpu_count()} cores"


def git_commit():
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("-dirty" if dirty else "")


def _error_text(error):
    text = f"{type(error).__name__}: {error}".strip().splitlines()[0]
    return text if len(text) <= 240 else text[:237] + "..."


class Runner:
    """Runs the workloads of the settings and returns their records."""

    def __init__(self, settings):
        self.settings = settings
        self.clock = Clock(settings.device)
        self.masks = MaskBank(settings.seed)
        self.cache_bytes = last_level_cache_bytes(settings.device)
        self.memory_budget = (torch.cuda.get_device_properties(settings.device).total_memory // 8
                              if settings.device == "cuda" else 2**30)
        self.progress = Progress(self.measurement_count())
        self.peaks = {}  # dtype name -> measure_peaks(): the roofline under every time of that dtype

    def run(self):
        records = []
        for dtype_name in self.settings.dtypes:
            self.peaks[dtype_name] = measure_peaks(self.settings.device, DTYPES[dtype_name],
                                                   self.floor_matmul_dtype(DTYPES[dtype_name]))
            for workload in self.workloads(dtype_name):
                records += self.run_layer(workload, dtype_name)
            if self.settings.network:
                records += self.run_network(dtype_name)
        self.progress.close()
        return records

    def floor_matmul_dtype(self, dtype):
        """The dtype whose matrix-product rate bounds a layer in `dtype`: itself, except for a half
        type on a CPU without native support for it, which the CPU kernels compute in float32."""
        half = dtype in (torch.float16, torch.bfloat16)
        return torch.float32 if half and self.settings.device == "cpu" and not native_cpu_support(dtype) else dtype

    def workloads(self, dtype_name):
        s = self.settings
        workloads = []
        if UNET2D in s.suites:
            size = s.sizes[dtype_name]
            workloads += (layer_workloads(SUITE, s.layers, s.batch, size, size, [s.holes])
                          + layer_workloads(HOLE_SWEEP, s.sweep_layers, s.batch, size, size, s.sweep_holes))
        if VIDEO3D in s.suites:
            workloads += video_workloads(s.video_layers, *s.video[dtype_name], s.holes)
        if SPEECH1D in s.suites:
            workloads += speech_workloads(s.speech_layers, *s.speech[dtype_name])
        return workloads

    def contenders(self, workload):
        """The selected contenders that run on workload: in 2-D all of them, except ours_compiled
        where --quick skips it; in the other suites those that the suite has."""
        if workload.kind in SUITE_CONTENDERS:
            return [c for c in SUITE_CONTENDERS[workload.kind] if c in self.settings.contenders]
        compiled = workload.kind == SUITE and workload.layer.name in self.settings.compiled_layers
        return [c for c in self.settings.contenders
                if c in CONTENDERS_2D and (c != OURS_COMPILED or compiled)]

    def measurement_count(self):
        s = self.settings
        layers = sum(len(self.contenders(w)) for d in s.dtypes for w in self.workloads(d)) * len(s.passes)
        return layers + (2 * len(s.dtypes) if s.network else 0)

    def run_layer(self, workload, dtype_name):
        s = self.settings
        dtype = DTYPES[dtype_name]
        backward = FWD_BWD in s.passes
        first = make_inputs(workload, self.masks, 0, dtype, s.device, backward)
        count = rotation_count(first.nbytes(), self.cache_bytes, self.memory_budget, s.most_input_sets)
        inputs = [first] + [make_inputs(workload, self.masks, i, dtype, s.device, backward) for i in range(1, count)]
        reference = partial_conv_reference(
            *(None if t is None else t.detach().double() for t in (first.input, first.mask, first.weight, first.bias)),
            **workload.conv_arguments())
        base = {
            "workload": workload.kind, "layer": workload.layer.name, "dtype": dtype_name,
            "holes": workload.holes, "layer_holes": self.masks.hole_fraction(workload),
            **workload.record_fields(),
            "gmac": workload.multiply_adds() / 1e9, "input_sets": count,
        }
        contenders = make_contenders(workload, self.contenders(workload), s.nvidia_partialconv)
        plain_conv = PLAIN_CONVS[workload.dims]
        prepared, checks = {}, {}
        for contender in contenders:
            try:
                arguments = [contender.prepare(x) for x in inputs]
                checks[contender.name] = None if contender.name == plain_conv else self.check(
                    contender, arguments[0], reference, dtype)
                prepared[contender.name] = (contender, arguments)
            except Exception as failure:  # reported in the table, not raised: one contender may fail
                checks[contender.name] = failure
        records = []
        for pass_ in s.passes:
            self.progress.start(f"{dtype_name} {workload.kind} {workload.layer.name} holes={workload.holes:g} {pass_}")
            make_call = self.forward_call if pass_ == FWD else self.forward_backward_call
            outcomes = self.clock.measure(
                {name: make_call(contender, arguments, inputs) for name, (contender, arguments) in prepared.items()},
                s.policy)
            for contender in contenders:
                check = checks[contender.name]
                record = dict(base, contender=contender.name, **{"pass": pass_},
                              max_rel_err=check if isinstance(check, float) else None,
                              gflop=workload.gflop(pass_ == FWD_BWD))
                min_bytes = workload.min_bytes(pass_ == FWD_BWD, first.input.element_size(),
                                               with_mask=contender.name != plain_conv)
                record["floor_ms"] = floor_ms(record["gflop"], min_bytes, self.peaks[dtype_name])
                records.append(self.with_outcome(record, outcomes.get(contender.name, check), min_bytes))
            self.progress.advance(len(contenders))
        return records

    def check(self, contender, arguments, reference, dtype):
        """Largest error of the contender's output relative to the largest float64 reference
        value; raises if it exceeds the dtype's tolerance or the updated mask differs."""
        with torch.no_grad(), contender.path():
            output, updated_mask = contender.forward(*arguments)
        ref_output, ref_mask = reference
        error = ((output.double() - ref_output).abs().max() / ref_output.abs().max().clamp_min(1e-30)).item()
        tolerance = TOLERANCE[dtype]
        if dtype == torch.float32 and self.settings.device == "cuda" and torch.backends.cudnn.allow_tf32:
            tolerance = TF32_TOLERANCE
        if not error <= tolerance:
            raise AssertionError(f"wrong result: output differs from the float64 reference by {error:.2e} "
                                 f"of its largest value (tolerance {tolerance:.0e})")
        if not torch.equal(*torch.broadcast_tensors(updated_mask.double(), ref_mask)):
            raise AssertionError("wrong result: updated mask differs from the reference")
        return error

    @staticmethod
    def forward_call(contender, arguments, inputs):
        def call(i):
            with torch.no_grad(), contender.path():
                return contender.forward(*arguments[i % len(arguments)])
        return call

    @staticmethod
    def forward_backward_call(contender, arguments, inputs):
        def call(i):
            k = i % len(arguments)
            with contender.path():
                output, _ = contender.forward(*arguments[k])
                return torch.autograd.grad(output, inputs[k].differentiable(), inputs[k].grad_output)
        return call

    @staticmethod
    def with_outcome(record, outcome, min_bytes=None):
        """record completed with a Measurement, or marked failed with the exception's text."""
        if not isinstance(outcome, Measurement):
            return dict(record, status="failed", error=_error_text(outcome), median_ms=None, p20_ms=None,
                        p80_ms=None, repeats=0, tflops=None, gbps=None, peak_mem_mb=None, times_ms=None)
        return dict(record, status="ok", error=None, **dataclasses.asdict(outcome),
                    tflops=record["gflop"] / outcome.median_ms,
                    gbps=None if min_bytes is None else min_bytes / outcome.median_ms / 1e6)

    def run_network(self, dtype_name):
        s = self.settings
        size = s.sizes[dtype_name]
        workload = NetworkWorkload(s.batch, size, size, s.holes, network_depth(size, size))
        set_bytes = s.batch * (3 + 1) * size * size * 4  # image and mask, float32
        count = rotation_count(set_bytes, self.cache_bytes, self.memory_budget, s.most_input_sets)
        self.progress.start(f"{dtype_name} {NETWORK} depth {workload.depth} {TRAIN_STEP}")
        steps, failures, records = {}, {}, []
        base = {
            "workload": NETWORK, "layer": NETWORK, "dtype": dtype_name, "pass": TRAIN_STEP, "holes": s.holes,
            "layer_holes": s.holes, "batch": s.batch, "height": size, "width": size, "image_height": size,
            "image_width": size, "depth": workload.depth, "gmac": workload.multiply_adds() / 1e9,
            "gflop": workload.gflop(), "input_sets": count, "max_rel_err": None,
        }
        losses = {}
        for contender in (NVIDIA, OURS):
            try:
                steps[contender] = TrainingStep(workload, contender, DTYPES[dtype_name], s.device, s.seed, count)
                losses[contender] = steps[contender](0).item()  # from the shared initial weights
            except Exception as failure:
                failures[contender] = failure
                steps.pop(contender, None)
        outcomes = self.clock.measure(steps, s.network_policy)
        for contender in (NVIDIA, OURS):
            record = dict(base, contender=contender, loss=losses.get(contender))
            records.append(self.with_outcome(record, outcomes.get(contender, failures.get(contender))))
        self.progress.advance(2)
        return records


def suites_suffix(settings):
    """'' for a run of every suite; else '_' and the suites it ran, so that runs of single suites
    on one day do not overwrite each other's files."""
    return "" if list(settings.suites) == list(SUITES) else "_" + "-".join(settings.suites)


def output_stem(settings, device, date):
    kind = "cpu" if settings.device == "cpu" else "".join(c if c.isalnum() else "-" for c in device.lower())
    return f"{kind}_{date}" + suites_suffix(settings) + ("_quick" if settings.quick else "")


def main(argv=None):
    args = parse_args(argv)
    settings, notes = resolve_settings(args)
    torch.set_num_threads(settings.threads)
    if settings.device == "cuda":
        torch.backends.cudnn.benchmark = True
    now = datetime.datetime.now(datetime.timezone.utc)
    commit = git_commit()  # of the code now loaded, before anything can change the working tree
    device = device_name(settings.device)
    print(f"python -m bench on {device}, torch {torch.__version__}, {settings.threads} CPU threads", file=sys.stderr)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)

    runner = Runner(settings)
    records = runner.run()
    run = {
        "device": device,
        "torch": torch.__version__,
        "cuda": torch.version.cuda if settings.device == "cuda" else None,
        "commit": commit,
        "date": now.strftime("%Y-%m-%d %H:%M UTC"),
        "command": shlex.join(["python", "-m", "bench", *(sys.argv[1:] if argv is None else argv)]),
        "threads": settings.threads,
        "gpu_settings": {"cudnn.benchmark": True, "cudnn.allow_tf32": torch.backends.cudnn.allow_tf32,
                         "matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32}
                        if settings.device == "cuda" else None,
        "settings": dataclasses.asdict(settings),
        "notes": notes,
        "peaks": runner.peaks,
        "results": records,
    }
    paths = write_results(run, args.out, output_stem(settings, device, now.strftime("%Y-%m-%d")),
                          latest=None if settings.quick else f"latest_{settings.device}{suites_suffix(settings)}", with_plot=not args.no_plot)
    print(markdown(run, details=False))
    print("wrote " + ", ".join(str(p) for p in paths), file=sys.stderr)
    return run


def write_results(run, directory, stem, latest, with_plot):
    directory.mkdir(parents=True, exist_ok=True)
    paths = [directory / f"{stem}.json", directory / f"{stem}.md"]
    paths[0].write_text(json.dumps(run, indent=1) + "\n")
    paths[1].write_text(markdown(run) + "\n")
    if with_plot and write_plot(run, directory / f"{stem}.png"):
        paths.append(directory / f"{stem}.png")
    if latest:
        for path in list(paths):
            copy = directory / f"{latest}{path.suffix}"
            shutil.copyfile(path, copy)
            paths.append(copy)
    return paths
