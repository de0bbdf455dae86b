"""Run tracking: TensorBoard scalars, the reward curve, sample videos, and GPU memory/utilisation/power.

    tracker = Tracker(output / "tensorboard", enabled=world.is_main)
    tracker.scalars(step, {"train/reward": r, "train/loss": l} | gpu_stats())
    tracker.video("samples/after_00", frames, step)          # frames [F, 3, H, W] in [0, 1]
    tracker.reward_curve(records, step)                      # the same figure as reward_curve.png
    tracker.close()
    # then: tensorboard --logdir runs/

Videos are written as animated GIF image summaries, which TensorBoard's image tab plays. torch's
``SummaryWriter.add_video`` does the same but needs moviepy; this builds the GIF with Pillow, so it needs
nothing beyond tensorboard itself. A disabled tracker (other ranks, ``--no-tensorboard``) does nothing and
imports nothing. ``gpu_stats()`` reads nvidia-ml-py (pynvml) and torch's allocator; on a machine without
CUDA it returns an empty dict.
"""

from __future__ import annotations

import io
from pathlib import Path

import torch

_NVML_READY: bool | None = None  # None: not tried yet


class Tracker:
    """A thin TensorBoard writer; every method is a no-op when ``enabled`` is false."""

    def __init__(self, log_dir: str | Path, enabled: bool = True, flush_secs: int = 30):
        self.enabled = enabled
        self.log_dir = Path(log_dir)
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.log_dir), flush_secs=flush_secs)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        """One scalar per key (``train/reward``, ``eval/reward``, ``gpu/memory_used_gb``...); non-numbers skipped."""
        if not self.enabled:
            return
        for tag, value in values.items():
            if isinstance(value, torch.Tensor):
                value = value.item()
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(tag, value, step)

    def video(self, tag: str, frames: torch.Tensor, step: int, fps: float = 8.0) -> None:
        """An animated GIF image summary of frames [F, 3, H, W] in [0, 1] (upscaled so tiny videos show)."""
        if not self.enabled:
            return
        from PIL import Image
        from tensorboard.compat.proto.summary_pb2 import Summary

        from engine.media import to_uint8

        array = to_uint8(frames)
        images = [Image.fromarray(a) for a in array]
        buffer = io.BytesIO()
        images[0].save(buffer, format="GIF", save_all=True, append_images=images[1:],
                       duration=max(1, int(1000 / fps)), loop=0)
        image = Summary.Image(height=array.shape[1], width=array.shape[2], colorspace=3,
                              encoded_image_string=buffer.getvalue())
        self.writer._get_file_writer().add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), step)

    def image_grid(self, tag: str, rows: list[torch.Tensor], step: int) -> None:
        """Still frames: each row a video's frames side by side (e.g. before above after)."""
        if not self.enabled:
            return
        from engine.media import to_uint8
        import numpy as np

        strips = [np.concatenate(list(to_uint8(r, min_size=64)), axis=1) for r in rows]
        self.writer.add_image(tag, np.concatenate(strips, axis=0), step, dataformats="HWC")

    def reward_curve(self, records: list[dict], step: int, title: str = "reward") -> None:
        """The trainer's metric records (kind train/eval) as a figure, like reward_curve.png."""
        if not self.enabled:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        train = [(r["step"], r["reward"]) for r in records if r.get("kind") == "train"]
        evals = [(r["step"], r["eval_reward"]) for r in records if r.get("kind") == "eval"]
        fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
        for points, style, label in ((train, "-", "train reward"), (evals, "o-", "held-out reward")):
            if points:
                ax.plot(*zip(*points), style, label=label)
        ax.set_xlabel("step")
        ax.set_ylabel(title)
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8)
        self.writer.add_figure("reward_curve", fig, step, close=True)

    def text(self, tag: str, text: str, step: int = 0) -> None:
        if self.enabled:
            self.writer.add_text(tag, text, step)

    def flush(self) -> None:
        if self.enabled:
            self.writer.flush()

    def close(self) -> None:
        if self.enabled and self.writer is not None:
            self.writer.close()
            self.writer = None
            self.enabled = False

    def abandon(self) -> None:
        """Close after a failed write (a full disk): its last flush would fail the same way, so errors are dropped."""
        try:
            self.close()
        except Exception:  # noqa: BLE001 (whatever the writer's thread met, the run already stops for it)
            self.writer, self.enabled = None, False

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _nvml():
    """pynvml, initialised once; None when the library or the driver is missing."""
    global _NVML_READY
    try:
        import pynvml
    except ImportError:
        return None
    if _NVML_READY is None:
        try:
            pynvml.nvmlInit()
            _NVML_READY = True
        except Exception:  # pynvml.NVMLError and its many subclasses: no driver, no permission...
            _NVML_READY = False
    return pynvml if _NVML_READY else None


def _nvml_handle(pynvml, device: torch.device):
    """The NVML handle of torch's device, matched by UUID: CUDA_VISIBLE_DEVICES renumbers torch's indices."""
    uuid = getattr(torch.cuda.get_device_properties(device), "uuid", None)
    if uuid is not None:
        try:
            return pynvml.nvmlDeviceGetHandleByUUID(f"GPU-{uuid}")
        except Exception:
            pass
    return pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)


def gpu_stats(device: torch.device | int | str | None = None) -> dict[str, float]:
    """Memory, utilisation and power of the (current) CUDA device, keyed ``gpu/...``; {} without CUDA.

    torch's allocator figures (allocated, peak allocated, reserved) are always there on CUDA; the device-wide
    figures (memory used by every process, utilisation %, power W) come from nvidia-ml-py when it can run.
    Reading them costs well under a millisecond and no GPU synchronisation.
    """
    if not torch.cuda.is_available():
        return {}
    device = torch.device("cuda", torch.cuda.current_device()) if device is None else torch.device(device)
    if device.type != "cuda":
        return {}
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    gib = 2 ** 30
    stats = {
        "gpu/torch_allocated_gb": torch.cuda.memory_allocated(device) / gib,
        "gpu/torch_peak_allocated_gb": torch.cuda.max_memory_allocated(device) / gib,
        "gpu/torch_reserved_gb": torch.cuda.memory_reserved(device) / gib,
    }
    pynvml = _nvml()
    if pynvml is None:
        return stats
    try:
        handle = _nvml_handle(pynvml, device)
        memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
        stats["gpu/memory_used_gb"] = memory.used / gib
        stats["gpu/memory_total_gb"] = memory.total / gib
        stats["gpu/utilization_pct"] = float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)
    except Exception:
        return stats
    try:  # some boards (and MIG slices) do not report power
        stats["gpu/power_w"] = pynvml.nvmlDeviceGetPowerUsage(handle) / 1000.0
    except Exception:
        pass
    return stats

