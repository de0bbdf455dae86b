"""``python -m engine.train``: the command around the recipe: the config from the command line, then
``Trainer.setup() -> train() -> finish()``, and what a process owes its shell: one line and an exit code when a
run stops early (3 after bad steps, 130 / 143 on a signal, 4 on a full disk, with how to resume) and the run
folder's lock released however it ends. ``--dry-run`` forecasts the run instead (engine.train.forecast)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from engine import distributed as dist_utils
from engine.config import TrainConfig, resolve_config
from engine.errors import DiskFull, UserError, cli_entry
from engine.rewards.registry import reward_label
from engine.train import checkpoint
from engine.train.recipe import DESCRIPTION, Stop, Trainer
from engine.train.run_folder import release_lock


DRY_RUN = ("--dry-run [--world-size N]: count one step of this run on the meta device (device peak, host memory, "
           "TFLOP, the memory plan) for one of N processes (splitting the batch, or with --context-parallel each "
           "clip's tokens), from the model's configs, print it and exit without reading weights or writing.")


@cli_entry
def main(argv: list[str] | None = None) -> dict:
    dry, argv = _dry_run_options(sys.argv[1:] if argv is None else argv)
    config = resolve_config(argv, description=f"{DESCRIPTION} {DRY_RUN}")
    if dry.dry_run:
        from engine.train.forecast import forecast

        predicted = forecast(config, dry.world_size)
        print(predicted.render())
        print(json.dumps(predicted.summary()))
        return predicted.summary()
    trainer = Trainer(config).setup()
    if trainer.world.is_main:
        print(job_line(config, trainer.output, trainer.step), flush=True)
    try:
        try:
            trainer.train()
        except Stop as stop:
            print(f"error: {stop}" if stop.exit_code == 3 else str(stop), file=sys.stderr)
            dist_utils.shutdown(trainer.world)
            raise SystemExit(stop.exit_code) from None
        return trainer.finish()
    except DiskFull as full:
        trainer.tracker.abandon()
        saved = checkpoint.saved_step(trainer.output)
        raise DiskFull(f"{full}; then --resume {trainer.output} continues from its checkpoint of step {saved}" if saved
                       else str(full)) from None
    finally:
        release_lock(trainer.output)  # this process's own lock only: other ranks and other runs keep theirs


def job_line(config: TrainConfig, output: Path, start: int = 0) -> str:
    """The run in one line, printed as it starts: what it trains and on which reward (a preset's default job names
    neither on the command line)."""
    trained = f"LoRA rank {config.lora_rank}" if config.finetune == "lora" else "every denoiser weight"
    label = reward_label(config.reward)
    reward = label if label == config.reward else f"{label} ({config.reward})"
    return (f"fine-tuning {config.model} ({trained}) on {reward}: {config.steps} step{'s' * (config.steps != 1)}"
            f"{f' (from step {start})' if start else ''} of batch {config.batch_size}, tau {config.tau} ("
            f"{config.steps_run} of {config.ddim_steps} DDIM steps), K {config.grad_steps}; into {output}")


def _dry_run_options(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """``--dry-run`` and ``--world-size``, taken out of the run's options."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--world-size", type=int, default=None)
    dry, rest = parser.parse_known_args(argv)
    if dry.world_size is not None and not dry.dry_run:
        raise UserError("--world-size is --dry-run's (the processes to forecast for); a real run takes its processes "
                        "from torchrun")
    dry.world_size = dry.world_size or 1
    return dry, rest
