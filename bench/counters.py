"""Exact, machine-independent FLOP counts for the benchmarks (bytes saved for backward are counted with
``engine.memory.SavedTensorMeter``, the meter the chain-memory tests use too)."""

from __future__ import annotations

from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry


class FlopCount(TorchDispatchMode):
    """FlopCounterMode's formulas (``flop_registry``) without its per-module tracking, which doubles the time of
    a meta-device UNet pass; the totals are the same (bench/test_costs.py compares them)."""

    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.total += formula(*args, **kwargs, out_val=out)
        return out
