"""One build stage's run (engine.world.build): a seeded training loop that can stop and continue, with a progress
bar, a log file and a JSON report.

A stage's work folder (``build/world/<stage>/``) holds ``checkpoint.pt``: the step reached, the stage's
configuration and the state of everything the loop changes (modules, optimizers, schedules, EMA weights, random
generators), written every few minutes and at the end, each time to a new file renamed over the old one, so an
interrupted stage loses at most those minutes and never its last checkpoint. Run again with the same
configuration it continues where it stopped; with another configuration it refuses and names the way out.
"""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path
from typing import Any, Iterator

import torch
from tqdm import tqdm

from engine.errors import UserError


def _snapshot(value: Any) -> Any:
    if isinstance(value, random.Random):
        return value.getstate()
    if isinstance(value, torch.Generator):
        return value.get_state()
    if isinstance(value, list):  # EMA weights
        return [t.detach().clone() for t in value]
    return value.state_dict()


def _restore(value: Any, saved: Any) -> None:
    if isinstance(value, random.Random):
        value.setstate(saved)
    elif isinstance(value, torch.Generator):
        value.set_state(saved)
    elif isinstance(value, list):
        for t, s in zip(value, saved):
            t.copy_(s)
    else:
        value.load_state_dict(saved)


class StageRun:
    """The steps of one stage, from where its checkpoint stopped. ``state`` names what the loop changes."""

    def __init__(self, name: str, work: Path, config: dict, steps: int, state: dict[str, Any],
                 save_every_s: float = 300.0, log_every: int = 50):
        self.name, self.work, self.config, self.steps, self.state = name, Path(work), config, steps, state
        self.save_every_s, self.log_every = save_every_s, log_every
        self.work.mkdir(parents=True, exist_ok=True)
        self.checkpoint = self.work / "checkpoint.pt"
        self.log_file = self.work / "log.txt"
        self.shown: dict[str, float] = {}
        self.start = self._resume()

    def _resume(self) -> int:
        if not self.checkpoint.exists():
            return 0
        saved = torch.load(self.checkpoint, weights_only=False)
        if saved["config"] != self.config:
            changed = sorted(k for k in {**saved["config"], **self.config}
                             if saved["config"].get(k) != self.config.get(k))
            raise UserError(f"{self.checkpoint} is a checkpoint of stage {self.name} with other settings "
                            f"({', '.join(changed)}); pass --restart to start the stage over, or the same settings")
        for key, value in self.state.items():
            _restore(value, saved["state"][key])
        self.log(f"resumed at step {saved['step']} of {self.steps}")
        return saved["step"]

    def save(self, step: int) -> None:
        partial = self.checkpoint.with_suffix(".partial")
        torch.save({"step": step, "config": self.config,
                    "state": {k: _snapshot(v) for k, v in self.state.items()}}, partial)
        os.replace(partial, self.checkpoint)

    def log(self, text: str) -> None:
        line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {self.name}: {text}"
        with self.log_file.open("a") as f:
            f.write(line + "\n")
        tqdm.write(line)

    def show(self, **values: float) -> None:
        """Figures of the current step, shown on the progress bar and written to the log every ``log_every``."""
        self.shown = values

    def __iter__(self) -> Iterator[int]:
        last_save = time.monotonic()
        bar = tqdm(range(self.start, self.steps), initial=self.start, total=self.steps, desc=self.name,
                   dynamic_ncols=True)
        for step in bar:
            yield step
            bar.set_postfix({k: f"{v:.4g}" for k, v in self.shown.items()}, refresh=False)
            if (step + 1) % self.log_every == 0 or step + 1 == self.steps:
                self.log(f"step {step + 1}/{self.steps} " + " ".join(f"{k}={v:.4g}" for k, v in self.shown.items()))
            if time.monotonic() - last_save > self.save_every_s:
                self.save(step + 1)
                last_save = time.monotonic()
        bar.close()
        if self.start < self.steps or not self.checkpoint.exists():
            self.save(self.steps)


def write_report(folder: Path, stage: str, figures: dict) -> Path:
    """``<folder>/<stage>.json``: the stage's measured figures, with the date they were measured."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{stage}.json"
    path.write_text(json.dumps({"measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), **figures},
                               indent=2) + "\n")
    return path
