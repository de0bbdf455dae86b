"""The run folder: what a run writes there, the one check of ``--output`` for a new run, ``--overwrite`` and
``--resume``, creating it once setup has succeeded, and atomic writes."""

from __future__ import annotations

import os
import shutil
from datetime import datetime
from pathlib import Path

from engine.errors import UserError

CHECKPOINT = "checkpoint.pt"
RUN_FILES = ("config.yaml", "metrics.jsonl", CHECKPOINT)
WEIGHT_FOLDERS = ("lora", "unet", "transformer")  # LoRA, or the full denoiser by its pipeline name; "_best" added
SAMPLES, TENSORBOARD, REWARD_CURVE = "samples", "tensorboard", "reward_curve.png"
# everything a run writes: what --overwrite clears, so nothing of the old run is mistaken for the new one's
RUN_OUTPUTS = (*RUN_FILES, *(f"{name}{best}" for name in WEIGHT_FOLDERS for best in ("", "_best")),
               SAMPLES, TENSORBOARD, REWARD_CURVE)


def check_output(output: str | None, model: str, overwrite: bool) -> Path:
    """The run folder, checked but not yet written (default ``runs/<model>-<time>``): one that holds another run
    needs ``overwrite`` (a resumed run sets it); a non-empty folder holding no run (a model folder, say) is never
    written into."""
    if output is None:
        out = Path("runs") / f"{Path(model).name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    else:
        out = Path(output)
    if out.exists() and not out.is_dir():
        raise UserError(f"--output {out} is a file; pass a folder")
    holds_run = any((out / f).exists() for f in RUN_FILES)
    if not overwrite and holds_run:
        raise UserError(f"output folder {out} already holds a run; pass another --output, --resume {out} or --overwrite")
    if out.is_dir() and not holds_run and any(out.iterdir()):
        raise UserError(f"output folder {out} is not empty and holds no run; pass a new or empty --output")
    return out


def open_output(out: Path, clear: bool) -> None:
    """Rank 0, once setup has succeeded: create the run folder; ``clear`` (--overwrite, not --resume) removes the
    old run's outputs first."""
    if clear:
        for name in RUN_OUTPUTS:
            path = out / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    out.mkdir(parents=True, exist_ok=True)


def atomic_write(path: Path, write) -> None:
    """write(tmp_path), then rename over ``path``: a crash (or power loss: both are synced) leaves the old file
    or the new one, never half."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
