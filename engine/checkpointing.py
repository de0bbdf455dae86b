"""Activation memory for the gradient steps of the chain.

Two policies:

- ``checkpoint_blocks(unet)``, the original one: ``UNet3DConditionModel.enable_gradient_checkpointing()`` raises
  in diffusers, so the engine wraps the UNet's down, mid and up blocks itself: with gradient enabled each block
  keeps only its inputs and recomputes its activations in backward (non-reentrant ``torch.utils.checkpoint``,
  RNG state preserved). Without gradient (the no-grad steps of the chain) the blocks run unchanged.

- ``ChainMemory(unet, grad_steps, budget)``: a bounded amount of device memory for gradient through K steps,
  whatever K is. Every (gradient step, UNet unit) item gets one of four decisions from the planner in
  ``csrc`` (C++ extension, or its Python twin):

      keep               plain autograd: the unit's saved tensors stay on the device
      offload            its saved tensors go to the host store in forward, come back (prefetched) in backward
      recompute          they are dropped; the unit's inputs stay and its forward reruns in backward
      recompute_offload  dropped, and the inputs go to the host store too: nothing of the unit stays

  The plan minimises the modelled extra time (recompute FLOPs, copies not hidden behind compute) subject to
  ``resident bytes + one unit rematerialised + prefetch in flight <= budget``. The latents x_t between steps are
  never touched (the chain keeps them; they are tiny). Recompute is exact: the CPU and CUDA RNG states and the
  autocast state are captured per unit call and restored for the rerun, so dropout (or any random op inside a
  unit) draws the same numbers and gradients equal plain autograd's bit for bit.

      memory = ChainMemory(model.denoiser, grad_steps=K, budget="8GiB")     # or "auto"
      chain.step_context = memory.step_context                          # or memory.attach(chain)
      with memory.region(model.vae, reward):                            # decode + reward: same budget
          rewards = ...
      memory.revert()

  The reward side (decoding the SegVR frames, the reward model) saves activations too, as many as the chain's
  plan at full size. ``region()`` puts them under the same budget: measured on the first call (spilled while
  counted), then kept on the device when they fit beside the plan's device bytes and spilled to the host store
  otherwise; the "auto" budget keeps them, as before. Spilling them adds copies, never FLOPs.

How the per-unit numbers are obtained: they are *measured*, not guessed. The first two gradient steps of the
first iteration (one when K=1) run every unit in the least-memory mode (``recompute_offload``; ``recompute`` when
spilling is off or for the K=1 "auto" budget) while recording, per unit call, the bytes autograd saves (unique
storages, parameters excluded), the bytes of its inputs and its forward FLOPs (``FlopCounterMode``). Two steps,
because the first differs from the rest: its latent does not require grad, so conv_in, for one, saves nothing
there. The plan for all K steps is then solved once and reused for as long as the UNet's input shapes, dtypes and
autocast state stay the same (a change triggers a new measurement); in the measuring iteration the steps after
the measured ones already follow it. The same measurement runs on the meta device (bench/bench_memory.py).

The "auto" budget keeps today's behaviour when K=1: every unit recomputed with its inputs kept, which is what
``checkpoint_blocks`` does (at unit granularity, so the same recompute FLOPs and a smaller transient). For K > 1,
"auto" is that same K=1 footprint (or the least feasible one if larger), so memory does not grow with K.
"""

from __future__ import annotations

import logging
import re
import weakref
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import nn
from torch.autograd.graph import saved_tensors_hooks
from torch.utils._pytree import tree_flatten, tree_unflatten
from torch.utils.checkpoint import checkpoint
from torch.utils.flop_counter import FlopCounterMode

import csrc
from csrc import DECISION_NAMES, KEEP, OFFLOAD, RECOMPUTE, RECOMPUTE_OFFLOAD, STAT_NAMES, Plan, Rates

logger = logging.getLogger(__name__)

__all__ = ["ChainMemory", "ChainProfile", "DEFAULT_RATES", "SavedTensorMeter", "UnitCost", "checkpoint_blocks",
           "denoiser_blocks", "denoiser_units", "parse_budget"]


def _transformer_blocks(denoiser: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """A video transformer's block list and its name (Wan ``blocks``, CogVideoX ``transformer_blocks``)."""
    for name in ("blocks", "transformer_blocks"):
        blocks = getattr(denoiser, name, None)
        if isinstance(blocks, nn.ModuleList) and not hasattr(denoiser, "down_blocks"):
            return name, blocks
    return None


def denoiser_blocks(denoiser: nn.Module) -> list[nn.Module]:
    """The top-level blocks in call order: a UNet's down, mid and up blocks, or a transformer's blocks."""
    transformer = _transformer_blocks(denoiser)
    if transformer is not None:
        return list(transformer[1])
    return [*denoiser.down_blocks, denoiser.mid_block, *denoiser.up_blocks]


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


# %% Budgets, units, rates ------------------------------------------------------------------------------------------
_BYTE_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kib": 1 << 10, "kb": 10**3, "m": 1 << 20, "mib": 1 << 20, "mb": 10**6,
               "g": 1 << 30, "gib": 1 << 30, "gb": 10**9, "t": 1 << 40, "tib": 1 << 40, "tb": 10**12}


def parse_budget(value: int | float | str | None) -> int | str:
    """'auto' (or None) stays 'auto'; '8GiB', '8G' (= GiB), '8GB' (= 1e9), '512MiB', 1e9 and 1000000 become bytes."""
    if value is None or (isinstance(value, str) and value.strip().lower() == "auto"):
        return "auto"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number, unit = float(value), ""
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", str(value))
        if not match or match.group(2).lower() not in _BYTE_UNITS:
            raise ValueError(f"memory budget {value!r} is not a size; use e.g. 8GiB, 12GB, 512MiB, a byte count "
                             "or 'auto'")
        number, unit = float(match.group(1)), match.group(2).lower()
    size = int(number * _BYTE_UNITS[unit])
    if size <= 0:
        raise ValueError(f"memory budget {value!r} must be positive (or 'auto')")
    return size


def denoiser_units(unet: nn.Module, granularity: str = "layers") -> list[tuple[str, nn.Module]]:
    """The modules ChainMemory plans for, named as in ``unet.named_modules()``.

    ``layers``: each resnet, temporal conv, spatial and temporal transformer, down/upsampler of every block, plus
    the stem (time embedding, conv_in, transformer_in) and the head (norm, activation, conv_out): one layer
    rematerialised at a time keeps the transient small. ``blocks``: the top-level blocks (as checkpoint_blocks)
    plus the stem and head modules. A video transformer's units are its blocks at either granularity (each is one
    attention + MLP layer), plus the top-level modules around them that hold weights (patch and condition
    embedders, output norm and projection).
    """
    if granularity not in ("layers", "blocks"):
        raise ValueError(f"granularity {granularity!r}: use 'layers' or 'blocks'")
    transformer = _transformer_blocks(unet)
    if transformer is not None:
        units = []
        for name, child in unet.named_children():
            if child is transformer[1]:
                units += [(f"{name}.{j}", block) for j, block in enumerate(child)]
            elif any(True for _ in child.parameters()):
                units.append((name, child))
        return units
    units: list[tuple[str, nn.Module]] = []

    def add(name: str):
        module = getattr(unet, name, None)
        if module is not None:
            units.append((name, module))

    for name in ("time_embedding", "conv_in", "transformer_in"):
        add(name)
    blocks = [(f"down_blocks.{i}", b) for i, b in enumerate(unet.down_blocks)]
    if getattr(unet, "mid_block", None) is not None:
        blocks.append(("mid_block", unet.mid_block))
    blocks += [(f"up_blocks.{i}", b) for i, b in enumerate(unet.up_blocks)]
    for prefix, block in blocks:
        if granularity == "blocks":
            units.append((prefix, block))
            continue
        for child_name, child in block.named_children():
            if isinstance(child, nn.ModuleList):
                units += [(f"{prefix}.{child_name}.{j}", m) for j, m in enumerate(child)]
            else:
                units.append((f"{prefix}.{child_name}", child))
    for name in ("conv_norm_out", "conv_act", "conv_out"):
        add(name)
    return units


# Cost-model rates per device type, assumed, not measured (no GPU has run this yet): CUDA is H100-class with bf16
# autocast (about 990 TFLOP/s dense on the data sheet, taken as 400 sustained for the mix of GEMMs and
# memory-bound ops), HBM3, PCIe 5 pinned copies. CPU: a few cores.
# The meta device models the GPU it stands in for.
DEFAULT_RATES = {
    "cuda": Rates(flops_per_s=400e12, device_bytes_per_s=3.0e12, host_bytes_per_s=25e9),
    "cpu": Rates(flops_per_s=1e11, device_bytes_per_s=2e10, host_bytes_per_s=1e10),
}


def _storage(t: torch.Tensor):
    """(identity, bytes) of a tensor's storage; identities are unique while the storage lives, on meta too."""
    storage = t.untyped_storage()
    return storage._cdata, storage.nbytes()


def _storage_ids(module: nn.Module) -> set[int]:
    ids = set()
    for t in [*module.parameters(), *module.buffers()]:
        ids.add(_storage(t)[0])
    return ids


# %% Counting what stays on the device ------------------------------------------------------------------------------
class SavedTensorMeter:
    """Counts the bytes autograd keeps for backward while active, through saved-tensor hooks.

    Every saved tensor that reaches these hooks stays in the graph, i.e. on the device. Hooks installed inside
    this context (ChainMemory's spills and recomputes) take precedence, so what they move away is not counted;
    what ChainMemory keeps on the device for a recompute (the unit's inputs) is saved through these hooks and is
    counted. Unique storages count once (whole storages: a saved view keeps its whole base alive); parameters and
    buffers of the ``exclude`` modules are weights, not activations.
    """

    def __init__(self, *exclude: nn.Module):
        self.exclude = set().union(*map(_storage_ids, exclude))
        self.bytes = 0
        self.tensors = 0
        self._seen: dict[int, torch.Tensor] = {}
        self._hooks = saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        sid, nbytes = _storage(t)
        if sid not in self.exclude and sid not in self._seen:
            self._seen[sid] = t  # held while counting so that storage identity cannot be reused
            self.bytes += nbytes
            self.tensors += 1
        return t

    def __enter__(self) -> "SavedTensorMeter":
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)
        self._seen.clear()


# %% Exact recompute ------------------------------------------------------------------------------------------------
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
    """

    def __init__(self, memory: "ChainMemory", fn, args, kwargs, offload_inputs: bool, record: "UnitCost | None"):
        flat, self.spec = tree_flatten((args, kwargs))
        held_idx = [i for i, v in enumerate(flat) if isinstance(v, torch.Tensor) and not memory._is_weight(v)]
        held = [flat[i] for i in held_idx]
        skip = set(held_idx)
        self.flat = [None if i in skip else v for i, v in enumerate(flat)]  # no references to activations
        self.held_idx = held_idx
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
        flat = list(self.flat)
        for i, t, requires_grad in zip(self.held_idx, held, self.requires_grad):
            flat[i] = t.detach().requires_grad_(requires_grad)
        args, kwargs = tree_unflatten(flat, self.spec)
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


# %% The manager ----------------------------------------------------------------------------------------------------
@dataclass
class UnitCost:
    """What one unit call of one UNet step costs, measured."""

    unit: int          # index into ChainMemory.units
    name: str
    act_bytes: int = 0      # bytes autograd saves in it (unique storages, weights excluded)
    input_bytes: int = 0    # bytes of its tensor inputs (what a recompute must keep)
    flops: float = 0.0      # forward FLOPs (what a recompute costs)


@dataclass
class ChainProfile:
    """The unit calls of a gradient step, in order, for one input signature.

    ``calls`` is the first gradient step, ``later`` the second (None when only one was measured). They differ:
    the first step's latent does not require grad, so e.g. conv_in saves nothing there and saves its input in
    every later step."""

    signature: tuple
    calls: list[UnitCost] = field(default_factory=list)
    later: list[UnitCost] | None = None

    def step_calls(self, step: int) -> list[UnitCost]:
        return self.calls if step == 0 or self.later is None else self.later

    def columns(self, steps: int) -> tuple[list[int], list[int], list[float]]:
        rows = [c for step in range(steps) for c in self.step_calls(step)]
        return [c.act_bytes for c in rows], [c.input_bytes for c in rows], [c.flops for c in rows]


class ChainMemory:
    """Bounded device memory for backpropagation through ``grad_steps`` UNet steps; see the module docstring.

    Args:
        unet: the denoiser, a UNet3DConditionModel or a video transformer (LoRA may be injected before or after).
        grad_steps: K, the gradient steps the chain runs.
        budget: device bytes for saved activations ("8GiB", an int) or "auto" (today's K=1 footprint).
        granularity: "layers" (default) or "blocks"; see ``denoiser_units``.
        backend: "extension", "python" or None (the extension when built; see ``csrc.backend``).
        host_offload: allow spilling to host memory (pinned on CUDA); off, the plan only keeps or recomputes.
        rates: the cost model's machine; default ``DEFAULT_RATES`` for the UNet's device.
        prefetch_depth: groups copied back ahead of backward (1 = double buffering).
        resolution: byte buckets of the planner's knapsack.
        decisions: force decisions instead of planning: one decision for every item, or
            ``f(step, call, unit_name) -> decision`` (tests and experiments).
        profile: a ChainProfile measured earlier (skips the measuring step when the signature matches).
        max_inflight_bytes: device bytes of spills whose copy has not finished before forward waits; by default
            the in-flight allowance the plan reserves (before the plan: a quarter of the budget, at most 1 GiB).
    """

    def __init__(self, unet: nn.Module, grad_steps: int, budget: int | str = "auto", *, granularity: str = "layers",
                 backend: str | None = None, host_offload: bool = True, rates: Rates | None = None,
                 prefetch_depth: int = 1, resolution: int = 1024,
                 decisions: int | Callable[[int, int, str], int] | None = None,
                 profile: ChainProfile | None = None, max_inflight_bytes: int | None = None):
        if grad_steps < 1:
            raise ValueError(f"grad_steps must be at least 1, got {grad_steps}")
        self.unet = unet
        self.grad_steps = int(grad_steps)
        self.budget = parse_budget(budget)
        self.device = next(unet.parameters()).device
        self.backend = csrc.backend(backend, self.device)
        self.host_offload = host_offload
        base = rates or DEFAULT_RATES["cpu" if self.device.type == "cpu" else "cuda"]
        self.rates = base if host_offload else base._replace(host_bytes_per_s=0.0)
        self.prefetch_depth, self.resolution = prefetch_depth, resolution
        self._fixed_inflight = max_inflight_bytes is not None
        if max_inflight_bytes is None:
            max_inflight_bytes = 1 << 30 if self.budget == "auto" else max(1, min(1 << 30, self.budget // 4))
        self.store = self.backend.Store(max_inflight_bytes, prefetch_depth, self.device.type == "cuda")
        self.units = denoiser_units(unet, granularity)
        self.profile = profile
        self.plan: Plan | None = None
        self._forced = self._forced_fn(decisions)
        self._least = RECOMPUTE_OFFLOAD if self.rates.host_bytes_per_s > 0 else RECOMPUTE
        self._today_at_k1 = self.budget == "auto" and self.grad_steps == 1
        self._probe_decision = RECOMPUTE if self._today_at_k1 else self._least
        # runtime state
        self._step: int | None = None
        self._call = 0
        self._unet_calls = 0
        self._mode = "plan"
        self._step_ok = True
        self._records: list[UnitCost] = []
        self._records_later: list[UnitCost] = []
        self._signature: tuple | None = None
        self._weights: set[int] = set()
        self._spilled: dict[tuple, tuple] = {}
        self._next_group = 0
        self._warned: set[str] = set()
        self.region_bytes: int | None = None  # what the reward side saves, measured by region()
        self.counters = {"calls": {n: 0 for n in DECISION_NAMES}, "recomputes": 0, "max_recompute_bytes": 0,
                         "measured_steps": 0, "regions": {"keep": 0, "offload": 0}}
        self._chain = None
        self._wrap()
        self._hook = unet.register_forward_pre_hook(self._on_unet_call, with_kwargs=True)
        if self.profile is not None:
            self._make_plan()

    # -- wiring ----------------------------------------------------------------------------------------------
    def _wrap(self):
        self._previous: list[tuple[nn.Module, object]] = []
        for index, (name, module) in enumerate(self.units):
            original = module.forward
            self._previous.append((module, module.__dict__.get("forward")))

            def forward(*args, _unit=index, _original=original, **kwargs):
                if self._step is None or not torch.is_grad_enabled():
                    return _original(*args, **kwargs)
                return self._run(_unit, _original, args, kwargs)

            forward.__chain_memory_unit__ = name
            module.forward = forward  # an instance attribute: the state dict and the class are untouched

    def attach(self, chain) -> "ChainMemory":
        """Use this manager for ``chain``'s gradient steps (sets ``chain.step_context``)."""
        self._chain = (chain, chain.step_context)
        chain.step_context = self.step_context
        return self

    def revert(self) -> None:
        """Restore the units' forwards (and the chain's step_context when attached) and wait for the copies."""
        for module, previous in self._previous:
            if previous is None:
                module.__dict__.pop("forward", None)
            else:
                module.forward = previous
        self._previous = []
        self._hook.remove()
        if self._chain is not None:
            chain, step_context = self._chain
            chain.step_context = step_context
            self._chain = None
        self.store.synchronize()

    @contextmanager
    def step_context(self, index: int):
        """Gradient step ``index`` (0 .. K-1) of the chain runs inside; plugs into ``EditChain.step_context``."""
        if index == 0:
            self._weights = _storage_ids(self.unet)  # LoRA may have been added since the last iteration
            self._spilled.clear()
            self._unet_calls = 0
            if self._mode == "probe" and self._records:  # the last chain ran fewer steps than measured for
                self._finish_probe()
            self._mode = "forced" if self._forced is not None else "plan"
        self._step, self._call, self._step_ok = index, 0, True
        try:
            yield
            if self._mode == "probe" and index == min(1, self.grad_steps - 1):
                self._finish_probe()
        finally:
            self._step = None

    @contextmanager
    def region(self, *modules: nn.Module):
        """Run the reward side inside: its saved tensors stay on the device if they fit the budget beside the
        chain's plan, else go to the host store (``modules``' weights never move). See the module docstring."""
        spill_possible = self.budget != "auto" and self.rates.host_bytes_per_s > 0 and self._forced is None
        if not (spill_possible and torch.is_grad_enabled()):
            yield
            return
        fits = (self.region_bytes is not None and self.plan is not None
                and self.region_bytes + self.plan.device_bytes <= self.budget)
        self.counters["regions"]["keep" if fits else "offload"] += 1
        if fits:
            yield
            return
        weights, self._weights = self._weights, self._weights | set().union(*map(_storage_ids, modules))
        spilled = []
        try:
            # a group per storage: backward brings back one at a time, prefetching the ones saved before it
            with saved_tensors_hooks(*self._spill_functions(None, on_put=spilled.append)):
                yield
        finally:
            self._weights = weights
        if self.region_bytes is None:
            self.region_bytes = sum(spilled)

    def _on_unet_call(self, module, args, kwargs):
        if self._step is None or not torch.is_grad_enabled():
            return None
        signature = self._signature_of(args, kwargs)
        if self._step == 0 and self._unet_calls == 0:
            if self._mode == "forced":
                pass
            elif (self.profile is None or self.profile.signature != signature
                  or (self.grad_steps > 1 and self.profile.later is None)):
                self._mode, self._records, self._records_later = "probe", [], []
            elif self.plan is None:
                self._make_plan()
            self._signature = signature
        elif signature != self._signature:
            self._step_ok = False
            self._warn("signature", "the UNet's inputs changed shape within one chain; that step runs in the "
                                    "least-memory mode")
        self._unet_calls += 1
        return None

    @staticmethod
    def _signature_of(args, kwargs) -> tuple:
        leaves, _ = tree_flatten((args, kwargs))
        tensors = tuple((tuple(t.shape), t.dtype, t.device.type) for t in leaves if isinstance(t, torch.Tensor))
        device_type = "cuda" if any(t[2] == "cuda" for t in tensors) else "cpu"
        autocast = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
        return tensors + (("autocast", autocast),)

    # -- deciding ------------------------------------------------------------------------------------------------
    @staticmethod
    def _forced_fn(decisions):
        if decisions is None:
            return None
        if callable(decisions):
            return decisions
        if isinstance(decisions, int) and 0 <= decisions < len(DECISION_NAMES):
            return lambda step, call, name: decisions
        raise ValueError(f"decisions must be one of {list(range(len(DECISION_NAMES)))} or a callable, got {decisions!r}")

    def _decide(self, unit: int) -> tuple[int, UnitCost | None]:
        step, call = self._step, self._call
        self._call += 1
        name = self.units[unit][0]
        if self._mode == "forced":
            return int(self._forced(step, call, name)), None
        if self._mode == "probe":
            if step <= 1:
                record = UnitCost(unit, name)
                (self._records if step == 0 else self._records_later).append(record)
                return self._probe_decision, record
            return self._least, None
        if not self._step_ok or self.plan is None:
            return self._least, None
        calls = self.profile.step_calls(step)
        if (step >= self.grad_steps or call >= len(calls) or calls[call].unit != unit
                or len(calls) != len(self.profile.calls)):
            self._warn("sequence", "the chain ran more gradient steps or unit calls than planned for; the extra "
                                   "ones run in the least-memory mode")
            return self._least, None
        return self.plan.decisions[step * len(calls) + call], None

    def _finish_probe(self):
        self.profile = ChainProfile(self._signature, self._records, self._records_later or None)
        self._records, self._records_later = [], []
        self.counters["measured_steps"] += 1
        self._make_plan()
        self._mode = "plan"

    def _make_plan(self):
        calls = self.profile.calls
        act, inp, flops = self.profile.columns(self.grad_steps)
        today = sum(c.input_bytes for c in calls) + max((c.act_bytes for c in calls), default=0)
        if self._today_at_k1:
            cost = sum(self.backend.option_costs(c.act_bytes, c.input_bytes, c.flops, *self.rates)[RECOMPUTE]
                       for c in calls)
            self.plan = csrc.summarize([RECOMPUTE] * len(calls), act, inp, flops, today, today - sum(inp), 1, True,
                                       cost)
            return
        budget = self.budget
        if budget == "auto":
            least = csrc.fallback.reserve_bytes(act, inp, self.rates.host_bytes_per_s > 0, self.prefetch_depth)
            budget = max(today, least)
        self.plan = csrc.make_plan(act, inp, flops, budget, self.rates, self.prefetch_depth, self.resolution,
                                   self.backend)
        if not self._fixed_inflight:
            # a spilled tensor holds its device memory until its copy lands: keep that within the plan's reserve
            largest = max((max(a, x) for a, x in zip(act, inp)), default=0)
            self.store.set_max_inflight_bytes(max(1, self.prefetch_depth * largest))
        if not self.plan.feasible:
            self._warn("budget", f"warning: memory budget {budget} B is below the {self.plan.device_bytes} B "
                                 f"({self.plan.device_bytes / 2 ** 20:.1f} MiB) that {self.grad_steps} gradient step(s) "
                                 f"need at least with this model and shape; running the least-memory plan (a "
                                 f"--memory-budget of at least {self.plan.device_bytes} B fits it)")

    # -- running ---------------------------------------------------------------------------------------------
    def _run(self, unit: int, original, args, kwargs):
        decision, record = self._decide(unit)
        self.counters["calls"][DECISION_NAMES[decision]] += 1
        if decision == KEEP:
            return original(*args, **kwargs)
        if decision == OFFLOAD:
            with self._spill_hooks(self._new_group()):
                return original(*args, **kwargs)
        if decision in (RECOMPUTE, RECOMPUTE_OFFLOAD):
            frame = _Recompute(self, original, args, kwargs, decision == RECOMPUTE_OFFLOAD, record)
            return frame.run(args, kwargs)
        raise ValueError(f"unknown decision {decision} for unit {self.units[unit][0]}")

    def _is_weight(self, t: torch.Tensor) -> bool:
        """A parameter (or a view of one): the UNet's, the region's modules', or any trainable leaf, such as the
        gathered weights FSDP swaps in for a forward. Weights are never spilled, recomputed or counted."""
        base = t if t._base is None else t._base
        return (base.is_leaf and base.requires_grad) or _storage(t)[0] in self._weights

    def _new_group(self) -> int:
        self._next_group += 1
        return self._next_group

    def _spill_hooks(self, group: int):
        return saved_tensors_hooks(*self._spill_functions(group))

    def _spill_functions(self, group: int | None, on_put: Callable[[int], None] | None = None):
        """(pack, unpack): saved tensors go to the store by whole storage (views of one storage share one entry)
        and come back as views with the same offset, sizes and strides: backward then runs the very same kernels,
        bit for bit (a contiguous copy of a strided view changes the rounding of the matmuls that read it).
        ``group`` None gives every new storage a group of its own; ``on_put`` receives each new entry's bytes."""

        def pack(t: torch.Tensor):
            if self._is_weight(t):
                return t
            storage = t.untyped_storage()
            key = (storage._cdata, t._version)
            hit = self._spilled.get(key)
            handle = hit[1]() if hit is not None and hit[0]() is not None else None
            if handle is None:
                whole = t.new_empty(0, dtype=torch.uint8).set_(storage)
                own = self._new_group() if group is None else group
                handle = _Spilled(self.store, self.store.put(whole, own), own)
                self._spilled[key] = (weakref.ref(t), weakref.ref(handle))
                if on_put is not None:
                    on_put(storage.nbytes())
            elif group is not None and handle.group != group:
                self.store.share(handle.key, group)  # one host copy; this unit's prefetch brings it back too
            return handle, handle.group if group is None else group, t.dtype, t.storage_offset(), t.shape, t.stride()

        def unpack(packed):
            if isinstance(packed, torch.Tensor):
                return packed
            handle, asking, dtype, offset, shape, stride = packed
            whole = self.store.get(handle.key, asking)
            return whole.new_empty(0, dtype=dtype).set_(whole.untyped_storage(), offset, shape, stride)

        return pack, unpack

    def _note_recompute(self, nbytes: int):
        self.counters["recomputes"] += 1
        self.counters["max_recompute_bytes"] = max(self.counters["max_recompute_bytes"], nbytes)

    def _unit_name(self, fn) -> str:
        for name, module in self.units:
            if getattr(fn, "__self__", None) is module:
                return name
        return getattr(fn, "__qualname__", "a unit")

    def _warn(self, key: str, message: str):
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(message)

    # -- reporting -------------------------------------------------------------------------------------------
    def stats(self) -> dict:
        """Plan summary, store statistics (host/device bytes, copies, prefetch hits) and what ran."""
        store = dict(zip(STAT_NAMES, self.store.stats()))
        out = {"backend": self.backend.name, "plan": self.plan.summary() if self.plan else None, "store": store,
               **{k: (dict(v) if isinstance(v, dict) else v) for k, v in self.counters.items()}}
        out["peak_transient_bytes"] = self.counters["max_recompute_bytes"] + store["peak_device_bytes"]
        return out

    def table(self) -> str:
        """One line per unit call of a step: measured bytes and FLOPs and the decision of every step."""
        if self.profile is None or self.plan is None:
            return "no plan yet (the first gradient step measures the units)"
        calls, k = self.profile.calls, self.grad_steps
        short = {KEEP: "K", OFFLOAD: "O", RECOMPUTE: "R", RECOMPUTE_OFFLOAD: "X"}
        lines = [f"{'unit':<40} {'saved MiB':>10} {'inputs MiB':>10} {'GFLOP':>9}  steps 0..{k - 1} "
                 "(K keep, O offload, R recompute, X recompute+offload inputs)"]
        for j, c in enumerate(calls):
            row = "".join(short[self.plan.decisions[s * len(calls) + j]] for s in range(k))
            lines.append(f"{c.name:<40} {c.act_bytes / 2**20:>10.1f} {c.input_bytes / 2**20:>10.1f} "
                         f"{c.flops / 1e9:>9.2f}  {row}")
        return "\n".join(lines)
