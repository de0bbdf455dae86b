"""engine.tracking: TensorBoard events read back, the disabled tracker, GPU statistics with and without CUDA."""

import sys
import types

import pytest
import torch

from engine import tracking
from engine.tracking import Tracker, gpu_stats


def read_events(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    return events


def test_tracker_writes_scalars_videos_grids_and_curve(tmp_path):
    from PIL import Image
    import io

    frames = torch.rand(5, 3, 8, 12)
    records = [{"kind": "train", "step": s, "reward": 0.1 * s} for s in range(1, 4)] + \
              [{"kind": "eval", "step": 3, "eval_reward": 0.25}]
    with Tracker(tmp_path / "tb") as tracker:
        tracker.scalars(1, {"train/reward": 0.5, "train/loss": torch.tensor(0.5), "note": "skipped", "flag": True})
        tracker.scalars(2, {"train/reward": 0.75})
        tracker.video("samples/after_00", frames, step=2, fps=4)
        tracker.image_grid("samples/grid_00", [frames, frames], step=2)
        tracker.reward_curve(records, step=3)
        tracker.text("config", "lr: 1e-5")
    events = read_events(tmp_path / "tb")
    assert set(events.Tags()["scalars"]) == {"train/reward", "train/loss"}
    assert [(e.step, e.value) for e in events.Scalars("train/reward")] == [(1, 0.5), (2, 0.75)]
    assert set(events.Tags()["images"]) == {"samples/after_00", "samples/grid_00", "reward_curve"}
    video = events.Images("samples/after_00")[0]
    assert video.step == 2 and video.encoded_image_string[:6] == b"GIF89a"
    with Image.open(io.BytesIO(video.encoded_image_string)) as gif:
        assert gif.n_frames == 5 and gif.info["duration"] == 250
    grid = events.Images("samples/grid_00")[0]
    assert (grid.width, grid.height) == (5 * 96, 2 * 64)  # 2 rows of 5 frames, 8x12 upscaled x8 to 64x96


def test_disabled_tracker_writes_nothing(tmp_path):
    tracker = Tracker(tmp_path / "tb", enabled=False)
    tracker.scalars(1, {"a": 1.0})
    tracker.video("v", torch.rand(2, 3, 4, 4), 1)
    tracker.reward_curve([], 1)
    tracker.close()
    assert not (tmp_path / "tb").exists() and tracker.writer is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only path")
def test_gpu_stats_is_empty_without_cuda():
    assert gpu_stats() == {}


def test_gpu_stats_reads_torch_and_nvml(monkeypatch):
    """A fake CUDA device and a fake pynvml: the numbers land under the documented keys, matched by UUID."""
    gib = 2 ** 30
    calls = []
    fake = types.SimpleNamespace(
        nvmlInit=lambda: calls.append("init"),
        nvmlDeviceGetHandleByUUID=lambda uuid: calls.append(uuid) or "handle",
        nvmlDeviceGetHandleByIndex=lambda i: pytest.fail("should match by UUID"),
        nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(used=30 * gib, total=80 * gib),
        nvmlDeviceGetUtilizationRates=lambda h: types.SimpleNamespace(gpu=97),
        nvmlDeviceGetPowerUsage=lambda h: 612_500,
    )
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.setattr(tracking, "_NVML_READY", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda d: 2 * gib)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda d: 5 * gib)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda d: 6 * gib)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: types.SimpleNamespace(uuid="1234-abcd"))
    stats = gpu_stats()
    assert stats == {"gpu/torch_allocated_gb": 2.0, "gpu/torch_peak_allocated_gb": 5.0, "gpu/torch_reserved_gb": 6.0,
                     "gpu/memory_used_gb": 30.0, "gpu/memory_total_gb": 80.0, "gpu/utilization_pct": 97.0,
                     "gpu/power_w": 612.5}
    assert calls == ["init", "GPU-1234-abcd"]
    gpu_stats()
    assert calls.count("init") == 1  # NVML is initialised once per process

    def no_power(handle):
        raise RuntimeError("not supported")

    fake.nvmlDeviceGetPowerUsage = no_power
    assert "gpu/power_w" not in gpu_stats() and "gpu/utilization_pct" in gpu_stats()
