"""What the CLIP-based rewards share: differentiable CLIP preprocessing, reading and checking checkpoint files,
the open_clip configs the engine ships, and the small helpers their loaders use (spec paths, error lines)."""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F

from engine.assets import OPEN_CLIP_CONFIGS
from engine.errors import UserError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_preprocess(images: torch.Tensor, size: int, fit: str = "crop", offset: str = "floor") -> torch.Tensor:
    """Differentiable CLIP preprocessing of images [N, 3, H, W] in [0, 1] (clamped) as each reward's authors do it,
    then normalised. Resizing is bicubic and antialiased (PIL's and torchvision's kernel, also when enlarging):

    - ``crop``: the short side resized to ``size`` (the long one to ``int(size * long / short)``), centre-cropped
      at ``offset`` ``floor`` (transformers' CLIPProcessor: PickScore) or ``round`` (torchvision's CenterCrop:
      open_clip's validation transform, the aesthetic predictor's);
    - ``pad``: the long side resized to ``size``, padded to a square with black around the centre (HPSv2's
      ``ResizeMaxSize``: its validation transform with ``light_augmentation=True``)."""
    images = images.float().clamp(0, 1)
    h, w = images.shape[-2:]
    if fit == "pad":
        scale = size / max(h, w)
        new_h, new_w = round(h * scale), round(w * scale)
        if scale != 1:
            images = F.interpolate(images, size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=True)
        pad_h, pad_w = size - new_h, size - new_w
        images = F.pad(images, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
    elif fit == "crop":
        new_h, new_w = (size, int(size * w / h)) if h <= w else (int(size * h / w), size)
        if (new_h, new_w) != (h, w):
            images = F.interpolate(images, size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=True)
        centre = (lambda n: (n - size) // 2) if offset == "floor" else (lambda n: int(round((n - size) / 2.0)))
        top, left = centre(new_h), centre(new_w)
        images = images[..., top:top + size, left:left + size]
    else:
        raise ValueError(f"fit must be 'crop' or 'pad', got {fit!r}")
    mean = images.new_tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = images.new_tensor(CLIP_STD).view(1, 3, 1, 1)
    return (images - mean) / std


def read_checkpoint(path: str | Path, what: str) -> tuple[dict[str, torch.Tensor], dict]:
    """A state dict from .safetensors or a torch file (a plain state dict or one under 'state_dict'), and the
    file's other entries (e.g. 'architecture') when it has them."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{what} checkpoint {p} does not exist; pass the path of the weights file")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file
            return load_file(str(p)), {}
        data = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(f"{what} checkpoint {p} cannot be read ({reason}); check the file is a complete torch or safetensors state dict") from None
    extras = {}
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        extras = {k: v for k, v in data.items() if k != "state_dict"}
        data = data["state_dict"]
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise UserError(f"{what} checkpoint {p} holds no state dict; expected tensors by name, or a dict with 'state_dict'")
    return data, extras


def load_state_dict_file(path: str | Path, what: str) -> dict[str, torch.Tensor]:
    """The state dict of ``read_checkpoint``, without the file's other entries."""
    return read_checkpoint(path, what)[0]


def register_open_clip_configs() -> None:
    """Let open_clip build the architectures whose configs the engine ships (idempotent)."""
    import open_clip
    from open_clip import factory

    if OPEN_CLIP_CONFIGS not in factory._MODEL_CONFIG_PATHS:
        open_clip.add_model_config(OPEN_CLIP_CONFIGS)


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


@contextmanager
def no_pretrained_warning():
    """open_clip logs "No pretrained weights loaded" for every pretrained=None build; here the weights come next."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


def split_paths(spec: str, what: str, usage: str) -> list[str]:
    """A reward spec's PATH split at ';' into its parts (``FIRST;SECOND``); an empty part is an error."""
    parts = [p.strip() for p in spec.split(";")]
    if not all(parts):
        raise UserError(f"{what} path {spec!r} has an empty part; use {usage}")
    return parts

