"""What a unit costs: the units ChainMemory plans for, the bytes autograd saves, and the measured costs.

The denoiser's top-level blocks and its planning units (``denoiser_blocks``, ``denoiser_units``), storage
identity and size of a saved tensor, ``SavedTensorMeter`` (the bytes autograd keeps on the device), and the
measured records: ``UnitCost`` (one unit call) and ``ChainProfile`` (the unit calls of a gradient step).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.autograd.graph import saved_tensors_hooks


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


def _storage(t: torch.Tensor):
    """(identity, bytes) of a tensor's storage; identities are unique while the storage lives, on meta too."""
    storage = t.untyped_storage()
    return storage._cdata, storage.nbytes()


def _storage_ids(module: nn.Module) -> set[int]:
    ids = set()
    for t in [*module.parameters(), *module.buffers()]:
        ids.add(_storage(t)[0])
    return ids



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
