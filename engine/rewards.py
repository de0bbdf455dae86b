"""Image rewards: a small interface, the built-in demonstration reward, HPSv2, PickScore, the LAION
aesthetic predictor, and weighted sums.

A reward maps images [N, 3, H, W] in [0, 1] and N prompts to N scores, differentiably in the images.
Specs on the command line: ``NAME[:PATH][@WEIGHT]``, comma-separated to combine, e.g.
``hpsv2:/weights/HPS_v2.1_compressed.pt@1.0,aesthetic:/weights/aesthetic@0.1``.
Where a reward needs two files, PATH is ``FIRST;SECOND`` (quote it in a shell) or a folder holding both.

| name         | PATH                                                             | score (typical range)           |
|--------------|------------------------------------------------------------------|---------------------------------|
| colorfulness | none                                                             | colourfulness, prompt-blind     |
| hpsv2        | HPS_v2_compressed.pt or HPS_v2.1_compressed.pt[;ARCH] (ARCH: open_clip name, default ViT-H-14 or the file's 'architecture'); `world`: the built-in reward | cosine(image, text), ~0.25-0.30 |
| pickscore    | MODEL_DIR[;PROCESSOR_DIR]: transformers CLIPModel folder (PickScore_v1) and, when that folder has no tokenizer files, the processor folder (CLIP-ViT-H-14-laion2B-s32B-b79K) | logit_scale * cosine, ~18-23 |
| aesthetic    | CLIP_FILE;HEAD_FILE or a folder with both: OpenAI CLIP ViT-L/14 (``ViT-L-14.pt`` from the ``clip`` package, a TorchScript archive, or an open_clip state dict such as ``open_clip_model.safetensors``) and the LAION head ``sac+logos+ava1-l14-linearMSE.pth`` | aesthetic rating, ~4-7 of 10 |

Scores on different scales can be combined with weights, e.g. ``hpsv2:A@1.0,pickscore:B@0.01``; the trainer's
loss is 1 - R, so only the gradient's direction and size matter, not the offset.

ImageReward is not included: its checkpoint is a BLIP model built from the ``image-reward`` package's own
BLIP/BERT classes (LAVIS-style ``med.py``), not a transformers or open_clip architecture, and its loader
fetches ``bert-base-uncased`` files from the hub at load time; a faithful local loader would mean porting
that model and mapping its keys without a real file to check against.
"""

from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager
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
    return read_checkpoint(path, what)[0]


# open_clip configs shipped with the engine (the built-in reward's WorldCLIP-XS)
OPEN_CLIP_CONFIGS = Path(__file__).parent / "assets"


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
def _no_pretrained_warning():
    """open_clip logs "No pretrained weights loaded" for every pretrained=None build; here the weights come next."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


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
            with _no_pretrained_warning():
                self.model = open_clip.create_model(arch, pretrained=None, device=device)
        else:
            state, extras = read_checkpoint(checkpoint, "HPSv2")
            arch = arch or str(extras.get("architecture", "ViT-H-14"))
            state = {k.removeprefix("module."): v for k, v in state.items()}
            try:  # check names and shapes on the meta device first: a wrong file fails in a second, not after init
                with _no_pretrained_warning():
                    expected = open_clip.create_model(arch, pretrained=None, device="meta").state_dict()
            except RuntimeError as err:
                raise UserError(f"unknown open_clip architecture {arch!r} ({err}); HPSv2 uses ViT-H-14") from None
            check_state_dict(state, expected, f"HPSv2 checkpoint {checkpoint}", f"open_clip {arch}")
            with _no_pretrained_warning():
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
        parts = _split_paths(path, "hpsv2", "hpsv2:PATH or hpsv2:PATH;ARCH")
        if len(parts) > 2:
            raise UserError(f"hpsv2 path {path!r} has {len(parts)} parts; use PATH[;ARCH]")
        if parts[0] == "world":  # the built-in reward, trained on engine.world (engine.world_assets)
            from engine.world_assets import REWARD_FILE

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
        pixels = clip_preprocess(images, self.image_size).to(next(self.model.parameters()).dtype)
        image = F.normalize(self.model.encode_image(pixels).float(), dim=-1)
        return (image * self.text_features(prompts).to(image.device)).sum(-1)


def _split_paths(spec: str, what: str, usage: str) -> list[str]:
    parts = [p.strip() for p in spec.split(";")]
    if not all(parts):
        raise UserError(f"{what} path {spec!r} has an empty part; use {usage}")
    return parts


class PickScoreReward(Reward):
    """PickScore (Kirstain et al. 2023): a CLIP ViT-H-14 fine-tuned on Pick-a-Pic, in transformers format.

    score = exp(logit_scale) * cosine(image embedding, text embedding), as the PickScore release computes it.
    ``model_dir`` is a ``CLIPModel`` folder (config.json + weights, e.g. ``yuvalkirstain/PickScore_v1``);
    the tokenizer is read from ``processor_dir`` (e.g. ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``) or, when
    that is not given, from ``model_dir`` itself. Images are preprocessed differentiably like
    ``CLIPImageProcessor``: shortest side to the model's image size (bicubic), centre crop, CLIP mean/std.
    """

    name = "pickscore"

    def __init__(self, model_dir: str | Path, processor_dir: str | Path | None = None):
        super().__init__()
        from transformers import AutoTokenizer, CLIPModel

        model_dir = Path(model_dir)
        tokenizer_dir = Path(processor_dir) if processor_dir else model_dir
        for folder, role in ((model_dir, "model"), (tokenizer_dir, "processor")):
            if not folder.is_dir():
                raise UserError(f"PickScore {role} folder {folder} does not exist; pass pickscore:MODEL_DIR[;PROCESSOR_DIR] "
                                "(transformers folders: PickScore_v1 and CLIP-ViT-H-14-laion2B-s32B-b79K)")
        if not (model_dir / "config.json").is_file():
            raise UserError(f"PickScore model folder {model_dir} has no config.json; pass the folder of a transformers "
                            "CLIPModel (e.g. a download of yuvalkirstain/PickScore_v1)")
        try:
            self.model = CLIPModel.from_pretrained(str(model_dir), local_files_only=True)
        except Exception as err:  # transformers raises OSError, ValueError, KeyError... for bad folders
            raise UserError(f"cannot load the PickScore CLIPModel from {model_dir} ({_first_line(err)}); "
                            "re-download the model folder") from None
        hint = "" if processor_dir else "; pass the processor folder too: pickscore:MODEL_DIR;PROCESSOR_DIR"
        # transformers 5 builds an empty tokenizer from a folder without vocabulary files: check first
        if not ((tokenizer_dir / "tokenizer.json").is_file() or
                ((tokenizer_dir / "vocab.json").is_file() and (tokenizer_dir / "merges.txt").is_file())):
            raise UserError(f"cannot load a tokenizer from {tokenizer_dir} (no tokenizer.json or vocab.json + "
                            f"merges.txt){hint}")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
        except Exception as err:
            raise UserError(f"cannot load a tokenizer from {tokenizer_dir} ({_first_line(err)}){hint}") from None
        self.model.requires_grad_(False).eval()
        self.image_size = int(self.model.config.vision_config.image_size)
        self.max_length = int(self.model.config.text_config.max_position_embeddings)
        self._text_cache: dict[str, torch.Tensor] = {}

    @classmethod
    def from_spec(cls, path: str) -> "PickScoreReward":
        parts = _split_paths(path, "pickscore", "pickscore:MODEL_DIR or pickscore:MODEL_DIR;PROCESSOR_DIR")
        if len(parts) > 2:
            raise UserError(f"pickscore path {path!r} has {len(parts)} parts; use MODEL_DIR[;PROCESSOR_DIR]")
        return cls(*parts)

    @torch.no_grad()
    def text_features(self, prompts: list[str]) -> torch.Tensor:
        device = next(self.model.parameters()).device
        new = [p for p in dict.fromkeys(prompts) if p not in self._text_cache]
        if new:
            tokens = self.tokenizer(new, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
            pooled = self.model.text_model(input_ids=tokens.input_ids.to(device),
                                           attention_mask=tokens.attention_mask.to(device)).pooler_output
            self._text_cache.update(zip(new, F.normalize(self.model.text_projection(pooled).float(), dim=-1)))
        return torch.stack([self._text_cache[p] for p in prompts])

    def forward(self, images, prompts):
        pixels = clip_preprocess(images, self.image_size).to(next(self.model.parameters()).dtype)
        pooled = self.model.vision_model(pixel_values=pixels).pooler_output
        image = F.normalize(self.model.visual_projection(pooled).float(), dim=-1)
        scale = self.model.logit_scale.exp().float()
        return scale * (image * self.text_features(prompts).to(image.device)).sum(-1)


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
                                f"({_first_line(err)}); re-download it") from None
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
        parts = _split_paths(path, "aesthetic", usage)
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
        pixels = clip_preprocess(images, self.image_size).to(next(self.clip.parameters()).dtype)
        embedding = F.normalize(self.clip.encode_image(pixels).float(), dim=-1)
        return self.head(embedding).squeeze(-1)


def _first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


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
    "hpsv2": (lambda path: HPSv2Reward.from_spec(path), True),
    "pickscore": (lambda path: PickScoreReward.from_spec(path), True),
    "aesthetic": (lambda path: AestheticReward.from_spec(path), True),
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
