"""LoRA on the UNet through peft: injection, the adapter on/off switch, and peft-format files."""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from engine.errors import UserError

TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0"]
WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"


def lora_config(rank: int = 4, alpha: float | None = None):
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=rank if alpha is None else alpha, target_modules=TARGET_MODULES,
                      lora_dropout=0.0, bias="none", init_lora_weights=True)


def add_lora(unet: nn.Module, rank: int = 4, alpha: float | None = None) -> list[nn.Parameter]:
    """Inject LoRA into every attention projection (spatial self/cross, temporal, transformer_in).

    Everything else is frozen; up (B) starts at zero so the model is unchanged at step 0.
    Returns the trainable parameters.
    """
    from peft import inject_adapter_in_model

    unet.requires_grad_(False)
    inject_adapter_in_model(lora_config(rank, alpha), unet)
    params = []
    for name, p in unet.named_parameters():
        p.requires_grad_("lora_" in name)
        if "lora_" in name:
            params.append(p)
    return params


def lora_layers(unet: nn.Module):
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in unet.modules() if isinstance(m, BaseTunerLayer)]


@contextmanager
def adapters_disabled(unet: nn.Module):
    """Run the base model: LoRA layers pass through their frozen base weights only."""
    layers = lora_layers(unet)
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)


def lora_state_dict(unet: nn.Module) -> dict[str, torch.Tensor]:
    """peft naming: ``<module path>.lora_A.weight`` / ``.lora_B.weight``."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(unet).items()}


def save_lora(unet: nn.Module, folder: str | Path, rank: int, alpha: float | None) -> Path:
    """adapter_model.safetensors + adapter_config.json, the layout peft's loaders read."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(lora_state_dict(unet), str(folder / WEIGHTS_NAME))
    config = lora_config(rank, alpha).to_dict()
    config = {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.items()}
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2, default=str))
    return folder


def load_lora(unet: nn.Module, folder: str | Path) -> None:
    """Inject (if needed) and load a saved adapter; the shapes must match the UNet."""
    from peft import set_peft_model_state_dict
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    weights, config_file = folder / WEIGHTS_NAME, folder / CONFIG_NAME
    if not weights.is_file() or not config_file.is_file():
        raise UserError(f"LoRA folder {folder} lacks {WEIGHTS_NAME} or {CONFIG_NAME}; pass a folder written by engine.train")
    try:
        config = json.loads(config_file.read_text())
        rank, alpha = int(config["r"]), float(config["lora_alpha"])
        state = load_file(str(weights))
    except (ValueError, KeyError, TypeError, OSError, SafetensorError) as err:
        raise UserError(f"LoRA folder {folder} is corrupt ({str(err).splitlines()[0]}); pass a folder written by "
                        "engine.train") from None
    if not lora_layers(unet):
        add_lora(unet, rank, alpha)
    try:
        result = set_peft_model_state_dict(unet, state)
    except RuntimeError as err:
        raise UserError(f"LoRA in {folder} does not fit this model ({str(err).splitlines()[-1].strip()}); "
                        "use the adapter trained for this base model") from None
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    if unexpected:
        raise UserError(f"LoRA in {folder} has {len(unexpected)} weights this model lacks (e.g. {unexpected[0]}); "
                        "use the adapter trained for this base model")
