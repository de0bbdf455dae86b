"""Exact, machine-independent counts: FLOPs (FlopCounterMode) and bytes saved for backward (saved-tensor hooks).

Saved-activation bytes are the storages autograd holds for backward when the forward pass ends, each counted
once, weights and buffers excluded. What a checkpointed block keeps (its inputs) is counted; what it recomputes
in backward is not held and is not counted, nor is what the chain-memory planner has moved to host memory.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch.utils.flop_counter import FlopCounterMode


def storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


class SavedActivations:
    """Counts the bytes of distinct storages packed for backward, ignoring those of ``exclude`` (weights)."""

    def __init__(self, exclude: list[torch.Tensor]):
        self.excluded = {storage_key(t) for t in exclude}
        self.seen: set[int] = set()
        self.bytes = 0

    def pack(self, t: torch.Tensor):
        key = storage_key(t)
        if key not in self.excluded and key not in self.seen:
            self.seen.add(key)
            self.bytes += t.untyped_storage().nbytes()
        return t

    @contextmanager
    def counting(self):
        with torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t):
            yield self


def weights_of(*modules: torch.nn.Module) -> list[torch.Tensor]:
    return [t for m in modules for t in (*m.parameters(), *m.buffers())]


@contextmanager
def count_flops():
    """``with count_flops() as counter: ...; counter.get_total_flops()``"""
    with FlopCounterMode(display=False) as counter:
        yield counter
