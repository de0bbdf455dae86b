"""The PickScore reward: a transformers CLIPModel fine-tuned on Pick-a-Pic (``pickscore:MODEL_DIR[;PROCESSOR_DIR]``)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from engine.errors import UserError, first_line
from engine.rewards.base import Reward
from engine.rewards.clip import clip_preprocess, split_paths


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
            raise UserError(f"cannot load the PickScore CLIPModel from {model_dir} ({first_line(err)}); "
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
            raise UserError(f"cannot load a tokenizer from {tokenizer_dir} ({first_line(err)}){hint}") from None
        self.model.requires_grad_(False).eval()
        self.image_size = int(self.model.config.vision_config.image_size)
        self.max_length = int(self.model.config.text_config.max_position_embeddings)
        self._text_cache: dict[str, torch.Tensor] = {}

    @classmethod
    def from_spec(cls, path: str) -> "PickScoreReward":
        parts = split_paths(path, "pickscore", "pickscore:MODEL_DIR or pickscore:MODEL_DIR;PROCESSOR_DIR")
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
