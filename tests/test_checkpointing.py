"""ChainMemory: gradient through K steps of the chain within a device budget, exactly.

The reference is plain autograd without any checkpointing. The model is the tiny preset with LoRA whose B is
random (so LoRA gradients flow everywhere), the chain D=6, tau=1.0 (6 steps run), latents 1x4x4x16x16, CFG on.
"""

import contextlib
import copy
import logging

import pytest
import torch

import csrc
from csrc import KEEP, OFFLOAD, RECOMPUTE, RECOMPUTE_OFFLOAD
from engine.chain import EditChain
from engine.errors import UserError
from engine.memory import (ChainMemory, SavedTensorMeter, checkpoint_blocks, parse_budget, denoiser_blocks,
                           denoiser_units)
from engine.lora import add_lora

STEPS = 6  # D=6, tau=1.0
SHAPE = (1, 4, 4, 16, 16)
needs_extension = pytest.mark.skipif(not csrc.extension_available(),
                                     reason=f"csrc._C is not built ({csrc.extension_error()}); {csrc.BUILD_HINT}")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread: on a loaded 2-core machine OpenMP barriers of tiny ops stall for milliseconds each
    (measured: a 512x32 linear takes 15 ms with 2 threads under load, 0.015 ms with 1), and this file runs the
    tiny chain some fifty times."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def lora_model(_tiny_model_session):
    model = copy.deepcopy(_tiny_model_session)
    params = add_lora(model.denoiser, rank=4)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in params:
            p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return model, params


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(SHAPE, generator=g), torch.randn(1, 77, 32, generator=g), torch.randn(1, 77, 32, generator=g)


def run(lora_model, inputs, k, eta=0.0, memory=None, policy=None):
    """One fine-tuning step's gradient part: returns (LoRA grads, saved bytes kept on the device in forward)."""
    model, params = lora_model
    latents, context, uncond = inputs
    chain = EditChain(model, ddim_steps=STEPS, tau=1.0, grad_steps=k, guidance=3.0, eta=eta, memory=memory)
    revert = policy(model.denoiser) if policy else None
    for p in params:
        p.grad = None
    meter = SavedTensorMeter(model.denoiser)
    try:
        with meter:
            x = chain.edit(latents, context, uncond, torch.Generator().manual_seed(2))
        (x.square().mean() + x.mean()).backward()
    finally:
        if revert:
            revert()
    return [p.grad.clone() for p in params], meter.bytes


def assert_same_grads(grads, reference, bitwise=True):
    for g, r in zip(grads, reference):
        rel = ((g - r).abs().max() / r.abs().max().clamp_min(1e-30)).item()
        assert rel <= 1e-6, rel
        if bitwise:
            assert torch.equal(g, r)


@pytest.fixture(scope="module")
def reference(lora_model, inputs):
    cache = {}

    def get(k, eta):
        if (k, eta) not in cache:
            cache[(k, eta)] = run(lora_model, inputs, k, eta)
        return cache[(k, eta)]

    return get


@pytest.fixture(scope="module")
def profile(lora_model, inputs):
    """The per-unit measurement of the first two gradient steps (shared so later tests plan immediately)."""
    memory = ChainMemory(lora_model[0].denoiser, 2, "auto")
    try:
        run(lora_model, inputs, 2, memory=memory)
    finally:
        memory.revert()
    return memory.profile


def tight_budget(profile, fraction=0.3):
    """Room for the least-memory plan plus ``fraction`` of one step's saved bytes: binding for every K."""
    act, inp, _ = profile.columns(1)
    return csrc.fallback.reserve_bytes(act, inp, True, 1) + int(fraction * sum(act))


# %% Exactness --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("eta", [0.0, 0.5])
@pytest.mark.parametrize("k", [1, 3, STEPS])
def test_grads_equal_plain_autograd(lora_model, inputs, reference, profile, k, eta):
    ref, ref_bytes = reference(k, eta)
    for budget in ("auto", tight_budget(profile)):
        memory = ChainMemory(lora_model[0].denoiser, k, budget)  # first iteration measures, the second runs the plan
        try:
            for _ in range(2):
                grads, saved = run(lora_model, inputs, k, eta, memory)
                assert_same_grads(grads, ref)
                assert saved < ref_bytes
        finally:
            memory.revert()


@pytest.mark.parametrize("decision", [KEEP, OFFLOAD, RECOMPUTE, RECOMPUTE_OFFLOAD, "mixed"])
def test_every_decision_is_exact(lora_model, inputs, reference, decision):
    ref, _ = reference(3, 0.5)
    forced = (lambda step, call, name: (step + call) % 4) if decision == "mixed" else decision
    memory = ChainMemory(lora_model[0].denoiser, 3, decisions=forced)
    try:
        grads, _ = run(lora_model, inputs, 3, 0.5, memory)
    finally:
        memory.revert()
    assert_same_grads(grads, ref)
    calls = memory.stats()["calls"]
    if decision == "mixed":
        assert all(n > 0 for n in calls.values())


def test_recompute_replays_dropout_and_leaves_the_rng_alone(lora_model, inputs):
    """Dropout inside the units draws from the global RNG: the rerun must draw the same numbers."""
    model, _ = lora_model
    dropouts = [m for m in model.denoiser.modules() if isinstance(m, torch.nn.Dropout)]
    assert dropouts
    for m in dropouts:
        m.p = 0.3
    model.denoiser.train()
    try:
        torch.manual_seed(5)
        ref, _ = run(lora_model, inputs, 2)
        after_ref = torch.get_rng_state()
        for decision in (RECOMPUTE, RECOMPUTE_OFFLOAD):
            torch.manual_seed(5)
            memory = ChainMemory(model.denoiser, 2, decisions=decision)
            try:
                grads, _ = run(lora_model, inputs, 2, memory=memory)
            finally:
                memory.revert()
            assert_same_grads(grads, ref)
            assert torch.equal(torch.get_rng_state(), after_ref)
            assert memory.stats()["recomputes"] > 0
    finally:
        for m in dropouts:
            m.p = 0.0
        model.denoiser.eval()


def test_auto_budget_at_k1_is_todays_policy(lora_model, inputs, reference, profile):
    """K=1 with the default budget recomputes every unit with its inputs kept, like checkpoint_blocks."""
    ref, _ = reference(1, 0.0)
    blocks, blocks_bytes = run(lora_model, inputs, 1, policy=checkpoint_blocks)
    assert_same_grads(blocks, ref)
    memory = ChainMemory(lora_model[0].denoiser, 1, "auto", profile=profile)
    try:
        grads, _ = run(lora_model, inputs, 1, memory=memory)
    finally:
        memory.revert()
    assert_same_grads(grads, ref)
    assert set(memory.plan.decisions) == {RECOMPUTE}
    assert memory.stats()["calls"]["recompute"] == len(profile.calls)


@needs_extension
def test_extension_and_fallback_give_identical_results(lora_model, inputs, profile):
    results = {}
    for name in ("extension", "python"):
        memory = ChainMemory(lora_model[0].denoiser, 3, tight_budget(profile), backend=name, profile=profile)
        try:
            grads, saved = run(lora_model, inputs, 3, 0.5, memory)
        finally:
            memory.revert()
        stats = memory.stats()
        results[name] = (grads, saved, memory.plan.decisions, stats["store"], stats["calls"])
    (g_ext, *rest_ext), (g_py, *rest_py) = results["extension"], results["python"]
    assert all(torch.equal(a, b) for a, b in zip(g_ext, g_py))
    assert rest_ext == rest_py


# %% Memory -----------------------------------------------------------------------------------------------------
def test_saved_bytes_do_not_grow_with_k(lora_model, inputs, profile):
    budget = tight_budget(profile)
    measured = {}
    for k in (1, STEPS):
        memory = ChainMemory(lora_model[0].denoiser, k, budget, profile=profile)
        try:
            _, saved = run(lora_model, inputs, k, memory=memory)
        finally:
            memory.revert()
        stats = memory.stats()
        # the plan respects the budget, and what stays on the device is what it planned
        assert memory.plan.feasible and memory.plan.device_bytes <= budget
        assert saved <= memory.plan.resident_bytes + 64 * k  # plus the 16 bytes saved outside the units per step
        assert saved + stats["peak_transient_bytes"] <= budget
        measured[k] = (saved, saved + stats["peak_transient_bytes"])
    plain_growth = run(lora_model, inputs, STEPS)[1] / run(lora_model, inputs, 1)[1]
    assert plain_growth > 0.9 * STEPS
    assert measured[STEPS][0] <= 1.1 * measured[1][0] + 64 * STEPS, measured
    assert measured[STEPS][1] <= 1.1 * measured[1][1] + 64 * STEPS, measured


def test_spills_in_flight_stay_within_the_plans_reserve(lora_model, inputs, profile):
    """A spilled tensor holds device memory until its copy lands; the store may let only what the plan
    reserves for copies (prefetch depth x the largest item) be in flight."""
    memory = ChainMemory(lora_model[0].denoiser, 3, tight_budget(profile))  # measures, then plans
    limits, store = [], memory.store

    class Recording:
        def __getattr__(self, name):
            return getattr(store, name)

        def set_max_inflight_bytes(self, nbytes):
            limits.append(nbytes)
            store.set_max_inflight_bytes(nbytes)

    memory.store = Recording()
    try:
        run(lora_model, inputs, 3, memory=memory)
    finally:
        memory.revert()
    act, inp, _ = memory.profile.columns(3)
    assert limits == [max(max(a, x) for a, x in zip(act, inp))]
    assert limits[0] <= memory.plan.reserve < tight_budget(profile)


def test_infeasible_budget_warns_and_runs_least_memory(lora_model, inputs, reference, profile, caplog):
    ref, _ = reference(3, 0.0)
    memory = ChainMemory(lora_model[0].denoiser, 3, 1, profile=profile)
    try:
        with caplog.at_level(logging.WARNING, logger="engine.memory.manager"):
            grads, saved = run(lora_model, inputs, 3, memory=memory)
    finally:
        memory.revert()
    assert not memory.plan.feasible
    assert any("that 3 gradient step(s) need at least" in r.getMessage() for r in caplog.records)
    assert set(memory.plan.decisions) <= {OFFLOAD, RECOMPUTE_OFFLOAD}
    assert saved <= 64 * 3
    assert_same_grads(grads, ref)


def test_weights_swapped_in_for_a_forward_are_never_spilled(lora_model, inputs, reference, profile):
    """FSDP swaps gathered frozen weights (Parameters the UNet did not hold at step 0) into its layers for each
    forward: the planner treats them as weights, even at a budget that spills everything else."""
    ref, _ = reference(3, 0.0)
    layers = [m for m in lora_model[0].denoiser.modules()
              if isinstance(m, torch.nn.Linear) and not m.weight.requires_grad]
    originals, gathered = [layer.weight for layer in layers], []

    def gather(layer, args):
        layer.weight = torch.nn.Parameter(layer.weight.detach().clone(), requires_grad=False)
        gathered.append(layer.weight)  # kept alive: no storage of theirs is reused by a spilled tensor

    class Recorder:  # the planner's host store, noting at each put whether a gathered weight's storage went in
        def __init__(self, store):
            self.store, self.puts, self.weights_put = store, 0, 0

        def put(self, whole, group):
            self.puts += 1
            self.weights_put += any(whole.untyped_storage()._cdata == w.untyped_storage()._cdata for w in gathered)
            return self.store.put(whole, group)

        def __getattr__(self, name):
            return getattr(self.store, name)

    hooks = [layer.register_forward_pre_hook(gather) for layer in layers]
    memory = ChainMemory(lora_model[0].denoiser, 3, 1, profile=profile)
    memory.store = recorder = Recorder(memory.store)
    try:
        grads, _ = run(lora_model, inputs, 3, memory=memory)
    finally:
        memory.revert()
        for hook, layer, weight in zip(hooks, layers, originals):
            hook.remove()
            layer.weight = weight
    assert gathered and recorder.puts
    assert recorder.weights_put == 0
    assert_same_grads(grads, ref, bitwise=False)


def test_no_grad_steps_and_revert_leave_the_model_untouched(lora_model, inputs):
    model, _ = lora_model
    latents, context, uncond = inputs
    units = [m for _, m in denoiser_units(model.denoiser)]
    chain = EditChain(model, ddim_steps=STEPS, tau=1.0, grad_steps=2)
    with torch.no_grad():
        before = chain.edit(latents, context, uncond, torch.Generator().manual_seed(3))
    memory = ChainMemory(model.denoiser, 2, "auto")
    with torch.no_grad():
        during = chain.replace(memory=memory).edit(latents, context, uncond, torch.Generator().manual_seed(3))
    assert torch.equal(before, during)
    assert memory.stats()["calls"] == {"keep": 0, "offload": 0, "recompute": 0, "recompute_offload": 0}
    memory.revert()
    assert chain.memory is None  # the chain without the manager is as it was
    assert all("forward" not in m.__dict__ for m in units)
    assert not model.denoiser._forward_pre_hooks


# %% Units and budgets ------------------------------------------------------------------------------------------
def test_units_cover_the_unet_without_nesting(lora_model):
    unet = lora_model[0].denoiser
    for granularity in ("layers", "blocks"):
        units = denoiser_units(unet, granularity)
        modules = [m for _, m in units]
        assert len({id(m) for m in modules}) == len(modules)
        for m in modules:  # no unit inside another: each is rematerialised on its own
            assert not any(other is not m and any(sub is other for sub in m.modules()) for other in modules)
        names = [n for n, _ in units]
        assert names[:3] == ["time_embedding", "conv_in", "transformer_in"] and names[-1] == "conv_out"
    assert [m for n, m in denoiser_units(unet, "blocks")][3:-3] == denoiser_blocks(unet)
    with pytest.raises(ValueError, match="granularity"):
        denoiser_units(unet, "steps")


@pytest.mark.parametrize("text, expected", [
    ("auto", "auto"), (None, "auto"), ("8GiB", 8 << 30), ("8G", 8 << 30), ("12GB", 12 * 10**9),
    ("512MiB", 512 << 20), ("1.5 GiB", 3 << 29), (1000000, 1000000), ("1e9", 10**9), ("4096", 4096),
])
def test_parse_budget(text, expected):
    assert parse_budget(text) == expected


@pytest.mark.parametrize("text", ["eight", "8 parsecs", "-1GiB", "0", ""])
def test_parse_budget_rejects(text):
    with pytest.raises(ValueError, match="budget"):
        parse_budget(text)


def reward_step(lora_model, inputs, memory=None):
    """K=1 edit, then decode two SegVR frames and score them inside ``memory.region``: (grads, device bytes)."""
    from engine.rewards import ColorfulnessReward
    from engine.video_reward import SegmentalReward, reward_loss

    model, params = lora_model
    latents, context, uncond = inputs
    chain = EditChain(model, ddim_steps=STEPS, tau=1.0, grad_steps=1, guidance=3.0, memory=memory)
    scorer = SegmentalReward(ColorfulnessReward(), segments=2)
    for p in params:
        p.grad = None
    meter = SavedTensorMeter(model.denoiser, model.vae)
    with meter:
        x = chain.edit(latents, context, uncond, torch.Generator().manual_seed(2))
        with memory.region(model.vae, scorer.reward) if memory is not None else contextlib.nullcontext():
            rewards, _ = scorer(model, x, ["a cat"], generator=torch.Generator().manual_seed(3))
    reward_loss(rewards).backward()
    return [p.grad.clone() for p in params], meter.bytes


def test_reward_region_is_kept_when_it_fits_and_spilled_when_not(lora_model, inputs, profile):
    """Decode + reward under the budget: measured (spilled) once, then kept beside the plan if it fits, spilled
    otherwise; gradients are plain autograd's bit for bit either way, and spilling lowers the device bytes."""
    ref, ref_bytes = reward_step(lora_model, inputs)
    outcomes = {}
    for name, budget in (("roomy", "64GiB"), ("tight", tight_budget(profile))):
        memory = ChainMemory(lora_model[0].denoiser, 1, budget, profile=profile)
        try:
            for _ in range(2):
                grads, saved = reward_step(lora_model, inputs, memory)
                assert_same_grads(grads, ref)
        finally:
            memory.revert()
        outcomes[name] = (memory.region_bytes, memory.counters["regions"], saved, memory.plan.device_bytes)
        if name == "roomy":  # only the first (measuring) region was spilled: it came back a storage at a time
            assert memory.stats()["store"]["peak_device_bytes"] < memory.region_bytes / 2
    (roomy_bytes, roomy, roomy_saved, _), (tight_bytes, tight, tight_saved, tight_plan) = outcomes.values()
    assert roomy_bytes == tight_bytes > 0
    assert roomy == {"keep": 1, "offload": 1} and tight == {"keep": 0, "offload": 2}
    assert tight_bytes + tight_plan > parse_budget(tight_budget(profile))  # it would not have fitted
    assert tight_saved < roomy_saved <= ref_bytes
    # the auto budget keeps today's behaviour: nothing of the reward side moves
    memory = ChainMemory(lora_model[0].denoiser, 1, "auto", profile=profile)
    try:
        reward_step(lora_model, inputs, memory)
    finally:
        memory.revert()
    assert memory.region_bytes is None and memory.counters["regions"] == {"keep": 0, "offload": 0}


def test_host_budget_bounds_what_the_plan_spills(lora_model, inputs, reference, profile):
    """--host-memory-budget: under a tight device budget the plan spills; held to half of that on the host it
    recomputes more instead, and stays exact; where the device budget needs more spilled than the host budget
    allows it is refused, naming the least host budget."""
    ref, _ = reference(3, 0.0)
    free = ChainMemory(lora_model[0].denoiser, 3, tight_budget(profile), profile=profile)
    free.revert()
    spilled = free.plan.host_bytes
    assert free.plan.feasible and spilled > 0
    memory = ChainMemory(lora_model[0].denoiser, 3, tight_budget(profile), profile=profile, host_budget=spilled // 2)
    try:
        grads, _ = run(lora_model, inputs, 3, memory=memory)
    finally:
        memory.revert()
    assert memory.plan.feasible and memory.plan.host_bytes <= spilled // 2
    assert memory.plan.recompute_flops > free.plan.recompute_flops
    assert_same_grads(grads, ref)
    with pytest.raises(UserError, match=r"--host-memory-budget 0 B is below the \d+ B .* within --memory-budget"):
        act, inp, _ = profile.columns(3)  # the least device budget: every unit spilled
        least = csrc.fallback.reserve_bytes(act, inp, True, 1)
        ChainMemory(lora_model[0].denoiser, 3, least, profile=profile, host_budget=0, strict=True).revert()
