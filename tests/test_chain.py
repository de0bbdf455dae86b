"""The editing chain against diffusers' DDIMScheduler, and where gradient flows."""

import pytest
import torch
from diffusers import DDIMScheduler

from engine.chain import EditChain
from engine.lora import add_lora


def contexts(model, prompts=("a cat running", "a red car")):
    return model.encode_prompts(list(prompts)), model.encode_prompts([""] * len(prompts))


def test_official_schedule_starts_at_551_and_runs_12_steps(tiny):
    chain = EditChain(tiny, ddim_steps=20, tau=0.6)
    assert chain.timesteps == list(range(551, 0, -50))
    assert chain.steps_run == 12
    assert chain.alpha(chain.previous(1)) == pytest.approx(float(tiny.scheduler.alphas_cumprod[0]))


def test_noising_is_q_sample(tiny):
    chain = EditChain(tiny, ddim_steps=20, tau=0.6, offset_noise=0.0)
    x0 = torch.randn(1, 4, 8, 16, 16)
    noisy = chain.noise_to_start(x0, torch.Generator().manual_seed(0))
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    expected = tiny.scheduler.add_noise(x0, noise, torch.tensor([551]))
    assert torch.allclose(noisy, expected, atol=1e-6)


def test_offset_noise_shares_one_value_per_frame_and_channel(tiny):
    chain = EditChain(tiny, offset_noise=0.1)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    noise = chain.draw_noise((2, 4, 8, 16, 16), g1, "cpu")
    base = torch.randn((2, 4, 8, 16, 16), generator=g2)
    offset = (noise - base) / 0.1
    assert torch.allclose(offset, offset[..., :1, :1].expand_as(offset), atol=1e-5)


@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_full_sampling_run_equals_ddim_scheduler(tiny, eta):
    """The engine's chain and a plain diffusers loop (CFG + DDIMScheduler.step) give the same video."""
    steps, guidance = 10, 3.0
    context, uncond = contexts(tiny)
    x = torch.randn(2, 4, 8, 16, 16, generator=torch.Generator().manual_seed(1))
    chain = EditChain(tiny, ddim_steps=steps, tau=1.0, guidance=guidance, eta=eta)
    with torch.no_grad():
        ours = chain.denoise(x.clone(), context, uncond, torch.Generator().manual_seed(2))

    scheduler = DDIMScheduler.from_config(tiny.scheduler.config)
    scheduler.set_timesteps(steps)
    g = torch.Generator().manual_seed(2)
    theirs = x.clone()
    with torch.no_grad():
        for t in scheduler.timesteps:
            eps = tiny.unet(torch.cat([theirs] * 2), t, encoder_hidden_states=torch.cat([uncond, context])).sample
            eps_u, eps_c = eps.chunk(2)
            eps = eps_u + guidance * (eps_c - eps_u)
            noise = torch.randn(theirs.shape, generator=g) if eta > 0 else None
            theirs = scheduler.step(eps, t, theirs, eta=eta, variance_noise=noise).prev_sample
    assert chain.timesteps == [int(t) for t in scheduler.timesteps]
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=1e-5), (ours - theirs).abs().max()


def test_guidance_one_runs_a_single_unet_pass(tiny):
    calls = []
    tiny.unet.register_forward_hook(lambda m, a, k, out: calls.append(a[0].shape[0]), with_kwargs=True)
    chain = EditChain(tiny, ddim_steps=4, tau=1.0, guidance=1.0)
    context, uncond = contexts(tiny, ["x"])
    with torch.no_grad():
        chain.denoise(torch.randn(1, 4, 8, 16, 16), context, uncond)
    assert calls == [1] * 4


@pytest.mark.parametrize("k", [1, 2, 4])
def test_gradient_flows_through_exactly_the_last_k_steps(tiny, k):
    add_lora(tiny.unet, rank=4)
    for name, p in tiny.unet.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    grad_calls = []
    tiny.unet.register_forward_hook(lambda m, a, out: grad_calls.append(torch.is_grad_enabled()))
    context, uncond = contexts(tiny)
    chain = EditChain(tiny, ddim_steps=8, tau=0.5, grad_steps=k, guidance=2.0)
    x = torch.randn(2, 4, 8, 16, 16, generator=torch.Generator().manual_seed(0))
    out = chain.edit(x, context, uncond, torch.Generator().manual_seed(1))
    assert grad_calls == [False] * (4 - k) + [True] * k
    params = [p for n, p in tiny.unet.named_parameters() if "lora_" in n]
    grads = torch.autograd.grad(out.square().mean(), params)

    # The same by hand: the first steps as constants, the last k differentiated.
    g = torch.Generator().manual_seed(1)
    x_t = chain.noise_to_start(x, g)
    with torch.no_grad():
        for t in chain.timesteps[: 4 - k]:
            x_t = chain.guided_step(x_t, t, context, uncond, g)
    for t in chain.timesteps[4 - k:]:
        x_t = chain.guided_step(x_t, t, context, uncond, g)
    expected = torch.autograd.grad(x_t.square().mean(), params)
    assert torch.allclose(out, x_t)
    for a, b in zip(grads, expected):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-8)


def test_gradient_reaches_only_lora_parameters(tiny):
    from engine.checkpointing import checkpoint_blocks
    from engine.rewards import ColorfulnessReward
    from engine.video_reward import SegmentalReward, reward_loss

    lora = add_lora(tiny.unet, rank=4)
    revert = checkpoint_blocks(tiny.unet)
    context, uncond = contexts(tiny)
    chain = EditChain(tiny, ddim_steps=6, tau=0.5, grad_steps=2)
    edited = chain.edit(torch.randn(2, 4, 8, 16, 16), context, uncond)
    rewards, _ = SegmentalReward(ColorfulnessReward())(tiny, edited, ["a", "b"])
    reward_loss(rewards).backward()
    revert()
    assert lora and all(p.grad is not None for p in lora)
    assert any(p.grad.abs().sum() > 0 for p in lora)
    for module in (tiny.unet, tiny.vae, tiny.text_encoder):
        for name, p in module.named_parameters():
            assert ("lora_" in name) == (p.grad is not None), name


def test_block_checkpointing_keeps_gradients_and_reverts(tiny):
    from engine.checkpointing import checkpoint_blocks, unet_blocks

    add_lora(tiny.unet, rank=2)
    for name, p in tiny.unet.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    params = [p for n, p in tiny.unet.named_parameters() if "lora_" in n]
    context, uncond = contexts(tiny, ["a"])
    x = torch.randn(1, 4, 8, 16, 16)

    def grads():
        out = tiny.unet(x, 401, encoder_hidden_states=context).sample
        return torch.autograd.grad(out.square().mean(), params)

    plain = grads()
    revert = checkpoint_blocks(tiny.unet)
    checkpointed = grads()
    revert()
    assert all("forward" not in vars(b) for b in unet_blocks(tiny.unet))
    for a, b in zip(plain, checkpointed):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-8)
