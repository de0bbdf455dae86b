"""A small text-conditioned motion reward for whole clips (a ``ClipReward``): how closely a clip's object follows the
steady motion its caption asks for. A learned locator reads the object's path: a per-frame convolution over each
pixel and its difference from the frame's border (where the background shows) gives each pixel's objectness in [0,
1], whose centre of mass is the object's centre, sub-pixel exact; each pixel's share is bounded, so that moving the
centre takes moving the object, not brightening a few pixels (as a spatial soft-argmax would allow). A bag of caption
words (the vocabulary saved with the weights) gives the velocity the caption asks for, u.
score = (b - w_v mean_t rho(v_t - u) - w_a mean_t rho(a_t) rho(u) / (mean_t rho(v_t) + floor)) / scale, with v_t the
path's steps, a_t their changes and rho(x) = sqrt(|x|^2 + eps^2): a clip moving at the captioned velocity without
shake scores b, and shake counts relative to the path's own speed. It reads paths rather than pooling features over
the clip, as fine-tuning against a pooled 3D convolution (the reward before it) learned to smear the object, which
that reward took for steadiness. ``scale`` (saved with the weights) puts the score in the units of an image reward
it is mixed with. The built-in one is trained on the world's renders (engine.world.motion_reward, ``python -m
engine.world.build motion-reward``) and ships as ``engine/assets/world-motion.safetensors``."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from engine.assets import MOTION_REWARD_FILE
from engine.errors import UserError
from engine.rewards.base import ClipReward

WIDTH = 16
ARCHITECTURE = "path"  # saved with the weights: files of the pooled 3D-convolution reward before it do not load
EPSILON = 0.05  # pixels: rho's smoothing, so that its gradient stays finite at a perfect path
SPEED_FLOOR = 0.1  # pixels per frame: keeps the relative shake of a frozen path finite


def caption_words(caption: str) -> list[str]:
    return re.findall(r"[a-z]+", caption.lower())


def rho(steps: torch.Tensor) -> torch.Tensor:
    """Smoothed length of each step [..., 2]."""
    return (steps.pow(2).sum(-1) + EPSILON ** 2).sqrt()


class MotionReward(ClipReward):
    """score(clip, caption) = (b - w_v mean_t rho(v_t - u) - w_a mean_t rho(a_t) rho(u) / (mean_t rho(v_t) +
    floor)) / scale: v_t the steps of the object's path as the locator reads it, a_t their changes, u the caption's
    velocity."""

    name = "motion"

    def __init__(self, vocabulary: list[str], width: int = WIDTH, scale: float = 1.0):
        super().__init__()
        self.vocabulary, self.index = list(vocabulary), {w: i for i, w in enumerate(vocabulary)}
        self.scale = scale
        self.locator = nn.Sequential(  # each pixel against the frame's background (its border's mean colour)
            nn.Conv2d(6, width, 3, padding=1), nn.GELU(), nn.Conv2d(width, width, 1), nn.GELU(), nn.Conv2d(width, 1, 1))
        self.velocity = nn.EmbeddingBag(len(vocabulary), 2, mode="sum")  # each word's share of the velocity
        nn.init.zeros_(self.velocity.weight)
        self.costs = nn.Parameter(torch.zeros(2))  # softplus: the weights of the velocity and acceleration terms
        self.bias = nn.Parameter(torch.zeros(()))

    def caption_velocity(self, prompts: list[str]) -> torch.Tensor:
        """The velocity [B, 2] (pixels per frame, x right, y down) each caption asks for."""
        ids = [[self.index[w] for w in caption_words(p) if w in self.index] or [0] for p in prompts]
        offsets = torch.tensor([0] + [len(i) for i in ids[:-1]]).cumsum(0)
        device = self.velocity.weight.device
        flat = torch.tensor([i for caption in ids for i in caption], device=device)
        return self.velocity(flat, offsets.to(device))

    def paths(self, clips: torch.Tensor) -> torch.Tensor:
        """The object's centre [B, T, 2] (x, y in pixels, pixel centres at +0.5) in each frame of ``clips``."""
        b, t, _, h, w = clips.shape
        frames = clips.flatten(0, 1).to(self.velocity.weight.dtype)
        border = torch.cat([frames[..., 0, :], frames[..., -1, :], frames[..., 1:-1, 0], frames[..., 1:-1, -1]], -1)
        objectness = self.locator(torch.cat([frames, frames - border.mean(-1)[..., None, None]], 1) * 2).float().sigmoid()
        weights = objectness[:, 0]  # each pixel's share at most one: moving the centre takes moving the object
        xs = torch.arange(w, device=clips.device, dtype=weights.dtype) + 0.5
        ys = torch.arange(h, device=clips.device, dtype=weights.dtype) + 0.5
        total = weights.sum((1, 2)) + 1.0  # and one pixel's weight at the frame's centre, where nothing stands out
        centre = torch.stack([(weights.sum(1) * xs).sum(1) + w / 2, (weights.sum(2) * ys).sum(1) + h / 2], 1) / total[:, None]
        return centre.view(b, t, 2)

    def logits(self, clips: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        steps, velocity = self.paths(clips).diff(dim=1), self.caption_velocity(prompts).float()
        velocity_cost = rho(steps - velocity[:, None]).mean(1)
        # shake relative to the path's own speed (in the caption's units): a path shrunk towards a fixed point (the
        # background read as a little object) shakes less in pixels, not relative to its travel
        shake_cost = rho(steps.diff(dim=1)).mean(1) * rho(velocity) / (rho(steps).mean(1) + SPEED_FLOOR)
        weights = F.softplus(self.costs)
        return self.bias - weights[0] * velocity_cost - weights[1] * shake_cost

    def forward(self, clips: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return self.logits(clips, prompts).float() / self.scale

    def save(self, path: Path) -> None:
        from safetensors.torch import save_file

        save_file({k: v.detach().contiguous() for k, v in self.state_dict().items()}, str(path),
                  metadata={"vocabulary": json.dumps(self.vocabulary), "width": str(self.locator[0].out_channels),
                            "scale": repr(self.scale), "architecture": ARCHITECTURE})

    @classmethod
    def from_file(cls, path: str | Path) -> MotionReward:
        from safetensors import safe_open
        from safetensors.torch import load_file

        path = Path(path)
        if not path.is_file():
            raise UserError(f"motion reward {path} does not exist; python -m engine.world.build motion-reward makes one")
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {}
        if "vocabulary" not in metadata:
            raise UserError(f"{path} is not a world motion reward (no vocabulary in its metadata)")
        if metadata.get("architecture") != ARCHITECTURE or "scale" not in metadata:
            raise UserError(f"{path} is a motion reward from before it read object paths; python -m engine.world.build "
                            "motion-reward makes a current one")
        reward = cls(json.loads(metadata["vocabulary"]), int(metadata.get("width", WIDTH)), float(metadata["scale"]))
        reward.load_state_dict(load_file(str(path)))
        return reward.requires_grad_(False).eval()

    @classmethod
    def from_spec(cls, path: str) -> MotionReward:
        """``motion:PATH``; ``motion:world`` is the built-in world model's (engine.assets.MOTION_REWARD_FILE)."""
        return cls.from_file(MOTION_REWARD_FILE if path == "world" else path)
