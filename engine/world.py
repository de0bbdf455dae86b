"""A procedural video world: captioned clips rendered from known parameters, and gold metrics read back from
pixels with the same renderer, so what a generated clip shows can be measured without any reward model.

A clip is one object (shape x colour) moving in a straight line (left, right, up or down) over a flat
background, 8 frames of 32x32. Clean clips are anti-aliased renders; degraded clips keep the caption but are
blurred, noisy, washed out, drawn in the wrong colour or jittered along their path. A model trained on the
mixture generates mixed quality: the situation reward fine-tuning exists to fix.

Splits, modelled on InstructVideo's Table 1 (in-domain animals / new animals / non-animals):
- ``in_domain``: template A captions over the fine-tuning categories (circle, square, triangle x red, green,
  blue, yellow);
- ``new_categories``: template A captions with a shape or colour kept out of fine-tuning (cross; purple,
  orange), which the base model has seen;
- ``unrelated``: captions of another template (B), which fine-tuning never uses.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

FRAMES, SIZE = 8, 32
RADIUS = 6.0          # half the object's extent, pixels
SPEED = 2.0           # pixels per frame along the motion's axis
SUPERSAMPLE = 4       # anti-aliasing of clean renders

COLOURS = {
    "red": (0.90, 0.12, 0.10), "green": (0.10, 0.75, 0.20), "blue": (0.15, 0.30, 0.95),
    "yellow": (0.95, 0.88, 0.10), "purple": (0.62, 0.20, 0.82), "orange": (1.00, 0.55, 0.05),
}
BACKGROUNDS = {"black": (0.05, 0.05, 0.05), "gray": (0.50, 0.50, 0.50), "white": (0.95, 0.95, 0.95)}
SHAPES = ("circle", "square", "triangle", "cross")
MOTIONS = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}  # (dx, dy)
DEGRADATIONS = ("blur", "noise", "washed", "wrong_colour", "jitter")

FINETUNE_SHAPES = ("circle", "square", "triangle")
FINETUNE_COLOURS = ("red", "green", "blue", "yellow")
TEMPLATE_B_MOTION = {"left": "to the left", "right": "to the right", "up": "upwards", "down": "downwards"}


@dataclass(frozen=True)
class Clip:
    """Everything a clip is rendered from. ``start`` is the object's centre in the first frame (x, y)."""

    shape: str
    colour: str
    motion: str
    background: str
    start: tuple[float, float]
    template: str = "A"
    degradation: str | None = None
    seed: int = 0  # noise, jitter and wrong-colour draws of a degraded clip

    @property
    def caption(self) -> str:
        if self.template == "A":
            return f"a {self.colour} {self.shape} moving {self.motion} on a {self.background} background"
        return f"{self.background} backdrop, a {shape_word(self.shape)} in {self.colour} drifts {TEMPLATE_B_MOTION[self.motion]}"

    def trajectory(self) -> torch.Tensor:
        """Object centres [F, 2] (x, y) of the clean motion."""
        dx, dy = MOTIONS[self.motion]
        t = torch.arange(FRAMES, dtype=torch.float32)
        return torch.stack([self.start[0] + SPEED * dx * t, self.start[1] + SPEED * dy * t], 1)

    def clean(self) -> "Clip":
        return replace(self, degradation=None)


def shape_word(shape: str) -> str:
    return {"circle": "disc", "square": "box", "triangle": "triangle", "cross": "plus sign"}[shape]


# ---------------------------------------------------------------------------------- sampling clips
def random_clip(rng: random.Random, shapes=SHAPES, colours=tuple(COLOURS), template: str = "A",
                degradation: str | None = None) -> Clip:
    """A clip whose whole path stays inside the frame, the object never touching the border."""
    motion = rng.choice(tuple(MOTIONS))
    dx, dy = MOTIONS[motion]
    travel = SPEED * (FRAMES - 1)
    low, high = RADIUS + 2, SIZE - RADIUS - 2

    def coordinate(direction: float) -> float:
        if direction > 0:
            return rng.uniform(low, high - travel)
        if direction < 0:
            return rng.uniform(low + travel, high)
        return rng.uniform(low + 3, high - 3)

    return Clip(rng.choice(shapes), rng.choice(colours), motion, rng.choice(tuple(BACKGROUNDS)),
                (coordinate(dx), coordinate(dy)), template, degradation, rng.randrange(2**31))


def training_mixture(rng: random.Random, clean_fraction: float = 0.4, template_b_fraction: float = 0.25) -> Clip:
    """One clip of the base model's training data: every category, both templates, mixed quality."""
    degradation = None if rng.random() < clean_fraction else rng.choice(DEGRADATIONS)
    template = "B" if rng.random() < template_b_fraction else "A"
    return random_clip(rng, template=template, degradation=degradation)


def prompt_set(name: str, count: int, seed: int) -> list[Clip]:
    """Clean clips of one evaluation split (see the module docstring); their captions are the prompts."""
    rng = random.Random(seed)
    if name == "in_domain":
        return [random_clip(rng, FINETUNE_SHAPES, FINETUNE_COLOURS) for _ in range(count)]
    if name == "new_categories":
        clips = []
        while len(clips) < count:
            clip = random_clip(rng)
            if clip.shape not in FINETUNE_SHAPES or clip.colour not in FINETUNE_COLOURS:
                clips.append(clip)
        return clips
    if name == "unrelated":
        return [random_clip(rng, template="B") for _ in range(count)]
    raise ValueError(f"unknown prompt set {name!r}; use in_domain, new_categories or unrelated")


PROMPT_SETS = ("in_domain", "new_categories", "unrelated")


def finetune_split(train_count: int, held_out_count: int, seed: int) -> tuple[list[Clip], list[Clip]]:
    """Source clips for reward fine-tuning: in-domain captions with the training data's mixed quality. The
    held-out clips' captions (category, motion and background together) never occur among the training clips."""
    rng = random.Random(seed)

    def mixed(shapes=FINETUNE_SHAPES, colours=FINETUNE_COLOURS) -> Clip:
        degradation = None if rng.random() < 0.4 else rng.choice(DEGRADATIONS)
        return random_clip(rng, shapes, colours, degradation=degradation)

    held_out = []
    while len(held_out) < held_out_count:
        clip = mixed()
        if clip.caption not in {c.caption for c in held_out}:
            held_out.append(clip)
    kept = {c.caption for c in held_out}
    train = []
    while len(train) < train_count:
        clip = mixed()
        if clip.caption not in kept:
            train.append(clip)
    return train, held_out


# ---------------------------------------------------------------------------------- rendering
def shape_mask(shape: str, centres: torch.Tensor, size: int = SIZE, supersample: int = SUPERSAMPLE) -> torch.Tensor:
    """Coverage in [0, 1], [F, size, size], of ``shape`` centred at each of ``centres`` [F, 2] (x, y)."""
    n = size * supersample
    coords = (torch.arange(n, dtype=torch.float32) + 0.5) / supersample  # pixel-centre coordinates
    x = coords.view(1, 1, n) - centres[:, 0].view(-1, 1, 1)
    y = coords.view(1, n, 1) - centres[:, 1].view(-1, 1, 1)
    r = RADIUS
    if shape == "circle":
        inside = x ** 2 + y ** 2 <= r ** 2
    elif shape == "square":
        inside = (x.abs() <= r * 0.85) & (y.abs() <= r * 0.85)
    elif shape == "triangle":  # pointing up, base at y = +r
        inside = (y <= r) & (y >= -r) & (x.abs() <= (y + r) / 2)
    elif shape == "cross":
        arm = r * 0.38
        inside = ((x.abs() <= arm) & (y.abs() <= r)) | ((y.abs() <= arm) & (x.abs() <= r))
    else:
        raise ValueError(f"unknown shape {shape!r}")
    inside = inside.float()
    return F.avg_pool2d(inside[:, None], supersample)[:, 0] if supersample > 1 else inside


def centre_of_mass_offset(shape: str) -> torch.Tensor:
    """Where a shape's centre of mass lies relative to its nominal centre (x, y): a triangle's is lower."""
    centre = torch.tensor([[SIZE / 2, SIZE / 2]])
    mask = shape_mask(shape, centre)
    return centroids_of(mask[:, None].expand(-1, 3, -1, -1) * 1.0, torch.zeros(3))[0] - centre[0]


def compose(clip: Clip, centres: torch.Tensor, colour: str | None = None) -> torch.Tensor:
    """Frames [F, 3, H, W] in [0, 1]: the clip's background with its object at ``centres``."""
    mask = shape_mask(clip.shape, centres)[:, None]
    background = torch.tensor(BACKGROUNDS[clip.background]).view(1, 3, 1, 1)
    foreground = torch.tensor(COLOURS[colour or clip.colour]).view(1, 3, 1, 1)
    return background * (1 - mask) + foreground * mask


def gaussian_blur(frames: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = max(1, math.ceil(3 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-x ** 2 / (2 * sigma ** 2))
    kernel = kernel / kernel.sum()
    c = frames.shape[1]
    padded = F.pad(frames, (radius, radius, radius, radius), mode="replicate")
    horizontal = F.conv2d(padded, kernel.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(horizontal, kernel.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def render(clip: Clip) -> torch.Tensor:
    """The clip's frames [F, 3, H, W] in [0, 1], with its degradation applied."""
    g = torch.Generator().manual_seed(clip.seed)
    centres = clip.trajectory()
    colour = None
    if clip.degradation == "jitter":
        centres = centres + 2.0 * torch.randn(centres.shape, generator=g)
    elif clip.degradation == "wrong_colour":
        others = [c for c in COLOURS if c != clip.colour]
        colour = others[int(torch.randint(len(others), (1,), generator=g))]
    frames = compose(clip, centres, colour)
    if clip.degradation == "blur":
        frames = gaussian_blur(frames, 1.3)
    elif clip.degradation == "noise":
        frames = frames + 0.15 * torch.randn(frames.shape, generator=g)
    elif clip.degradation == "washed":
        grey = frames.mean(dim=(1, 2, 3), keepdim=True)
        frames = 0.4 * frames + 0.6 * (0.5 * grey + 0.5 * 0.6)
    return frames.clamp(0, 1)


# ---------------------------------------------------------------------------------- gold metrics
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
    reference = compose(clip.clean(), path - centre_of_mass_offset(clip.shape))

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
