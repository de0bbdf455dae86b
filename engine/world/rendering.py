"""Rendering a clip to pixels: shape coverage masks, composition over the background, and the degradations
(blur, noise, washing out, wrong colour, jitter) applied from the clip's seed."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from engine.world.scene import BACKGROUNDS, COLOURS, RADIUS, SIZE, SUPERSAMPLE, Clip


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
