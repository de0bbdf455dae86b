"""LoRA on the denoiser through peft: injection, the adapter on/off switch, peft-format files and the one loader
of saved adapters."""

from __future__ import annotations

import json
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from engine.errors import UserError, first_line

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


def check_lora_folder(folder: str | Path) -> Path:
    """A folder that holds a peft adapter's two files; a clear error otherwise."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"LoRA folder {folder} does not exist; pass --lora the lora/ folder a training run wrote")
    missing = [n for n in (WEIGHTS_NAME, CONFIG_NAME) if not (folder / n).is_file()]
    if missing:
        raise UserError(f"LoRA folder {folder} lacks {' and '.join(missing)}; pass a peft adapter folder "
                        "(adapter_model.safetensors + adapter_config.json), e.g. runs/<run>/lora")
    return folder


def _read_adapter(folder: Path):
    """The folder's peft config and weights; a damaged file is a clear error naming it."""
    from peft import LoraConfig
    from safetensors.torch import load_file

    try:
        config = LoraConfig.from_pretrained(str(folder))
    except Exception as err:  # peft raises TypeError/ValueError/JSONDecodeError for a bad config
        raise UserError(f"LoRA folder {folder} is corrupt ({CONFIG_NAME} is not a peft LoRA config: "
                        f"{first_line(err)}); pass a folder written by engine.train or peft's save_pretrained") from None
    try:
        state = load_file(str(folder / WEIGHTS_NAME))
    except Exception as err:  # safetensors raises its own error type, OSError or ValueError
        raise UserError(f"LoRA folder {folder} is corrupt ({WEIGHTS_NAME} cannot be read: {first_line(err)}); "
                        "pass a folder written by engine.train") from None
    return config, state


def load_lora(denoiser: nn.Module, folder: str | Path, scale: float = 1.0, adapter_name: str = "default") -> None:
    """Load the peft adapter in ``folder`` under ``adapter_name``: the one LoRA loader (``--init-lora``,
    ``engine.sample``, ``engine.evaluate``, ``engine.export``).

    Where ``add_lora`` already made that adapter (``--init-lora``), its weights are loaded in place and stay
    trainable. Otherwise the adapter is injected from the folder's own config (any rank, alpha, targets; several
    can live side by side, one per ``adapter_name``), loaded, made the active one at ``scale`` (peft's
    ``set_scale``: 0 is the base model, 1 as trained) and frozen, for inference."""
    from peft import inject_adapter_in_model, set_peft_model_state_dict

    folder = check_lora_folder(folder)
    config, state = _read_adapter(folder)
    inject = not any(adapter_name in layer.lora_A for layer in lora_layers(denoiser))
    if inject:
        with warnings.catch_warnings():  # peft warns whenever a second adapter joins a model: that is intended
            warnings.simplefilter("ignore", UserWarning)
            try:
                inject_adapter_in_model(config, denoiser, adapter_name=adapter_name)
            except ValueError as err:
                raise UserError(f"LoRA in {folder} targets modules this model lacks ({first_line(err)}); "
                                "use the adapter trained for this base model") from None
    try:
        result = set_peft_model_state_dict(denoiser, state, adapter_name=adapter_name)
    except RuntimeError as err:
        raise UserError(f"LoRA in {folder} does not fit this model ({str(err).strip().splitlines()[-1].strip()}); "
                        "use the adapter trained for this base model") from None
    unexpected = list(getattr(result, "unexpected_keys", None) or [])
    missing = [k for k in getattr(result, "missing_keys", None) or [] if "lora_" in k and f".{adapter_name}." in k]
    if unexpected or missing:
        raise UserError(f"LoRA in {folder} does not fit this model ({len(unexpected)} unexpected, {len(missing)} "
                        f"missing weights, e.g. {(unexpected or missing)[0]}); use the adapter trained for this base "
                        "model")
    if inject:
        activate_adapter(denoiser, adapter_name)
        set_lora_scale(denoiser, scale, adapter_name)
        denoiser.requires_grad_(False)


def activate_adapter(denoiser: nn.Module, adapter_name: str) -> None:
    for layer in lora_layers(denoiser):
        layer.set_adapter(adapter_name)
        layer.enable_adapters(True)


def set_lora_scale(denoiser: nn.Module, scale: float, adapter_name: str = "default") -> None:
    """Output of each LoRA layer = base + scale * (alpha / r) * B A x; 0 turns the adapter off, 1 is as trained."""
    for layer in lora_layers(denoiser):
        layer.set_scale(adapter_name, scale)
