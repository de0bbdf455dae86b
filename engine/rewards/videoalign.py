"""VideoAlign's VideoReward: Qwen2-VL-2B with a linear reward head that scores a clip's visual quality (VQ), motion
quality (MQ) and text alignment (TA), loaded from a local checkpoint folder in its released layout and
differentiable in the frames.

The released folder (the ``KwaiVGI/VideoReward`` model repository) holds ``model_config.json`` (the training
run's ``data_config``, ``model_config``, ``peft_lora_config`` and ``inference_config``) and ``checkpoint-N/``
folders, each either ``model.pth`` (a whole state dict) or ``adapter_model.safetensors`` (LoRA) with
``non_lora_state_dict.pth`` (every other trained weight), both in peft's naming. Qwen2-VL's own files (its
config, processor and the weights not trained) come from the base model folder ``model_config.model_name_or_path``
names, or one of that name inside the checkpoint folder; the prompt templates from the authors'
``prompt_template.py`` beside the checkpoint folder or inside it (the engine does not carry their text).

Scoring follows the authors' inference code step for step, in torch: frames sampled uniformly at the config's
``fps`` (or ``num_frames``), resized (bicubic, antialiased) to multiples of 28 within the pixel bounds, rescaled
and normalised with the processor's mean and std, cut into Qwen2-VL's temporal x spatial patches; the prompt built
from the template and the chat template; the reward head read at the three special tokens; each score normalised
with the inference config's mean and std; ``overall`` = VQ + MQ + TA.
"""

from __future__ import annotations

import ast
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from engine.errors import UserError
from engine.rewards.base import ClipReward

SCORES = ("vq", "mq", "ta", "overall")
SPECIAL_TOKENS = ("<|VQ_reward|>", "<|MQ_reward|>", "<|TA_reward|>")  # added by the authors' training code
TEMPLATES = {"detailed_special": "DETAILED_PROMPT_WITH_SPECIAL_TOKEN", "detailed": "DETAILED_PROMPT",
             "simple": "SIMPLE_PROMPT", "video_score": "VIDEOSCORE_QUERY_PROMPT"}  # template type -> name in the file
PATCH_FACTOR = 28  # patch 14 x spatial merge 2: frame sides are multiples of it
FRAME_FACTOR = 2  # temporal patch: frame counts are even
VIDEO_MIN_PIXELS = 128 * 28 * 28  # qwen-vl-utils' bound for a video frame, which the authors' reader keeps
MIN_FRAMES, MAX_FRAMES = 4, 768


def sampled_frame_count(total: int, video_fps: float, fps: float | None, num_frames: int | None = None) -> int:
    """How many frames the authors' reader samples from ``total`` frames at ``video_fps``: ``num_frames`` when
    given, else the clip's duration x ``fps``; at least 4 and even, at most ``total``."""
    if num_frames is not None:
        count = round(num_frames / FRAME_FACTOR) * FRAME_FACTOR
    else:
        lowest = math.ceil(MIN_FRAMES / FRAME_FACTOR) * FRAME_FACTOR
        highest = math.floor(min(MAX_FRAMES, total) / FRAME_FACTOR) * FRAME_FACTOR
        count = round(min(max(total / video_fps * fps, lowest), highest) / FRAME_FACTOR) * FRAME_FACTOR
    count = min(count, total)
    if count < FRAME_FACTOR:
        raise UserError(f"VideoAlign needs at least {FRAME_FACTOR} frames a clip; this clip has {total}")
    return count


def sampled_frame_indices(total: int, video_fps: float, fps: float | None, num_frames: int | None = None) -> torch.Tensor:
    """The frames the authors' reader samples (``sampled_frame_count`` of them), spread evenly over the clip."""
    return torch.linspace(0, total - 1, sampled_frame_count(total, video_fps, fps, num_frames)).round().long()


def smart_resize(height: int, width: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen2-VL's frame size: sides multiples of 28, the area within the bounds, the aspect kept as nearly as may."""
    h, w = max(PATCH_FACTOR, round(height / PATCH_FACTOR) * PATCH_FACTOR), max(PATCH_FACTOR, round(width / PATCH_FACTOR) * PATCH_FACTOR)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h, w = (math.floor(side / beta / PATCH_FACTOR) * PATCH_FACTOR for side in (height, width))
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = (math.ceil(side * beta / PATCH_FACTOR) * PATCH_FACTOR for side in (height, width))
    return h, w


def patchify(frames: torch.Tensor, temporal: int, patch: int, merge: int) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """Normalised frames [T, C, H, W] to Qwen2-VL's patch rows [t*h*w, C*temporal*patch*patch] in its order
    (merge windows contiguous) and the grid (t, h, w); an odd last frame is repeated, as the processor does."""
    if frames.shape[0] % temporal:
        frames = torch.cat([frames, frames[-1:].expand(temporal - frames.shape[0] % temporal, -1, -1, -1)])
    t, c, height, width = frames.shape
    grid = (t // temporal, height // patch, width // patch)
    x = frames.reshape(grid[0], temporal, c, grid[1] // merge, merge, patch, grid[2] // merge, merge, patch)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(grid[0] * grid[1] * grid[2], c * temporal * patch * patch), grid


def read_prompt(folder: Path, template: str, eval_dim) -> str:
    """The authors' prompt for ``template`` (``{text_prompt}`` left to fill), read as literals from their
    ``prompt_template.py`` in ``folder`` or its parent (not imported: nothing in it runs)."""
    if template == "none":
        return "{text_prompt}"
    if template not in TEMPLATES:
        raise UserError(f"VideoAlign prompt_template_type {template!r} is unknown; expected none or "
                        f"{', '.join(TEMPLATES)}")
    source = next((p for p in (folder / "prompt_template.py", folder.parent / "prompt_template.py") if p.is_file()), None)
    if source is None:
        raise UserError(f"VideoAlign needs its prompt templates: copy prompt_template.py from the VideoAlign "
                        f"repository into {folder}")
    literals = {}
    for node in ast.parse(source.read_text()).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                literals[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                continue
    if TEMPLATES[template] not in literals:
        raise UserError(f"{source} has no {TEMPLATES[template]}; use the prompt_template.py of VideoAlign's repository")
    text = literals[TEMPLATES[template]]
    if template in ("simple", "video_score"):  # the one or several dimensions scored, named as the authors name them
        names = literals.get("DIMENSION_DESCRIPTIONS", {})
        dims = [eval_dim] if isinstance(eval_dim, str) else list(eval_dim)
        if len(dims) > 1:
            name = f"overall performance({', '.join(names[d][0] for d in dims)})"
            description = "the overall performance of the video"
        else:
            name, description = names[dims[0]]
        text = text.replace("{dimension_name}", name).replace("{dimension_description}", description)
    return text


def latest_checkpoint(folder: Path) -> Path:
    """The ``checkpoint-N`` folder with the largest N, which the authors' loader takes by default."""
    found = sorted((p for p in folder.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()),
                   key=lambda p: int(p.name.split("-")[-1]))
    if not found:
        raise UserError(f"{folder} has no checkpoint-N folder; --reward videoalign:PATH needs the VideoReward "
                        "folder (model_config.json and checkpoint-N/)")
    return found[-1]


def plain_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys of a checkpoint (peft-wrapped or not, with or without ``modules_to_save``, transformers 4 or 5 naming)
    as ``Qwen2VLModel`` names them, the reward head as ``rm_head.weight``; the language-model head, unused, is
    dropped."""
    plain = {}
    for key, value in state.items():
        if ".original_module." in key:  # peft's frozen copy beside a trained ``modules_to_save`` module
            continue
        key = key.removeprefix("base_model.model.").replace(".base_layer.", ".").replace(".modules_to_save.default.", ".")
        if key.startswith(("model.language_model.", "model.visual.")):
            key = key.removeprefix("model.")
        elif key.startswith("model."):
            key = "language_model." + key.removeprefix("model.")
        if not key.startswith("lm_head."):
            plain[key] = value
    return plain


def merge_lora(state: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """Fold ``X.lora_A.weight`` / ``X.lora_B.weight`` pairs into ``X.weight`` (W + scale B A)."""
    merged = {k: v for k, v in state.items() if ".lora_" not in k}
    for key in [k for k in state if k.endswith(".lora_A.weight")]:
        module = key.removesuffix(".lora_A.weight")
        down, up = state[key].float(), state[f"{module}.lora_B.weight"].float()
        base = merged[f"{module}.weight"]
        merged[f"{module}.weight"] = (base.float() + scale * up @ down).to(base.dtype)
    return merged


def _weights_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


class VideoAlignReward(ClipReward):
    """VideoAlign's VideoReward: one of VQ, MQ, TA (normalised) or their sum ``overall`` per clip."""

    name = "videoalign"

    def __init__(self, model: nn.Module, head: nn.Linear, processor, prompt: str, data_config: dict,
                 normalisation: dict | None, score: str = "overall"):
        super().__init__()
        self.model, self.head, self.processor, self.prompt = model, head, processor, prompt
        self.fps, self.num_frames = data_config.get("fps"), data_config.get("num_frames")
        self.max_pixels = data_config.get("max_frame_pixels", 240 * 320)
        self.score, self.normalisation = score, normalisation
        tokenizer = processor.tokenizer
        self.special_ids = torch.tensor(tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS)))
        vision = processor.video_processor if hasattr(processor, "video_processor") else processor.image_processor
        self.register_buffer("mean", torch.tensor(vision.image_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(vision.image_std).view(1, 3, 1, 1), persistent=False)
        self.temporal, self.patch, self.merge = vision.temporal_patch_size, vision.patch_size, vision.merge_size
        self.requires_grad_(False).eval()

    @classmethod
    def from_folder(cls, path: str | Path, score: str = "overall") -> VideoAlignReward:
        from accelerate import init_empty_weights
        from safetensors.torch import load_file
        from transformers import AutoProcessor, Qwen2VLConfig, Qwen2VLModel

        if score not in SCORES:
            raise UserError(f"VideoAlign score {score!r} is unknown; choose one of {', '.join(SCORES)}")
        folder = Path(path)
        if not (folder / "model_config.json").is_file():
            raise UserError(f"{folder} has no model_config.json; --reward videoalign:PATH needs the VideoReward folder")
        configs = json.loads((folder / "model_config.json").read_text())
        data, model_config = configs["data_config"], configs["model_config"]
        lora, inference = configs.get("peft_lora_config", {}), configs.get("inference_config")
        if model_config.get("reward_token", "special") != "special" or not model_config.get("use_special_tokens", True):
            raise UserError(f"{folder}: only VideoReward's special-token head (reward_token 'special') is supported")
        named = Path(model_config["model_name_or_path"])
        base = next((p for p in (named, folder / named.name) if (p / "config.json").is_file()), None)
        if base is None:
            raise UserError(f"VideoAlign's base model {named} is not on this machine: put a copy of it (config, "
                            f"processor and weights) at {folder / named.name}")
        prompt = read_prompt(folder, data.get("prompt_template_type", "none"), data.get("eval_dim", "VQ"))
        processor = AutoProcessor.from_pretrained(base, padding_side="right")
        processor.tokenizer.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS)})

        checkpoint = latest_checkpoint(folder)
        if (checkpoint / "model.pth").is_file():
            state = plain_state_dict(torch.load(checkpoint / "model.pth", map_location="cpu", weights_only=True))
        else:
            state = {}
            for file in _weights_files(base):  # the weights training left frozen come from the base model
                state.update(plain_state_dict(load_file(file)))
            state.update(plain_state_dict(torch.load(checkpoint / "non_lora_state_dict.pth", map_location="cpu",
                                                     weights_only=True)))
            rank, alpha = lora.get("lora_r", 16), lora.get("lora_alpha", 32)
            scale = alpha / math.sqrt(rank) if lora.get("use_rslora") else alpha / rank
            state = merge_lora({**state, **plain_state_dict(load_file(checkpoint / "adapter_model.safetensors"))}, scale)
        head_weight = state.pop("rm_head.weight")
        config = Qwen2VLConfig.from_pretrained(base)
        config.text_config.vocab_size = state["language_model.embed_tokens.weight"].shape[0]  # resized for the tokens
        with init_empty_weights(include_buffers=False):  # weights come from the files; rotary tables are built
            model = Qwen2VLModel(config)
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
        if missing or unexpected:
            raise UserError(f"VideoAlign checkpoint {checkpoint} does not fit Qwen2-VL ({base}): missing "
                            f"{missing[:3]}, unexpected {unexpected[:3]}")
        head = nn.Linear(head_weight.shape[1], head_weight.shape[0], bias=False)
        head.weight.data = head_weight
        reward = cls(model, head, processor, prompt, data, inference, score)
        print(f"reward videoalign: Qwen2-VL from {base} with {checkpoint}, score {score}")
        return reward

    @classmethod
    def from_spec(cls, spec: str) -> VideoAlignReward:
        """``PATH[:vq|mq|ta|overall]``."""
        path, sep, score = spec.rpartition(":")
        if not sep or "/" in score or Path(spec).exists():
            path, score = spec, "overall"
        return cls.from_folder(path, score)

    def frame_indices(self, num_frames: int, fps: float) -> torch.Tensor:
        return sampled_frame_indices(num_frames, fps, self.fps, self.num_frames)

    def pixels(self, clip: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """One clip's frames [T, 3, H, W] in [0, 1] to patch rows and grid, as the authors' reader and the
        processor make them from 8-bit frames (here without rounding to 8 bits, so gradients pass)."""
        height, width = smart_resize(clip.shape[-2], clip.shape[-1], VIDEO_MIN_PIXELS, self.max_pixels)
        frames = F.interpolate(clip.float() * 255, size=(height, width), mode="bicubic", antialias=True,
                               align_corners=False).clamp(0, 255)  # bicubic overshoots; their 8-bit frames cannot
        frames = (frames / 255 - self.mean) / self.std
        return patchify(frames, self.temporal, self.patch, self.merge)

    def text_inputs(self, prompts: list[str], tokens: int) -> dict[str, torch.Tensor]:
        """Token ids of the chat (the video placeholder repeated once per merged patch, as the processor does),
        the attention mask and, where transformers asks for them, the tokens' modality types."""
        video = getattr(self.processor, "video_token", "<|video_pad|>")
        texts = [self.processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "video"},
                                          {"type": "text", "text": self.prompt.replace("{text_prompt}", p)}]}],
            tokenize=False, add_generation_prompt=True).replace(video, video * tokens) for p in prompts]
        batch = self.processor.tokenizer(texts, padding=True, return_tensors="pt")
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        if hasattr(self.processor, "create_mm_token_type_ids"):  # transformers 5
            inputs["mm_token_type_ids"] = torch.tensor(self.processor.create_mm_token_type_ids(batch["input_ids"].tolist()))
        return inputs

    def forward(self, clips: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        rows, grids = zip(*(self.pixels(clip) for clip in clips))
        tokens = math.prod(grids[0]) // self.merge ** 2
        return self.score_tokens(self.text_inputs(prompts, tokens), torch.cat(rows), torch.tensor(grids))

    def score_tokens(self, inputs: dict[str, torch.Tensor], rows: torch.Tensor, grids: torch.Tensor) -> torch.Tensor:
        """The model on token ids (``text_inputs``) and patch rows (``pixels``): the chosen score per clip."""
        device = self.head.weight.device
        inputs = {k: v.to(device) for k, v in inputs.items()}
        hidden = self.model(**inputs, pixel_values_videos=rows.to(device, self.head.weight.dtype),
                            video_grid_thw=grids.to(device)).last_hidden_state
        logits = self.head(hidden)  # [B, L, 3]
        where = torch.isin(inputs["input_ids"], self.special_ids.to(device))
        scores = logits[where].view(len(grids), 3, -1)  # [B, token, head output]
        # a head of 3 outputs reads output i at token i (the released one); a head of 1 reads its one output at each
        scores = (scores.diagonal(dim1=1, dim2=2) if scores.shape[2] == 3 else scores[..., 0]).float()  # VQ, MQ, TA
        if self.normalisation:
            stats = self.normalisation
            scores = (scores - torch.tensor([stats[f"{n}_mean"] for n in ("VQ", "MQ", "TA")], device=device)) \
                / torch.tensor([stats[f"{n}_std"] for n in ("VQ", "MQ", "TA")], device=device)
        return scores.sum(1) if self.score == "overall" else scores[:, SCORES.index(self.score)]
