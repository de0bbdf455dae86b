"""Chain memory (issue: C++ checkpointing extension): exact gradients, bounded device bytes, plan and store."""

import pytest
import torch

import csrc
from engine.chain import EditChain
from engine.checkpointing import ChainMemory, SavedTensorMeter
from engine.lora import add_lora

STEPS = 4  # D=4, tau=1: four steps run, K up to 4


def lora_model(tiny):
    add_lora(tiny.unet, rank=4)
    g = torch.Generator().manual_seed(0)
    for name, p in tiny.unet.named_parameters():
        if "lora_B" in name:
            p.data = torch.randn(p.shape, generator=g) * 0.05
    return tiny


def grads(model, k, eta, memory=None, meter=None):
    """LoRA gradients of one edit with gradient through the last k steps (and the device bytes it saved)."""
    chain = EditChain(model, ddim_steps=STEPS, tau=1.0, grad_steps=k, guidance=2.0, eta=eta)
    if memory is not None:
        memory.attach(chain)
    context = model.encode_prompts(["a cat", "a dog"])
    uncond = model.encode_prompts(["", ""])
    x = torch.randn(2, 4, 8, 16, 16, generator=torch.Generator().manual_seed(1))
    params = [p for n, p in model.unet.named_parameters() if "lora_" in n]
    out = chain.edit(x, context, uncond, torch.Generator().manual_seed(2))
    return torch.autograd.grad(out.square().mean(), params)


def assert_close(a, b, rtol=1e-6):
    for x, y in zip(a, b):
        assert torch.allclose(x, y, rtol=rtol, atol=1e-12), (x - y).abs().max()


@pytest.mark.parametrize("k, eta, decisions", [
    (1, 0.0, None), (3, 0.0, None), (STEPS, 0.0, None), (1, 0.5, None), (STEPS, 0.5, None),
    (3, 0.5, csrc.RECOMPUTE_OFFLOAD), (STEPS, 0.0, csrc.RECOMPUTE_OFFLOAD), (3, 0.5, csrc.OFFLOAD),
])
def test_gradients_equal_plain_autograd(tiny, k, eta, decisions):
    """K = 1, 3 and all, eta = 0 and > 0, the planned decisions and every unit spilled or recomputed."""
    model = lora_model(tiny)
    plain = grads(model, k, eta)
    budget = "auto" if decisions is None else "1GiB"
    memory = ChainMemory(model.unet, k, budget, decisions=decisions)
    for _ in range(2):  # the first step measures the units, the second runs the plan
        assert_close(grads(model, k, eta, memory), plain)
    memory.revert()


@pytest.mark.skipif(not csrc.extension_available(), reason=f"csrc._C not built: {csrc.extension_error()}")
def test_extension_and_fallback_give_identical_plans_and_gradients(tiny):
    model = lora_model(tiny)
    results = {}
    for name in ("extension", "python"):
        memory = ChainMemory(model.unet, 3, "2MiB", backend=name)
        grads(model, 3, 0.5, memory)
        results[name] = (grads(model, 3, 0.5, memory), memory.plan.decisions, memory.plan.cost)
        memory.revert()
    (ga, da, ca), (gb, db, cb) = results["extension"], results["python"]
    assert da == db and ca == cb
    for x, y in zip(ga, gb):
        assert torch.equal(x, y)
    act, inp, flops = [5 << 20, 3 << 20, 9 << 20, 1 << 20], [1 << 20] * 4, [1e9, 2e9, 3e9, 4e9]
    rates = csrc.Rates(1e12, 1e11, 1e10)
    plans = [csrc.make_plan(act, inp, flops, 12 << 20, rates, backend_=csrc.backend(n)) for n in ("extension", "python")]
    assert plans[0].decisions == plans[1].decisions and plans[0].cost == plans[1].cost


def test_device_bytes_do_not_grow_with_k(tiny):
    model = lora_model(tiny)
    saved = {}
    for k in (1, STEPS):
        memory = ChainMemory(model.unet, k, "auto")
        grads(model, k, 0.0, memory)
        with SavedTensorMeter(exclude=model.unet) as meter:
            grads(model, k, 0.0, memory)
        saved[k] = meter.bytes
        memory.revert()
    latents = 2 * 4 * 8 * 16 * 16 * 4 * 2 * STEPS  # the x_t of every step, in and out, fp32
    assert saved[STEPS] <= 1.1 * saved[1] + latents, saved


@pytest.mark.parametrize("budget", [1 << 20, 4 << 20, 64 << 20])
def test_plan_respects_the_budget(budget):
    g = torch.Generator().manual_seed(0)
    act = (torch.rand(24, generator=g) * (2 << 20)).long().tolist()
    inp = (torch.rand(24, generator=g) * (1 << 18)).long().tolist()
    flops = (torch.rand(24, generator=g) * 1e10).tolist()
    plan = csrc.make_plan(act, inp, flops, budget, csrc.Rates(1e12, 1e11, 1e10))
    if plan.feasible:
        assert plan.device_bytes <= budget
        assert plan.resident_bytes == sum(a if d == csrc.KEEP else x if d == csrc.RECOMPUTE else 0
                                          for d, a, x in zip(plan.decisions, act, inp))
    else:
        assert budget == 1 << 20


@pytest.mark.parametrize("name", ["python", "extension"])
def test_store_returns_exactly_what_it_was_given(name):
    if name == "extension" and not csrc.extension_available():
        pytest.skip(f"csrc._C not built: {csrc.extension_error()}")
    store = csrc.backend(name).Store(1 << 20, 1, False)
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(37, 5, generator=g), torch.randint(0, 9, (4, 4, 3)), torch.randn(6, 8).t(),
               torch.randn(3, dtype=torch.float64)]
    keys = [store.put(t, i % 2) for i, t in enumerate(tensors)]
    store.prefetch_group(1)
    store.prefetch_group(0)
    for key, t in zip(keys, tensors):
        back = store.get(key)
        assert back.dtype == t.dtype and back.shape == t.shape and torch.equal(back, t)
        store.release(key)
