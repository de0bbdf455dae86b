"""csrc: the checkpoint planner and store, in the C++ extension and in its pure-Python fallback.

The extension is built by ``pip install --no-build-isolation -e .`` (or ``python setup.py build_ext --inplace``);
its tests are skipped, with the reason, when it is not built. The fallback is always tested, and where both
exist they must agree bit for bit.
"""

import itertools
import logging
import random

import pytest
import torch

import csrc
from csrc import KEEP, OFFLOAD, RECOMPUTE, RECOMPUTE_OFFLOAD, STAT_NAMES, Rates, fallback

EXT_REASON = f"csrc._C is not built ({csrc.extension_error()}); {csrc.BUILD_HINT}"
needs_extension = pytest.mark.skipif(not csrc.extension_available(), reason=EXT_REASON)
BACKENDS = ["python", pytest.param("extension", marks=needs_extension)]
RATES = Rates(1e12, 1e11, 1e10)


# %% Reference: brute force over every plan ---------------------------------------------------------------------
def brute_force_cost(act, inp, flops, budget, rates, depth, resolution):
    """Least cost over all 4^N plans under the planner's own bucketing (the DP must find exactly this)."""
    best = None
    hosts = [False, True] if rates.host_bytes_per_s > 0 else [False]
    for host in hosts:
        reserve = fallback.reserve_bytes(act, inp, host, depth)
        avail = budget - reserve
        if avail < 0:
            continue
        if sum(act) <= avail:
            return 0.0  # everything kept: free
        q = max(1, -(-avail // max(resolution, 32 * len(act))))
        cap = avail // q
        options = []
        for a, x, f in zip(act, inp, flops):
            cost = fallback.option_costs(a, x, f, *rates)
            nbytes = [a, 0, x, 0]
            options.append([(-(-nbytes[o] // q), cost[o]) for o in range(4)
                            if host or o in (KEEP, RECOMPUTE)])
        for combo in itertools.product(*options):
            if sum(w for w, _ in combo) <= cap:
                total = 0.0
                for _, c in combo:
                    total += c
                best = total if best is None or total < best else best
    return best


def random_instance(rnd: random.Random, n: int):
    act = [rnd.choice([0, rnd.randrange(1, 1 << 20)]) for _ in range(n)]
    inp = [rnd.randrange(0, 1 << 18) for _ in range(n)]
    flops = [float(rnd.choice([0, rnd.randrange(1, 10**9)])) for _ in range(n)]
    return act, inp, flops


# %% Loading ----------------------------------------------------------------------------------------------------
@needs_extension
def test_extension_is_importable_as_one_module():
    import csrc._C  # noqa: F401

    assert callable(torch.ops.chain_memory.plan)
    assert torch.classes.chain_memory.Store is not None
    assert csrc.backend().name == "extension"
    assert csrc.backend("extension").cuda == bool(torch.ops.chain_memory.cuda_built())


def test_fallback_is_used_and_logged_once(monkeypatch, caplog):
    monkeypatch.setattr(csrc, "_extension_state", {"ok": False, "error": "ImportError: not built", "cuda": False})
    monkeypatch.setattr(csrc, "_logged_fallback", [])
    monkeypatch.delenv("CHAIN_MEMORY_BACKEND", raising=False)
    with caplog.at_level(logging.WARNING, logger="csrc"):
        assert csrc.backend().name == "python"
        assert csrc.backend().name == "python"
    messages = [r.getMessage() for r in caplog.records if "pure-Python" in r.getMessage()]
    assert len(messages) == 1 and "not built" in messages[0] and "--no-build-isolation" in messages[0]
    with pytest.raises(RuntimeError, match="not available"):
        csrc.backend("extension")


def test_backend_env_and_errors(monkeypatch):
    monkeypatch.setenv("CHAIN_MEMORY_BACKEND", "python")
    assert csrc.backend().name == "python"
    with pytest.raises(ValueError, match="unknown chain-memory backend"):
        csrc.backend("fortran")


# %% Planner ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("seed", range(6))
def test_planner_is_optimal_on_small_instances(name, seed):
    rnd = random.Random(seed)
    be = csrc.backend(name)
    for _ in range(4):
        act, inp, flops = random_instance(rnd, rnd.randrange(1, 5))
        rates = Rates(1e12, 1e11, rnd.choice([0.0, 1e9, 1e11]))
        depth, resolution = rnd.randrange(0, 3), rnd.choice([1, 7, 64, 1024])
        budget = rnd.randrange(0, 3 * (sum(act) + sum(inp)) + 2)
        decisions, reserve, quantum, feasible, cost = be.plan(act, inp, flops, budget, *rates, depth, resolution)
        best = brute_force_cost(act, inp, flops, budget, rates, depth, resolution)
        assert feasible == (best is not None)
        if feasible:
            assert cost == pytest.approx(best, rel=1e-12, abs=0)
            plan = csrc.summarize(decisions, act, inp, flops, budget, reserve, quantum, feasible, cost)
            assert plan.resident_bytes + reserve <= budget


@pytest.mark.parametrize("name", BACKENDS)
def test_planner_respects_budget_and_is_monotone(name):
    rnd = random.Random(7)
    be = csrc.backend(name)
    for _ in range(10):
        act, inp, flops = random_instance(rnd, rnd.randrange(5, 40))
        rates = Rates(1e12, 1e11, rnd.choice([0.0, 1e10]))
        previous = None
        for budget in sorted(rnd.randrange(0, 2 * sum(act) + 1) for _ in range(5)):
            plan = csrc.make_plan(act, inp, flops, budget, rates, 1, 256, be)
            if plan.feasible:
                assert plan.resident_bytes + plan.reserve <= budget
                if previous is not None and previous.feasible:
                    assert plan.cost <= previous.cost * (1 + 1e-9) + 1e-15  # more memory never costs more time
            else:
                host = rates.host_bytes_per_s > 0
                least = fallback.reserve_bytes(act, inp, host, 1) + (0 if host else sum(inp))
                assert budget < least
                assert all(d in ((OFFLOAD, RECOMPUTE_OFFLOAD) if host else (RECOMPUTE,)) for d in plan.decisions)
            previous = plan


@pytest.mark.parametrize("name", BACKENDS)
def test_planner_keeps_everything_that_fits(name):
    act, inp, flops = [100, 200, 300], [10, 20, 30], [1e6, 2e6, 3e6]
    plan = csrc.make_plan(act, inp, flops, sum(act) + 300, RATES, 1, 1024, csrc.backend(name))
    assert plan.decisions == [KEEP] * 3 and plan.cost == 0.0 and plan.feasible
    # without room for the largest activation nothing can be kept or recomputed, so it all goes to the host
    tight = csrc.make_plan(act, inp, flops, 0, RATES, 1, 1024, csrc.backend(name))
    assert not tight.feasible and set(tight.decisions) <= {OFFLOAD, RECOMPUTE_OFFLOAD}


@pytest.mark.parametrize("name", BACKENDS)
def test_planner_grid_scales_with_the_number_of_items(name):
    """More items than buckets (K=12 at full size has 1,056): rounding each item up to a bucket must not
    push items out of a budget they fit in; at most 1/32 of the budget is lost to rounding."""
    mib, n = 1 << 20, 1200
    act, inp, flops = [mib] * n, [mib // 16] * n, [1e9] * n
    be = csrc.backend(name)
    roomy = csrc.make_plan(act, inp, flops, 64 << 30, RATES, 1, 1024, be)
    assert roomy.decisions == [KEEP] * n and roomy.cost == 0.0
    reserve = fallback.reserve_bytes(act, inp, True, 1)
    room_for = 1150
    tight = csrc.make_plan(act, inp, flops, reserve + room_for * mib, RATES, 1, 1024, be)
    kept = tight.decisions.count(KEEP)
    assert room_for * (1 - 1 / 32) <= kept <= room_for
    assert tight.resident_bytes + tight.reserve <= reserve + room_for * mib


@pytest.mark.parametrize("name", BACKENDS)
def test_planner_rejects_bad_input(name):
    be = csrc.backend(name)
    with pytest.raises(RuntimeError, match="one entry per item"):
        be.plan([1, 2], [1], [1.0, 2.0], 10, *RATES, 1, 16)
    with pytest.raises(RuntimeError, match="must be > 0"):
        be.plan([1], [1], [1.0], 10, 0.0, 1.0, 1.0, 1, 16)
    with pytest.raises(RuntimeError, match="negative"):
        be.plan([-1], [1], [1.0], 10, *RATES, 1, 16)


@needs_extension
def test_extension_and_fallback_plans_are_identical():
    rnd = random.Random(11)
    ext, py = csrc.backend("extension"), csrc.backend("python")
    for _ in range(60):
        act, inp, flops = random_instance(rnd, rnd.randrange(0, 120))
        rates = Rates(rnd.choice([1e11, 4e14]), rnd.choice([2e10, 3e12]), rnd.choice([0.0, 1e10, 25e9]))
        args = (act, inp, flops, rnd.randrange(-10, 2 * sum(act) + sum(inp) + 10), *rates, rnd.randrange(0, 3),
                rnd.choice([1, 5, 128, 1024]))
        assert ext.plan(*args) == py.plan(*args)  # decisions, reserve, quantum, feasible and the float cost
        for a, x, f in zip(act[:5], inp, flops):
            assert ext.option_costs(a, x, f, *rates) == py.option_costs(a, x, f, *rates)


# %% Store ------------------------------------------------------------------------------------------------------
def sample_tensors():
    """Odd dtypes and layouts: what autograd saves is not always contiguous."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 10, generator=g)
    return [
        torch.randn(3, 5, generator=g),
        torch.randn(4, 5, generator=g).t(),                       # transposed: dense, strides kept
        base[1:5, 2:9],                                            # a view with an offset: not dense
        torch.randn(2, 3, 8, 8, generator=g).to(memory_format=torch.channels_last),
        torch.randn(3, generator=g).expand(4, 3),                  # stride 0: comes back contiguous
        torch.tensor(3.5),                                         # 0-d
        torch.empty(0, 7),                                         # empty
        torch.randn(33, generator=g).to(torch.bfloat16),
        torch.randn(5, 5, generator=g).half(),
        torch.randint(0, 1 << 40, (17,), generator=g),
        torch.rand(9, generator=g) > 0.5,
        torch.randn(4, 3, generator=g, dtype=torch.complex64),
        torch.randn(1000, generator=g).double()[::3],
    ]


@pytest.mark.parametrize("name", BACKENDS)
def test_store_returns_exactly_what_it_was_given(name):
    store = csrc.backend(name).Store(1 << 30, 1, False)
    tensors = sample_tensors()
    keys = [store.put(t, group) for group, t in enumerate(tensors)]
    for group in reversed(range(len(tensors))):  # backward order: each get prefetches the group before it
        t, out = tensors[group], store.get(keys[group], group)
        assert out.dtype == t.dtype and out.shape == t.shape and out.device == t.device
        assert torch.equal(out, t)
        if fallback.is_non_overlapping_and_dense(t):
            assert out.stride() == t.stride()
        else:
            assert out.is_contiguous()
        assert out.data_ptr() != t.data_ptr() or t.numel() == 0
    stats = dict(zip(STAT_NAMES, store.stats()))
    assert stats["puts"] == stats["gets"] == len(tensors)
    assert stats["demand_copies"] == 1 and stats["ready_on_get"] == len(tensors) - 1  # all but the first prefetched
    assert all(store.release(k) for k in keys)
    stats = dict(zip(STAT_NAMES, store.stats()))
    assert stats["entries"] == stats["host_bytes"] == stats["device_bytes"] == 0


@pytest.mark.parametrize("name", BACKENDS)
def test_store_groups_shares_pool_and_errors(name):
    store = csrc.backend(name).Store(1 << 30, 1, False)
    a, b, c = torch.randn(100), torch.randn(100), torch.randn(50)
    ka = store.put(a, 1)
    kb = store.put(b, 2)
    store.share(ka, 2)                    # a is needed by group 2 as well
    kc = store.put(c, 3)
    assert torch.equal(store.get(kb, 2), b)  # group 2 comes back on demand, with a; group 1 is prefetched
    held = store.get(ka, 2)
    assert torch.equal(held, a)
    s = dict(zip(STAT_NAMES, store.stats()))  # both handed over; b's copy is gone, a's lives
    assert s["demand_copies"] == 2 and s["h2d_bytes"] == 800 and s["device_bytes"] == 400
    assert store.get(ka, 1).data_ptr() == held.data_ptr()  # a repeat while a's copy lives: that copy
    assert torch.equal(store.get(kc, 3), c)  # group 3 was not prefetched: demand copy; it prefetches group 2,
    s = dict(zip(STAT_NAMES, store.stats()))  # where b's copy is gone and a's lives: b comes back alone
    assert s["h2d_bytes"] == 1400 and s["device_bytes"] == 800 and s["demand_copies"] == 3 and s["gets"] == 4
    assert s["peak_device_bytes"] == 1000  # a, b and c at once
    del held
    assert torch.equal(store.get(ka, 1), a)  # a's copy gone: copied back again
    s = dict(zip(STAT_NAMES, store.stats()))
    assert s["h2d_bytes"] == 1800 and s["device_bytes"] == 400 and s["gets"] == 5
    # released buffers go back to the pool and are reused by the next put of the same (rounded) size
    assert store.release(ka) and not store.release(ka)
    store.put(torch.randn(100), 4)
    s = dict(zip(STAT_NAMES, store.stats()))
    assert s["pool_hits"] == 1 and s["pool_misses"] == 3 and s["pool_bytes"] == 3 * 512
    store.release(kb)
    store.trim()
    assert dict(zip(STAT_NAMES, store.stats()))["pool_bytes"] == 2 * 512
    store.reset_peaks()
    s = dict(zip(STAT_NAMES, store.stats()))
    assert s["puts"] == 0 and s["peak_host_bytes"] == s["host_bytes"] == 2 * 512
    with pytest.raises(RuntimeError, match="unknown or released key"):
        store.get(ka, 1)
    with pytest.raises(RuntimeError, match="strided"):
        store.put(torch.eye(3).to_sparse(), 0)
    with pytest.raises(RuntimeError, match="group"):
        store.put(a, -1)
    with pytest.raises(RuntimeError, match="max_inflight_bytes"):
        csrc.backend(name).Store(0, 1, False)
    with pytest.raises(RuntimeError, match="max_inflight_bytes"):
        store.set_max_inflight_bytes(0)


@pytest.mark.parametrize("name", BACKENDS)
def test_store_counts_a_handed_over_copy_while_it_lives(name):
    """Device bytes count the copies brought back that still live, held by the store or handed over; a copy gone
    or released leaves them, whichever comes first."""
    store = csrc.backend(name).Store(1 << 30, 0, False)
    a, b = torch.randn(100), torch.randn(50)
    ka, kb = store.put(a, 0), store.put(b, 1)
    device_bytes = lambda: dict(zip(STAT_NAMES, store.stats()))["device_bytes"]  # noqa: E731
    held = store.get(ka, 0)
    assert device_bytes() == 400
    store.get(kb, 1)  # handed over and gone at once
    assert device_bytes() == 400
    assert store.release(ka) and device_bytes() == 0  # released while it lives: the store counts it no more
    assert torch.equal(held, a)
    store.get(kb, 1)  # gone before anything looks again, then released
    assert store.release(kb) and device_bytes() == 0


@pytest.mark.parametrize("name", BACKENDS)
def test_store_on_meta_keeps_shapes_only(name):
    store = csrc.backend(name).Store(1 << 30, 1, False)
    t = torch.empty(4, 1024, device="meta").t()
    key = store.put(t, 0)
    out = store.get(key, 0)
    assert out.is_meta and out.shape == t.shape and out.stride() == t.stride()
    s = dict(zip(STAT_NAMES, store.stats()))
    assert s["host_bytes"] == 4 * 1024 * 4 and s["pool_bytes"] == 0  # counted, never allocated


@needs_extension
@pytest.mark.parametrize("depth", [0, 1, 2])
def test_extension_and_fallback_stores_agree(depth):
    """The same random sequence of operations gives the same tensors and the same statistics."""
    rnd = random.Random(depth)
    stores = [csrc.backend(n).Store(1 << 20, depth, False) for n in ("extension", "python")]
    tensors = sample_tensors()
    live: list[tuple[int, int]] = []
    for step in range(300):
        op = rnd.random()
        if op < 0.4 or not live:
            t, group = rnd.choice(tensors), rnd.randrange(0, 12)
            keys = [s.put(t, group) for s in stores]
            assert keys[0] == keys[1]
            live.append((keys[0], group))
        elif op < 0.55:
            key, _ = rnd.choice(live)
            group = rnd.randrange(0, 12)
            for s in stores:
                s.share(key, group)
        elif op < 0.8:
            key, group = rnd.choice(live)
            ask = rnd.choice([group, -1, rnd.randrange(0, 12)])
            a, b = (s.get(key, ask) for s in stores)
            assert torch.equal(a, b) and a.stride() == b.stride() and a.dtype == b.dtype
        elif op < 0.9:
            key, _ = live.pop(rnd.randrange(len(live)))
            assert [s.release(key) for s in stores] == [True, True]
        else:
            group = rnd.randrange(0, 12)
            for s in stores:
                s.prefetch_group(group)
        assert stores[0].stats() == stores[1].stats(), f"statistics differ after operation {step}"
