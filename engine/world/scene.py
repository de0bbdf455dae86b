"""The world's scenes: what a clip is (one object, shape x colour, moving in a straight line over a flat
background, 8 frames of 32x32), its captions, and the clips each training and evaluation split draws.

Clean clips are anti-aliased renders (engine.world.rendering); degraded clips keep the caption but are blurred,
noisy, washed out, drawn in the wrong colour or jittered along their path. A model trained on the mixture
generates mixed quality: the situation reward fine-tuning exists to fix.

Splits, modelled on InstructVideo's Table 1 (in-domain animals / new animals / non-animals):
- ``in_domain``: template A captions over the fine-tuning categories (circle, square, triangle x red, green,
  blue, yellow);
- ``new_categories``: template A captions with a shape or colour kept out of fine-tuning (cross; purple,
  orange), which the base model has seen;
- ``unrelated``: captions of another template (B), which fine-tuning never uses.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

import torch

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
