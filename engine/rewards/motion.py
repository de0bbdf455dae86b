"""A small text-conditioned motion reward for whole clips (a ``ClipReward``): how closely a clip moves as its caption
asks, read as a translation between consecutive frames. For frames f_t, f_{t+1} (mean removed) with spectra X_t,
X_{t+1}, the caption asks for the velocity u (pixels per frame, a learned vector per caption word); the residual
R_t = sum_k |X_{t+1} - X_t exp(-i k.u)|^2 is the energy that did not move by u, and its share of the frames' edge
energy E_t = sum_k |X|^2 |k|^2 (the mean over the pair) is a displacement error:

    d_t^2 = (2 R_t + eps u.u) / (min(E_t, E_ref) + eps)

which for a small error delta is |delta|^2 whatever the object's size, blur or contrast as long as E_t stays under
the cap (a clip with more edge energy than the caption's clean render reads (E_t / E_ref) |delta|^2), and for a clip
in which nothing visible moves is u.u, as if frozen. score = (b - w mean_t sqrt(d_t^2 + rho^2)) / scale.

It reads where the whole picture moves rather than a feature of it: an object frozen, jittered, drifting the wrong way
or static clutter leaves a residual, while brightening or darkening the background changes only the mean, and
blurring or fading the object scales R and E alike. Content that moves by u adds to E and nothing to R, so an
uncapped ratio would reward painting more of it (halos, rings, edges: what fine-tuning against it alone did); E_ref
caps E at the edge energy of the caption's clean render, predicted from its words as
exp(edge length) |object colour - background colour|^2 (each a learned sum over the words). Learned from the world's
clips: the words' velocities and the calibration ``w``, ``b`` by ranking, the reference by regression on clean
renders. ``scale`` (saved with the weights) makes its gradient in pixels as large as an image reward's it is mixed
with. The built-in one is trained on the world's renders (engine.world.motion_reward, ``python -m engine.world.build
motion-reward``) and ships as ``engine/assets/world-motion.safetensors``."""

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

ARCHITECTURE = "translation-residual"  # saved with the weights: files of earlier designs do not load
FAINT = 0.1     # spectral energy (orthonormal FFT, pixel units) below which a frame pair counts as showing nothing
SMOOTHING = 0.05  # pixels: keeps the gradient of a perfect frame pair's error finite


def caption_words(caption: str) -> list[str]:
    return re.findall(r"[a-z]+", caption.lower())


def _spectra(clips: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The frames' spectra [B, T, C, H, W] (mean removed, orthonormal) and their wavenumbers ky [H, 1], kx [1, W]."""
    frames = clips.float()
    h, w = frames.shape[-2:]
    ky = torch.fft.fftfreq(h, device=frames.device).view(h, 1) * 2 * math.pi
    kx = torch.fft.fftfreq(w, device=frames.device).view(1, w) * 2 * math.pi
    return torch.fft.fft2(frames - frames.mean((-1, -2), keepdim=True), norm="ortho"), ky, kx


def _edge_energy(spectra: torch.Tensor, ky: torch.Tensor, kx: torch.Tensor) -> torch.Tensor:
    return (spectra.abs().pow(2) * (kx ** 2 + ky ** 2)).sum((-3, -2, -1))


def edge_energy(clips: torch.Tensor) -> torch.Tensor:
    """Each frame's edge energy sum_k |X|^2 |k|^2 [B, T] of ``clips`` [B, T, C, H, W]: what E_ref predicts."""
    return _edge_energy(*_spectra(clips))


def displacement_errors(clips: torch.Tensor, velocity: torch.Tensor,
                        reference_energy: torch.Tensor | None = None) -> torch.Tensor:
    """Squared displacement error d_t^2 [B, T-1] (pixels^2) of each consecutive frame pair of ``clips`` [B, T, C, H,
    W] against a translation by ``velocity`` [B, 2] (x right, y down, pixels per frame), the pair's edge energy
    capped at ``reference_energy`` [B] if given; see the module docstring."""
    spectra, ky, kx = _spectra(clips)
    u = velocity.float()
    moved = torch.polar(torch.ones_like(kx * u[:, :1, None]), -(kx * u[:, :1, None] + ky * u[:, 1:, None]))
    residual = (spectra[:, 1:] - spectra[:, :-1] * moved[:, None, None]).abs().pow(2).sum((-3, -2, -1))
    power = _edge_energy(spectra, ky, kx)
    energy = (power[:, 1:] + power[:, :-1]) / 2
    if reference_energy is not None:
        energy = torch.minimum(energy, reference_energy[:, None])
    return (2 * residual + FAINT * u.pow(2).sum(-1, keepdim=True)) / (energy + FAINT)


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
        # E_ref = exp(edge length) |object colour - background colour|^2, each a sum over the caption's words; fitted
        # on clean renders (``fit_reference``), until then E is not capped
        self.edge_length = nn.EmbeddingBag(len(vocabulary), 1, mode="sum")
        self.object_colour = nn.EmbeddingBag(len(vocabulary), 3, mode="sum")
        self.background_colour = nn.EmbeddingBag(len(vocabulary), 3, mode="sum")
        self.register_buffer("has_reference", torch.tensor(False))

    def _words(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """The captions' word indices, flat, and where each caption's begin (EmbeddingBag's input)."""
        ids = [[self.index[w] for w in caption_words(p) if w in self.index] or [0] for p in prompts]
        device = self.velocity.weight.device
        offsets = torch.tensor([0] + [len(i) for i in ids[:-1]]).cumsum(0)
        return torch.tensor([i for caption in ids for i in caption], device=device), offsets.to(device)

    def caption_velocity(self, prompts: list[str]) -> torch.Tensor:
        """The velocity [B, 2] (pixels per frame, x right, y down) each caption asks for."""
        return self.velocity(*self._words(prompts))

    def predicted_energy(self, prompts: list[str]) -> torch.Tensor:
        """E_ref [B]: the edge energy of each caption's clean render, as its words predict it."""
        words = self._words(prompts)
        contrast = (self.object_colour(*words) - self.background_colour(*words)).pow(2).sum(-1)
        return self.edge_length(*words)[:, 0].exp() * contrast

    def fit_reference(self, prompts: list[str], energy: torch.Tensor, steps: int = 3000, seed: int = 0) -> None:
        """Fit E_ref to the measured edge ``energy`` [B] of the clean renders of ``prompts`` (log-squared error,
        from a seeded start), then freeze it and cap E with it."""
        generator = torch.Generator().manual_seed(seed)
        parameters = [m.weight for m in (self.edge_length, self.object_colour, self.background_colour)]
        with torch.no_grad():
            for p in parameters:
                p.copy_(0.1 * torch.randn(p.shape, generator=generator)).requires_grad_(True)
        optimizer = torch.optim.Adam(parameters, lr=0.03)
        target = energy.detach().float().log().to(parameters[0].device)
        for _ in range(steps):
            loss = (self.predicted_energy(prompts).log() - target).pow(2).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        for p in parameters:
            p.requires_grad_(False)
        self.has_reference.fill_(True)

    def reference_energy(self, prompts: list[str]) -> torch.Tensor | None:
        """The cap E_ref [B] on each caption's edge energy, or None before ``fit_reference``."""
        return self.predicted_energy(prompts) if bool(self.has_reference) else None

    def logits(self, clips: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        errors = displacement_errors(clips, self.caption_velocity(prompts), self.reference_energy(prompts))
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
            raise UserError(f"{path} is a motion reward of an earlier design ({metadata.get('architecture', 'pooled')}); "
                            "python -m engine.world.build motion-reward makes a current one")
        reward = cls(json.loads(metadata["vocabulary"]), float(metadata["scale"]))
        reward.load_state_dict(load_file(str(path)))
        return reward.requires_grad_(False).eval()

    @classmethod
    def from_spec(cls, path: str) -> MotionReward:
        """``motion:PATH``; ``motion:world`` is the built-in world model's (engine.assets.MOTION_REWARD_FILE)."""
        return cls.from_file(MOTION_REWARD_FILE if path == "world" else path)
