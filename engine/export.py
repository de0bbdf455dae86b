"""Export a trained LoRA for stock diffusers: ``python -m engine.export --lora FOLDER --output DIR``.

    python -m engine.export --model /weights/text-to-video-ms-1.7b --lora runs/my-run/lora --output export/
    python -m engine.export --lora runs/tiny/lora --output export/ --peft         # adapter only

Two forms, both by default:

``DIR/merged/``  a full pipeline folder of the model's family (``TextToVideoSDPipeline``, ``WanPipeline`` or
    ``CogVideoXPipeline``: model_index.json and its components) whose denoiser (unet/ or transformer/) has the
    LoRA merged in (W <- W + scale * alpha/r * B A on every adapted projection, then the peft wrappers removed).
    The stock pipeline's ``from_pretrained(DIR/merged)`` loads it; nothing beyond diffusers is needed.

``DIR/peft/``  the adapter in peft format (adapter_model.safetensors + adapter_config.json, ``--lora-scale``
    folded into lora_alpha) and a README with the peft calls that apply it to the stock pipeline's denoiser.
    For UNet3D, diffusers' ``pipe.load_lora_weights`` cannot be used: UNet3DConditionModel has no peft adapter mixin
    (diffusers 0.42 raises ``AttributeError: 'UNet3DConditionModel' object has no attribute
    'load_lora_adapter'``), and ``unet.load_attn_procs`` reads Custom Diffusion weights only.

``DIR/original/wan_lora.safetensors``  (``--original``, Wan only) the LoRA as one file in the original Wan 2.1
    checkpoint's names (``diffusion_model.blocks.0.self_attn.q.lora_down.weight``, ``.lora_up.weight`` and
    ``.alpha`` = strength x alpha/r x rank), the layout ComfyUI's LoRA loaders read; diffusers'
    ``WanPipeline.load_lora_weights`` reads it too, through its converter of non-diffusers Wan LoRAs.

Each gives the frames the engine's sampler gives with the LoRA (tests/test_export.py and tests/test_families.py
check this with the stock pipeline); the merged denoiser differs from the unmerged one by float rounding of W + dW.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from torch import nn

from engine.builtin import build_model, builtin
from engine.cli import HelpFormatter, check_model, check_output_folder
from engine.errors import UserError, cli_entry, disk_writes
from engine.lora import CONFIG_NAME, WEIGHTS_NAME, check_lora_folder, load_lora, lora_layers
from engine.models import VideoDiffusion, WanVideo, model_family
from engine.models.wan import original_module_name
from engine.runtime import resolve_device

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

PEFT_README = """# LoRA adapter (peft format)

Trained with InstructVideo reward fine-tuning for `{base}`{scale_note}. Apply it to the stock diffusers pipeline
with peft (the same calls for every family; diffusers' `load_lora_weights` does not support
`UNet3DConditionModel`):

```python
from diffusers import {pipeline}
from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
from safetensors.torch import load_file

pipe = {pipeline}.from_pretrained("{base}")
config = LoraConfig.from_pretrained("{folder}")
inject_adapter_in_model(config, pipe.{denoiser})
set_peft_model_state_dict(pipe.{denoiser}, load_file("{folder}/adapter_model.safetensors"))
pipe.to("cuda")
frames = pipe("a golden retriever playing in autumn leaves", num_inference_steps=20).frames
```

To change the strength afterwards, call `layer.set_scale("default", s)` on every
`peft.tuners.lora.LoraLayer` in `pipe.{denoiser}.modules()` (0 = base model, 1 = as exported).
To fold the adapter into the weights, call `layer.merge()` on each of those layers.
"""

MERGED_README = """# Merged {denoiser}

A full `{pipeline}` folder with the LoRA from `{lora}` merged into the {denoiser}{scale_note}. Stock diffusers:

```python
from diffusers import {pipeline}, {denoiser_class}

pipe = {pipeline}.from_pretrained("{folder}")
# or only the {denoiser}, into a pipeline of the base model:
{denoiser} = {denoiser_class}.from_pretrained("{folder}/{denoiser}")
```
"""


ORIGINAL_NAME = "wan_lora.safetensors"
ORIGINAL_README = """# Wan LoRA in the original checkpoint's names

`{name}` holds the LoRA from `{lora}`{scale_note} with the original Wan 2.1 key names
(`diffusion_model.<module>.lora_down.weight`, `.lora_up.weight`, `.alpha`). ComfyUI: copy it into
`ComfyUI/models/loras/` and apply it with a LoRA loader node to the Wan model. diffusers:

```python
from diffusers import WanPipeline

pipe = WanPipeline.from_pretrained("{base}")
pipe.load_lora_weights("{folder}/{name}")
```
"""


def _readme_names(model) -> dict[str, str]:
    return {"pipeline": model.pipeline_class, "denoiser": model.denoiser_name,
            "denoiser_class": type(model.denoiser).__name__}


def merge_lora(unet: nn.Module) -> int:
    """Fold every active LoRA adapter into its base layer and put the plain layer back; returns layers merged.

    Equivalent to peft's ``merge_and_unload``: W <- W + scaling * B A with the current scaling (set_scale).
    ``safe_merge`` checks the merged weights are finite before they replace the originals.
    """
    layers = set(lora_layers(unet))
    names = [name for name, module in unet.named_modules() if module in layers]
    for name in names:
        layer = unet.get_submodule(name)
        if layer.active_adapters and not layer.disable_adapters:
            layer.merge(safe_merge=True, adapter_names=list(layer.active_adapters))
        parent_name, _, child = name.rpartition(".")
        setattr(unet.get_submodule(parent_name) if parent_name else unet, child, layer.get_base_layer())
    if hasattr(unet, "peft_config"):  # set by inject_adapter_in_model; the plain model must not carry it
        del unet.peft_config
    return len(names)


def export_merged(model, lora: Path, scale: float, folder: Path, dtype: torch.dtype, named: Path | None = None) -> Path:
    """The merged pipeline written to ``folder``; its README names ``named`` (where it will live) or ``folder``."""
    load_lora(model.denoiser, lora, scale)
    merged = merge_lora(model.denoiser)
    if lora_layers(model.denoiser) or merged == 0:
        raise UserError(f"no LoRA layer of {lora} could be merged; check the adapter fits this model")
    if dtype != next(model.denoiser.parameters()).dtype:
        model.denoiser.to(dtype)
    model.save(folder)
    note = f" at scale {scale}" if scale != 1.0 else ""
    (folder / "README.md").write_text(MERGED_README.format(lora=lora, folder=named or folder, scale_note=note,
                                                           **_readme_names(model)))
    return folder


def export_peft(model, lora: Path, scale: float, folder: Path, base: str, named: Path | None = None) -> Path:
    """The peft adapter written to ``folder``; its README names ``named`` (where it will live) or ``folder``."""
    load_lora(model.denoiser, lora, 1.0)  # only to check the adapter fits the model
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(lora / WEIGHTS_NAME, folder / WEIGHTS_NAME)
    config = json.loads((lora / CONFIG_NAME).read_text())
    if scale != 1.0:  # peft's scaling is lora_alpha / r (or / sqrt(r)), so the strength folds into alpha exactly
        config["lora_alpha"] = config["lora_alpha"] * scale
        config["alpha_pattern"] = {k: v * scale for k, v in (config.get("alpha_pattern") or {}).items()}
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2))
    note = f" (strength {scale} folded into lora_alpha)" if scale != 1.0 else ""
    (folder / "README.md").write_text(PEFT_README.format(base=base, folder=named or folder, scale_note=note,
                                                         **_readme_names(model)))
    return folder


def original_lora(denoiser: nn.Module) -> dict[str, torch.Tensor]:
    """The active adapter of a Wan transformer in the original checkpoint's names; each layer's strength (peft's
    scaling, ``--lora-scale`` included) goes into its ``.alpha`` as scaling x rank, the convention of that format."""
    weights = {}
    from peft.tuners.lora import LoraLayer

    for name, layer in denoiser.named_modules():
        if not isinstance(layer, LoraLayer):
            continue
        adapter = layer.active_adapters[0]
        original = original_module_name(name)
        if original is None or layer.use_dora.get(adapter) or getattr(layer, "lora_bias", {}).get(adapter):
            raise UserError(f"the LoRA on {name} has no form in the original Wan checkpoint's names (a module it "
                            "lacks, or DoRA / a LoRA bias); export --peft or --merged instead")
        down, up = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
        key = f"diffusion_model.{original}"
        weights[f"{key}.lora_down.weight"] = down.detach().cpu().contiguous()
        weights[f"{key}.lora_up.weight"] = up.detach().cpu().contiguous()
        weights[f"{key}.alpha"] = torch.tensor(layer.scaling[adapter] * down.shape[0], dtype=down.dtype)
    return weights


def export_original(model, lora: Path, scale: float, folder: Path, base: str, named: Path | None = None) -> Path:
    """Wan only: ``original_lora`` written as one safetensors file in ``folder``, with a README."""
    from safetensors.torch import save_file

    load_lora(model.denoiser, lora, scale)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(original_lora(model.denoiser), str(folder / ORIGINAL_NAME), metadata={"format": "pt"})
    note = f" at strength {scale}" if scale != 1.0 else ""
    (folder / "README.md").write_text(ORIGINAL_README.format(name=ORIGINAL_NAME, lora=lora, scale_note=note, base=base,
                                                             folder=named or folder))
    return folder


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--model", default="world", help="the base model: diffusers text-to-video folder, 'world' or 'tiny'")
    parser.add_argument("--lora", required=True, help="LoRA folder (adapter_model.safetensors + adapter_config.json)")
    parser.add_argument("--lora-scale", type=float, default=1.0, help="strength baked into the export")
    parser.add_argument("--output", required=True, help="export folder (merged/, peft/ and original/ are written in it)")
    parser.add_argument("--merged", action="store_true", help="write the merged pipeline (default: both forms)")
    parser.add_argument("--peft", action="store_true", help="write the peft adapter (default: both forms)")
    parser.add_argument("--original", action="store_true",
                        help="Wan: write the LoRA in the original checkpoint's key names (ComfyUI; diffusers' "
                             "load_lora_weights)")
    parser.add_argument("--dtype", default="fp32", choices=tuple(DTYPES), help="weight dtype of the merged denoiser")
    parser.add_argument("--overwrite", action="store_true", help="replace merged/ or peft/ if they exist")
    parser.add_argument("--device", default="cpu", help="where to merge (cpu is enough: merging is one GEMM per layer)")
    return parser


@cli_entry
def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    lora = check_lora_folder(args.lora)
    check_model(args.model, "the base model's diffusers folder")
    out = check_output_folder(args.output)
    forms = [f for f in ("merged", "peft", "original") if getattr(args, f)] or ["merged", "peft"]
    taken = [f for f in forms if (out / f).exists()]
    if taken and not args.overwrite:
        raise UserError(f"{out / taken[0]} already exists; pass another --output or --overwrite")
    preset = builtin(args.model)
    family = VideoDiffusion if preset else model_family(Path(args.model))
    if "original" in forms and family is not WanVideo:
        raise UserError(f"--original writes Wan 2.1's original key names; {args.model} is a {family.pipeline_class}: "
                        "export --peft (peft loads it) or --merged (the stock pipeline loads it) instead")
    device = resolve_device(args.device)
    written = {}
    base = preset.base_name() if preset else str(Path(args.model).resolve())
    for form in forms:  # each form starts from a fresh base model: merging changes the weights in place
        model = build_model(args.model, seed=0, device=device)
        partial = out / f".{form}.partial"  # replaces out/form only once whole: a full disk loses no old export
        shutil.rmtree(partial, ignore_errors=True)
        with disk_writes(out, f"the {form} export", cleanup=lambda: shutil.rmtree(partial, ignore_errors=True)):
            if form == "merged":
                export_merged(model, lora, args.lora_scale, partial, DTYPES[args.dtype], named=out / form)
            elif form == "peft":
                export_peft(model, lora, args.lora_scale, partial, base, named=out / form)
            else:
                export_original(model, lora, args.lora_scale, partial, base, named=out / form)
        if (out / form).exists():
            shutil.rmtree(out / form)
        partial.rename(out / form)
        written[form] = str(out / form)
        del model
    for form, folder in written.items():
        print(f"{form}: {folder}")
    return written


if __name__ == "__main__":
    main()
