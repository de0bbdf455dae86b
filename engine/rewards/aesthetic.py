"""The LAION aesthetic reward: its MLP head on OpenAI CLIP ViT-L/14 image embeddings, loaded from local files
(``aesthetic:CLIP_FILE;HEAD_FILE`` or a folder holding both)."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from engine.errors import UserError, first_line
from engine.rewards.base import Reward
from engine.rewards.clip import check_state_dict, clip_preprocess, load_state_dict_file, split_paths


class AestheticHead(nn.Module):
    """The LAION improved-aesthetic-predictor MLP (``sac+logos+ava1-l14-linearMSE.pth``): five linear layers and
    no activations; the indices of ``layers`` match the released state dict (layers.0, .2, .4, .6, .7)."""

    def __init__(self, embed_dim: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(embed_dim, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1),
        )

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        return self.layers(embedding)


# Buffers in OpenAI's TorchScript CLIP files that are not weights (open_clip drops them the same way).
_OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")
AESTHETIC_HEAD_FILE = "sac+logos+ava1-l14-linearMSE.pth"
AESTHETIC_CLIP_FILES = ("ViT-L-14.pt", "open_clip_model.safetensors", "open_clip_pytorch_model.bin")


def load_clip_weights(path: str | Path, what: str) -> dict[str, torch.Tensor]:
    """A CLIP state dict from OpenAI's TorchScript archive (``clip`` package cache) or a plain state dict."""
    import zipfile

    p = Path(path)
    if p.is_file() and zipfile.is_zipfile(p):
        with zipfile.ZipFile(p) as archive:
            torchscript = any(name.split("/", 1)[-1] == "constants.pkl" for name in archive.namelist())
        if torchscript:  # torch.load(weights_only=True) refuses TorchScript; jit.load runs no Python code
            try:
                with warnings.catch_warnings():  # torch.jit.load is deprecated, but OpenAI's files are TorchScript
                    warnings.simplefilter("ignore", FutureWarning)
                    state = torch.jit.load(str(p), map_location="cpu").state_dict()
            except Exception as err:
                raise UserError(f"{what} checkpoint {p} is a TorchScript archive that cannot be read "
                                f"({first_line(err)}); re-download it") from None
            return {k: v.float() for k, v in state.items() if k not in _OPENAI_EXTRA_KEYS}
    state = load_state_dict_file(p, what)
    return {k.removeprefix("module."): v.float() for k, v in state.items() if k not in _OPENAI_EXTRA_KEYS}


class AestheticReward(Reward):
    """LAION improved aesthetic predictor: MLP(normalise(CLIP ViT-L/14 image embedding)), prompt-blind.

    The CLIP tower is OpenAI's ViT-L/14 (QuickGELU), built with open_clip and loaded from a local file; the
    head is the released linear MLP. The score is the predicted 1-10 rating (most images land at 4-7).
    """

    name = "aesthetic"
    arch = "ViT-L-14"  # the open_clip architecture of the CLIP file (tests register a tiny one)

    def __init__(self, clip_checkpoint: str | Path, head_checkpoint: str | Path, arch: str | None = None):
        super().__init__()
        import open_clip

        arch = arch or self.arch
        state = load_clip_weights(clip_checkpoint, "aesthetic CLIP")
        try:
            expected = open_clip.create_model(arch, pretrained=None, device="meta", force_quick_gelu=True).state_dict()
        except RuntimeError as err:
            raise UserError(f"unknown open_clip architecture {arch!r} ({err}); the aesthetic head uses ViT-L-14") from None
        check_state_dict(state, expected, f"aesthetic CLIP checkpoint {clip_checkpoint}", f"open_clip {arch} (OpenAI CLIP)")
        self.clip = open_clip.create_model(arch, pretrained=None, force_quick_gelu=True)
        self.clip.load_state_dict(state, strict=True)
        self.clip.requires_grad_(False).eval()
        embed_dim = int(self.clip.visual.output_dim)
        head = load_state_dict_file(head_checkpoint, "aesthetic head")
        self.head = AestheticHead(embed_dim)
        check_state_dict(head, self.head.state_dict(), f"aesthetic head {head_checkpoint}",
                         f"the LAION linearMSE MLP on {embed_dim}-d CLIP embeddings")
        self.head.load_state_dict({k: v.float() for k, v in head.items()})
        self.head.requires_grad_(False).eval()
        size = self.clip.visual.image_size
        self.image_size = size[0] if isinstance(size, (tuple, list)) else int(size)

    @classmethod
    def from_spec(cls, path: str) -> "AestheticReward":
        usage = f"aesthetic:CLIP_FILE;HEAD_FILE or aesthetic:FOLDER (holding {AESTHETIC_CLIP_FILES[0]} and {AESTHETIC_HEAD_FILE})"
        parts = split_paths(path, "aesthetic", usage)
        if len(parts) == 2:
            return cls(*parts)
        if len(parts) > 2:
            raise UserError(f"aesthetic path {path!r} has {len(parts)} parts; use {usage}")
        folder = Path(parts[0])
        if not folder.is_dir():
            raise UserError(f"aesthetic folder {folder} does not exist (or is a file); use {usage}")
        clip = next((folder / n for n in AESTHETIC_CLIP_FILES if (folder / n).is_file()), None)
        if clip is None or not (folder / AESTHETIC_HEAD_FILE).is_file():
            missing = AESTHETIC_HEAD_FILE if clip is not None else " or ".join(AESTHETIC_CLIP_FILES)
            raise UserError(f"aesthetic folder {folder} lacks {missing}; use {usage}")
        return cls(clip, folder / AESTHETIC_HEAD_FILE)

    def forward(self, images, prompts):
        pixels = clip_preprocess(images, self.image_size, offset="round").to(next(self.clip.parameters()).dtype)
        embedding = F.normalize(self.clip.encode_image(pixels).float(), dim=-1)
        return self.head(embedding).squeeze(-1)
