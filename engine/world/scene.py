"""The world's scenes: what a clip is (one object, shape x colour, moving in a straight line over a flat
background, 8 frames of 32x32, crossing most of the frame), its captions, and the clips each training and
evaluation split draws.

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

import functools
import random
import re
from dataclasses import dataclass, replace

import torch

FRAMES, SIZE = 8, 32
RADIUS = 7.5          # half the object's extent, pixels: a clean square reads as a square in every frame
MARGIN = 1.0          # least gap between the object and the frame's border, pixels
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


def opposite_motion(motion: str) -> str:
    return {"left": "right", "right": "left", "up": "down", "down": "up"}[motion]


def perpendicular_motion(motion: str) -> str:
    return {"left": "up", "right": "down", "up": "left", "down": "right"}[motion]


def shape_word(shape: str) -> str:
    return {"circle": "disc", "square": "box", "triangle": "triangle", "cross": "plus sign"}[shape]


# ---------------------------------------------------------------------------------- sampling clips
def start_position(rng: random.Random, motion: str) -> tuple[float, float]:
    """Where a clip moving ``motion`` may start so that its whole path stays inside the frame, the object never
    touching the border."""
    dx, dy = MOTIONS[motion]
    travel = SPEED * (FRAMES - 1)
    low, high = RADIUS + MARGIN, SIZE - RADIUS - MARGIN

    def coordinate(direction: float) -> float:
        if direction > 0:
            return rng.uniform(low, high - travel)
        if direction < 0:
            return rng.uniform(low + travel, high)
        return rng.uniform(low + 3, high - 3)

    return coordinate(dx), coordinate(dy)


def random_clip(rng: random.Random, shapes=SHAPES, colours=tuple(COLOURS), template: str = "A",
                degradation: str | None = None) -> Clip:
    motion = rng.choice(tuple(MOTIONS))
    shape, colour, background = rng.choice(shapes), rng.choice(colours), rng.choice(tuple(BACKGROUNDS))
    return Clip(shape, colour, motion, background, start_position(rng, motion), template, degradation,
                rng.randrange(2**31))


def mixed_quality(rng: random.Random, clip: Clip, clean_fraction: float = 0.4) -> Clip:
    """``clip``'s caption at a fresh place, clean or degraded as often as in the base model's training data."""
    degradation = None if rng.random() < clean_fraction else rng.choice(DEGRADATIONS)
    return replace(clip, start=start_position(rng, clip.motion), degradation=degradation, seed=rng.randrange(2**31))


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

# ---------------------------------------------------------------------------------- evaluation sets
# Fixed before any asset was trained, so that no figure is tuned to the set it is reported on: the 144 in-domain
# captions (shape x colour x motion x background) shuffled once and cut into four disjoint groups of 36, each
# with its own range of noise seeds. ``reward_train``: captions whose base-model generations may train the
# reward (and that fine-tuning trains on, with ``reward_validation``); ``reward_validation``: the reward's
# agreement with the gold metrics; ``effect``: before/after figures of fine-tuning; ``fresh``: the same figures
# again on noise seeds drawn only once the assets are final.
CAPTION_GROUPS = ("reward_train", "reward_validation", "effect", "fresh")
GROUP_SEED_BASE = {"reward_train": 10_000, "reward_validation": 20_000, "effect": 30_000, "fresh": 40_000}


def in_domain_grid(template: str = "A") -> list[Clip]:
    """Every in-domain caption once, as a clean clip at the frame's centre line (its path matters to no caption)."""
    clips = []
    for shape in FINETUNE_SHAPES:
        for colour in FINETUNE_COLOURS:
            for motion in MOTIONS:
                for background in BACKGROUNDS:
                    clips.append(_centred(shape, colour, motion, background, template))
    return clips


def _centred(shape: str, colour: str, motion: str, background: str, template: str) -> Clip:
    dx, dy = MOTIONS[motion]
    travel = SPEED * (FRAMES - 1)
    start = (SIZE / 2 - dx * travel / 2, SIZE / 2 - dy * travel / 2)
    return Clip(shape, colour, motion, background, start, template)


@functools.cache
def caption_clips() -> dict[str, Clip]:
    """Every caption the world can write (every shape, colour, motion, background and template) -> a clean clip
    of it at the frame's centre line."""
    return {clip.caption: clip for template in ("A", "B") for shape in SHAPES for colour in COLOURS
            for motion in MOTIONS for background in BACKGROUNDS
            for clip in [_centred(shape, colour, motion, background, template)]}


def caption_group(name: str) -> list[Clip]:
    """The 36 in-domain captions of one evaluation group (see CAPTION_GROUPS)."""
    if name not in CAPTION_GROUPS:
        raise ValueError(f"unknown caption group {name!r}; use one of {', '.join(CAPTION_GROUPS)}")
    grid = in_domain_grid()
    random.Random(2026_12_04).shuffle(grid)
    size = len(grid) // len(CAPTION_GROUPS)
    start = CAPTION_GROUPS.index(name) * size
    return grid[start:start + size]


def evaluation_set(name: str, samples_per_caption: int, seed_offset: int = 0) -> list[tuple[Clip, int]]:
    """(clip, noise seed) pairs of one group: each caption with ``samples_per_caption`` seeds of the group's own
    range (moved by ``seed_offset``), the same pairs every time (paired designs draw the same initial noise before
    and after)."""
    clips, base = caption_group(name), GROUP_SEED_BASE[name] + seed_offset
    return [(clip, base + i * samples_per_caption + j) for i, clip in enumerate(clips) for j in range(samples_per_caption)]


def effect_sets(samples_per_caption: int = 2, group: str = "effect", seed_offset: int = 0) -> dict[str, list[tuple[Clip, int]]]:
    """Table 1's three sets for before/after figures, as (clip, noise seed) pairs: the in-domain captions of
    ``group`` (never fine-tuned on), and as many captions with a held-out shape or colour and of template B,
    with noise seeds of the group's range. ``group="fresh"`` with a ``seed_offset`` drawn once the assets are
    final (bench.world_study takes it from their hash) is the second set no choice was made on."""
    in_domain = evaluation_set(group, samples_per_caption, seed_offset)
    base = GROUP_SEED_BASE[group] + 5_000 + seed_offset
    others = {name: prompt_set(name, len(in_domain), seed=base + i) for i, name in enumerate(PROMPT_SETS[1:])}
    return {"in_domain": in_domain, **{name: [(clip, base + 1_000 * (i + 1) + k) for k, clip in enumerate(clips)]
                                      for i, (name, clips) in enumerate(others.items())}}


def finetune_split(train_count: int, held_out_count: int, seed: int) -> tuple[list[Clip], list[Clip]]:
    """Source clips for reward fine-tuning, in-domain with the training data's mixed quality: training clips with
    the captions of the reward_train and reward_validation groups, held-out clips with the effect group's, which
    fine-tuning never sees."""
    rng = random.Random(seed)
    train_captions = caption_group("reward_train") + caption_group("reward_validation")
    effect = caption_group("effect")
    held_out = [mixed_quality(rng, effect[i % len(effect)]) for i in range(held_out_count)]
    train = [mixed_quality(rng, rng.choice(train_captions)) for _ in range(train_count)]
    return train, held_out


def world_words() -> list[str]:
    """Every word and punctuation mark the world's captions use (both templates)."""
    rng = random.Random(0)
    words: set[str] = set()
    for _ in range(3000):
        clip = random_clip(rng, template=rng.choice("AB"))
        words.update(re.findall(r"[a-z]+|[^\sa-z]", clip.caption))
    return sorted(words)
