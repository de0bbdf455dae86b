"""What a person looks at after a run: the before/after videos and frame grids of the held-out prompts, the
held-out edits grid (the videos the printed numbers score), the reward curve, and the printed summary."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from engine import media
from engine.models import VideoDiffusion
from engine.tracking import Tracker


def write_samples(folder: Path, model: VideoDiffusion, prompts: list[str], before: list[torch.Tensor],
                  after: list[torch.Tensor], edits: list[list[torch.Tensor]], tracker: Tracker, step: int,
                  fps: float) -> list[Path]:
    """Before (base model) and after (fine-tuned) videos from the same noise for the held-out prompts, and the
    held-out edits: per prompt the (source, base edit, fine-tuned edit) latents in ``edits`` (none for a resumed
    run, whose base-model edits were made by the run it resumes)."""
    folder.mkdir(exist_ok=True)
    written, rows = [], []
    for i, pair in enumerate(zip(before, after)):
        videos = {}
        for label, latent in zip(("before", "after"), pair):
            videos[label] = model.decode_video(latent[0])
            written.append(media.write_mp4(videos[label], folder / f"{i:02d}_{label}.mp4", fps))
            written.append(media.write_gif(videos[label], folder / f"{i:02d}_{label}.gif", fps))
            tracker.video(f"samples/{i:02d}_{label}", videos[label], step, fps)
        written.append(media.write_grid([videos["before"], videos["after"]], folder / f"{i:02d}_before_after.png"))
        rows += [videos["before"], videos["after"]]
    written.append(media.write_grid(rows, folder / "before_after.png"))  # every prompt: before, after, ...
    if edits:
        rows = [model.decode_video(latent.to(model.device)) for triple in edits for latent in triple]
        written.append(media.write_grid(rows, folder / "edits.png"))  # every prompt: source, before, after, ...
    (folder / "prompts.txt").write_text("".join(f"{i:02d}: {p}\n" for i, p in enumerate(prompts)))
    return written


def print_summary(first: dict, last: dict, output: Path, file=sys.stdout) -> None:
    """The held-out reward and, for the world model, the gold metrics, before -> after fine-tuning."""
    print(f"held-out reward {first['eval_reward']:.4f} -> {last['eval_reward']:.4f}", file=file)
    if "gold_quality" in first:
        print(f"held-out gold metrics (from pixels, no reward model), before -> after fine-tuning:\n"
              f"  quality (PSNR to the clean render) {first['gold_quality']:.2f} -> {last['gold_quality']:.2f} dB\n"
              f"  colour right {first['gold_colour_acc']:.1%} -> {last['gold_colour_acc']:.1%}, "
              f"shape right {first['gold_shape_acc']:.1%} -> {last['gold_shape_acc']:.1%}\n"
              f"  sharpness {first['gold_sharpness']:.3f} -> {last['gold_sharpness']:.3f}, "
              f"background noise {first['gold_bg_noise']:.4f} -> {last['gold_bg_noise']:.4f}\n"
              f"  motion kept: distance to the source's path {first['gold_motion_error']:.2f} -> "
              f"{last['gold_motion_error']:.2f} px/frame, speed {first['gold_motion']:.2f} -> "
              f"{last['gold_motion']:.2f} px/frame", file=file)
    print(f"outputs in {output}", file=file)
