"""The HPSv2 reward: an open_clip model with an HPS_v2 / HPS_v2.1 checkpoint (``hpsv2:PATH[;ARCH]``;
``hpsv2:world`` is the built-in reward, engine.assets.REWARD_FILE)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from engine.assets import REWARD_FILE
from engine.errors import UserError
from engine.rewards.base import Reward
from engine.rewards.clip import (check_state_dict, clip_preprocess, no_pretrained_warning, read_checkpoint,
                                 register_open_clip_configs, split_paths)


class HPSv2Reward(Reward):
    """HPSv2: an OpenCLIP model with an HPS_v2 / HPS_v2.1 checkpoint; score = cosine(image, text), no logit scale.

    The architecture is ViT-H-14 (the released files) unless the spec (``hpsv2:PATH;ARCH``) or the file's
    ``architecture`` entry names another open_clip model, such as the built-in reward's ``WorldCLIP-XS``."""

    name = "hpsv2"

    def __init__(self, checkpoint: str | Path | None, arch: str | None = None, device: str | torch.device = "cpu"):
        """``checkpoint=None`` builds the architecture with random weights (on ``device``, e.g. "meta" to count costs)."""
        super().__init__()
        import open_clip

        register_open_clip_configs()
        if checkpoint is None:
            arch = arch or "ViT-H-14"
            with no_pretrained_warning():
                self.model = open_clip.create_model(arch, pretrained=None, device=device)
        else:
            state, extras = read_checkpoint(checkpoint, "HPSv2")
            arch = arch or str(extras.get("architecture", "ViT-H-14"))
            state = {k.removeprefix("module."): v for k, v in state.items()}
            try:  # check names and shapes on the meta device first: a wrong file fails in a second, not after init
                with no_pretrained_warning():
                    expected = open_clip.create_model(arch, pretrained=None, device="meta").state_dict()
            except RuntimeError as err:
                raise UserError(f"unknown open_clip architecture {arch!r} ({err}); HPSv2 uses ViT-H-14") from None
            check_state_dict(state, expected, f"HPSv2 checkpoint {checkpoint}", f"open_clip {arch}")
            with no_pretrained_warning():
                self.model = open_clip.create_model(arch, pretrained=None)
            self.model.load_state_dict(state, strict=True)  # copies into the model's dtype (files may hold fp16)
            self.model.to(device)
        self.model.requires_grad_(False).eval()
        self.arch = arch
        self.tokenizer = open_clip.get_tokenizer(arch)
        size = self.model.visual.image_size
        self.image_size = size[0] if isinstance(size, (tuple, list)) else int(size)
        self._text_cache: dict[str, torch.Tensor] = {}

    @classmethod
    def from_spec(cls, path: str) -> "HPSv2Reward":
        parts = split_paths(path, "hpsv2", "hpsv2:PATH or hpsv2:PATH;ARCH")
        if len(parts) > 2:
            raise UserError(f"hpsv2 path {path!r} has {len(parts)} parts; use PATH[;ARCH]")
        if parts[0] == "world":  # the built-in reward, trained on engine.world (python -m engine.world.build)
            parts[0] = str(REWARD_FILE)
        reward = cls(*parts)
        # open_clip's "No pretrained weights loaded ... initialized randomly" is silenced: say what was loaded
        print(f"reward hpsv2: open_clip {reward.arch} with the weights of {parts[0]}")
        return reward

    @torch.no_grad()
    def text_features(self, prompts: list[str]) -> torch.Tensor:
        device = next(self.model.parameters()).device
        new = [p for p in dict.fromkeys(prompts) if p not in self._text_cache]
        if new:
            feats = F.normalize(self.model.encode_text(self.tokenizer(new).to(device)).float(), dim=-1)
            self._text_cache.update(zip(new, feats))
        return torch.stack([self._text_cache[p] for p in prompts])

    def forward(self, images, prompts):
        pixels = clip_preprocess(images, self.image_size, fit="pad").to(next(self.model.parameters()).dtype)
        image = F.normalize(self.model.encode_image(pixels).float(), dim=-1)
        return (image * self.text_features(prompts).to(image.device)).sum(-1)
