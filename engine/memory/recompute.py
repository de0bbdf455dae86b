"""Exact recompute: drop a unit's saved tensors in forward and rerun it at their first unpack in backward.

``checkpoint_blocks`` (torch.utils.checkpoint over the top-level blocks) and ChainMemory's own machinery: the
held inputs (``_HeldInputs``), the captured RNG and autocast state, the placeholders (``_Slot``), one unit call
(``_Recompute``) and the handle of a tensor spilled to the host store (``_Spilled``).
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager, nullcontext
from typing import Callable, Iterable

import torch
from torch import nn
from torch.autograd.graph import saved_tensors_hooks
from torch.utils.checkpoint import checkpoint
from torch.utils.flop_counter import FlopCounterMode

from engine.memory.tree import TensorSlots
from engine.memory.units import UnitCost, _storage, denoiser_blocks


def checkpoint_blocks(denoiser: nn.Module) -> Callable[[], None]:
    """Recompute every top-level block in backward; returns a function that reverts the change."""
    blocks = denoiser_blocks(denoiser)
    for block in blocks:
        original = block.forward

        def forward(*args, _original=original, **kwargs):
            if torch.is_grad_enabled():
                return checkpoint(_original, *args, use_reentrant=False, **kwargs)
            return _original(*args, **kwargs)

        block.forward = forward  # an instance attribute: the state dict and the class are untouched

    def revert():
        for block in blocks:
            del block.forward

    return revert



class _HeldInputs(torch.autograd.Function):
    """Saves a unit's inputs through autograd so that whatever saved-tensor hooks are active apply to them.

    The output is never used: the recompute reads ``holder.grad_fn.saved_tensors``. Under ChainMemory's spill
    hooks the inputs go to the host store (``recompute_offload``); otherwise they stay on the device like any
    saved tensor, where an outer SavedTensorMeter counts them. The anchor input requires grad so that autograd
    records the node (and keeps the saved tensors) even when no input does.
    """

    @staticmethod
    def forward(ctx, anchor, *tensors):
        ctx.save_for_backward(*tensors)
        ctx.count = len(tensors)
        return anchor.new_empty(0)

    @staticmethod
    def backward(ctx, grad):  # pragma: no cover - the output never reaches a loss
        return (None,) * (1 + ctx.count)


_ANCHOR = torch.zeros(0, requires_grad=True)


class _RngState:
    """CPU and CUDA generator states at the start of a unit call, restored for its rerun."""

    def __init__(self, tensors: Iterable[torch.Tensor]):
        self.devices = sorted({t.device.index or 0 for t in tensors if t.is_cuda})
        self.cpu = torch.get_rng_state()
        self.cuda = [torch.cuda.get_rng_state(d) for d in self.devices]

    @contextmanager
    def restored(self):
        with torch.random.fork_rng(devices=self.devices):
            torch.set_rng_state(self.cpu)
            for d, state in zip(self.devices, self.cuda):
                torch.cuda.set_rng_state(state, d)
            yield


class _AutocastState:
    def __init__(self):
        devices = ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",)
        self.states = [(d, torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in devices]
        self.cache = torch.is_autocast_cache_enabled()

    @contextmanager
    def restored(self):
        with ExitStack() as stack:
            for device, enabled, dtype in self.states:
                stack.enter_context(torch.autocast(device, dtype=dtype, enabled=enabled, cache_enabled=self.cache))
            yield


class _Slot:
    """What a dropped saved tensor leaves in the graph: its index in the unit's call."""

    __slots__ = ("frame", "index")

    def __init__(self, frame: "_Recompute", index: int):
        self.frame, self.index = frame, index

    def __del__(self):
        frame = self.frame
        frame.alive.discard(self.index)
        frame.values.pop(self.index, None)


def _no_unpack(_):
    raise RuntimeError("a tensor saved during a recompute was unpacked; recomputed graphs are never backpropagated")


class _Recompute:
    """One unit call whose saved tensors are dropped in forward and recomputed at their first unpack in backward.

    Non-reentrant, as ``torch.utils.checkpoint(use_reentrant=False)``: the forward builds the real graph with
    placeholders (``_Slot``); the rerun replays the call on detached copies of the inputs under the captured RNG
    and autocast state and hands back the tensors it saves, matched by order, checked by shape and dtype.
    ``memory`` is the ChainMemory running the call (its weight test, spill hooks and counters).
    """

    def __init__(self, memory, fn, args, kwargs, offload_inputs: bool, record: UnitCost | None):
        # no references to activations: the weights stay in place, the rest is held by _HeldInputs
        self.arguments, held = TensorSlots.split((args, kwargs), lambda t: not memory._is_weight(t))
        self.requires_grad = [t.requires_grad for t in held]
        with memory._spill_hooks(memory._new_group()) if offload_inputs else nullcontext():
            self.holder = _HeldInputs.apply(_ANCHOR, *held)
        self.rng = _RngState(held)
        self.autocast = _AutocastState()
        self.fn, self.memory, self.record = fn, memory, record
        self.count = 0
        self.meta: list[tuple[torch.Size, torch.dtype]] = []
        self.alive: set[int] = set()
        self.values: dict[int, torch.Tensor] = {}
        self._measured: dict[int, torch.Tensor] = {}
        if record is not None:
            record.input_bytes = sum(_storage(t)[1] for t in {_storage(t)[0]: t for t in held}.values())

    def run(self, args, kwargs):
        with saved_tensors_hooks(self.pack, self.unpack):
            if self.record is None:
                return self.fn(*args, **kwargs)
            with FlopCounterMode(display=False) as flops:
                out = self.fn(*args, **kwargs)
            self.record.flops = float(flops.get_total_flops())
            self._measured.clear()
            return out

    def pack(self, t: torch.Tensor) -> _Slot:
        index = self.count
        self.count += 1
        self.meta.append((t.shape, t.dtype))
        self.alive.add(index)
        if self.record is not None:
            sid, nbytes = _storage(t)
            if sid not in self._measured and not self.memory._is_weight(t):
                self._measured[sid] = t  # held until the call ends so storage identity cannot be reused
                self.record.act_bytes += nbytes
        return _Slot(self, index)

    def unpack(self, slot: _Slot) -> torch.Tensor:
        if slot.index not in self.values:
            self.recompute()
        return self.values[slot.index]

    def recompute(self) -> None:
        held = self.holder.grad_fn.saved_tensors
        args, kwargs = self.arguments.rebuilt(
            [t.detach().requires_grad_(requires_grad) for t, requires_grad in zip(held, self.requires_grad)])
        produced = 0
        bytes_now = {}

        def pack(t):
            nonlocal produced
            index = produced
            produced += 1
            if index < self.count and index in self.alive:
                shape, dtype = self.meta[index]
                if t.shape != shape or t.dtype != dtype:
                    raise RuntimeError(f"recompute of {self.memory._unit_name(self.fn)} saved {tuple(t.shape)} "
                                       f"{t.dtype} where forward saved {tuple(shape)} {dtype}: the unit is not "
                                       "deterministic in its saved tensors")
                self.values[index] = t
                sid, nbytes = _storage(t)
                bytes_now[sid] = nbytes
            return None

        with self.rng.restored(), torch.enable_grad(), self.autocast.restored(), saved_tensors_hooks(pack, _no_unpack):
            self.fn(*args, **kwargs)
        if produced != self.count:
            raise RuntimeError(f"recompute of {self.memory._unit_name(self.fn)} saved {produced} tensors where "
                               f"forward saved {self.count}: the unit does not run the same ops twice")
        self.memory._note_recompute(sum(bytes_now.values()))


class _Spilled:
    """A saved tensor in the host store; releasing the handle (autograd frees it after use) frees the entry."""

    __slots__ = ("store", "key", "group", "__weakref__")

    def __init__(self, store, key: int, group: int):
        self.store, self.key, self.group = store, key, group

    def __del__(self):
        try:
            self.store.release(self.key)
        except Exception:  # interpreter shutdown: nothing left to free
            pass

