"""The world's built-in video reward (engine.rewards.motion.MotionReward), its training data and its
measurements: a clip moving as captioned, clean or appearance-degraded, against the same clip with its motion
broken (``MOTION_FAULTS``): jittered along its path, frozen in one place, moving the opposite way, or sideways.
The caption stays the clip's own, so only motion separates the two; the image reward, which sees one frame at a
time, cannot tell them apart."""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

from engine.rewards.motion import MotionReward
from engine.world.rendering import render
from engine.world.scene import (FRAMES, Clip, opposite_motion, perpendicular_motion, random_clip,
                                start_position)

MOTION_FAULTS = ("jitter", "frozen", "reversed", "sideways")
APPEARANCES = (None, "blur", "noise", "washed", "wrong_colour")  # kept by both clips of a pair


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
        clip = clips[i % len(clips)] if clips else random_clip(rng, template=rng.choice("AB"))
        clip = replace(clip, degradation=rng.choice(APPEARANCES), seed=rng.randrange(2 ** 31))
        fault = MOTION_FAULTS[i % len(MOTION_FAULTS)]
        pairs.append((clip.caption, render(clip), broken_motion(clip, fault, rng), fault))
    return pairs


def train_motion_reward(reward: MotionReward, steps: int, seed: int, work: Path, config: dict,
                        batch: int = 32, lr: float = 2e-3) -> None:
    """Each step: ``batch`` fresh pairs; the loss asks the good clip for 1, the broken one for 0, and the good one
    above the broken one (logistic, on the logits)."""
    from engine.world.stages import StageRun

    rng, generator = random.Random(seed), torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(reward.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=max(steps, 1), pct_start=0.1)
    run = StageRun("motion-reward", work, config, steps, {"reward": reward, "optimizer": optimizer,
                                                          "schedule": schedule, "rng": rng, "generator": generator})
    reward.train()
    for _ in run:
        captions, good, bad, _ = zip(*motion_pairs(rng, batch))
        logits = reward.logits(torch.stack(good + bad), list(captions) * 2)
        positive, negative = logits[:batch], logits[batch:]
        loss = (F.softplus(-positive).mean() + F.softplus(negative).mean()
                + F.softplus(negative - positive).mean())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        run.show(loss=loss.item(), accuracy=(positive > negative).float().mean().item())
    reward.requires_grad_(False).eval()


@torch.no_grad()
def pair_accuracy(reward: MotionReward, pairs) -> dict[str, float]:
    """Share of pairs in which the good clip scores above the broken one, per fault and overall."""
    captions, good, bad, faults = zip(*pairs)
    right = (reward(torch.stack(good), list(captions)) > reward(torch.stack(bad), list(captions))).tolist()
    shares = {f: sum(r for r, g in zip(right, faults) if g == f) / max(1, faults.count(f)) for f in MOTION_FAULTS}
    return {"all": sum(right) / len(right), **shares, "pairs": len(right)}


@torch.no_grad()
def generation_agreement(reward: MotionReward, rows: list[dict], videos: list[torch.Tensor],
                         captions: list[str], jitter_gap: float = 0.5) -> dict[str, float]:
    """On generations of the same caption: how often the reward ranks the one moving in the caption's direction
    (gold ``direction_acc``) above one that does not, and the smoother (gold ``jitter`` lower by ``jitter_gap``
    pixels or more, both in the right direction) above the other; and the rank correlation with the gold
    direction over all generations."""
    scores = torch.cat([reward(torch.stack(videos[i:i + 64]), captions[i:i + 64]) for i in range(0, len(videos), 64)])
    direction, smooth = [], []
    for i in range(len(rows)):
        for j in range(len(rows)):
            if captions[i] != captions[j]:
                continue
            if rows[i]["direction_acc"] > 0.5 >= rows[j]["direction_acc"]:
                direction.append(bool(scores[i] > scores[j]))
            elif (min(rows[i]["direction_acc"], rows[j]["direction_acc"]) > 0.5
                  and rows[j]["jitter"] - rows[i]["jitter"] >= jitter_gap):
                smooth.append(bool(scores[i] > scores[j]))
    right = torch.tensor([r["direction_acc"] > 0.5 for r in rows], dtype=torch.float32)
    return {"direction_pairs": len(direction), "direction_agreement": sum(direction) / max(1, len(direction)),
            "smoothness_pairs": len(smooth), "smoothness_agreement": sum(smooth) / max(1, len(smooth)),
            "mean_score_direction_right": scores[right > 0].mean().item() if right.any() else None,
            "mean_score_direction_wrong": scores[right == 0].mean().item() if (right == 0).any() else None}
