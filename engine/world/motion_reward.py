"""The world's built-in video reward (engine.rewards.motion.MotionReward), its training data and its
measurements: a clip moving as captioned, clean or appearance-degraded, against the same clip with its motion
broken (``MOTION_FAULTS``): jittered along its path, frozen in one place, moving the opposite way, or sideways;
and, so that the reward grades the sub-pixel shake the base model's generations have (gold jitter 0.1 - 0.8 px,
where the world's jitter degradation is about 6 px), the same clip shaking less against shaking more
(``ShakenClip``). The caption stays the clip's own, so only motion separates the two; the image reward, which sees
one frame at a time, cannot tell them apart. Its on-policy rounds (``engine.world.build motion-onpolicy``) add what
fine-tuning against it produced, ordered against the base model's generations by the gold metrics
(``generation_pairs``)."""

from __future__ import annotations

import functools
import math
import random
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from engine.rewards.motion import MotionReward, edge_energy
from engine.world.figures import QUALITY_GAP
from engine.world.rendering import render
from engine.world.scene import (FRAMES, Clip, caption_clips, opposite_motion, perpendicular_motion, random_clip,
                                start_position)

MOTION_FAULTS = ("jitter", "frozen", "reversed", "sideways")
APPEARANCES = (None, "blur", "noise", "washed", "wrong_colour")  # kept by both clips of a pair
SHAKE_RANGE = (0.03, 1.0)  # the shakier clip's shake, pixels (log-uniform); gold jitter is about 3x the shake
SHAKE_BANDS = (0.1, 0.3)   # held-out shake pairs are reported by the shakier clip's shake: below, between, above


@dataclass(frozen=True)
class ShakenClip(Clip):
    """A clip whose object shakes about its path by ``shake`` pixels (standard deviation per axis and frame), its
    appearance kept: ``render`` reads the path from ``trajectory``. One clip at two shakes moves by the same
    pattern, scaled."""

    shake: float = 0.0

    @classmethod
    def of(cls, clip: Clip, shake: float) -> ShakenClip:
        return cls(**{f.name: getattr(clip, f.name) for f in fields(Clip)}, shake=shake)

    def trajectory(self) -> torch.Tensor:
        path = super().trajectory()
        g = torch.Generator().manual_seed(self.seed + 1)  # apart from the appearance's draws, seeded by ``seed``
        return path + self.shake * torch.randn(path.shape, generator=g)


def broken_motion(clip: Clip, fault: str, rng: random.Random) -> torch.Tensor:
    """``clip``'s frames with its motion broken by ``fault``, its appearance (and caption) kept."""
    if fault == "jitter":  # the world's own jitter degradation (it replaces any appearance degradation)
        return render(replace(clip, degradation="jitter", seed=rng.randrange(2 ** 31)))
    if fault == "frozen":
        return render(clip)[rng.randrange(FRAMES)].expand(FRAMES, -1, -1, -1).clone()
    motion = opposite_motion(clip.motion) if fault == "reversed" else (
        perpendicular_motion(clip.motion) if rng.random() < 0.5 else opposite_motion(perpendicular_motion(clip.motion)))
    return render(replace(clip, motion=motion, start=start_position(rng, motion)))


def motion_pairs(rng: random.Random, count: int, clips: list[Clip] | None = None):
    """``count`` (caption, good frames, broken frames, fault) from random clips (or from ``clips``), every
    category and both templates, appearances mixed as in the base model's training data."""
    pairs = []
    for i in range(count):
        clip = appearance_clip(rng, i, clips)
        fault = MOTION_FAULTS[i % len(MOTION_FAULTS)]
        pairs.append((clip.caption, render(clip), broken_motion(clip, fault, rng), fault))
    return pairs


def shake_pairs(rng: random.Random, count: int, clips: list[Clip] | None = None):
    """``count`` (caption, steadier frames, shakier frames, the shakier one's shake): one clip at two shakes, the
    shakier drawn from ``SHAKE_RANGE``, the steadier still (half the pairs) or 2 - 4x steadier."""
    low, high = (math.log(s) for s in SHAKE_RANGE)
    pairs = []
    for i in range(count):
        clip = appearance_clip(rng, i, clips)
        shakier = math.exp(rng.uniform(low, high))
        steadier = 0.0 if rng.random() < 0.5 else shakier / rng.uniform(2, 4)
        pairs.append((clip.caption, render(ShakenClip.of(clip, steadier)), render(ShakenClip.of(clip, shakier)), shakier))
    return pairs


def appearance_clip(rng: random.Random, i: int, clips: list[Clip] | None) -> Clip:
    """The ``i``-th clip of a pair set: a random one (or ``clips``'), appearances mixed as in the base model's
    training data."""
    clip = clips[i % len(clips)] if clips else random_clip(rng, template=rng.choice("AB"))
    return replace(clip, degradation=rng.choice(APPEARANCES), seed=rng.randrange(2 ** 31))


def train_motion_reward(reward: MotionReward, steps: int, seed: int, work: Path, config: dict,
                        batch: int = 32, lr: float = 2e-3, generations: list | None = None,
                        reference_steps: int = 3000) -> None:
    """Each step: ``batch`` fresh fault pairs, the good clip asked for 1, the broken one for 0 and the good one
    above the broken one; and ``batch`` fresh shake pairs, the steadier asked only to score above the shakier
    (logistic, on the logits): no shake is called broken, the reward grades it. With ``generations`` (caption,
    better video, worse video, why: ``generation_pairs``), also ``batch`` of those, ranked the same way. First its
    cap on edge energy is fitted to every caption's clean render (``reference_steps``) and frozen."""
    from engine.world.stages import StageRun

    rng, generator = random.Random(seed), torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    reward.fit_reference(*clean_energies(), steps=reference_steps, seed=seed)
    # the caption words' velocities (pixels per frame) grow from zero 10x faster than the calibration learns
    words = [reward.velocity.weight]
    others = [p for p in reward.parameters() if p.requires_grad and p is not reward.velocity.weight]
    optimizer = torch.optim.AdamW([{"params": others, "lr": lr}, {"params": words, "lr": 10 * lr}], weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, [lr, 10 * lr], total_steps=max(steps, 1), pct_start=0.1)
    run = StageRun("motion-reward", work, config, steps, {"reward": reward, "optimizer": optimizer,
                                                          "schedule": schedule, "rng": rng, "generator": generator})
    reward.train()
    for _ in run:
        captions, good, bad, _ = zip(*motion_pairs(rng, batch))
        shake_captions, steadier, shakier, _ = zip(*shake_pairs(rng, batch))
        clips, prompts = good + bad + steadier + shakier, list(captions) * 2 + list(shake_captions) * 2
        if generations:
            generation_captions, better, worse, _ = zip(*rng.choices(generations, k=batch))
            clips, prompts = clips + better + worse, prompts + list(generation_captions) * 2
        positive, negative, steady, shaky, *ranked = reward.logits(torch.stack(clips), prompts).split(batch)
        loss = (F.softplus(-positive).mean() + F.softplus(negative).mean()
                + F.softplus(negative - positive).mean() + F.softplus(shaky - steady).mean())
        if generations:
            loss = loss + F.softplus(ranked[1] - ranked[0]).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        run.show(loss=loss.item(), accuracy=(positive > negative).float().mean().item())
    reward.requires_grad_(False).eval()


SUBPIXEL = (0.0, 0.25, 0.5, 0.75)  # offsets of a clean render whose edge energies average to a caption's


def caption_energy(clip: Clip) -> torch.Tensor:
    """The edge energy of ``clip`` rendered clean, averaged over frames and sub-pixel positions (where the object's
    edges fall between pixels changes it by up to half)."""
    x, y = clip.start
    frames = [render(replace(clip, degradation=None, start=(x + dx, y + dy))) for dx in SUBPIXEL for dy in SUBPIXEL]
    return edge_energy(torch.stack(frames)).mean()


@functools.cache  # 9,216 renders; the motion reward's fit and its report both read them
def clean_energies() -> tuple[list[str], torch.Tensor]:
    """Every caption the world writes and its clean edge energy (``caption_energy``): what the motion reward's cap on
    edge energy predicts."""
    captions = caption_clips()
    return list(captions), torch.stack([caption_energy(clip) for clip in captions.values()])


def reference_error(reward: MotionReward) -> float:
    """The largest relative error of the reward's predicted edge energy over every caption's clean render."""
    captions, energy = clean_energies()
    with torch.no_grad():
        return (reward.predicted_energy(captions) / energy - 1).abs().max().item()


def pair_accuracy(reward: MotionReward, pairs) -> dict[str, float]:
    """Share of pairs in which the good clip scores above the broken one, per fault and overall."""
    return ranking_accuracy(reward, pairs, {f: (lambda fault, f=f: fault == f) for f in MOTION_FAULTS})


def shake_accuracy(reward: MotionReward, pairs) -> dict[str, float]:
    """Share of shake pairs in which the steadier clip scores above the shakier, overall and by the shakier one's
    shake (``SHAKE_BANDS``)."""
    edges = (0.0, *SHAKE_BANDS, math.inf)
    return ranking_accuracy(reward, pairs, {f"shake {low:g}-{high:g} px": (lambda s, low=low, high=high: low <= s < high)
                                            for low, high in zip(edges, edges[1:])})


@torch.no_grad()
def ranking_accuracy(reward: MotionReward, pairs, groups: dict) -> dict[str, float]:
    """Share of (caption, better, worse, what) pairs that ``reward`` orders right: overall, and in each group
    (name: which ``what`` belong to it)."""
    captions, better, worse, what = zip(*pairs)
    right = (reward(torch.stack(better), list(captions)) > reward(torch.stack(worse), list(captions))).tolist()
    shares = {}
    for name, belongs in groups.items():
        chosen = [r for r, w in zip(right, what) if belongs(w)]
        shares[name] = sum(chosen) / max(1, len(chosen))
    return {"all": sum(right) / len(right), **shares, "pairs": len(right)}


JITTER_GAP = 0.2  # pixels of gold jitter between two generations of one noise to make a pair
# What orders a fine-tuned generation and the base model's of the same noise, first that applies (higher first):
# moving the caption's way; then, both doing so, the object drawn whole (gold quality 2 dB apart: fine-tuning
# against the reward alone learned to smear the object, which steadies its measured path); then the steadier path.
GENERATION_ORDER = (("direction", lambda row: row["direction_acc"], 1.0), ("quality", lambda row: row["quality"], QUALITY_GAP),
                    ("jitter", lambda row: -row["jitter"], JITTER_GAP))


def generation_pairs(base_rows: list[dict], base_videos: list[torch.Tensor], rows: list[dict],
                     videos: list[torch.Tensor], captions: list[str]) -> list[tuple]:
    """(caption, better video, worse video, why) from a fine-tuned model's generations and the base model's of
    the same noise, ordered by the gold metrics alone (``GENERATION_ORDER``); none where neither moves the
    caption's way or no criterion separates them. What fine-tuning against the reward gets wrong, the reward then
    learns to score down."""
    pairs = []
    for caption, first, second in zip(captions, zip(base_rows, base_videos), zip(rows, videos)):
        if max(first[0]["direction_acc"], second[0]["direction_acc"]) <= 0.5:
            continue
        for why, value, gap in GENERATION_ORDER:
            difference = value(first[0]) - value(second[0])
            if abs(difference) >= gap:
                better, worse = (first, second) if difference > 0 else (second, first)
                pairs.append((caption, better[1], worse[1], why))
                break
    return pairs


def generation_accuracy(reward: MotionReward, pairs) -> dict[str, float]:
    """Share of ``generation_pairs`` that ``reward`` orders as the gold metrics do, overall and by why."""
    if not pairs:
        return {"all": None, "pairs": 0}
    return ranking_accuracy(reward, pairs, {why: (lambda w, why=why: w == why) for why, _, _ in GENERATION_ORDER})


@torch.no_grad()
def clip_scores(reward: MotionReward, videos: list[torch.Tensor], captions: list[str], batch: int = 64) -> torch.Tensor:
    """``reward`` of each video [F, 3, H, W] for its caption, ``batch`` at a time."""
    return torch.cat([reward(torch.stack(videos[i:i + batch]), captions[i:i + batch]) for i in range(0, len(videos), batch)])


@torch.no_grad()
def generation_agreement(reward: MotionReward, rows: list[dict], videos: list[torch.Tensor],
                         captions: list[str], jitter_gaps: tuple[float, ...] = (0.2, 0.5)) -> dict[str, float]:
    """On generations of the same caption: how often the reward ranks the one moving in the caption's direction
    (gold ``direction_acc``) above one that does not, and the smoother (gold ``jitter`` lower by each of
    ``jitter_gaps`` pixels or more, both in the right direction) above the other; and its mean score on the
    generations moving the caption's way and on the others."""
    scores = clip_scores(reward, videos, captions)
    direction, smooth = [], {gap: [] for gap in jitter_gaps}
    for i in range(len(rows)):
        for j in range(len(rows)):
            if captions[i] != captions[j]:
                continue
            if rows[i]["direction_acc"] > 0.5 >= rows[j]["direction_acc"]:
                direction.append(bool(scores[i] > scores[j]))
            elif min(rows[i]["direction_acc"], rows[j]["direction_acc"]) > 0.5:
                for gap in jitter_gaps:
                    if rows[j]["jitter"] - rows[i]["jitter"] >= gap:
                        smooth[gap].append(bool(scores[i] > scores[j]))
    right = torch.tensor([r["direction_acc"] > 0.5 for r in rows], dtype=torch.float32)
    smoothness = {}
    for gap, agreed in smooth.items():
        smoothness |= {f"smoothness_pairs_gap_{gap:g}px": len(agreed),
                       f"smoothness_agreement_gap_{gap:g}px": sum(agreed) / max(1, len(agreed))}
    return {"direction_pairs": len(direction), "direction_agreement": sum(direction) / max(1, len(direction)),
            **smoothness,
            "mean_score_direction_right": scores[right > 0].mean().item() if right.any() else None,
            "mean_score_direction_wrong": scores[right == 0].mean().item() if (right == 0).any() else None}
