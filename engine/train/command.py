"""``python -m engine.train``: the command around the recipe: the config from the command line, then
``Trainer.setup() -> train() -> finish()``, and what a process owes its shell: one line and an exit code when a
run stops early (3 after bad steps, 130 / 143 on a signal, 4 on a full disk, with how to resume) and the run
folder's lock released however it ends."""

from __future__ import annotations

import sys

from engine import distributed as dist_utils
from engine.config import resolve_config
from engine.errors import DiskFull, cli_entry
from engine.train import checkpoint
from engine.train.recipe import DESCRIPTION, Stop, Trainer
from engine.train.run_folder import release_lock


@cli_entry
def main(argv: list[str] | None = None) -> dict:
    config = resolve_config(argv, description=DESCRIPTION)
    trainer = Trainer(config).setup()
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
