"""Exact, machine-independent counts of a step on the meta device: FLOPs (``FlopCount``, with ``NoGradReuse`` for
a chain's repeated no-gradient denoiser calls), the device bytes alive at the peak (``LiveBytes``) and the attention
kernel a real device runs (``fused_attention_on_meta``). ``engine.train.forecast`` (``--dry-run``) and the
benchmarks count with them; bytes saved for backward are counted with ``engine.memory.SavedTensorMeter``."""

from __future__ import annotations

import weakref
from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode, _get_current_dispatch_mode_stack
from torch.utils._pytree import tree_leaves, tree_map
from torch.utils.flop_counter import flop_registry, sdpa_backward_flop_count, sdpa_flop_count

from kernels.dispatch import set_backend


def _cpu_attention_flops(query, key, value, *args, out_val=None, **kwargs) -> int:
    return sdpa_flop_count(query.shape, key.shape, value.shape)


def _cpu_attention_backward_flops(grad_out, query, key, value, *args, out_val=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out.shape, query.shape, key.shape, value.shape)


# FlopCounterMode's formulas, and the CPU's fused attention, which it does not count (its CUDA twins it does): a CPU
# step's attention would count as zero FLOPs.
FORMULAS = {**flop_registry,
            torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops,
            torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_attention_backward_flops}


class FlopCount(TorchDispatchMode):
    """FlopCounterMode's formulas (``FORMULAS``: its ``flop_registry``, and the CPU's fused attention) without its
    per-module tracking, which doubles the time of a meta-device UNet pass; the totals are the same (bench/test_costs.py
    compares them) but for the CPU's fused attention, which FlopCounterMode counts as nothing.

    On the meta device an op's outputs are empty tensors whose layouts, like its FLOPs, follow from its arguments'
    layouts and other values alone, and the meta kernels take most of a count's time. So an op seen before with the
    same arguments (a chain repeats every step's) returns fresh empty tensors of the layouts it returned then, and
    adds the FLOPs it counted then, without running again; in every process, for every FlopCount. Ops that mutate or
    alias their arguments, ops off the meta device and ops with other dispatch modes below this one always run.

    Everything inside the block runs the kernels' PyTorch reference (``kernels.dispatch``; saved bytes and a planner's
    measurements made there too): a Triton kernel does the same arithmetic but is one launch the dispatcher never
    sees, and the fused CFG+DDIM step saves no tensors, so with kernels on (CUDA, or the CPU under TRITON_INTERPRET=1)
    a count would leave out their work and a checkpointed step's recomputation would stop one convolution early. The
    backend found on entry comes back on exit (last in, first out), whatever was set inside."""

    _seen: dict = {}  # (op, arguments) -> (FLOPs, outputs' _layouts), or None: always run

    def __init__(self, reuse: bool = True):
        super().__init__()
        self.total, self.reuse, self._backends = 0, reuse, []

    def __enter__(self) -> "FlopCount":
        self._backends.append(set_backend("reference"))
        try:
            return super().__enter__()
        except BaseException:
            set_backend(self._backends.pop())
            raise

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            set_backend(self._backends.pop())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        key = _op_key(func, args, kwargs) if self.reuse else None
        seen = self._seen.get(key) if key is not None else None
        if seen is not None:
            flops, outputs = seen
            self.total += flops
            return _fresh(outputs)
        out = func(*args, **kwargs)
        formula = FORMULAS.get(func._overloadpacket)
        flops = formula(*args, **kwargs, out_val=out) if formula is not None else 0
        self.total += flops
        if key is not None and key not in self._seen:
            self._seen[key] = _reusable(flops, out, tree_leaves((args, kwargs)))
        return out


class _Empty:
    """The layout of a meta-device tensor; ``new()`` allocates another one."""

    __slots__ = ("shape", "stride", "dtype")

    def __init__(self, t: torch.Tensor):
        self.shape, self.stride, self.dtype = t.shape, t.stride(), t.dtype

    def new(self) -> torch.Tensor:
        return torch.empty_strided(self.shape, self.stride, dtype=self.dtype, device="meta")


def _layouts(out):
    return tree_map(lambda t: _Empty(t) if isinstance(t, torch.Tensor) else t, out)


def _fresh(layouts):
    """New empty tensors in place of ``_layouts(out)``'s."""
    if isinstance(layouts, _Empty):
        return layouts.new()
    return tree_map(lambda x: x.new() if isinstance(x, _Empty) else x, layouts)


def _op_key(func, args, kwargs):
    """What a meta-device op's outputs depend on, hashable; None where it must run (mutation, aliasing, off meta)."""
    schema = func._schema
    if schema.is_mutable or any(r.alias_info is not None for r in schema.returns) or _get_current_dispatch_mode_stack():
        return None
    try:
        return func, _arguments(args), _arguments(tuple(sorted(kwargs.items())))
    except _MustRun:
        return None


class _MustRun(Exception):
    pass


_PLAIN = (int, float, bool, complex, str, type(None), torch.dtype, torch.device, torch.layout, torch.memory_format)


def _arguments(x, call: bool = False):
    """``x`` as a key: tensors by layout, and with ``call`` (a module's call, not an op) numbers by type and 0-dim
    tensors off the meta device by layout too (a timestep: the denoisers move it onto the inputs' device first)."""
    if isinstance(x, torch.Tensor):
        if x.device.type != "meta" and not (call and x.dim() == 0):
            raise _MustRun
        return x.shape, x.stride(), x.storage_offset(), x.dtype, x.layout, x.device.type
    if isinstance(x, (list, tuple)):
        return type(x), tuple(_arguments(v, call) for v in x)
    if not isinstance(x, _PLAIN):
        raise _MustRun
    if call and isinstance(x, (int, float)) and not isinstance(x, bool):
        return type(x)
    return type(x), x  # 1, 1.0 and True are equal keys otherwise


def _reusable(flops, out, arguments):
    """(flops, ``_layouts(out)``) when fresh empty tensors stand for ``out``'s exactly: on the meta device, plain
    strided tensors of storages of their own, none shared with an argument; else None."""
    tensors = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
    storages = {t.untyped_storage()._cdata for t in tensors}
    taken = {t.untyped_storage()._cdata for t in arguments if isinstance(t, torch.Tensor)}
    for t in tensors:
        if t.device.type != "meta" or type(t) is not torch.Tensor or t.layout != torch.strided or \
                t.storage_offset() or t.untyped_storage().nbytes() != _Empty(t).new().untyped_storage().nbytes():
            return None
    if len(storages) < len(tensors) or storages & taken:
        return None
    return flops, _layouts(out)


class NoGradReuse:
    """Counts each distinct no-gradient call of ``module`` on the meta device once and reuses that count.

    There a call's ops depend on its inputs' shapes, strides and dtypes and on the grad and autocast modes, never on
    values (the denoisers move a timestep onto the inputs' device first), so a chain's no-grad steps, which call the
    denoiser with the same inputs up to 19 times, repeat one count. A repeated call adds the first one's FLOPs to
    every running ``FlopCount`` and returns empty outputs of the same layout (where they stand for the first call's
    exactly, as FlopCount's do for an op); without gradient nothing is saved for backward. Calls with gradient, with tensors off the meta device (but a 0-dim one: the plain loop's timestep) or
    under any other dispatch mode run as usual.
    bench/test_costs.py checks that the totals equal those of running every call."""

    def __init__(self, module: torch.nn.Module):
        self.module, self.calls = module, {}

    def __enter__(self) -> "NoGradReuse":
        self._previous = self.module.__dict__.get("forward")
        forward = self.module.forward
        self.module.forward = lambda *args, **kwargs: self._call(forward, args, kwargs)
        return self

    def __exit__(self, *exc):
        if self._previous is None:
            del self.module.forward
        else:
            self.module.forward = self._previous

    def _call(self, forward, args, kwargs):
        modes = _get_current_dispatch_mode_stack()
        if torch.is_grad_enabled() or not all(isinstance(m, FlopCount) for m in modes):
            return forward(*args, **kwargs)
        autocast = [(torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in ("cpu", "cuda")]
        try:
            key = (self.module.training, *autocast, _arguments(args, True),
                   _arguments(tuple(sorted(kwargs.items())), True))
        except _MustRun:
            return forward(*args, **kwargs)
        seen = self.calls.get(key)
        if seen is None:
            counter = modes[-1] if modes else FlopCount()  # every running FlopCount counts the same
            with nullcontext() if modes else counter:
                before = counter.total
                out = forward(*args, **kwargs)
            self.calls.setdefault(key, _reusable(counter.total - before, out, tree_leaves((args, kwargs))))
            return out
        flops, layouts = seen
        for mode in modes:
            mode.total += flops
        return _fresh(layouts)


class LiveBytes(TorchDispatchMode):
    """The bytes of ``device`` tensors alive, and their peak, while active: every op's outputs are followed by
    their storages (each counted once, until the last tensor on it dies), so the peak is what a caching-free
    allocator would hold at its highest, on top of what existed before the block (``base``, e.g. the weights);
    ``where()``, if given, names the moment of the peak (``peak_at``).
    On the meta device storages live and die exactly as they would on a GPU; an op's internal workspace (cuDNN,
    cuBLAS) is not an output and is not seen."""

    def __init__(self, device: str = "meta", base: int = 0, where=None):
        super().__init__()
        self.device, self.base, self.where = device, base, where
        self.live = self.peak = base
        self.peak_at: str | None = None  # ``where()`` when the peak was reached (e.g. the module running)
        self._storages: dict[int, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # an output on an input's storage (a view, an in-place op) allocates nothing: that storage is followed
        # already or was there before the block (a weight, whose transpose a linear layer takes)
        inputs = {t.untyped_storage()._cdata for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type == self.device \
                    and t.untyped_storage()._cdata not in inputs:
                self._follow(t.untyped_storage())
        return out

    def _follow(self, storage) -> None:
        key = storage._cdata
        if key in self._storages:
            return
        self._storages[key] = nbytes = storage.nbytes()
        self.live += nbytes
        if self.live > self.peak:
            self.peak = self.live
            self.peak_at = self.where() if self.where is not None else None
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.live -= self._storages.pop(key, 0)


@contextmanager
def fused_attention_on_meta():
    """On the meta device ``scaled_dot_product_attention`` falls back to its math form, which keeps the whole
    attention matrix for backward; a CPU or GPU run takes a fused kernel that keeps the output and its log-sum-exp.
    Inside this block meta-device calls take the fused kernel's meta form, so what a count sees saved is what a
    real run saves."""
    original = F.scaled_dot_product_attention

    def attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if query.device.type != "meta" or enable_gqa:
            return original(query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, key, value, dropout_p, is_causal, attn_mask=attn_mask, scale=scale)[0]

    F.scaled_dot_product_attention = attention
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


class ModulePath:
    """The innermost module running now, named by its path in ``roots`` (e.g. ``vae.decoder.up_blocks.2``), through
    global forward hooks: forward calls, and recomputations inside backward, which run forwards too."""

    def __init__(self, **roots: torch.nn.Module):
        self.names = {id(module): f"{root}.{name}".rstrip(".") for root, top in roots.items()
                      for name, module in top.named_modules()}
        self.stack: list[str] = []

    def __enter__(self) -> "ModulePath":
        from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

        def enter(module, args):
            self.stack.append(self.names.get(id(module), type(module).__name__))

        def leave(module, args, output):
            if self.stack:
                self.stack.pop()

        self._handles = [register_module_forward_pre_hook(enter), register_module_forward_hook(leave, always_call=True)]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()

    def current(self) -> str | None:
        return self.stack[-1] if self.stack else None
