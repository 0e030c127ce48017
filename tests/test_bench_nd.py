"""The benchmark's 3-D video suite and 1-D speech suite: a --quick run at tiny sizes, and the masks
and costs their numbers rest on."""
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from bench.contenders import CUDA_PATHS, NVIDIA_DIR_ENV, NVIDIA_MISSING, nvidia_partialconv3d_file
from bench.run import main, output_stem, parse_args, resolve_settings
from bench.suites_nd import (SPEECH1D, SPEECH_LAYERS, SUITE_CONTENDERS, VIDEO3D, VIDEO_LAYERS, moving_masks,
                             sequence_lengths, sequence_masks, speech_workloads, velocities, video_workloads)
from bench.workloads import concatenated_mask, unet_layer_masks, updated_mask
from partialconv_cuda import partial_conv1d, partial_conv3d

# Where a development machine keeps a bare clone of github.com/NVIDIA/partialconv; CI has none
# (and no $PARTIALCONV_NVIDIA_DIR), and then only the "reported as failed" path is tested.
NVIDIA_MIRROR = Path("/work/.mirror/NVIDIA+partialconv/repo")
QUICK_ND = ["--quick", "--suite", "video3d,speech1d", "--video-layers", "enc1,enc2,dec2,dec1",
            "--speech-layers", "pred_k3b,wn_k3_d4", "--length", "32", "--threads", "1"]


@pytest.fixture(autouse=True)
def restore_thread_count():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def nvidia_partialconv(tmp_path):
    """A folder holding NVIDIA's models/partialconv3d.py: $PARTIALCONV_NVIDIA_DIR, or the file taken
    from the local mirror of NVIDIA/partialconv; skips where there is neither."""
    if os.environ.get(NVIDIA_DIR_ENV):
        try:
            nvidia_partialconv3d_file(os.environ[NVIDIA_DIR_ENV])
            return os.environ[NVIDIA_DIR_ENV]
        except FileNotFoundError:
            pass
    if not (NVIDIA_MIRROR.is_dir() and shutil.which("git")):
        pytest.skip("NVIDIA's partialconv3d.py is not here (set PARTIALCONV_NVIDIA_DIR)")
    shown = subprocess.run(["git", f"--git-dir={NVIDIA_MIRROR}", "show", "HEAD:models/partialconv3d.py"],
                           capture_output=True, text=True)
    if shown.returncode:
        pytest.skip(f"cannot read partialconv3d.py from {NVIDIA_MIRROR}: {shown.stderr.strip()}")
    (tmp_path / "nvidia" / "models").mkdir(parents=True)
    (tmp_path / "nvidia" / "models" / "partialconv3d.py").write_text(shown.stdout)
    return str(tmp_path / "nvidia")


def _records(tmp_path):
    return json.loads(next(tmp_path.glob("*.json")).read_text())["results"]


def test_quick_run_of_the_video_and_speech_suites_with_nvidias_partialconv3d(tmp_path, nvidia_partialconv):
    pytest.importorskip("matplotlib")
    main(QUICK_ND + ["--nvidia-partialconv", nvidia_partialconv, "--out", str(tmp_path / "out")])
    out = tmp_path / "out"
    assert {p.suffix for p in out.iterdir()} == {".json", ".md", ".png"}
    assert next(out.glob("*.json")).stem.endswith("_video3d-speech1d_quick")  # not overwritten by other suites
    records = _records(out)
    # Per dtype (2) and pass (2): 4 video layers x 4 contenders, 2 speech layers x 3.
    assert len(records) == 2 * 2 * (4 * 4 + 2 * 3)
    for record in records:
        assert record["status"] == "ok", record
        assert 0 < record["p20_ms"] <= record["median_ms"] <= record["p80_ms"]
        assert record["floor_ms"] > 0 and record["gflop"] > 0
        assert (record["max_rel_err"] is None) == (record["contender"] in ("conv1d", "conv3d"))
    for suite in (VIDEO3D, SPEECH1D):  # CUDA's two forced paths run on CUDA only
        assert {r["contender"] for r in records if r["workload"] == suite} == set(SUITE_CONTENDERS[suite]) - set(CUDA_PATHS)
    video = next(r for r in records if r["workload"] == VIDEO3D and r["layer"] == "dec1")
    assert (video["frames"], video["height"], video["width"]) == (4, 16, 16)
    assert video["shape"] == "35→3 3×3×3/1×1×1 at 4×16×16, 35-ch mask"
    speech = next(r for r in records if r["workload"] == SPEECH1D and r["layer"] == "wn_k3_d4")
    assert speech["length"] == 32 and speech["shape"] == "512→512 3/1 dilation 4 at 32"
    report = next(out.glob("*.md")).read_text()
    assert "## Speedups of ours: Video suite (3-D U-Net, moving holes)" in report
    assert "| dtype | pass | vs nvidia_pc3d | vs nvidia | vs conv3d |" in report
    assert "## Speech suite (1-D, padded sequences), float32, forward + backward" in report
    assert "| ours vs nvidia | ours / conv1d | floor ms | ours / floor |" in report
    assert "## Layer suite" not in report and "PConvUNet built from each layer" not in report


def test_without_nvidias_file_its_contender_is_reported_failed_saying_what_to_pass(tmp_path, monkeypatch):
    monkeypatch.delenv(NVIDIA_DIR_ENV, raising=False)
    main(["--quick", "--suite", "video3d", "--video-layers", "enc1,dec1", "--dtype", "float32", "--threads", "1",
          "--no-plot", "--out", str(tmp_path)])
    records = _records(tmp_path)
    failed = {(r["layer"], r["pass"]): r["error"] for r in records if r["contender"] == "nvidia_pc3d"}
    assert len(failed) == 4 and all(r["status"] == "failed" for r in records if r["contender"] == "nvidia_pc3d")
    assert set(failed.values()) == {f"FileNotFoundError: {NVIDIA_MISSING}"}
    assert "--nvidia-partialconv DIR" in NVIDIA_MISSING and NVIDIA_DIR_ENV in NVIDIA_MISSING
    assert all(r["status"] == "ok" for r in records if r["contender"] != "nvidia_pc3d")
    assert NVIDIA_MISSING in next(tmp_path.glob("*.md")).read_text()


def test_a_wrong_nvidia_path_is_reported_with_the_path(tmp_path):
    main(["--quick", "--suite", "video3d", "--video-layers", "enc4", "--dtype", "float32", "--passes", "fwd",
          "--threads", "1", "--no-plot", "--nvidia-partialconv", str(tmp_path / "nowhere"), "--out", str(tmp_path)])
    (record,) = [r for r in _records(tmp_path) if r["contender"] == "nvidia_pc3d"]
    assert record["status"] == "failed" and str(tmp_path / "nowhere") in record["error"]


def test_nvidia_file_is_found_from_a_checkout_its_models_folder_or_itself(tmp_path):
    file = tmp_path / "partialconv" / "models" / "partialconv3d.py"
    file.parent.mkdir(parents=True)
    file.write_text("")
    for given in (tmp_path / "partialconv", file.parent, file):
        assert nvidia_partialconv3d_file(str(given)) == file.resolve()
    with pytest.raises(FileNotFoundError, match="--nvidia-partialconv"):
        nvidia_partialconv3d_file(None)


def test_moving_masks_are_one_irregular_mask_translated_frame_by_frame():
    batch, frames, height, width, speed = 3, 6, 40, 48, 2
    masks = moving_masks(batch, frames, height, width, 0.3, seed=5, speed=speed)
    assert masks.shape == (batch, 1, frames, height, width)
    assert set(masks.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(masks, moving_masks(batch, frames, height, width, 0.3, seed=5, speed=speed))
    assert not torch.equal(masks, moving_masks(batch, frames, height, width, 0.3, seed=6, speed=speed))
    moves = velocities(batch, speed, torch.Generator().manual_seed(5))
    for video, (vy, vx) in zip(masks[:, 0], moves):
        assert (vy, vx) != (0, 0) and max(abs(vy), abs(vx)) <= speed
        for t in range(frames - 1):
            # Frame t + 1 is frame t shifted by (-vy, -vx) where both frames see the same canvas.
            now, later = video[t], video[t + 1]
            rows, cols = slice(max(vy, 0), height + min(vy, 0)), slice(max(vx, 0), width + min(vx, 0))
            back_rows = slice(max(-vy, 0), height + min(-vy, 0))
            back_cols = slice(max(-vx, 0), width + min(-vx, 0))
            assert torch.equal(later[back_rows, back_cols], now[rows, cols])
        assert not torch.equal(video[0], video[-1])  # the holes moved
    holes = 1 - masks.mean()
    assert 0.2 < holes < 0.4  # the canvas has 30 %; a window of it about as much


def test_video_masks_are_the_updated_masks_partial_conv3d_gives_inside_the_network():
    """unet_layer_masks (max pooling) against the updated masks of partial_conv3d itself, run
    through the video U-Net: encoder, then upsampling and concatenation with the skips."""
    torch.manual_seed(0)
    mask = moving_masks(2, 4, 32, 32, 0.5, seed=3)
    parts = unet_layer_masks(mask, VIDEO_LAYERS)
    depth = len(VIDEO_LAYERS) // 2

    def layer_call(layer, input, layer_mask):
        assert torch.equal(layer_mask, concatenated_mask(parts[layer.name], layer)), layer.name
        weight = torch.randn(layer.out_channels, layer.in_channels, *layer.kernel_size) / 10
        output, updated = partial_conv3d(input, layer_mask, weight, None, layer.stride, layer.padding,
                                         activation=layer.activation, negative_slope=layer.negative_slope)
        return output, updated[:, :1]

    video = torch.randn(2, 3, 4, 32, 32)
    output, current = video, mask
    skips = [(video, mask)]
    for layer in VIDEO_LAYERS[:depth]:
        output, current = layer_call(layer, output, current)
        skips.append((output, current))
    skips.pop()
    for layer in VIDEO_LAYERS[depth:]:
        skip, skip_mask = skips.pop()
        output = F.interpolate(output, size=skip.shape[2:], mode="nearest")
        current = F.interpolate(current, size=skip.shape[2:], mode="nearest")
        n, _, *size = skip.shape
        layer_mask = torch.cat([current.expand(n, output.shape[1], *size),
                                skip_mask.expand(n, skip.shape[1], *size)], 1)
        output, current = layer_call(layer, torch.cat([output, skip], 1), layer_mask)
    assert output.shape == video.shape
    assert 0 < 1 - concatenated_mask(parts["enc2"], VIDEO_LAYERS[1]).mean() < 1 - mask.mean()  # holes shrink


def test_updated_mask_is_max_pooling_with_stride_padding_and_dilation():
    """The formula's U = clamp(S, 0, 1) for binary masks, in 1-D with dilation and in 3-D with stride."""
    mask = sequence_masks(torch.tensor([7, 20, 13]), 20)
    layer = next(layer for layer in SPEECH_LAYERS if layer.dilation == (4,))
    x = torch.randn(3, layer.in_channels, 20)
    weight = torch.randn(layer.out_channels, layer.in_channels, *layer.kernel_size)
    _, updated = partial_conv1d(x, mask, weight, None, layer.stride, layer.padding, layer.dilation)
    assert torch.equal(updated_mask(mask, layer), updated)
    enc1 = VIDEO_LAYERS[0]
    video_mask = moving_masks(1, 5, 20, 18, 0.6, seed=1)
    weight = torch.randn(enc1.out_channels, enc1.in_channels, *enc1.kernel_size)
    _, updated = partial_conv3d(torch.randn(1, 3, 5, 20, 18), video_mask, weight, None, enc1.stride, enc1.padding)
    assert torch.equal(updated_mask(video_mask, enc1), updated)


def test_sequence_masks_are_one_up_to_each_length():
    lengths = sequence_lengths(64, 2048, seed=2)
    assert torch.equal(lengths, sequence_lengths(64, 2048, seed=2))
    assert 1024 <= lengths.min() and lengths.max() <= 2048 and len(set(lengths.tolist())) > 32
    masks = sequence_masks(lengths, 2048)
    assert masks.shape == (64, 1, 2048)
    assert torch.equal(masks.sum(-1).flatten().long(), lengths)
    for mask, length in zip(masks[:4, 0], lengths[:4]):
        assert mask[:length].all() and not mask[length:].any()
    assert 0.15 < 1 - masks.mean() < 0.35  # a quarter of the steps are padding on average


def test_video_and_speech_costs():
    workloads = {w.layer.name: w for w in video_workloads(["enc1", "enc4", "dec1"], 1, 8, 128, 0.3)}
    enc1 = workloads["enc1"]
    assert (enc1.in_size, enc1.out_size) == ((8, 128, 128), (8, 64, 64))
    assert enc1.multiply_adds() == 32 * 3 * 3 * 5 * 5 * 8 * 64 * 64
    assert enc1.gflop(backward=True) == 2 * 2 * enc1.multiply_adds() / 1e9  # no grad_input: the video
    assert workloads["enc4"].in_size == (8, 16, 16) and workloads["dec1"].in_size == (8, 128, 128)
    dec1 = workloads["dec1"]  # 35 -> 3, a 35-channel mask
    inputs, outputs, positions = 35 * 8 * 128 * 128, 3 * 8 * 128 * 128, 8 * 128 * 128
    weights = 3 * 35 * 27 + 3
    assert dec1.min_bytes(False, 4) == 4 * (inputs + 35 * positions + positions + weights + outputs)
    (speech,) = speech_workloads(["wn_k3_d4"], 4, 2048)
    assert speech.out_size == (2048,) and speech.conv_arguments()["padding"] == (4,)
    assert speech.multiply_adds() == 4 * 512 * 512 * 3 * 2048
    assert speech.gflop(backward=True) == 2 * 3 * speech.multiply_adds() / 1e9


def test_default_suites_and_sizes(monkeypatch):
    import bench.run

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(bench.run, "native_cpu_support", lambda dtype: False)
    settings, notes = resolve_settings(parse_args([]))
    assert settings.suites == ["unet2d", "video3d", "speech1d"]
    assert settings.video == {"float32": [1, 8, 128], "bfloat16": [1, 4, 32]}
    assert settings.speech == {"float32": [4, 2048], "bfloat16": [2, 128]}
    assert any(note.startswith("bfloat16 runs unet2d at 64×64, video3d at 4 frames of 32×32") for note in notes)
    assert output_stem(settings, "AMD EPYC", "2026-11-30") == "cpu_2026-11-30"
    settings, _ = resolve_settings(parse_args(["--suite", "speech1d", "--length", "512", "--dtype", "float32"]))
    assert settings.suites == ["speech1d"] and settings.speech == {"float32": [4, 512]}
    assert settings.layers == [] and not settings.network and settings.video == {}
    assert output_stem(settings, "AMD EPYC", "2026-11-30") == "cpu_2026-11-30_speech1d"
