"""The run folder: what a run writes there, the one check of ``--output`` for a new run, ``--overwrite`` and
``--resume``, the lock that keeps a second run out of a live one, creating it once setup has succeeded, and
atomic writes."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import socket
from datetime import datetime
from pathlib import Path

import yaml

from engine.errors import UserError, disk_writes

CHECKPOINT = "checkpoint.pt"
LOCK = "run.lock"
RUN_FILES = ("config.yaml", "metrics.jsonl", CHECKPOINT)
WEIGHT_FOLDERS = ("lora", "unet", "transformer")  # LoRA, or the full denoiser by its pipeline name; "_best" added
SAMPLES, TENSORBOARD, REWARD_CURVE = "samples", "tensorboard", "reward_curve.png"
# everything a run writes: what --overwrite clears, so nothing of the old run is mistaken for the new one's
RUN_OUTPUTS = (*RUN_FILES, *(f"{name}{best}" for name in WEIGHT_FOLDERS for best in ("", "_best")),
               SAMPLES, TENSORBOARD, REWARD_CURVE)


def check_output(output: str | None, model: str, overwrite: bool, break_lock: bool = False) -> Path:
    """The run folder, checked but not yet written (default ``runs/<model>-<time>``): one that a live run holds
    is refused (``check_lock``); one that holds another run needs ``overwrite`` (a resumed run sets it); a
    non-empty folder holding no run (a model folder, say) is never written into."""
    if output is None:
        out = Path("runs") / f"{Path(model).name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    else:
        out = Path(output)
    if out.exists() and not out.is_dir():
        raise UserError(f"--output {out} is a file; pass a folder")
    check_lock(out, break_lock)
    holds_run = any((out / f).exists() for f in RUN_FILES)
    if not overwrite and holds_run:
        raise UserError(f"output folder {out} already holds a run; pass another --output, --resume {out} or --overwrite")
    if out.is_dir() and not holds_run and any(out.iterdir()):
        raise UserError(f"output folder {out} is not empty and holds no run; pass a new or empty --output")
    return out


def open_output(out: Path, clear: bool, break_lock: bool = False) -> None:
    """Rank 0, once setup has succeeded: create the run folder and lock it; ``clear`` (--overwrite, not --resume)
    removes the old run's outputs first."""
    if clear:
        for name in RUN_OUTPUTS:
            path = out / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    take_lock(out, break_lock)


# ---------------------------------------------------------------------------------- the lock of a live run
def _start_time(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks since boot, /proc), so that a reused pid is not taken for the
    owner; None where the process does not exist."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        if not Path("/proc/self/stat").exists():  # no /proc (macOS): the pid alone says whether it lives
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return None
            except PermissionError:
                pass
            return 0
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])  # field 22; the name before ")" may hold spaces


def _owner() -> dict:
    pid = os.getpid()
    return {"pid": pid, "start_time": _start_time(pid), "host": socket.gethostname(),
            "started": datetime.now().isoformat(timespec="seconds"),
            "torchrun_job": os.environ.get("TORCHELASTIC_RUN_ID"), "rank": int(os.environ.get("RANK", 0))}


def _read_lock(out: Path) -> dict | None:
    try:
        return json.loads((out / LOCK).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {"pid": -1, "start_time": None, "host": "unknown (unreadable lock)", "started": "?"}


def _describe(lock: dict) -> str:
    job = f", torchrun job {lock['torchrun_job']}" if lock.get("torchrun_job") else ""
    return f"pid {lock['pid']} on {lock['host']}{job}, started {lock['started']}"


def check_lock(out: Path, break_lock: bool) -> dict | None:
    """Refuse a folder whose lock belongs to a run that still lives (on this host: its pid with its start time),
    whatever --overwrite or --resume say, and a lock from another host unless ``break_lock``. Returns a lock this
    run may replace (stale: its owner gone; or broken), None when there is none."""
    lock = _read_lock(out)
    if lock is None or lock.get("pid") == os.getpid():
        return None
    if lock["host"] != socket.gethostname() and not lock["host"].startswith("unknown"):
        if not break_lock:
            raise UserError(f"output folder {out} is locked by a run on another host ({_describe(lock)}); wait for "
                            f"it, or pass --break-lock if that run is gone")
        return lock
    if lock.get("start_time") is not None and _start_time(lock["pid"]) == lock["start_time"]:
        raise UserError(f"output folder {out} belongs to a live run ({_describe(lock)}); wait for it to end or "
                        f"stop it (SIGINT saves a checkpoint), or pass another --output")
    return lock


def take_lock(out: Path, break_lock: bool) -> None:
    """Rank 0, with the folder created: write the lock, checked again (another run may have started since the
    first check) and created exclusively; removed when this run ends (``release_lock``, and at exit)."""
    stale = check_lock(out, break_lock)
    if stale is not None:
        print(f"note: taking over the lock of {_describe(stale)}, which no longer runs")
        (out / LOCK).unlink(missing_ok=True)
    try:
        fd = os.open(out / LOCK, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        if (lock := _read_lock(out)) and lock.get("pid") == os.getpid():
            return
        raise UserError(f"output folder {out} was locked by another run a moment ago; pass another --output") from None
    with disk_writes(out / LOCK, "the run's lock", cleanup=lambda: (out / LOCK).unlink(missing_ok=True)), \
            os.fdopen(fd, "w") as fh:
        fh.write(json.dumps(_owner()) + "\n")
    atexit.register(release_lock, out)


def release_lock(out: Path) -> None:
    lock = _read_lock(out)
    if lock and lock.get("pid") == os.getpid() and lock.get("host") == socket.gethostname():
        (out / LOCK).unlink(missing_ok=True)


def atomic_write(path: Path, data: bytes, what: str) -> None:
    """``data`` to a temporary file, synced, then renamed over ``path``: a crash (or power loss) leaves the old
    file or the new one, never half; a full disk leaves the old one and raises ``DiskFull`` naming ``what``."""
    tmp = path.with_name(path.name + ".tmp")
    with disk_writes(path, what, len(data), cleanup=lambda: tmp.unlink(missing_ok=True)), open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def append_line(path: Path, line: str, what: str) -> None:
    """One line appended; a full disk cuts the file back to its last whole line and raises ``DiskFull``."""
    size = path.stat().st_size if path.exists() else 0

    def cut_back():
        if path.exists() and path.stat().st_size > size:
            os.truncate(path, size)

    with disk_writes(path, what, len(line.encode()), cleanup=cut_back), open(path, "a") as fh:
        fh.write(line)
        fh.flush()


def write_config(run) -> None:
    """config.yaml: the run's options as resolved, and what they came to (the chain's start, K, the device...)."""
    cfg, chain = run.config, run.chain
    resolved = cfg.to_dict() | {
        "output": str(run.output),
        "derived": {"start_timestep": chain.timesteps[0], "steps_run": chain.steps_run,
                    "grad_steps": chain.grad_steps, "device": str(run.device), "backend": run.backend,
                    "no_grad_path": chain.no_grad_path.mode if chain.no_grad_path else "off",
                    "processes": run.world.size,
                    "trainable_parameters": sum(p.numel() for p in run.trainable),
                    "train_sources": len(run.train_sources), "eval_sources": len(run.eval_sources)},
    }
    with disk_writes(run.output, "config.yaml"):
        (run.output / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
