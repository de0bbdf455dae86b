"""The reward interface (images [N, 3, H, W] in [0, 1] and N prompts to N scores, differentiably in the
images), the weight-free demonstration reward, and the weighted sum that combines rewards."""

from __future__ import annotations

import torch
from torch import nn


class Reward(nn.Module):
    """Base class: frozen, differentiable in the images, one score per (image, prompt)."""

    name = "reward"

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        raise NotImplementedError


class ColorfulnessReward(Reward):
    """Demonstration reward for the tiny preset: Hasler & Suesstrunk (2003) colourfulness, prompt-blind.

    It needs no weights, so the default job can show a reward rising; it is not a human-preference model.
    """

    name = "colorfulness"

    def forward(self, images, prompts):
        r, g, b = images.float().unbind(1)
        rg, yb = r - g, 0.5 * (r + g) - b
        std = (rg.flatten(1).var(1) + yb.flatten(1).var(1) + 1e-8).sqrt()
        mean = (rg.flatten(1).mean(1) ** 2 + yb.flatten(1).mean(1) ** 2 + 1e-8).sqrt()
        return std + 0.3 * mean


class WeightedSum(Reward):
    """sum_j w_j r_j over component rewards: the combined reward the command line builds."""

    name = "weighted"

    def __init__(self, parts: list[tuple[Reward, float]]):
        super().__init__()
        self.parts = nn.ModuleList(r for r, _ in parts)
        self.weights = [w for _, w in parts]

    def forward(self, images, prompts):
        return sum(w * r(images, prompts) for r, w in zip(self.parts, self.weights))


class ClipReward(Reward):
    """A video-level reward: B clips [B, T, 3, H, W] in [0, 1] and B prompts to B scores, differentiably in the
    frames. It declares which of a clip's frames it needs (``frame_indices``), so only those are decoded."""

    name = "clip"

    def frame_indices(self, num_frames: int, fps: float) -> torch.Tensor:
        """Indices of the frames scored from a clip of ``num_frames`` frames playing at ``fps``: all of them."""
        return torch.arange(num_frames)

    def forward(self, clips: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        raise NotImplementedError
