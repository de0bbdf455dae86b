"""The pure-Python twin of csrc._C: the same checkpoint planner and the same store, used when the extension is
not built (csrc/__init__.py picks one and logs the fallback once).

Everything here mirrors a C++ function of the same name (csrc/planner.cpp, csrc/store.cpp,
csrc/cuda/store_cuda.cu) statement for statement: the planner's double arithmetic runs in the same order with the
same tie-breaking, so both return identical plans, and the store keeps identical statistics; tests/test_csrc.py
checks both bit for bit. Change one, change the other.
"""

from __future__ import annotations

import math
import threading
from collections import deque

import torch
from torch.multiprocessing.reductions import StorageWeakRef

# -- decisions (csrc/planner.h) ------------------------------------------------------------------------------------
KEEP, OFFLOAD, RECOMPUTE, RECOMPUTE_OFFLOAD = range(4)
DECISION_NAMES = ("keep", "offload", "recompute", "recompute_offload")

# -- store statistics, in stats() order (csrc/store.h, enum Stat) --------------------------------------------------
STAT_NAMES = (
    "entries", "host_bytes", "peak_host_bytes", "pool_bytes", "device_bytes", "peak_device_bytes", "puts", "gets",
    "d2h_bytes", "h2d_bytes", "prefetched", "ready_on_get", "waited_on_get", "demand_copies", "pool_hits",
    "pool_misses", "inflight_bytes", "backpressure_waits",
)
_S = {name: i for i, name in enumerate(STAT_NAMES)}
_INF = math.inf


# %% Planner (csrc/planner.cpp) -------------------------------------------------------------------------------------
def _exposed(copy_s: float, compute_s: float) -> float:
    return max(0.0, copy_s - compute_s) + max(0.0, copy_s - 2.0 * compute_s)


def _costs_and_bytes(act: int, inp: int, flops: float, flops_per_s: float, device_bps: float, host_bps: float):
    t = flops / flops_per_s + float(act) / device_bps
    host = host_bps > 0.0
    cost = [
        0.0,
        _exposed(float(act) / host_bps, t) if host else _INF,
        t,
        t + _exposed(float(inp) / host_bps, t) if host else _INF,
    ]
    return cost, [act, 0, inp, 0]


def option_costs(act_bytes: int, input_bytes: int, flops: float, flops_per_s: float, device_bytes_per_s: float,
                 host_bytes_per_s: float) -> list[float]:
    """Modelled extra seconds of each decision for one item (KEEP, OFFLOAD, RECOMPUTE, RECOMPUTE_OFFLOAD)."""
    return _costs_and_bytes(act_bytes, input_bytes, float(flops), flops_per_s, device_bytes_per_s, host_bytes_per_s)[0]


def reserve_bytes(act: list[int], inp: list[int], host: bool, prefetch_depth: int) -> int:
    unit = inflight = 0
    for a, x in zip(act, inp):
        unit = max(unit, a + (x if host else 0))
        inflight = max(inflight, max(a, x))
    return unit + (prefetch_depth * inflight if host else 0)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _solve(act, inp, flops, budget, rates, host, depth, resolution):
    """dp[b] = least cost of the items so far with total weight <= b buckets (vectorised over b)."""
    reserve = reserve_bytes(act, inp, host, depth)
    avail = budget - reserve
    if avail < 0:
        return None, reserve, 1, 0.0
    n = len(act)
    if sum(act) <= avail:
        return [KEEP] * n, reserve, 1, 0.0
    q = max(1, _ceil_div(avail, max(resolution, 32 * n)))
    nb = avail // q + 1
    dp = torch.zeros(nb, dtype=torch.float64)
    choice = torch.zeros((n, nb), dtype=torch.int8)
    weights = []
    cand = torch.empty((4, nb), dtype=torch.float64)
    for i in range(n):
        cost, nbytes = _costs_and_bytes(act[i], inp[i], flops[i], *rates)
        if not host:
            cost[OFFLOAD] = cost[RECOMPUTE_OFFLOAD] = _INF
        w = [_ceil_div(b, q) for b in nbytes]
        weights.append(w)
        cand.fill_(_INF)
        for o in range(4):
            if w[o] < nb:
                cand[o, w[o]:] = dp[: nb - w[o]] + cost[o]
        best = torch.argmin(cand, dim=0)  # the first minimum, as the C++ loop's strict '<'
        dp = cand.gather(0, best[None])[0]
        choice[i] = best.to(torch.int8)
    total = float(dp[nb - 1])
    if not total < _INF:
        return None, reserve, q, 0.0
    decisions = [KEEP] * n
    b = nb - 1
    for i in range(n - 1, -1, -1):
        o = int(choice[i, b])
        decisions[i] = o
        b -= weights[i][o]
    return decisions, reserve, q, total


def plan(act_bytes, input_bytes, flops, budget: int, flops_per_s: float, device_bytes_per_s: float,
         host_bytes_per_s: float, prefetch_depth: int, resolution: int):
    """Returns (decisions, reserve, quantum, feasible, cost), as torch.ops.chain_memory.plan."""
    act, inp, flops = [int(a) for a in act_bytes], [int(x) for x in input_bytes], [float(f) for f in flops]
    if not len(act) == len(inp) == len(flops):
        raise RuntimeError(f"plan: act_bytes, input_bytes and flops need one entry per item, got {len(act)}, "
                           f"{len(inp)} and {len(flops)}")
    if not (flops_per_s > 0.0 and device_bytes_per_s > 0.0 and host_bytes_per_s >= 0.0):
        raise RuntimeError("plan: flops_per_s and device_bytes_per_s must be > 0, host_bytes_per_s >= 0")
    if resolution < 1 or prefetch_depth < 0:
        raise RuntimeError("plan: resolution must be >= 1 and prefetch_depth >= 0")
    for i, (a, x, f) in enumerate(zip(act, inp, flops)):
        if a < 0 or x < 0 or not f >= 0.0:
            raise RuntimeError(f"plan: item {i} has negative bytes or flops")
    rates = (float(flops_per_s), float(device_bytes_per_s), float(host_bytes_per_s))
    host_ok = rates[2] > 0.0

    best = _solve(act, inp, flops, budget, rates, False, prefetch_depth, resolution)
    if host_ok:
        with_host = _solve(act, inp, flops, budget, rates, True, prefetch_depth, resolution)
        if with_host[0] is not None and (best[0] is None or with_host[3] < best[3]):
            best = with_host
    decisions, reserve, quantum, cost = best
    if decisions is not None:
        return decisions, reserve, quantum, True, cost
    # Infeasible: the least device memory there is, cheapest first among equals.
    reserve = reserve_bytes(act, inp, host_ok, prefetch_depth)
    decisions, cost = [], 0.0
    for a, x, f in zip(act, inp, flops):
        c, _ = _costs_and_bytes(a, x, f, *rates)
        o = RECOMPUTE
        if host_ok:
            o = RECOMPUTE_OFFLOAD if c[RECOMPUTE_OFFLOAD] < c[OFFLOAD] else OFFLOAD
        decisions.append(o)
        cost += c[o]
    return decisions, reserve, 1, False, cost


# %% Store (csrc/store.cpp, csrc/cuda/store_cuda.cu) ----------------------------------------------------------------
_ROUND = 512  # pinned allocations are page-backed anyway; rounding lets nearly equal sizes share buffers


def is_non_overlapping_and_dense(t: torch.Tensor) -> bool:
    """c10's _compute_non_overlapping_and_dense: can the elements be laid out densely with these strides?"""
    sizes, strides = tuple(t.shape), t.stride()
    if len(sizes) == 1:
        return sizes[0] < 2 or strides[0] == 1
    require = 1
    for d in sorted((d for d in range(len(sizes)) if sizes[d] >= 2), key=lambda d: strides[d]):
        if strides[d] != require:
            return False
        require *= sizes[d]
    return True


def _round_up(n: int) -> int:
    return (n + _ROUND - 1) // _ROUND * _ROUND


class _CudaFence:
    __slots__ = ("event", "device")

    def __init__(self, event, device):
        self.event, self.device = event, device

    def ready(self) -> bool:
        return self.event.query()

    def block_stream(self) -> None:
        torch.cuda.current_stream(self.device).wait_event(self.event)

    def synchronize(self) -> None:
        self.event.synchronize()


class _CudaCopier:
    """Device <-> pinned host copies on one side stream per device (see csrc/cuda/store_cuda.cu for the rules)."""

    def __init__(self):
        self.streams: dict[int, torch.cuda.Stream] = {}

    def copy(self, dst: torch.Tensor, src: torch.Tensor, device: torch.device) -> _CudaFence:
        with torch.cuda.device(device):
            caller = torch.cuda.current_stream(device)
            side = self.streams.get(device.index)
            if side is None:
                side = self.streams[device.index] = torch.cuda.Stream(device)
            side.wait_stream(caller)
            fence = torch.cuda.Event()
            with torch.cuda.stream(side):
                dst.copy_(src, non_blocking=True)
                fence.record(side)
        return _CudaFence(fence, device)


class _Entry:
    __slots__ = ("groups", "nbytes", "pooled", "meta", "demand", "delivered", "sizes", "strides", "dtype",
                 "device_type", "buffer", "host", "source", "device", "handed", "d2h", "h2d")

    def __init__(self):
        self.demand = self.delivered = False
        self.buffer = self.host = self.source = self.device = self.handed = self.d2h = self.h2d = None


class Store:
    """Host buffers for spilled saved tensors; the methods and statistics of torch.classes.chain_memory.Store.
    ``get`` hands the device copy over and refers to it weakly from then on (csrc/store.h says why)."""

    def __init__(self, max_inflight_bytes: int, prefetch_depth: int, pin_memory: bool):
        if max_inflight_bytes <= 0:
            raise RuntimeError(f"Store: max_inflight_bytes must be positive, got {max_inflight_bytes}")
        if prefetch_depth < 0:
            raise RuntimeError(f"Store: prefetch_depth must be >= 0, got {prefetch_depth}")
        self._max_inflight = int(max_inflight_bytes)
        self._depth = int(prefetch_depth)
        self._pin = bool(pin_memory)
        self._lock = threading.RLock()
        self._next_key = 0
        self._entries: dict[int, _Entry] = {}
        self._groups: dict[int, list[int]] = {}
        self._pending: deque[int] = deque()
        self._handed_keys: list[int] = []
        self._pool: dict[int, list[torch.Tensor]] = {}
        self._copier: _CudaCopier | None = None
        self._stats = [0] * len(STAT_NAMES)

    # -- helpers -------------------------------------------------------------------------------------------------
    def _copy(self) -> _CudaCopier:
        if self._copier is None:
            self._copier = _CudaCopier()
        return self._copier

    def _take_buffer(self, pooled: int) -> torch.Tensor:
        free = self._pool.setdefault(pooled, [])
        if free:
            self._stats[_S["pool_hits"]] += 1
            return free.pop()
        self._stats[_S["pool_misses"]] += 1
        self._stats[_S["pool_bytes"]] += pooled
        return torch.empty(pooled, dtype=torch.uint8, pin_memory=self._pin)

    def _reap(self, wait_all: bool) -> None:
        # One side stream runs the copies in order: once one is unfinished, the later ones are too.
        while self._pending:
            e = self._entries.get(self._pending[0])
            if e is None or e.d2h is None:
                self._pending.popleft()
                continue
            if wait_all:
                e.d2h.synchronize()
            elif not e.d2h.ready():
                break
            e.d2h = e.source = None
            self._stats[_S["inflight_bytes"]] -= e.nbytes
            self._pending.popleft()

    @staticmethod
    def _handed_copy(e: _Entry) -> torch.Tensor | None:
        """The copy ``get`` handed over, if it still lives."""
        storage = None if e.handed is None else torch.UntypedStorage._new_with_weak_ptr(e.handed.cdata)
        if storage is None:  # gone (the weak pointer's lock fails)
            return None
        return torch.empty(0, dtype=e.dtype, device=e.device_type).set_(storage, 0, e.sizes, e.strides)

    def _forget_gone_copies(self) -> None:
        kept = []
        for key in self._handed_keys:
            e = self._entries[key]  # release() takes its key out of _handed_keys
            if not e.handed.expired():
                kept.append(key)
                continue
            e.handed = None
            self._stats[_S["device_bytes"]] -= e.nbytes
        self._handed_keys = kept

    def _start_copy_back(self, e: _Entry, demand: bool) -> None:
        if e.device is not None or (e.handed is not None and not e.handed.expired()):
            return
        e.device = torch.empty_strided(e.sizes, e.strides, dtype=e.dtype, device=e.device_type)
        if not e.meta:
            if e.device.is_cuda:
                e.h2d = self._copy().copy(e.device, e.host, e.device.device)
            else:
                e.device.copy_(e.host)
        e.demand = demand
        if not demand:
            self._stats[_S["prefetched"]] += 1
        self._stats[_S["h2d_bytes"]] += e.nbytes
        self._stats[_S["device_bytes"]] += e.nbytes
        self._stats[_S["peak_device_bytes"]] = max(self._stats[_S["peak_device_bytes"]], self._stats[_S["device_bytes"]])

    # -- the API of csrc._C --------------------------------------------------------------------------------------
    def put(self, tensor: torch.Tensor, group: int) -> int:
        with self._lock:
            if not isinstance(tensor, torch.Tensor):
                raise RuntimeError("Store.put: the tensor is undefined")
            if tensor.layout != torch.strided:
                raise RuntimeError(f"Store.put: only strided tensors can be stored, got {tensor.layout}")
            if group < 0:
                raise RuntimeError(f"Store.put: group must be >= 0, got {group}")
            self._reap(False)
            key = self._next_key
            self._next_key += 1
            e = _Entry()
            e.groups = [group]
            e.nbytes = tensor.numel() * tensor.element_size()
            e.pooled = _round_up(e.nbytes)
            e.meta = tensor.is_meta
            e.sizes = tuple(tensor.shape)
            e.strides = (tuple(tensor.stride()) if is_non_overlapping_and_dense(tensor)
                         else torch.empty(e.sizes, device="meta").stride())
            e.dtype, e.device_type = tensor.dtype, tensor.device
            if not e.meta:
                e.buffer = self._take_buffer(e.pooled) if e.pooled > 0 else torch.empty(0, dtype=torch.uint8)
                e.host = e.buffer.narrow(0, 0, e.nbytes).view(tensor.dtype).as_strided(e.sizes, e.strides)
                if tensor.is_cuda:
                    e.d2h = self._copy().copy(e.host, tensor, tensor.device)
                    e.source = tensor
                    self._pending.append(key)
                    self._stats[_S["inflight_bytes"]] += e.nbytes
                else:
                    e.host.copy_(tensor)
            s = self._stats
            s[_S["puts"]] += 1
            s[_S["entries"]] += 1
            s[_S["d2h_bytes"]] += e.nbytes
            s[_S["host_bytes"]] += e.pooled
            s[_S["peak_host_bytes"]] = max(s[_S["peak_host_bytes"]], s[_S["host_bytes"]])
            self._groups.setdefault(group, []).append(key)
            self._entries[key] = e
            # Back-pressure: device memory is freed only once its copy has landed, so bound what is in flight.
            while s[_S["inflight_bytes"]] > self._max_inflight and self._pending:
                front = self._entries.get(self._pending[0])
                if front is not None and front.d2h is not None:
                    front.d2h.synchronize()
                s[_S["backpressure_waits"]] += 1
                self._reap(False)
            return key

    def prefetch_group(self, group: int) -> None:
        with self._lock:
            self._forget_gone_copies()
            for k in self._groups.get(group, ()):
                self._start_copy_back(self._entries[k], False)

    def share(self, key: int, group: int) -> None:
        with self._lock:
            e = self._entries.get(key)
            if e is None:
                raise RuntimeError(f"Store.share: unknown or released key {key}")
            if group < 0:
                raise RuntimeError(f"Store.share: group must be >= 0, got {group}")
            if group in e.groups:
                return
            e.groups.append(group)
            self._groups.setdefault(group, []).append(key)

    def get(self, key: int, group: int) -> torch.Tensor:
        with self._lock:
            self._reap(False)
            e = self._entries.get(key)
            if e is None:
                raise RuntimeError(f"Store.get: unknown or released key {key}")
            if group < 0:
                group = e.groups[0]
            self._stats[_S["gets"]] += 1
            self._forget_gone_copies()
            handed = self._handed_copy(e)
            if e.device is None and handed is None:
                # Not prefetched: bring the asking group back now (backward needs all of it next).
                for k in self._groups.get(group, ()):
                    self._start_copy_back(self._entries[k], True)
                self._start_copy_back(e, True)
            # Start the groups backward needs after this one: the ones spilled just before it.
            earlier = sorted(g for g in self._groups if g < group)[::-1][: self._depth]
            for g in earlier:
                for k in self._groups[g]:
                    self._start_copy_back(self._entries[k], False)
            if not e.delivered:
                if e.demand:
                    self._stats[_S["demand_copies"]] += 1
                elif e.h2d is not None and not e.h2d.ready():
                    self._stats[_S["waited_on_get"]] += 1
                else:
                    self._stats[_S["ready_on_get"]] += 1
                e.delivered = True
            if e.h2d is not None:
                e.h2d.block_stream()
                e.h2d = None
            if handed is not None:
                return handed
            # hand the copy over: backward's use of it decides how long it lives
            device, e.device = e.device, None
            if e.handed is not None:
                self._stats[_S["device_bytes"]] -= e.nbytes  # an earlier copy handed over, gone since the last look
            else:
                self._handed_keys.append(key)
            e.handed = StorageWeakRef(device.untyped_storage())
            return device

    def release(self, key: int) -> bool:
        with self._lock:
            e = self._entries.get(key)
            if e is None:
                return False
            if e.h2d is not None:
                e.h2d.block_stream()  # the side stream may still write the device copy we drop
            if e.d2h is not None:
                e.d2h.synchronize()
                self._stats[_S["inflight_bytes"]] -= e.nbytes
            if e.device is not None:
                self._stats[_S["device_bytes"]] -= e.nbytes
            if e.handed is not None:  # counted until looked at again: alive or not, it leaves with its entry
                self._stats[_S["device_bytes"]] -= e.nbytes
                self._handed_keys.remove(key)
            self._stats[_S["host_bytes"]] -= e.pooled
            self._stats[_S["entries"]] -= 1
            if not e.meta and e.pooled > 0:
                self._pool.setdefault(e.pooled, []).append(e.buffer)
            for g in e.groups:
                keys = self._groups[g]
                keys.remove(key)
                if not keys:
                    del self._groups[g]
            del self._entries[key]
            return True

    def synchronize(self) -> None:
        with self._lock:
            self._reap(True)
            for e in self._entries.values():
                if e.h2d is not None:
                    e.h2d.synchronize()

    def stats(self) -> list[int]:
        with self._lock:
            self._reap(False)
            self._forget_gone_copies()
            return list(self._stats)

    def set_max_inflight_bytes(self, nbytes: int) -> None:
        if nbytes <= 0:
            raise RuntimeError(f"Store: max_inflight_bytes must be positive, got {nbytes}")
        with self._lock:
            self._max_inflight = int(nbytes)

    def reset_peaks(self) -> None:
        with self._lock:
            kept = {name: self._stats[_S[name]] for name in
                    ("entries", "host_bytes", "pool_bytes", "device_bytes", "inflight_bytes")}
            self._stats = [0] * len(STAT_NAMES)
            for name, value in kept.items():
                self._stats[_S[name]] = value
            self._stats[_S["peak_host_bytes"]] = self._stats[_S["host_bytes"]]
            self._stats[_S["peak_device_bytes"]] = self._stats[_S["device_bytes"]]

    def trim(self) -> None:
        with self._lock:
            for pooled, free in self._pool.items():
                self._stats[_S["pool_bytes"]] -= pooled * len(free)
                free.clear()

    def __del__(self):
        # Copies still running read or write buffers this object owns: let them finish first.
        try:
            for e in self._entries.values():
                if e.d2h is not None:
                    e.d2h.synchronize()
                if e.h2d is not None:
                    e.h2d.synchronize()
        except Exception:
            pass
