"""A run's files on disk: ``checkpoint.pt`` (everything a bitwise-identical continuation needs, written
atomically), resuming from it, ``metrics.jsonl`` rewritten on resume, and the trained weights (``lora/``, or the
full denoiser as ``unet/`` / ``transformer/``; ``_best`` for the best evaluation so far).

Each function takes the run (``engine.train.recipe.Trainer``) whose state it saves or restores."""

from __future__ import annotations

import io
import json
from pathlib import Path

import torch

from engine import distributed as dist_utils
from engine.errors import UserError, disk_writes, first_line
from engine.lora import lora_state_dict, save_lora
from engine.train.run_folder import CHECKPOINT, atomic_write


def weights_and_optimizer(run) -> dict:
    """The trained weights and the optimizer state, whole: LoRA's are on every rank; a sharded model's are
    gathered (a collective) and arrive on rank 0 only."""
    if run.config.finetune == "lora":
        return {"lora": lora_state_dict(run.model.denoiser), "optimizer": run.optimizer.state_dict()}
    model, optimizer = dist_utils.full_state(run.model.denoiser, run.optimizer)
    return {"unet": model, "optimizer": optimizer}  # "unet" for any denoiser: older checkpoints resume


def save_checkpoint(run) -> None:
    """Everything a bitwise-identical continuation needs, written atomically by rank 0."""
    if not run.runs_model:
        return
    trained = weights_and_optimizer(run)
    if not run.world.is_main:
        return
    state = trained | {
        "step": run.step, "bad_in_row": run.bad_in_row, "records": run.records,
        "lr_scheduler": run.lr_scheduler.state_dict(),
        "scaler": run.scaler.state_dict(), "sampler": run.sampler.state_dict(),
        "noise_generator": run.noise_generator.get_state(), "frame_generator": run.frame_generator.get_state(),
        "torch_rng": torch.get_rng_state(), "early_stopping": run.early_stopping.state_dict(),
    }
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write(run.output / CHECKPOINT, buffer.getvalue(), f"the checkpoint of step {run.step}")


def read_checkpoint(output: Path) -> dict:
    path = output / CHECKPOINT
    if not path.is_file():
        raise UserError(f"--resume {output} has no {CHECKPOINT}; the run saved none (use --save-every)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 (a damaged pickle fails in many ways: any of them means corrupt)
        raise UserError(f"{path} is corrupt ({first_line(err)}); resume from a copy of the run, "
                        "or start again") from None


def saved_step(output: Path) -> int | None:
    """The step of the run's last complete checkpoint, None when there is none (or it cannot be read)."""
    try:
        return int(torch.load(output / CHECKPOINT, map_location="cpu", weights_only=True, mmap=True)["step"])
    except Exception:  # noqa: BLE001 (missing or damaged: either way nothing to resume from)
        return None


def load_checkpoint(run) -> None:
    """Restore the run's state from its checkpoint; a checkpoint of another configuration is a clear error."""
    from peft import set_peft_model_state_dict

    state = read_checkpoint(run.output)
    try:
        if run.config.finetune == "lora":
            set_peft_model_state_dict(run.model.denoiser, state["lora"])
            run.optimizer.load_state_dict(state["optimizer"])
        else:
            dist_utils.load_full_state(run.model.denoiser, run.optimizer, state["unet"], state["optimizer"])
    except (RuntimeError, KeyError, ValueError) as err:
        raise UserError(f"{run.output / CHECKPOINT} does not fit this configuration ({first_line(err)}); "
                        "resume with the options the run was started with") from None
    run.lr_scheduler.load_state_dict(state["lr_scheduler"])
    run.scaler.load_state_dict(state["scaler"])
    run.sampler.load_state_dict(state["sampler"])
    run.noise_generator.set_state(state["noise_generator"])
    run.frame_generator.set_state(state["frame_generator"])
    torch.set_rng_state(state["torch_rng"])
    run.early_stopping.load_state_dict(state["early_stopping"])
    run.step, run.bad_in_row, run.records = state["step"], state["bad_in_row"], list(state["records"])
    apply_optimizer_options(run)


def apply_optimizer_options(run) -> None:
    """--lr and --weight-decay given with --resume win over the values the optimizer state restored (same
    arithmetic as LambdaLR, so unchanged options resume bitwise)."""
    cfg, scheduler = run.config, run.lr_scheduler
    scheduler.base_lrs = [cfg.lr] * len(run.optimizer.param_groups)
    factor = scheduler.lr_lambdas[0](scheduler.last_epoch)
    for group in run.optimizer.param_groups:
        group |= {"initial_lr": cfg.lr, "lr": cfg.lr * factor, "weight_decay": cfg.weight_decay}


def rewrite_metrics(output: Path, records: list[dict]) -> None:
    """Resumed: the metric lines up to the checkpoint (lines written after it are dropped)."""
    lines = "".join(json.dumps(r) + "\n" for r in records)
    atomic_write(output / "metrics.jsonl", lines.encode(), "metrics.jsonl")


def weights_folder(run, suffix: str = "") -> Path:
    """lora/ (peft), or unet/ / transformer/ for full fine-tuning (diffusers: config.json + safetensors);
    ``suffix`` "best" gives lora_best/."""
    name = "lora" if run.config.finetune == "lora" else run.model.denoiser_name
    return run.output / (f"{name}_{suffix}" if suffix else name)


def save_weights(run, suffix: str = "") -> Path:
    """The trained weights in their folder (rank 0 writes; a sharded model is gathered by every rank first)."""
    cfg = run.config
    folder = weights_folder(run, suffix)
    if cfg.finetune == "lora":
        if run.world.is_main:
            with disk_writes(folder, "the LoRA weights"):
                save_lora(run.model.denoiser, folder, cfg.lora_rank, cfg.lora_alpha)
        return folder
    weights, _ = dist_utils.full_state(run.model.denoiser)
    if run.world.is_main:
        with disk_writes(folder, f"the {run.model.denoiser_name} weights"):
            _save_denoiser(run, folder, weights)
    return folder


def _save_denoiser(run, folder: Path, weights: dict) -> None:
    """diffusers' layout: config.json (with the class name) + diffusion_pytorch_model.safetensors."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    run.model.denoiser.save_config(folder)
    config_file = folder / "config.json"
    config_file.write_text(json.dumps(json.loads(config_file.read_text()) | {"_class_name": run.denoiser_class},
                                      indent=2))
    save_file({k: v.contiguous() for k, v in weights.items()}, str(folder / "diffusion_pytorch_model.safetensors"))
