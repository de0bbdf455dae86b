"""Pictures for people: mp4 and GIF videos, frame grids and the reward curve."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


def to_uint8(frames: torch.Tensor, min_size: int = 128) -> np.ndarray:
    """[F, 3, H, W] in [0, 1] -> uint8 [F, H', W', 3], upscaled (nearest) so tiny videos stay visible;
    H' and W' are even for H.264."""
    frames = frames.detach().float().cpu().clamp(0, 1)
    h, w = frames.shape[-2:]
    scale = max(1, -(-min_size // min(h, w)))
    if scale > 1:
        frames = F.interpolate(frames, scale_factor=scale, mode="nearest")
    frames = frames[..., : frames.shape[-2] // 2 * 2, : frames.shape[-1] // 2 * 2]
    return (frames.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()


def write_mp4(frames: torch.Tensor, path: str | Path, fps: float = 8.0) -> Path:
    import av
    from fractions import Fraction

    array = to_uint8(frames)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1000))
        stream.height, stream.width = array.shape[1:3]
        stream.pix_fmt = "yuv420p"
        for image in array:
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return Path(path)


def write_gif(frames: torch.Tensor, path: str | Path, fps: float = 8.0) -> Path:
    from PIL import Image

    images = [Image.fromarray(a) for a in to_uint8(frames)]
    images[0].save(str(path), save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
    return Path(path)


def _labelled(image: np.ndarray, row_height: int, labels: list[str] | None, column_width: int = 0,
              column_labels: list[str] | None = None):
    """A PIL image: ``image`` (uint8 [H, W, 3]) on white, with ``labels`` in a band to the left of its rows and
    ``column_labels`` (each ``column_width`` apart) in a band above its columns, when given."""
    from PIL import Image, ImageDraw

    band = 8 + 6 * max(map(len, labels)) if labels else 0
    top = 16 if column_labels else 0
    canvas = Image.new("RGB", (image.shape[1] + band, image.shape[0] + top), "white")
    canvas.paste(Image.fromarray(image), (band, top))
    draw = ImageDraw.Draw(canvas)
    for i, label in enumerate(labels or []):
        draw.text((4, top + i * row_height + row_height // 2 - 5), label, fill="black")
    for j, label in enumerate(column_labels or []):
        draw.text((band + j * column_width + 4, 2), label, fill="black")
    return canvas


def write_grid(rows: list[torch.Tensor], path: str | Path, labels: list[str] | None = None) -> Path:
    """One PNG: each row a video's frames side by side (e.g. before above after), with ``labels`` written in a
    band to the left of the rows when given."""
    strips = [np.concatenate(list(to_uint8(r, min_size=64)), axis=1) for r in rows]
    _labelled(np.concatenate(strips, axis=0), strips[0].shape[0], labels).save(str(path))
    return Path(path)


GUTTER = 4  # white pixels between the videos of an animated grid


def write_grid_gif(rows: list[list[torch.Tensor]], path: str | Path, labels: list[str], column_labels: list[str],
                   fps: float = 8.0) -> Path:
    """An animated GIF of videos side by side, playing together: each row a list of videos of one length (e.g. a
    prompt's before and after), ``labels`` to the left of the rows, ``column_labels`` above the columns. What
    changes from frame to frame (an object's wobble, an outline that boils) shows in a loop, not in a frame grid."""
    def side_by_side(row):  # [F, H, columns * (W + GUTTER), 3], a white gutter right of each video
        return np.concatenate([np.pad(to_uint8(v), ((0, 0), (0, 0), (0, GUTTER), (0, 0)), constant_values=255)
                               for v in row], axis=2)

    cells = [side_by_side(row) for row in rows]
    height, width = cells[0].shape[1], cells[0].shape[2] // len(rows[0])
    images = [_labelled(frame, height, labels, width, column_labels) for frame in np.concatenate(cells, axis=1)]
    images[0].save(str(path), save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
    return Path(path)


def plot_rewards(records: list[dict], path: str | Path, title: str = "reward") -> Path:
    """Training reward per step (and its running mean) with held-out evaluations as markers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["reward"]) for r in records if r.get("kind") == "train"]
    evals = [(r["step"], r["eval_reward"]) for r in records if r.get("kind") == "eval"]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    if train:
        steps, values = zip(*train)
        ax.plot(steps, values, alpha=0.35, label="train reward")
        window = max(1, len(values) // 10)
        smooth = np.convolve(values, np.ones(window) / window, mode="valid")
        ax.plot(steps[window - 1:], smooth, label=f"train (mean of {window})")
    if evals:
        steps, values = zip(*evals)
        ax.plot(steps, values, "o-", label="held-out reward")
    ax.set_xlabel("step")
    ax.set_ylabel(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(str(path))
    plt.close(fig)
    return Path(path)
