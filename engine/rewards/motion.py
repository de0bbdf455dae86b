"""A small text-conditioned motion reward for whole clips (a ``ClipReward``): how surely a clip moves its object
the way the caption says, smoothly. A 3D convolution reads the clip, a bag of caption words (the vocabulary saved
with the weights) reads the caption; score = (v . (T t) + u . v + b) / scale, the logit of that classification.
Not its probability: trained clips are told apart by logits of 20 and more, where a sigmoid is 1 to float
precision and passes no gradient. ``scale`` (saved with the weights) puts the score in the units of an image
reward it is mixed with. The built-in one is trained on the world's renders (engine.world.motion_reward,
``python -m engine.world.build motion-reward``) and ships as ``engine/assets/world-motion.safetensors``."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import nn

from engine.assets import MOTION_REWARD_FILE
from engine.errors import UserError
from engine.rewards.base import ClipReward

WIDTH = 32


def caption_words(caption: str) -> list[str]:
    return re.findall(r"[a-z]+", caption.lower())


class MotionReward(ClipReward):
    """score(clip, caption) = (v . (T t) + u . v + b) / scale: v the clip's pooled 3D-convolution features, t the
    mean embedding of the caption's known words."""

    name = "motion"

    def __init__(self, vocabulary: list[str], width: int = WIDTH, scale: float = 1.0):
        super().__init__()
        self.vocabulary, self.index = list(vocabulary), {w: i for i, w in enumerate(vocabulary)}
        self.scale = scale
        self.video = nn.Sequential(
            nn.Conv3d(3, width // 2, (3, 5, 5), stride=(1, 2, 2), padding=(1, 2, 2)), nn.GELU(),
            nn.Conv3d(width // 2, width, 3, stride=(1, 2, 2), padding=1), nn.GELU(),
            nn.Conv3d(width, width, 3, stride=(1, 2, 2), padding=1), nn.GELU(),
            nn.Conv3d(width, width, 3, padding=1), nn.GELU())
        self.words = nn.EmbeddingBag(len(vocabulary), width, mode="mean")
        self.text = nn.Linear(width, width)
        self.smooth = nn.Linear(width, 1)

    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        ids = [[self.index[w] for w in caption_words(p) if w in self.index] or [0] for p in prompts]
        offsets = torch.tensor([0] + [len(i) for i in ids[:-1]]).cumsum(0)
        device = self.words.weight.device
        flat = torch.tensor([i for caption in ids for i in caption], device=device)
        return self.text(self.words(flat, offsets.to(device)))

    def logits(self, clips: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        features = self.video(clips.transpose(1, 2).to(self.words.weight.dtype) * 2 - 1).mean(dim=(2, 3, 4))
        return (features * self.encode_text(prompts)).sum(1) + self.smooth(features)[:, 0]

    def forward(self, clips: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return self.logits(clips, prompts).float() / self.scale

    def save(self, path: Path) -> None:
        from safetensors.torch import save_file

        save_file({k: v.detach().contiguous() for k, v in self.state_dict().items()}, str(path),
                  metadata={"vocabulary": json.dumps(self.vocabulary), "width": str(self.words.embedding_dim),
                            "scale": repr(self.scale)})

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
        if "scale" not in metadata:
            raise UserError(f"{path} is a motion reward from before its scores were calibrated (no scale in its "
                            "metadata); python -m engine.world.build motion-reward makes a current one")
        reward = cls(json.loads(metadata["vocabulary"]), int(metadata.get("width", WIDTH)), float(metadata["scale"]))
        reward.load_state_dict(load_file(str(path)))
        return reward.requires_grad_(False).eval()

    @classmethod
    def from_spec(cls, path: str) -> MotionReward:
        """``motion:PATH``; ``motion:world`` is the built-in world model's (engine.assets.MOTION_REWARD_FILE)."""
        return cls.from_file(MOTION_REWARD_FILE if path == "world" else path)
