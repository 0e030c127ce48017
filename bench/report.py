"""Turns a benchmark run (the JSON document) into Markdown tables and a plot.

`python -m bench.report RESULTS.json` writes RESULTS.md (and RESULTS.png, with matplotlib) again
from the JSON alone."""
import json
import math
import statistics
import sys
from collections import defaultdict
from pathlib import Path

from .contenders import (CONTENDERS, CONV2D, DESCRIPTIONS, NVIDIA, OURS, OURS_COMPILED, PLAIN_CONVS, SEED,
                          SUITE_DESCRIPTIONS)
from .network import NETWORK
from .suites_nd import SHORTEST, SUITE_CONTENDERS, SUITE_TITLES, VIDEO3D
from .workloads import HOLE_SWEEP, PAPER_LAYERS, SUITE, layer_workloads

FWD, FWD_BWD, TRAIN_STEP = "fwd", "fwd+bwd", "train_step"
PASS_TITLES = {FWD: "forward", FWD_BWD: "forward + backward", TRAIN_STEP: "training step"}


def geometric_mean(values):
    values = [v for v in values if v is not None and v > 0]
    return math.exp(sum(map(math.log, values)) / len(values)) if values else None


def speedup(baseline, record):
    """How many times faster record is than baseline (both records, or None): the median over the
    timed rounds of baseline's time / record's time in the same round, where both carry their
    rounds' times (else, in results written before they did, the ratio of their medians). A round
    runs every contender once, back to back, so a slow spell of the machine, which moves both
    medians, cancels out of each round's ratio."""
    if not (ok(baseline) and ok(record)):
        return None
    rounds = list(zip(baseline.get("times_ms") or (), record.get("times_ms") or ()))
    if rounds and len(rounds) == len(baseline["times_ms"]) == len(record["times_ms"]):
        return statistics.median(b / r for b, r in rounds)
    return baseline["median_ms"] / record["median_ms"]


def ok(record):
    return record is not None and record["status"] == "ok"


def index_records(records):
    """{(workload, dtype, pass): {row key: {contender: record}}} with row key (layer, holes)."""
    index = defaultdict(lambda: defaultdict(dict))
    for record in records:
        rows = index[record["workload"], record["dtype"], record["pass"]]
        rows[record["layer"], record["holes"]][record["contender"]] = record
    return index


def speedups(run):
    """Geometric means over the layer suite of ours' speedup over each other contender, per
    (dtype, pass): {(dtype, pass): {contender: speedup}}."""
    summary = {}
    for (workload, dtype, pass_), rows in index_records(run["results"]).items():
        if workload != SUITE:
            continue
        summary[dtype, pass_] = {
            other: geometric_mean([speedup(row.get(other), row.get(OURS)) for row in rows.values()])
            for other in (SEED, NVIDIA, CONV2D, OURS_COMPILED)
        }
    return summary


def suite_contenders(run, kind):
    """The contenders of a 1-D or 3-D suite that this run selected, in the suite's order."""
    return [c for c in SUITE_CONTENDERS[kind] if c in run["settings"]["contenders"]]


def suite_ratios(contenders):
    """layer_table's ratio columns for a suite: ours against each other contender."""
    return tuple((f"ours / {c}", OURS, c) if c in PLAIN_CONVS.values() else (f"ours vs {c}", c, OURS)
                 for c in contenders if c != OURS)


def suite_speedups(run):
    """Geometric means over each 1-D or 3-D suite's layers of ours' speedup over each of its other
    contenders: {(suite, dtype, pass): {contender: speedup}}."""
    summary = {}
    for (workload, dtype, pass_), rows in index_records(run["results"]).items():
        if workload in SUITE_CONTENDERS:
            summary[workload, dtype, pass_] = {
                other: geometric_mean([speedup(row.get(other), row.get(OURS)) for row in rows.values()])
                for other in suite_contenders(run, workload) if other != OURS
            }
    return summary


def _time_cell(record, footnotes):
    if record is None:
        return "–"
    if record["status"] != "ok":
        reason = f"{record['contender']}: {record['error']}"
        if reason not in footnotes:
            footnotes.append(reason)
        return f"failed [{footnotes.index(reason) + 1}]"
    spread = (record["p80_ms"] - record["p20_ms"]) / 2 / record["median_ms"]
    return f"{_number(record['median_ms'])} ±{spread:.0%}"


def _number(value, digits=3):
    if value is None:
        return "–"
    if value == 0 or abs(value) >= 10 ** (digits - 1):
        return f"{value:.0f}"
    return f"{value:.{max(0, digits - 1 - math.floor(math.log10(abs(value))))}f}"


def _ratio(value):
    return "–" if value is None else f"{value:.2f}×"


def _table(header, rows, align=None):
    align = align or ["---"] + ["---:"] * (len(header) - 1)
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _footnote_lines(footnotes):
    return [""] + [f"[{i}] {text}" for i, text in enumerate(footnotes, 1)] if footnotes else []


def _shape(record):
    if "shape" in record:  # the 1-D and 3-D suites say it themselves
        return record["shape"]
    layer = next(layer for layer in PAPER_LAYERS if layer.name == record["layer"])
    mask = f", {layer.in_channels}-ch mask" if layer.multi_channel else ""
    return (f"{layer.in_channels}→{layer.out_channels} {layer.kernel_size}×{layer.kernel_size}/{layer.stride} "
            f"at {record['height']}×{record['width']}{mask}")


# Ratio columns: (title, a, b) shows a's time / b's (speedup: the median of the rounds' ratios).
RATIOS = (("ours vs nvidia", NVIDIA, OURS), ("ours vs seed", SEED, OURS), ("ours / conv2d", OURS, CONV2D))


def _floor_ms(by_contender):
    """The roofline floor of a row: the one computed for ours, whose minimum bytes include the mask
    (None for runs recorded before floors were)."""
    record = by_contender.get(OURS)
    return record.get("floor_ms") if record else None


def _over_floor(by_contender):
    record, floor = by_contender.get(OURS), _floor_ms(by_contender)
    return record["median_ms"] / floor if ok(record) and floor else None


def layer_table(rows, contenders, ratios=RATIOS):
    """Side-by-side times of the contenders for each (layer, holes) row, with ours' ratios and the
    roofline floor; for several rows, their sums and the geometric means of the ratios."""
    footnotes = []
    floors = any(_floor_ms(by_contender) is not None for by_contender in rows.values())
    header = (["layer", "shape", "GMAC", "holes"] + [f"{c} ms" for c in contenders] + [t for t, _, _ in ratios]
              + (["floor ms", "ours / floor"] if floors else []))
    lines = []
    for by_contender in rows.values():
        first = next(iter(by_contender.values()))
        lines.append([first["layer"], _shape(first), _number(first["gmac"]), f"{first['layer_holes']:.0%}"]
                     + [_time_cell(by_contender.get(c), footnotes) for c in contenders]
                     + [_ratio(speedup(by_contender.get(a), by_contender.get(b))) for _, a, b in ratios]
                     + ([_number(_floor_ms(by_contender)), _ratio(_over_floor(by_contender))] if floors else []))
    if len(rows) > 1:
        totals = {}
        for contender in set(contenders) | {c for _, a, b in ratios for c in (a, b)}:
            records = [by_contender.get(contender) for by_contender in rows.values()]
            totals[contender] = sum(r["median_ms"] for r in records) if all(map(ok, records)) else None
        gmac = sum(next(iter(by_contender.values()))["gmac"] for by_contender in rows.values())
        row_floors = [_floor_ms(by_contender) for by_contender in rows.values()]
        floor_total = sum(row_floors) if floors and None not in row_floors else None
        lines.append(["**sum of the rows**", "", _number(gmac), ""] + [_number(totals[c]) for c in contenders]
                     + [_ratio(totals[a] / totals[b] if totals[a] and totals[b] else None) for _, a, b in ratios]
                     + ([_number(floor_total), _ratio(totals[OURS] / floor_total if totals[OURS] and floor_total
                                                      else None)] if floors else []))
        means = [geometric_mean([speedup(r.get(a), r.get(b)) for r in rows.values()]) for _, a, b in ratios]
        lines.append(["**geometric mean**", "", "", ""] + [""] * len(contenders) + [_ratio(m) for m in means]
                     + (["", _ratio(geometric_mean([_over_floor(r) for r in rows.values()]))] if floors else []))
    return "\n".join([_table(header, lines, ["---", "---"] + ["---:"] * (len(header) - 2))]
                     + _footnote_lines(footnotes))


def throughput_table(rows, contenders):
    """TFLOP/s, GB/s and peak memory of every contender for each (layer, holes) row."""
    header = ["layer", "holes"] + [f"TFLOP/s {c}" for c in contenders] + [f"GB/s {c}" for c in contenders] + [
        f"peak MiB {c}" for c in contenders]
    lines = []
    for (layer, holes), by_contender in rows.items():
        records = [by_contender.get(c) for c in contenders]
        first = next(iter(by_contender.values()))
        lines.append([layer, f"{first['layer_holes']:.0%}"]
                     + [_number(r["tflops"]) if ok(r) else "–" for r in records]
                     + [_number(r["gbps"]) if ok(r) else "–" for r in records]
                     + [_number(r["peak_mem_mb"]) if ok(r) else "–" for r in records])
    return _table(header, lines)


def network_table(rows):
    """The training step of both networks, with their first-step losses."""
    footnotes = []
    header = ["contender", "depth", "image", "batch", "holes", "step ms", "speedup vs nvidia", "TFLOP/s",
              "peak MiB", "first-step loss", "relative to nvidia's"]
    lines = []
    for by_contender in rows.values():
        reference_loss = by_contender.get(NVIDIA, {}).get("loss")
        for contender in (NVIDIA, OURS):
            record = by_contender.get(contender)
            if record is None:
                continue
            loss = record["loss"]
            lines.append([contender, record["depth"], f"{record['height']}×{record['width']}", record["batch"],
                          f"{record['holes']:.0%}", _time_cell(record, footnotes),
                          _ratio(speedup(by_contender.get(NVIDIA), record)),
                          _number(record["tflops"]) if ok(record) else "–",
                          _number(record["peak_mem_mb"]) if ok(record) else "–",
                          "–" if loss is None else f"{loss:.6f}",
                          "–" if None in (loss, reference_loss) else f"{abs(loss - reference_loss) / abs(reference_loss):.1e}"])
    return "\n".join([_table(header, lines)] + _footnote_lines(footnotes))


def multiply_add_check():
    """The paper's 16 layers at 512x512: per-layer and total GMAC for one image."""
    workloads = layer_workloads(SUITE, [layer.name for layer in PAPER_LAYERS], 1, 512, 512, [0.0])
    per_layer = ", ".join(f"{w.layer.name} {w.multiply_adds() / 1e9:.2f}" for w in workloads)
    total = sum(w.multiply_adds() for w in workloads) / 1e9
    return total, per_layer


def markdown(run, details=True, title="partialconv_cuda speed comparison"):
    """The report: summary, side-by-side tables; with details, throughput tables and definitions."""
    settings = run["settings"]
    contenders = [c for c in CONTENDERS if c in settings["contenders"]]
    total, per_layer = multiply_add_check()
    lines = [
        f"# {title}",
        "",
        f"Measured on **{run['device']}** on {run['date']} (torch {run['torch']}, CUDA {run['cuda'] or '–'}, "
        f"commit {run['commit']}, {run['threads']} CPU threads{_gpu_settings(run)}).",
        "",
        f"Command: `{run['command']}`",
        "",
    ]
    lines += [f"- {note}" for note in run["notes"]]
    lines += [f"- roofline peaks for {dtype}: {peaks['tflops']:.3g} TFLOP/s, {peaks['gbps']:.3g} GB/s ({peaks['how']})"
              for dtype, peaks in (run.get("peaks") or {}).items()]
    summary = speedups(run)
    suite_summary = suite_speedups(run)
    if summary or not suite_summary:
        lines += ["", "## Speedups of ours (geometric mean over the layer suite)", ""]
        lines.append(_table(["dtype", "pass"] + [f"vs {c}" for c in (SEED, NVIDIA, CONV2D, OURS_COMPILED)], [
            [dtype, PASS_TITLES[pass_]] + [_ratio(values[c]) for c in (SEED, NVIDIA, CONV2D, OURS_COMPILED)]
            for (dtype, pass_), values in summary.items()
        ], ["---", "---", "---:", "---:", "---:", "---:"]))
    for kind in SUITE_CONTENDERS:
        means = {key[1:]: values for key, values in suite_summary.items() if key[0] == kind}
        if not means:
            continue
        others = [c for c in suite_contenders(run, kind) if c != OURS]
        lines += ["", f"## Speedups of ours: {SUITE_TITLES[kind]}, geometric mean over its layers", "",
                  _table(["dtype", "pass"] + [f"vs {c}" for c in others],
                         [[dtype, PASS_TITLES[pass_]] + [_ratio(values[c]) for c in others]
                          for (dtype, pass_), values in means.items()], ["---", "---"] + ["---:"] * len(others))]
    plain = "conv2d" if not suite_summary else "conv1d/2d/3d"
    lines += ["", f"\"vs X\" = X's time / ours, the median over the timed rounds of the two times measured in the same "
              f"round (above 1: ours is faster); \"vs {plain}\" below 1 means ours costs more than a plain "
              "convolution of the same shape.", ""]
    index = index_records(run["results"])
    for (workload, dtype, pass_), rows in index.items():
        if workload == SUITE:
            lines += [f"## Layer suite, {dtype}, {PASS_TITLES[pass_]}", "", layer_table(rows, contenders), ""]
    for (workload, dtype, pass_), rows in index.items():
        if workload == HOLE_SWEEP:
            lines += [f"## Hole-ratio sweep, {dtype}, {PASS_TITLES[pass_]}", "",
                      "The mask is drawn at the layer's input size with this fraction of holes.", "",
                      layer_table(rows, contenders), ""]
    for (workload, dtype, pass_), rows in index.items():
        if workload == NETWORK:
            lines += [f"## Whole network: PConvUNet training step, {dtype}", "", network_table(rows), ""]
    for (workload, dtype, pass_), rows in index.items():
        if workload in SUITE_CONTENDERS:
            columns = suite_contenders(run, workload)
            lines += [f"## {SUITE_TITLES[workload]}, {dtype}, {PASS_TITLES[pass_]}", "",
                      layer_table(rows, columns, suite_ratios(columns)), ""]
    if not details:
        return "\n".join(lines)
    for (workload, dtype, pass_), rows in index.items():
        if workload in (SUITE, HOLE_SWEEP):
            lines += [f"### Throughput and peak memory: {workload}, {dtype}, {PASS_TITLES[pass_]}", "",
                      throughput_table(rows, contenders), ""]
        elif workload in SUITE_CONTENDERS:
            lines += [f"### Throughput and peak memory: {workload}, {dtype}, {PASS_TITLES[pass_]}", "",
                      throughput_table(rows, suite_contenders(run, workload)), ""]
    # The 2-D suites' definitions, unless this run has only the 1-D and 3-D suites.
    two_d = not suite_summary or any(workload not in SUITE_CONTENDERS for workload, _, _ in index)
    lines += [
        "## How to read this",
        "",
        "Contenders:",
        "",
        *([f"- `{c}`: {DESCRIPTIONS[c]}" for c in contenders] if two_d else []),
        *_suite_contender_lines(run, suite_summary, two_d),
        "",
        f"Multiply-adds (GMAC) are C_out · C_in/groups · kh · kw · H_out · W_out · N"
        + (f". The 16 layers of the paper's network total **{total:.2f} GMAC per 512×512 image** (the paper: "
           f"about 38; mask convolutions, batch norm and upsampling are not counted): {per_layer}."
           if two_d else " (with kd · kh · kw in 3-D and kl in 1-D); mask convolutions are not counted."),
        "",
        "- `ms`: median time of one call, ± half the spread between the 20th and 80th percentiles, "
        "relative to the median. Contenders run in rounds, one call each, in an order that rotates from "
        "round to round; each call gets the next of several input sets (together at least twice the "
        "last-level cache where memory allows), so no call finds its inputs in cache, not even those the "
        "call before it read. Ratio columns (`vs X`, `X / Y`) are medians of the ratios of the two "
        "contenders' times within each round.",
        "- `–`: not measured (contender not selected; --quick runs ours_compiled on one layer only).",
        "- `holes`: fraction of hole pixels in the mask the layer gets. In the layer suite every layer "
        "gets the mask it sees inside PConvUNet, propagated from an irregular image mask; deep layers "
        "have few holes left.",
        "- `floor ms`: the least time the row's work could take here, max(FLOPs / peak TFLOP/s, "
        "minimum bytes of ours / peak GB/s), from the peaks measured at the start of the run (listed at "
        "the top: the best rate of a large matrix product or convolution, and of a large copy). `ours / floor` "
        "is how far "
        "ours is from it.",
        "- TFLOP/s: 2 · GMAC (forward) or 2 · GMAC · (2 or 3) (forward + backward: grad_weight, and "
        "grad_input except for enc1, whose input is the image) divided by the median time.",
        "- GB/s: minimum bytes divided by the median time. Minimum bytes: input, mask, weight, bias, "
        "output and updated mask (one channel) once each; backward adds grad_output, input, mask, "
        "weight (and the output when an activation is fused) read once and the gradients written once. "
        "conv2d counts no mask.",
        "- peak MiB: most memory allocated during one call beyond what was allocated before it "
        "(outputs, saved tensors, workspaces). GPU: torch.cuda.max_memory_allocated. CPU: allocations "
        "of PyTorch's CPU allocator recorded by torch.profiler (memory that oneDNN or other libraries "
        "allocate on their own is not seen).",
        *["- Whole network: one training step (forward, the paper's per-pixel loss L_valid + 6 L_hole, "
          "backward, Adam) of PConvUNet built from each layer; both start from the same weights, and "
          "the first step's loss is shown so they can be compared."] * two_d,
        *_suite_definition_lines(run, suite_summary),
        "",
    ]
    return "\n".join(lines)


def _suite_contender_lines(run, suite_summary, after_2d):
    """How to read the 1-D and 3-D suites' contenders (nothing for a run without those suites)."""
    if not suite_summary:
        return []
    kinds = {kind for kind, _, _ in suite_summary}
    named = [c for kind in SUITE_CONTENDERS if kind in kinds for c in suite_contenders(run, kind)]
    lines = ["", "In the video and speech suites:", ""] if after_2d else []
    for c in dict.fromkeys(named):
        lines.append(f"- `{c}`: {SUITE_DESCRIPTIONS.get(c, DESCRIPTIONS[c])}")
    return lines


def _suite_definition_lines(run, suite_summary):
    if not suite_summary:
        return []
    kinds = {kind for kind, _, _ in suite_summary}
    lines = []
    if VIDEO3D in kinds:
        lines.append("- Video suite: the layers of a 3-D partial-convolution U-Net (encoder stride 1×2×2, "
                     "decoder stride 1 on the upsampled output concatenated with the skip, one mask channel "
                     "per input channel), each with the mask it gets inside the network: an irregular 2-D hole "
                     "mask moving by a seeded few pixels per frame, propagated through the layers (updated mask "
                     "= max pooling over the window). `holes`: the fraction of the layer's mask that is holes. "
                     "`frames`, `height`, `width` in the JSON: the layer's input.")
    if kinds - {VIDEO3D}:
        lines.append(f"- Speech suite: stride-1 layers of partial-padding TTS models over a batch of padded "
                     f"sequences with lengths uniform in [{SHORTEST:g} L, L]; the mask is 1 up to each length, "
                     "the same for every layer. `holes`: the fraction of padding.")
    return lines


def _gpu_settings(run):
    gpu = run.get("gpu_settings")
    if not gpu:
        return ""
    return ", " + ", ".join(f"{key} {value}" for key, value in gpu.items())


def plot(run, path):
    """Speedup of each contender over the NVIDIA-style layer, per layer (log scale), one row per
    dtype: forward, forward + backward, and ours over the hole sweep."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    def log_axis(axis):
        axis.set_yscale("log")
        axis.yaxis.set_major_locator(LogLocator(base=10, subs=(1, 2, 5)))
        axis.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}×"))
        axis.yaxis.set_minor_formatter(NullFormatter())
        axis.axhline(1.0, color="black", linewidth=1)
        axis.grid(axis="y", which="major", alpha=0.3)

    index = index_records(run["results"])
    dtypes = list(dict.fromkeys(dtype for workload, dtype, _ in index if workload not in SUITE_CONTENDERS))
    suite_rows = list(dict.fromkeys((workload, dtype) for workload, dtype, _ in index
                                    if workload in SUITE_CONTENDERS))
    others = [c for c in CONTENDERS if c != NVIDIA and c in run["settings"]["contenders"]]
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colors = dict(zip(others, palette))
    colors.update({c: colors.get(CONV2D, palette[1]) for c in PLAIN_CONVS.values() if c != CONV2D})
    colors.setdefault(OURS, palette[2])
    colors["nvidia_pc3d"] = "tab:purple"
    figure, axes = plt.subplots(len(dtypes) + len(suite_rows), 3,
                                figsize=(18, 4.2 * (len(dtypes) + len(suite_rows))), squeeze=False,
                                gridspec_kw={"width_ratios": [3, 3, 1.4]})
    for row, (kind, dtype) in enumerate(suite_rows, len(dtypes)):
        suite_others = [c for c in suite_contenders(run, kind) if c != NVIDIA]
        for column, pass_ in enumerate((FWD, FWD_BWD)):
            axis = axes[row][column]
            rows = index.get((kind, dtype, pass_), {})
            width = 0.8 / max(len(suite_others), 1)
            for i, contender in enumerate(suite_others):
                values = [speedup(by.get(NVIDIA), by.get(contender)) or float("nan") for by in rows.values()]
                positions = [x + (i - (len(suite_others) - 1) / 2) * width for x in range(len(values))]
                axis.bar(positions, values, width, label=contender, color=colors[contender])
            log_axis(axis)
            axis.set_xticks(range(len(rows)), [layer for layer, _ in rows], rotation=45)
            axis.set_ylabel("speedup over NVIDIA-style (= 1)")
            axis.set_title(f"{SUITE_TITLES[kind]}, {dtype}, {PASS_TITLES[pass_]}", fontsize=10)
            axis.legend(fontsize=8, ncol=2)
        axes[row][2].set_visible(False)
    for row, dtype in enumerate(dtypes):
        for column, pass_ in enumerate((FWD, FWD_BWD)):
            axis = axes[row][column]
            rows = index.get((SUITE, dtype, pass_), {})
            width = 0.8 / max(len(others), 1)
            for i, contender in enumerate(others):
                values = [speedup(by.get(NVIDIA), by.get(contender)) or float("nan") for by in rows.values()]
                positions = [x + (i - (len(others) - 1) / 2) * width for x in range(len(values))]
                axis.bar(positions, values, width, label=contender, color=colors[contender])
            log_axis(axis)
            axis.set_xticks(range(len(rows)), [layer for layer, _ in rows], rotation=45)
            axis.set_ylabel("speedup over NVIDIA-style (= 1)")
            axis.set_title(f"layer suite, {dtype}, {PASS_TITLES[pass_]}")
        axis = axes[row][2]
        for pass_ in (FWD, FWD_BWD):
            by_layer = defaultdict(list)
            for (layer, holes), by in index.get((HOLE_SWEEP, dtype, pass_), {}).items():
                by_layer[layer].append((100 * holes, speedup(by.get(NVIDIA), by.get(OURS)) or float("nan")))
            for color, (layer, points) in zip(("tab:green", "tab:purple", "tab:brown"), by_layer.items()):
                axis.plot(*zip(*points), marker="o", color=color, linestyle="-" if pass_ == FWD else "--",
                          label=f"{layer} {pass_}")
        log_axis(axis)
        axis.set_xlabel("holes (%)")
        axis.set_title(f"hole sweep: ours over NVIDIA-style, {dtype}", fontsize=10)
        axis.legend(fontsize=8)
    if dtypes:
        axes[0][0].legend(fontsize=8, ncol=2)
    figure.suptitle(f"Speedup over the NVIDIA-style partial convolution: {run['device']}, {run['date']}")
    rows = len(dtypes) + len(suite_rows)
    # Room for the title above the top row (0.4 inch), in a figure that the suites make tall.
    figure.tight_layout(**({"rect": (0, 0, 1, 1 - 0.4 / (4.2 * rows))} if suite_rows else {}))
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write_plot(run, path):
    """plot(run, path) if matplotlib is installed; otherwise says so and returns False."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)
        return False
    plot(run, path)
    return True


if __name__ == "__main__":
    for name in sys.argv[1:]:
        path = Path(name)
        document = json.loads(path.read_text())
        path.with_suffix(".md").write_text(markdown(document) + "\n")
        write_plot(document, path.with_suffix(".png"))
