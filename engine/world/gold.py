"""Gold metrics: what a generated clip shows, read back from its pixels with the world's own renderer (object
path, colour, shape, quality, sharpness, background noise, motion), so no reward model is needed to measure it."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.world.rendering import compose, render, shape_mask
from engine.world.scene import BACKGROUNDS, COLOURS, FRAMES, MOTIONS, SHAPES, SIZE, SPEED, Clip


def object_weights(frames: torch.Tensor, background: str) -> torch.Tensor:
    """How much each pixel differs from the caption's background, in [0, 1]: [F, H, W]."""
    bg = torch.tensor(BACKGROUNDS[background], device=frames.device).view(1, 3, 1, 1)
    return ((frames - bg).norm(dim=1) / 0.35).clamp(0, 1)  # 0.35: about the smallest colour-background distance


def centroids(frames: torch.Tensor, background: str) -> torch.Tensor:
    """Object centre of mass per frame [F, 2] (x, y): the weighted mean of pixels unlike the background (the frame
    centre when nothing stands out)."""
    return centroids_of(frames, torch.tensor(BACKGROUNDS[background]))


def centroids_of(frames: torch.Tensor, background: torch.Tensor) -> torch.Tensor:
    w = ((frames - background.to(frames.device).view(1, 3, 1, 1)).norm(dim=1) / 0.35).clamp(0, 1)
    w = torch.where(w > 0.5, w, torch.zeros_like(w))
    coords = torch.arange(frames.shape[-1], dtype=torch.float32, device=frames.device) + 0.5
    total = w.sum((1, 2))
    cx = (w.sum(1) * coords).sum(1) / total.clamp(min=1e-6)
    cy = (w.sum(2) * coords).sum(1) / total.clamp(min=1e-6)
    centre = torch.full_like(cx, frames.shape[-1] / 2)
    empty = total < 1.0
    return torch.stack([torch.where(empty, centre, cx), torch.where(empty, centre, cy)], 1)


def centre_of_mass_offset(shape: str) -> torch.Tensor:
    """Where a shape's centre of mass lies relative to its nominal centre (x, y): a triangle's is lower."""
    centre = torch.tensor([[SIZE / 2, SIZE / 2]])
    mask = shape_mask(shape, centre)
    return centroids_of(mask[:, None].expand(-1, 3, -1, -1) * 1.0, torch.zeros(3))[0] - centre[0]


def clean_reference(frames: torch.Tensor, clip: Clip, path: torch.Tensor | None = None) -> torch.Tensor:
    """What ``quality`` compares ``frames`` [F, 3, H, W] against: the clean render of the caption with its object
    where the frames show it (``path``, the measured centres, when already known), so that a wrong position costs
    direction and jitter, not quality."""
    if path is None:
        path = centroids(frames.detach().float().cpu().clamp(0, 1), clip.background)
    return compose(clip.clean(), path - centre_of_mass_offset(clip.shape))


def _gradient_magnitude(frames: torch.Tensor) -> torch.Tensor:
    gx = frames[..., :, 1:] - frames[..., :, :-1]
    gy = frames[..., 1:, :] - frames[..., :-1, :]
    return gx[..., :-1, :].abs().sum(1) + gy[..., :, :-1].abs().sum(1)  # [F, H-1, W-1]


def gold_metrics(frames: torch.Tensor, clip: Clip, source_trajectory: torch.Tensor | None = None) -> dict[str, float]:
    """Metrics of a generated clip ``frames`` [F, 3, H, W] in [0, 1] for the caption of ``clip``, from pixels only.

    - ``colour_acc``: frames whose object colour (mean of object pixels) is nearest the caption's colour.
    - ``shape_acc``: frames whose object mask overlaps the caption's shape best (IoU against every shape drawn at
      the measured centre).
    - ``quality``: PSNR (dB) against the clean render of the caption at the measured object centres: blur, noise,
      washed-out or wrong colour and a wrong shape all lower it.
    - ``sharpness``: edge contrast against that clean render (1 = as sharp; blur and washing lower it).
    - ``bg_noise``: standard deviation of the pixels that should be plain background (0 = clean).
    - ``motion``: mean displacement per frame, pixels; ``jitter``: mean second difference of the path, pixels.
    - ``direction_acc``: whether the path runs the captioned way.
    - ``motion_error`` (with ``source_trajectory``, e.g. ``centroids`` of the source clip): mean distance per frame
      to the source clip's path, pixels.
    """
    frames = frames.detach().float().cpu().clamp(0, 1)
    path = centroids(frames, clip.background)
    reference = clean_reference(frames, clip, path)

    bg = torch.tensor(BACKGROUNDS[clip.background]).view(1, 3, 1, 1)
    distance = (frames - bg).norm(dim=1)
    # pixels at least half covered by the object: half the largest difference from the background in the frame
    object_pixels = ((distance > 0.5 * distance.amax((1, 2), keepdim=True)) & (distance > 0.07)).float()
    count = object_pixels.sum((1, 2))
    mean_colour = (frames * object_pixels[:, None]).sum((2, 3)) / count.clamp(min=1)[:, None]
    palette = torch.tensor(list(COLOURS.values()))
    nearest = torch.cdist(mean_colour, palette).argmin(1)
    colour_ok = (nearest == list(COLOURS).index(clip.colour)) & (count >= 4)

    ious = []
    for shape in SHAPES:
        template = shape_mask(shape, path - centre_of_mass_offset(shape)) > 0.5
        mask = object_pixels > 0.5
        ious.append((template & mask).sum((1, 2)) / (template | mask).sum((1, 2)).clamp(min=1))
    shape_ok = (torch.stack(ious, 1).argmax(1) == SHAPES.index(clip.shape)) & (count >= 4)

    mse = ((frames - reference) ** 2).mean((1, 2, 3)).clamp(min=1e-10)
    quality = (10 * torch.log10(1 / mse)).mean()

    reference_edges = _gradient_magnitude(reference)
    band = reference_edges > 0.05
    sharpness = (_gradient_magnitude(frames) * band).sum() / (reference_edges * band).sum().clamp(min=1e-6)

    near_object = F.max_pool2d(shape_mask(clip.shape, path - centre_of_mass_offset(clip.shape), supersample=1)[:, None], 5, 1, 2)[:, 0] > 0
    background_pixels = frames.permute(1, 0, 2, 3)[:, ~near_object]
    bg_noise = background_pixels.std(1).mean() if background_pixels.shape[1] > 1 else torch.tensor(0.0)

    steps = path[1:] - path[:-1]
    dx, dy = MOTIONS[clip.motion]
    travel = (path[-1] - path[0]) @ torch.tensor([dx, dy])
    metrics = {
        "colour_acc": colour_ok.float().mean().item(),
        "shape_acc": shape_ok.float().mean().item(),
        "quality": quality.item(),
        "sharpness": sharpness.item(),
        "bg_noise": bg_noise.item(),
        "motion": steps.norm(dim=1).mean().item(),
        "jitter": (steps[1:] - steps[:-1]).norm(dim=1).mean().item() if len(steps) > 1 else 0.0,
        "direction_acc": float(travel.item() > SPEED * (FRAMES - 1) / 2),
    }
    if source_trajectory is not None:
        metrics["motion_error"] = (path - source_trajectory.cpu()).norm(dim=1).mean().item()
    return metrics


GOLD_METRICS = ("quality", "colour_acc", "shape_acc", "sharpness", "bg_noise", "motion", "jitter", "direction_acc")


def mean_metrics(rows: list[dict[str, float]]) -> dict[str, float]:
    return {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}


def intended_path(clip: Clip) -> torch.Tensor:
    """The source's object path [F, 2] as measured from its clean render (a jittered source's intended path)."""
    return centroids(render(clip.clean()), clip.background)


@torch.no_grad()
def gold_scores(videos: list[torch.Tensor], clips: list[Clip], against_source: bool = False) -> list[dict[str, float]]:
    """Gold metrics of each decoded video [F, 3, H, W] in [0, 1] for its clip's caption (and, with
    ``against_source``, motion error against the clip's own path: for edits of that clip)."""
    return [gold_metrics(video, clip, intended_path(clip) if against_source else None)
            for video, clip in zip(videos, clips)]
