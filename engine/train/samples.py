"""What a person looks at after a run: the before/after videos and frame grids of the held-out prompts, the
held-out edits grid (the videos the printed numbers score), the reward curve, and the printed summary."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from engine import media
from engine.models import VideoDiffusion
from engine.tracking import Tracker
from engine.world import clean_reference, gold_metrics


def write_samples(folder: Path, model: VideoDiffusion, prompts: list[str], before: list[torch.Tensor],
                  after: list[torch.Tensor], edits: list[list[torch.Tensor]], tracker: Tracker, step: int,
                  fps: float, clips: list | None = None,
                  edit_qualities: list[tuple[float, float]] | None = None) -> list[Path]:
    """Before (base model) and after (fine-tuned) videos from the same noise for the held-out prompts, and the
    held-out edits: per prompt the (source, base edit, fine-tuned edit) latents in ``edits`` (none for a resumed
    run, whose base-model edits were made by the run it resumes), labelled with the edits' gold quality
    (``edit_qualities``: base, fine-tuned) for the world model's clips. ``before_after.png`` shows, under each before /
    after pair, where they differ; or, for the world model's clips (``clips``), each one's error against the clean
    render its gold quality is measured against, labelled with that quality: the changes are too fine to see side
    by side, their effect on the error is not. ``before_after.gif`` plays each before / after pair side by side, a
    row per prompt, where what changes from frame to frame (a wobble, an outline that boils) shows."""
    folder.mkdir(exist_ok=True)
    written, rows, labels, played, played_labels = [], [], [], [], []
    for i, pair in enumerate(zip(before, after)):
        videos = {}
        for label, latent in zip(("before", "after"), pair):
            videos[label] = model.decode_video(latent[0])
            written.append(media.write_mp4(videos[label], folder / f"{i:02d}_{label}.mp4", fps))
            written.append(media.write_gif(videos[label], folder / f"{i:02d}_{label}.gif", fps))
            tracker.video(f"samples/{i:02d}_{label}", videos[label], step, fps)
        written.append(media.write_grid([videos["before"], videos["after"]], folder / f"{i:02d}_before_after.png"))
        clip = clips[i] if clips else None
        played.append([videos["before"], videos["after"]])
        if clip is None:
            rows += [videos["before"], videos["after"], difference(videos["before"], videos["after"])]
            labels += [f"{i:02d} before", "after", f"|diff| x{DIFFERENCE_GAIN}"]
            played_labels.append(f"{i:02d}")
            continue
        quality = {label: gold_metrics(video, clip)["quality"] for label, video in videos.items()}
        rows += [videos["before"], videos["after"], *(difference(clean_reference(v.float().cpu().clamp(0, 1), clip), v)
                                                      for v in videos.values())]
        labels += [f"{i:02d} before {quality['before']:.1f} dB", f"after {quality['after']:.1f} dB",
                   f"|before - clean| x{DIFFERENCE_GAIN}", f"|after - clean| x{DIFFERENCE_GAIN}"]
        played_labels.append(f"{i:02d} {quality['before']:.1f} -> {quality['after']:.1f} dB")
    written.append(media.write_grid(rows, folder / "before_after.png", labels))
    written.append(media.write_grid_gif(played, folder / "before_after.gif", played_labels, ["before", "after"], fps))
    if edits:
        rows = [model.decode_video(latent.to(model.device)) for triple in edits for latent in triple]
        labels = []
        for i, quality in enumerate(edit_qualities or [(None, None)] * len(edits)):
            labels += [f"{i:02d} source", *(name + ("" if q is None else f" {q:.1f} dB")
                                            for name, q in zip(("base edit", "fine-tuned"), quality))]
        written.append(media.write_grid(rows, folder / "edits.png", labels))
    (folder / "prompts.txt").write_text("".join(f"{i:02d}: {p}\n" for i, p in enumerate(prompts)))
    return written


def edit_quality(evaluations: list[list[dict[str, float]]]) -> list[tuple[float, float]] | None:
    """Each held-out edit's gold quality by the base model and fine-tuned (a run's first and last evaluations'
    per-clip rows), for the edits grid's labels: which edit gained. None for clips without a gold quality (not the
    world model's). Only a run that started at step 0 draws the grid, so its first evaluation is the base model's."""
    first, last = evaluations[0], evaluations[-1]
    if "quality" not in first[0]:
        return None
    return [(a["quality"], b["quality"]) for a, b in zip(first, last)]


DIFFERENCE_GAIN = 4  # a change of 1/4 of the range shows at full brightness


def difference(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """Where two videos differ (fine-tuning's change from the same noise, or a video's error against its clean
    render), and how much: |after - before| per pixel and channel, amplified, so that a difference too small to
    see side by side shows."""
    return ((after.float().cpu() - before.float().cpu()).abs() * DIFFERENCE_GAIN).clamp(0, 1)


def print_summary(first: dict, last: dict, output: Path, file=sys.stdout) -> None:
    """Before -> after fine-tuning, on the held-out prompts: the reward and, for the world model, the gold metrics,
    of the edits of the held-out sources and of videos generated from noise (the same noise before and after)."""
    print(f"held-out reward, edits {first['eval_reward']:.4f} -> {last['eval_reward']:.4f}; from noise "
          f"{first['noise_reward']:.4f} -> {last['noise_reward']:.4f}", file=file)
    if "gold_quality" in first:
        print("held-out gold metrics (from pixels, no reward model), before -> after fine-tuning:", file=file)
        for label, prefix in (("edits", "gold_"), ("from noise", "noise_gold_")):
            def change(key: str, form: str) -> str:
                return f"{first[prefix + key]:{form}} -> {last[prefix + key]:{form}}"

            print(f"  {label}: quality (PSNR to the clean render) {change('quality', '.2f')} dB, colour right "
                  f"{change('colour_acc', '.1%')}, shape right {change('shape_acc', '.1%')}, direction right "
                  f"{change('direction_acc', '.1%')}\n"
                  f"  {' ' * len(label)}  sharpness {change('sharpness', '.3f')}, background noise "
                  f"{change('bg_noise', '.4f')}, jitter {change('jitter', '.2f')} px", file=file)
        print(f"  edits keep their motion: distance to the source's path {first['gold_motion_error']:.2f} -> "
              f"{last['gold_motion_error']:.2f} px/frame, speed {first['gold_motion']:.2f} -> "
              f"{last['gold_motion']:.2f} px/frame", file=file)
    print(f"outputs in {output}", file=file)
