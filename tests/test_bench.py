"""The benchmark's --quick path at tiny sizes, and the pieces its numbers rest on."""
import json
import platform

import pytest
import torch

import bench.contenders
from bench import cpu_paths
from bench.report import multiply_add_check, speedup
from bench.roofline import floor_ms
from bench.run import main, parse_args, resolve_settings
from bench.timing import Clock, Policy, keep_freed_memory, rotation_count
from bench.workloads import SUITE, concatenated_mask, layer_workloads, unet_layer_masks
from partialconv_cuda.masks import irregular_masks
from partialconv_cuda.models import PConvUNet

RECORD_KEYS = {"layer", "contender", "dtype", "pass", "holes", "batch", "height", "width", "median_ms", "p20_ms",
               "p80_ms", "gflop", "tflops", "gbps", "peak_mem_mb"}
TOP_LEVEL_KEYS = {"device", "torch", "cuda", "commit", "date", "command", "threads", "peaks", "results"}


@pytest.fixture(autouse=True)
def restore_thread_count():
    """main() sets torch's thread count. These runs use one thread: torch was loaded before bench
    could pin OpenMP threads to cores, and unpinned threads can stall each other on a small VM."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_quick_run_measures_every_contender_and_writes_json_markdown_and_plot(tmp_path):
    matplotlib = pytest.importorskip("matplotlib")  # noqa: F841  (CI installs it; the plot is part of the output)
    run = main(["--quick", "--suite", "unet2d", "--layers", "enc2,dec1", "--sweep-layers", "enc2", "--sweep-holes", "0,0.5",
                "--threads", "1", "--out", str(tmp_path)])
    stem = next(tmp_path.glob("*.json")).stem
    assert stem.startswith("cpu_") and stem.endswith("_quick")
    assert {p.suffix for p in tmp_path.iterdir()} == {".json", ".md", ".png"}
    document = json.loads((tmp_path / f"{stem}.json").read_text())
    assert TOP_LEVEL_KEYS <= document.keys() and document["threads"] == 1
    records = document["results"]
    # Per dtype and pass: suite enc2 (all 5 contenders; --quick compiles enc2 only), suite dec1 (4),
    # sweep enc2 at 2 hole ratios (4 each); plus the network step, ours and nvidia, per dtype.
    assert len(records) == 2 * 2 * (5 + 4 + 4 + 4) + 2 * 2
    keys = {(r["workload"], r["layer"], r["contender"], r["dtype"], r["pass"], r["holes"]) for r in records}
    assert len(keys) == len(records)
    for record in records:
        assert RECORD_KEYS <= record.keys()
        assert record["status"] == "ok", record
        assert 0 < record["p20_ms"] <= record["median_ms"] <= record["p80_ms"]
        assert record["tflops"] > 0 and record["peak_mem_mb"] is not None
        if record["pass"] != "train_step":
            assert record["floor_ms"] > 0
    # CUDA's two forced paths (ours_fused, ours_vendor) run on CUDA only; the report says so
    assert {r["contender"] for r in records} == set(bench.contenders.CONTENDERS) - set(bench.contenders.CUDA_PATHS)
    assert {r["dtype"] for r in records} == {"float32", "bfloat16"}
    assert {r["pass"] for r in records} == {"fwd", "fwd+bwd", "train_step"}
    losses = {r["contender"]: r["loss"] for r in records if r["pass"] == "train_step" and r["dtype"] == "float32"}
    assert losses["ours"] == pytest.approx(losses["nvidia"], rel=1e-5)
    report = (tmp_path / f"{stem}.md").read_text()
    assert "## Layer suite, float32, forward" in report and "ours_compiled ms" in report
    assert "| floor ms | ours / floor |" in report
    assert "ours_fused, ours_vendor: CUDA's two paths, each forced; not run on the cpu" in report
    assert set(document["peaks"]) == {"float32", "bfloat16"}
    assert all(p["tflops"] > 0 and p["gbps"] > 0 for p in document["peaks"].values())
    assert run["results"] == records


def test_a_contender_that_cannot_run_is_reported_as_failed(tmp_path, monkeypatch):
    def no_kernel(*args, **kwargs):
        raise NotImplementedError("no kernel for this device")

    monkeypatch.setattr(bench.contenders, "partial_conv2d", no_kernel)
    main(["--quick", "--suite", "unet2d", "--layers", "enc2", "--sweep-layers", "none", "--no-network", "--dtype", "float32",
          "--contenders", "nvidia,ours", "--threads", "1", "--no-plot", "--out", str(tmp_path)])
    document = json.loads(next(tmp_path.glob("*.json")).read_text())
    status = {(r["contender"], r["pass"]): (r["status"], r["error"]) for r in document["results"]}
    assert status[("nvidia", "fwd")] == ("ok", None)
    assert status[("ours", "fwd")] == ("failed", "NotImplementedError: no kernel for this device")
    assert status[("ours", "fwd+bwd")][0] == "failed"
    assert "NotImplementedError: no kernel for this device" in next(tmp_path.glob("*.md")).read_text()


@pytest.mark.parametrize("flags, fewest, most", [([], 20, 20), (["--quick"], 3, 3), (["--network-rounds", "7"], 7, 10),
                                                 (["--repeats", "40"], 20, 40)])
def test_the_training_step_gets_at_least_its_own_number_of_rounds(flags, fewest, most):
    # A 0.6 s step got only the 5 rounds that --max-time allows a layer: too few for its few percent.
    settings, _ = resolve_settings(parse_args(["--device", "cpu", "--suite", "unet2d", *flags]))
    assert (settings.network_policy.min_repeats, settings.network_policy.repeats) == (fewest, most)
    assert settings.network_policy.warmup == settings.policy.warmup
    # the layers' own policy is unchanged
    assert settings.policy.min_repeats == (3 if "--quick" in flags else 5)


def test_too_few_network_rounds_are_refused():
    with pytest.raises(SystemExit, match="--network-rounds"):
        resolve_settings(parse_args(["--device", "cpu", "--network-rounds", "1"]))


def test_allocator_is_set_to_keep_freed_memory_on_glibc():
    if platform.libc_ver()[0] != "glibc":
        pytest.skip("mallopt is glibc's")
    note = keep_freed_memory()
    assert note is not None and "no trimming" in note and platform.libc_ver()[1] in note


def test_multiply_adds_match_the_paper():
    total, per_layer = multiply_add_check()
    assert total == pytest.approx(38.0, abs=0.1)  # "about 38 GMAC" per 512x512 image
    assert per_layer.startswith("enc1 0.62, enc2 3.36")


def test_suite_masks_are_the_masks_each_layer_sees_inside_pconv_unet():
    model = PConvUNet(depth=5).eval()
    seen = {}
    for name, block in model.blocks.items():
        block.conv.register_forward_hook(lambda module, args, output, name=name: seen.__setitem__(name, args[1]))
    mask = irregular_masks(2, 64, 96, 0.5, seed=4)
    with torch.no_grad():
        model(torch.randn(2, 3, 64, 96), mask)
    parts = unet_layer_masks(mask, model.layers)
    for layer in model.layers:
        assert torch.equal(concatenated_mask(parts[layer.name], layer), seen[layer.name]), layer.name
    workloads = layer_workloads(SUITE, [layer.name for layer in model.layers], 2, 64, 96, [0.5], network=model.layers)
    assert [(w.height, w.width) for w in workloads] == [tuple(seen[w.layer.name].shape[2:]) for w in workloads]


def test_minimum_bytes_count_each_tensor_once():
    (workload,) = layer_workloads(SUITE, ["enc1"], 1, 16, 16, [0.3])  # 3 -> 64, 7x7, stride 2, bias
    inputs, mask, weights, outputs, updated_mask = 3 * 256, 256, 64 * 3 * 49 + 64, 64 * 64, 64
    assert workload.min_bytes(False, 4) == 4 * (inputs + mask + weights + outputs + updated_mask)
    assert workload.min_bytes(False, 2, with_mask=False) == 2 * (inputs + weights + outputs)
    # Backward of enc1: grad_output, input, mask, weight and the ReLU output read; no grad_input.
    backward = outputs + inputs + mask + updated_mask + 2 * weights + outputs
    assert workload.min_bytes(True, 4) == 4 * (inputs + mask + weights + outputs + updated_mask + backward)


def test_rotation_covers_twice_the_cache_within_limits():
    assert rotation_count(set_bytes=2**20, cache_bytes=4 * 2**20, memory_budget_bytes=2**30) == 8
    assert rotation_count(set_bytes=2**30, cache_bytes=2**20, memory_budget_bytes=2**34) == 2
    assert rotation_count(set_bytes=2**10, cache_bytes=2**30, memory_budget_bytes=2**34) == 16
    assert rotation_count(set_bytes=2**30, cache_bytes=2**20, memory_budget_bytes=2**29) == 1


def test_each_call_of_a_round_gets_its_own_input_set_and_its_time_is_kept():
    # With one set per round, each contender ran on the inputs and weights the one before it had
    # just read: enc8's 9.4 MB weight in cache made both partial convolutions 25-30% faster.
    sets = {"a": [], "b": [], "c": []}
    calls = {name: (lambda i, name=name: sets[name].append(i)) for name in sets}
    results = Clock("cpu").measure(calls, Policy(warmup=2, min_repeats=4, repeats=4, max_time_s=1.0))
    timed = [i for name in sets for i in sets[name][2:-1]]  # after the warm-up, before the peak-memory call
    assert len(timed) == 12 and len(set(timed)) == 12
    for name in sets:
        assert results[name].repeats == 4 and len(results[name].times_ms) == 4


def test_speedup_is_the_median_of_the_ratios_within_rounds():
    def record(times):
        return {"status": "ok", "median_ms": sorted(times)[len(times) // 2], "times_ms": times}

    # The machine slowed down 3x in the last round; ours ran 2x faster than the baseline in every
    # round but one, which the medians of each alone (10 / 15) would not show.
    baseline, ours = record([10, 10, 30]), record([5, 20, 15])
    assert speedup(baseline, ours) == 2
    # Results written before the rounds' times were kept: the ratio of the medians.
    assert speedup({"status": "ok", "median_ms": 3.0}, {"status": "ok", "median_ms": 2.0}) == 1.5
    assert speedup(baseline, {"status": "failed"}) is None


def test_cpu_path_timing_prints_a_row_per_hole_ratio(capsys):
    cpu_paths.main(["--layers", "enc7", "--threads", "1"])  # a 4x4 input: quick
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| enc7 |")]
    assert len(rows) == len(cpu_paths.HOLE_RATIOS)
    assert all(float(cell) > 0 for row in rows for cell in row.strip("| ").split(" | ")[3:])


def test_floor_is_the_slower_of_compute_and_memory():
    peaks = {"tflops": 100.0, "gbps": 2000.0}
    assert floor_ms(gflop=50.0, min_bytes=1e6, peaks=peaks) == pytest.approx(0.5)  # 50 GFLOP at 100 TFLOP/s
    assert floor_ms(gflop=0.01, min_bytes=4e9, peaks=peaks) == pytest.approx(2.0)  # 4 GB at 2 TB/s
