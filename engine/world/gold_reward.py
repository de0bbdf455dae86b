"""The gold quality as a reward (``--reward gold``, registered by engine.builtin): a bound for the study of a
learned reward, kept out of the world's pure modules because it is an engine.rewards ``Reward``."""

from __future__ import annotations

import torch

from engine.errors import UserError
from engine.rewards.base import Reward
from engine.world.gold import clean_reference
from engine.world.scene import caption_clips


class GoldQualityReward(Reward):
    """``--reward gold`` (world captions only): the gold quality itself as the reward: each frame's PSNR to the
    clean render of its caption at the frame's measured object centre, in tens of dB, differentiable in the frame
    (the centre is measured without gradient). Not a preference model: what a recipe can reach with a reward that
    agrees with the gold quality everywhere, the bound against which a learned reward is judged."""

    name = "gold"

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        clips = caption_clips()
        unknown = [p for p in prompts if p not in clips]
        if unknown:
            raise UserError(f"reward gold scores world captions only, not {unknown[0]!r}; use it with --model world")
        scores = []
        for image, prompt in zip(images, prompts):
            clip, frame = clips[prompt], image.float().clamp(0, 1)[None]
            reference = clean_reference(frame, clip).to(frame.device)
            scores.append(-torch.log10(((frame - reference) ** 2).mean().clamp(min=1e-10)))
        return torch.stack(scores)
