"""Image rewards: a small interface, the built-in demonstration reward, HPSv2, and weighted sums.

A reward maps images [N, 3, H, W] in [0, 1] and N prompts to N scores, differentiably in the images.
Specs on the command line: ``NAME[:PATH][@WEIGHT]``, comma-separated to combine, e.g.
``hpsv2:/weights/HPS_v2.1_compressed.pt@1.0,colorfulness@0.1``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from engine.errors import UserError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


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


def clip_preprocess(images: torch.Tensor, size: int) -> torch.Tensor:
    """Differentiable CLIP preprocessing: clamp, resize the short side to ``size``, centre-crop, normalise."""
    images = images.float().clamp(0, 1)
    h, w = images.shape[-2:]
    scale = size / min(h, w)
    new_h, new_w = max(size, round(h * scale)), max(size, round(w * scale))
    images = F.interpolate(images, size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=scale < 1)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    images = images[..., top:top + size, left:left + size]
    mean = images.new_tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = images.new_tensor(CLIP_STD).view(1, 3, 1, 1)
    return (images - mean) / std


def load_state_dict_file(path: str | Path, what: str) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors or a torch file (a plain state dict or one under 'state_dict')."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{what} checkpoint {p} does not exist; pass the path of the weights file")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file
            return load_file(str(p))
        data = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(f"{what} checkpoint {p} cannot be read ({reason}); check the file is a complete torch or safetensors state dict") from None
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise UserError(f"{what} checkpoint {p} holds no state dict; expected tensors by name, or a dict with 'state_dict'")
    return data


def check_state_dict(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], what: str, target: str) -> None:
    """Names and shapes must match exactly; the error names the first difference."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or wrong:
        detail = (f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}" if unexpected else
                  f"{wrong[0]} has shape {tuple(state[wrong[0]].shape)}, expected {tuple(expected[wrong[0]].shape)}")
        raise UserError(f"{what} does not match {target} ({len(missing)} missing, {len(unexpected)} unexpected, "
                        f"{len(wrong)} mis-shaped weights; {detail}); pass a checkpoint of that architecture")


class HPSv2Reward(Reward):
    """HPSv2: OpenCLIP ViT-H-14 with an HPS_v2 / HPS_v2.1 checkpoint; score = cosine(image, text), no logit scale."""

    name = "hpsv2"

    def __init__(self, checkpoint: str | Path, arch: str = "ViT-H-14"):
        super().__init__()
        import open_clip

        state = load_state_dict_file(checkpoint, "HPSv2")
        state = {k.removeprefix("module."): v for k, v in state.items()}
        try:  # check names and shapes on the meta device first: a wrong file fails in a second, not after init
            expected = open_clip.create_model(arch, pretrained=None, device="meta").state_dict()
        except RuntimeError as err:
            raise UserError(f"unknown open_clip architecture {arch!r} ({err}); HPSv2 uses ViT-H-14") from None
        check_state_dict(state, expected, f"HPSv2 checkpoint {checkpoint}", f"open_clip {arch}")
        self.model = open_clip.create_model(arch, pretrained=None)
        self.model.load_state_dict(state, strict=True)
        self.model.requires_grad_(False).eval()
        self.tokenizer = open_clip.get_tokenizer(arch)
        size = self.model.visual.image_size
        self.image_size = size[0] if isinstance(size, (tuple, list)) else int(size)
        self._text_cache: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def text_features(self, prompts: list[str]) -> torch.Tensor:
        device = next(self.model.parameters()).device
        new = [p for p in dict.fromkeys(prompts) if p not in self._text_cache]
        if new:
            feats = F.normalize(self.model.encode_text(self.tokenizer(new).to(device)).float(), dim=-1)
            self._text_cache.update(zip(new, feats))
        return torch.stack([self._text_cache[p] for p in prompts])

    def forward(self, images, prompts):
        pixels = clip_preprocess(images, self.image_size).to(next(self.model.parameters()).dtype)
        image = F.normalize(self.model.encode_image(pixels).float(), dim=-1)
        return (image * self.text_features(prompts).to(image.device)).sum(-1)


class WeightedSum(Reward):
    """sum_j w_j r_j over component rewards: the combined reward the command line builds."""

    name = "weighted"

    def __init__(self, parts: list[tuple[Reward, float]]):
        super().__init__()
        self.parts = nn.ModuleList(r for r, _ in parts)
        self.weights = [w for _, w in parts]

    def forward(self, images, prompts):
        return sum(w * r(images, prompts) for r, w in zip(self.parts, self.weights))


# name -> (builder taking an optional path, needs a path)
REWARDS: dict[str, tuple[Callable[[str | None], Reward], bool]] = {
    "colorfulness": (lambda path: ColorfulnessReward(), False),
    "hpsv2": (lambda path: HPSv2Reward(path), True),
}


def register_reward(name: str, builder: Callable[[str | None], Reward], needs_path: bool = True) -> None:
    """Plug in another image reward under ``name`` for ``--reward name:PATH``."""
    REWARDS[name] = (builder, needs_path)


def build_reward(spec: str) -> Reward:
    """Parse ``NAME[:PATH][@WEIGHT],...`` into one reward (a WeightedSum when several or weighted)."""
    parts: list[tuple[Reward, float]] = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        item, _, weight_text = item.partition("@")
        name, _, path = item.partition(":")
        if name not in REWARDS:
            raise UserError(f"unknown reward {name!r}; choose from {', '.join(sorted(REWARDS))} (NAME[:PATH][@WEIGHT])")
        builder, needs_path = REWARDS[name]
        if needs_path and not path:
            raise UserError(f"reward {name!r} needs a weights file: --reward {name}:PATH")
        try:
            weight = float(weight_text) if weight_text else 1.0
        except ValueError:
            raise UserError(f"reward weight {weight_text!r} in {spec!r} is not a number; use NAME[:PATH]@0.5") from None
        parts.append((builder(path or None), weight))
    if not parts:
        raise UserError("--reward is empty; name at least one reward, e.g. --reward hpsv2:PATH")
    if len(parts) == 1 and parts[0][1] == 1.0:
        return parts[0][0]
    return WeightedSum(parts)
