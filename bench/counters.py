"""One benchmark step counted on the meta device: FLOPs and the bytes saved for backward, with the engine's counters
(``engine.counting``: the ones ``--dry-run`` uses; ``engine.memory.SavedTensorMeter``: the chain-memory tests' meter)."""

from __future__ import annotations

from contextlib import nullcontext

from engine.counting import FlopCount, NoGradReuse
from engine.memory import SavedTensorMeter

__all__ = ["FlopCount", "NoGradReuse", "count_step"]


def count_step(step, reuse: bool = True) -> tuple[int, int]:
    """(FLOPs, bytes saved for backward) of one ``bench.recipes.Step`` on the meta device; with the planner, of a
    planned step (the planner measures its units on the first gradient step). ``reuse``: ops' and no-grad denoiser
    calls' counts reused (FlopCount, NoGradReuse); without, every op runs (bench/test_costs.py compares the two)."""
    model = step.model
    with NoGradReuse(model.denoiser) if reuse else nullcontext():
        if step.memory is not None:
            with FlopCount(reuse):  # not counted, but its meta ops' outputs serve the counted step
                step("meta")
            step.memory.store.reset_peaks()
        saved = SavedTensorMeter(model.denoiser, model.vae, model.text_encoder, step.scorer.reward)
        with FlopCount(reuse) as counter, saved:
            step("meta")
    return counter.total, saved.bytes
