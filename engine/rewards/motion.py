"""A small text-conditioned motion reward for whole clips (a ``ClipReward``): how closely a clip moves as its caption
asks, read as a translation between consecutive frames. For frames f_t, f_{t+1} (mean removed) with spectra X_t,
X_{t+1} and cross-power C = sum_channels X_{t+1} conj(X_t), a translation by v gives C(k) = |C(k)| exp(-i k.v); the
caption asks for the velocity u (pixels per frame, a learned vector per caption word). The phase left after
undoing u measures the displacement error:

    d_t^2 = (4 sum_k |C| (1 - cos(arg C + k.u)) + eps u.u) / (sum_k |C| |k|^2 + eps)

which for a small error delta is |delta|^2 (the |k|^2 weights make it so, whatever the object's size, blur or
contrast), and for a clip in which nothing visible moves is u.u, as if frozen.
score = (b - w mean_t sqrt(d_t^2 + rho^2)) / scale.

It reads where the whole picture moves rather than a feature of it: an object frozen, jittered, drifting the wrong way
or static clutter adds phase error, while brightening or darkening the background (which moved the centre of mass
of a learned objectness in a path-reading reward, a fault that fine-tuning learned to exploit) changes only the
mean, and blurring or fading the object changes the weights, not the phases. Learned from the world's clips: the
caption words' velocities and the calibration ``w``, ``b``. ``scale`` (saved with the weights) makes its gradient in
pixels as large as an image reward's it is mixed with. The built-in one is trained on the world's renders
(engine.world.motion_reward, ``python -m engine.world.build motion-reward``) and ships as
``engine/assets/world-motion.safetensors``."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from engine.assets import MOTION_REWARD_FILE
from engine.errors import UserError
from engine.rewards.base import ClipReward

ARCHITECTURE = "translation"  # saved with the weights: files of the earlier pooled 3D-convolution reward do not load
FAINT = 0.1     # spectral energy (orthonormal FFT, pixel units) below which a frame pair counts as showing nothing
SMOOTHING = 0.05  # pixels: keeps the gradient of a perfect frame pair's error finite


def caption_words(caption: str) -> list[str]:
    return re.findall(r"[a-z]+", caption.lower())


def displacement_errors(clips: torch.Tensor, velocity: torch.Tensor) -> torch.Tensor:
    """Squared displacement error d_t^2 [B, T-1] (pixels^2) of each consecutive frame pair of ``clips`` [B, T, C, H,
    W] against a translation by ``velocity`` [B, 2] (x right, y down, pixels per frame); see the module docstring."""
    frames = clips.float()
    spectra = torch.fft.fft2(frames - frames.mean((-1, -2), keepdim=True), norm="ortho")
    cross = (spectra[:, 1:] * spectra[:, :-1].conj()).sum(2)  # [B, T-1, H, W]
    h, w = frames.shape[-2:]
    ky = torch.fft.fftfreq(h, device=frames.device).view(h, 1) * 2 * math.pi
    kx = torch.fft.fftfreq(w, device=frames.device).view(1, w) * 2 * math.pi
    u = velocity.float()[:, None, None, None]  # [B, 1, 1, 1, 2]
    undone = cross * torch.polar(torch.ones_like(kx * u[..., 0]), kx * u[..., 0] + ky * u[..., 1])
    magnitude = cross.abs()
    error = (magnitude - undone.real).sum((-1, -2)).clamp(min=0)
    energy = (magnitude * (kx ** 2 + ky ** 2)).sum((-1, -2))
    return (4 * error + FAINT * velocity.float().pow(2).sum(-1, keepdim=True)) / (energy + FAINT)


class MotionReward(ClipReward):
    """score(clip, caption) = (b - w mean_t sqrt(d_t^2 + rho^2)) / scale: d_t the displacement error of frame pair t
    against the caption's velocity (``displacement_errors``)."""

    name = "motion"

    def __init__(self, vocabulary: list[str], scale: float = 1.0):
        super().__init__()
        self.vocabulary, self.index = list(vocabulary), {w: i for i, w in enumerate(vocabulary)}
        self.scale = scale
        self.velocity = nn.EmbeddingBag(len(vocabulary), 2, mode="sum")  # each word's share of the velocity
        nn.init.zeros_(self.velocity.weight)
        self.cost = nn.Parameter(torch.zeros(()))  # softplus: w
        self.bias = nn.Parameter(torch.zeros(()))

    def caption_velocity(self, prompts: list[str]) -> torch.Tensor:
        """The velocity [B, 2] (pixels per frame, x right, y down) each caption asks for."""
        ids = [[self.index[w] for w in caption_words(p) if w in self.index] or [0] for p in prompts]
        offsets = torch.tensor([0] + [len(i) for i in ids[:-1]]).cumsum(0)
        device = self.velocity.weight.device
        flat = torch.tensor([i for caption in ids for i in caption], device=device)
        return self.velocity(flat, offsets.to(device))

    def logits(self, clips: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        errors = displacement_errors(clips, self.caption_velocity(prompts))
        return self.bias - F.softplus(self.cost) * (errors + SMOOTHING ** 2).sqrt().mean(1)

    def forward(self, clips: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return self.logits(clips, prompts).float() / self.scale

    def save(self, path: Path) -> None:
        from safetensors.torch import save_file

        save_file({k: v.detach().contiguous() for k, v in self.state_dict().items()}, str(path),
                  metadata={"vocabulary": json.dumps(self.vocabulary), "scale": repr(self.scale),
                            "architecture": ARCHITECTURE})

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
            raise UserError(f"{path} is a motion reward from before it read translations; python -m engine.world.build "
                            "motion-reward makes a current one")
        reward = cls(json.loads(metadata["vocabulary"]), float(metadata["scale"]))
        reward.load_state_dict(load_file(str(path)))
        return reward.requires_grad_(False).eval()

    @classmethod
    def from_spec(cls, path: str) -> MotionReward:
        """``motion:PATH``; ``motion:world`` is the built-in world model's (engine.assets.MOTION_REWARD_FILE)."""
        return cls.from_file(MOTION_REWARD_FILE if path == "world" else path)
