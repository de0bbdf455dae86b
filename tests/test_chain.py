"""The editing chain against diffusers' DDIMScheduler, and where gradient flows."""

import copy

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
    x0 = torch.randn(1, 4, 4, 8, 8)
    noisy = chain.noise_to_start(x0, torch.Generator().manual_seed(0))
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    expected = tiny.scheduler.add_noise(x0, noise, torch.tensor([551]))
    assert torch.allclose(noisy, expected, atol=1e-6)


def test_offset_noise_shares_one_value_per_frame_and_channel(tiny):
    chain = EditChain(tiny, offset_noise=0.1)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    noise = chain.draw_noise((2, 4, 4, 8, 8), g1, "cpu")
    base = torch.randn((2, 4, 4, 8, 8), generator=g2)
    offset = (noise - base) / 0.1
    assert torch.allclose(offset, offset[..., :1, :1].expand_as(offset), atol=1e-5)


@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_full_sampling_run_equals_ddim_scheduler(tiny, eta):
    """The engine's chain and a plain diffusers loop (CFG + DDIMScheduler.step) give the same video."""
    steps, guidance = 10, 3.0
    context, uncond = contexts(tiny)
    x = torch.randn(2, 4, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    chain = EditChain(tiny, ddim_steps=steps, tau=1.0, guidance=guidance, eta=eta)
    with torch.no_grad():
        ours = chain.denoise(x.clone(), context, uncond, torch.Generator().manual_seed(2))

    scheduler = DDIMScheduler.from_config(tiny.scheduler.config)
    scheduler.set_timesteps(steps)
    g = torch.Generator().manual_seed(2)
    theirs = x.clone()
    with torch.no_grad():
        for t in scheduler.timesteps:
            eps = tiny.denoiser(torch.cat([theirs] * 2), t, encoder_hidden_states=torch.cat([uncond, context])).sample
            eps_u, eps_c = eps.chunk(2)
            eps = eps_u + guidance * (eps_c - eps_u)
            noise = torch.randn(theirs.shape, generator=g) if eta > 0 else None
            theirs = scheduler.step(eps, t, theirs, eta=eta, variance_noise=noise).prev_sample
    assert chain.timesteps == [int(t) for t in scheduler.timesteps]
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=1e-5), (ours - theirs).abs().max()


def test_guidance_one_runs_a_single_unet_pass(tiny):
    calls = []
    tiny.denoiser.register_forward_hook(lambda m, a, k, out: calls.append(a[0].shape[0]), with_kwargs=True)
    chain = EditChain(tiny, ddim_steps=4, tau=1.0, guidance=1.0)
    context, uncond = contexts(tiny, ["x"])
    with torch.no_grad():
        chain.denoise(torch.randn(1, 4, 4, 8, 8), context, uncond)
    assert calls == [1] * 4


@pytest.mark.parametrize("k", [1, 2, 4])
def test_gradient_flows_through_exactly_the_last_k_steps(tiny, k):
    add_lora(tiny.denoiser, rank=4)
    for name, p in tiny.denoiser.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    grad_calls = []
    tiny.denoiser.register_forward_hook(lambda m, a, out: grad_calls.append(torch.is_grad_enabled()))
    context, uncond = contexts(tiny)
    chain = EditChain(tiny, ddim_steps=8, tau=0.5, grad_steps=k, guidance=2.0)
    x = torch.randn(2, 4, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    out = chain.edit(x, context, uncond, torch.Generator().manual_seed(1))
    assert grad_calls == [False] * (4 - k) + [True] * k
    params = [p for n, p in tiny.denoiser.named_parameters() if "lora_" in n]
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
    from engine.memory import checkpoint_blocks
    from engine.rewards import ColorfulnessReward
    from engine.video_reward import SegmentalReward, reward_loss

    lora = add_lora(tiny.denoiser, rank=4)
    revert = checkpoint_blocks(tiny.denoiser)
    context, uncond = contexts(tiny)
    chain = EditChain(tiny, ddim_steps=6, tau=0.5, grad_steps=2)
    edited = chain.edit(torch.randn(2, 4, 4, 8, 8), context, uncond)
    rewards, _ = SegmentalReward(ColorfulnessReward())(tiny, edited, ["a", "b"])
    reward_loss(rewards).backward()
    revert()
    assert lora and all(p.grad is not None for p in lora)
    assert any(p.grad.abs().sum() > 0 for p in lora)
    for module in (tiny.denoiser, tiny.vae, tiny.text_encoder):
        for name, p in module.named_parameters():
            assert ("lora_" in name) == (p.grad is not None), name


def test_block_checkpointing_keeps_gradients_and_reverts(tiny):
    from engine.memory import checkpoint_blocks, denoiser_blocks

    add_lora(tiny.denoiser, rank=2)
    for name, p in tiny.denoiser.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    params = [p for n, p in tiny.denoiser.named_parameters() if "lora_" in n]
    context, uncond = contexts(tiny, ["a"])
    x = torch.randn(1, 4, 4, 8, 8)

    def grads():
        out = tiny.denoiser(x, 401, encoder_hidden_states=context).sample
        return torch.autograd.grad(out.square().mean(), params)

    plain = grads()
    revert = checkpoint_blocks(tiny.denoiser)
    checkpointed = grads()
    revert()
    assert all("forward" not in vars(b) for b in denoiser_blocks(tiny.denoiser))
    for a, b in zip(plain, checkpointed):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-8)


# -- the no-grad steps' fast path (engine.runtime.NoGradPath) ---------------------------------------
def _edit_with(tiny, path, k=1, before=None):
    """One edit of the official schedule (12 steps, the last k with gradient), the LoRA weights' gradients;
    ``before(chain, context, uncond)`` runs first, on the same chain."""
    torch.manual_seed(0)  # the same LoRA weights in every call
    params = add_lora(tiny.denoiser, rank=4)
    for p in params:
        torch.nn.init.normal_(p, std=0.05)
    context, uncond = contexts(tiny)
    chain = EditChain(tiny, ddim_steps=20, tau=0.6, grad_steps=k, guidance=3.0, no_grad_path=path)
    if before is not None:
        before(chain, context, uncond)
    out = chain.edit(torch.randn(2, 4, 4, 8, 8, generator=torch.Generator().manual_seed(0)), context, uncond,
                     torch.Generator().manual_seed(1))
    return out, torch.autograd.grad(out.square().mean(), params)


def test_bf16_no_grad_steps_change_results_by_bf16_rounding_only(tiny):
    from engine.runtime import NoGradPath

    exact, exact_grads = _edit_with(copy.deepcopy(tiny), None)
    fast, fast_grads = _edit_with(tiny, NoGradPath("bf16", torch.device("cpu")))
    relative = ((fast - exact).norm() / exact.norm()).item()
    assert 0 < relative < 2 ** -6  # they did run in bf16 (8 mantissa bits), and nothing more than its rounding
    fast_grads, exact_grads = torch.cat([g.flatten() for g in fast_grads]), torch.cat([g.flatten() for g in exact_grads])
    print(f"relative change: edit {relative:.2e}, LoRA gradient {((fast_grads - exact_grads).norm() / exact_grads.norm()).item():.2e}")
    assert ((fast_grads - exact_grads).norm() / exact_grads.norm()).item() < 2 ** -5


def test_compiled_no_grad_steps_equal_eager_and_share_one_graph_over_the_timesteps(tiny):
    from engine.runtime import NoGradPath

    graphs = []

    def backend(graph_module, example_inputs):  # records each graph dynamo hands over, runs it eagerly
        graphs.append(graph_module)
        return graph_module.forward

    compiled_after_one_step = []

    def one_step_first(chain, context, uncond):  # compiles the UNet at one timestep, then counts its graphs
        with torch.no_grad():
            chain.guided_step(torch.randn(2, 4, 4, 8, 8), chain.timesteps[-1], context, uncond, None)
        compiled_after_one_step.append(len(graphs))

    torch._dynamo.reset()
    exact, exact_grads = _edit_with(copy.deepcopy(tiny), None, k=2)
    compiled, grads = _edit_with(tiny, NoGradPath("compile", torch.device("cpu"), compile_backend=backend), k=2,
                                 before=one_step_first)
    torch._dynamo.reset()
    assert compiled_after_one_step[0] > 0
    assert len(graphs) == compiled_after_one_step[0]  # ten more timesteps, no recompilation
    assert torch.equal(compiled, exact)
    for a, b in zip(grads, exact_grads):
        assert torch.equal(a, b)


def test_no_grad_path_auto_is_bf16_only_on_a_fp32_cpu_run_with_bf16_units(monkeypatch):
    from engine import runtime
    from engine.errors import UserError

    for native in (True, False):
        monkeypatch.setattr(runtime, "native_bf16", lambda device, native=native: native)
        assert runtime.NoGradPath("auto", torch.device("cpu")).mode == ("bf16" if native else "off")
        # on CUDA, --precision auto already runs every step in bf16; an fp32 CUDA run keeps its precision
        assert runtime.NoGradPath("auto", torch.device("cuda"), "auto").mode == "off"
        assert runtime.NoGradPath("auto", torch.device("cuda"), "fp32").mode == "off"
    with pytest.raises(UserError, match="--no-grad-path"):
        runtime.NoGradPath("fast", torch.device("cpu"))


# -- other samplers: DDIM with v-prediction (CogVideoX), flow-matching Euler (Wan) --------------------------------
def with_scheduler(model, kind):
    """The tiny model with a CogVideoX-style v-prediction DDIM or a Wan-style flow-matching scheduler."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    if kind == "v":
        model.scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                        clip_sample=False, set_alpha_to_one=True, steps_offset=0,
                                        prediction_type="v_prediction", rescale_betas_zero_snr=True,
                                        timestep_spacing="trailing")
    else:
        model.scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    return model


@pytest.mark.parametrize("kind", ["v", "flow"])
def test_full_sampling_run_equals_the_diffusers_scheduler(tiny, kind):
    """The chain and a plain diffusers loop (CFG + the scheduler's own step) give the same video."""
    model, steps, guidance = with_scheduler(tiny, kind), 10, 5.0
    context, uncond = contexts(model)
    x = torch.randn(2, 4, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    chain = EditChain(model, ddim_steps=steps, tau=1.0, guidance=guidance)
    with torch.no_grad():
        ours = chain.sample(x.shape, context, uncond, torch.Generator().manual_seed(1))

    scheduler = type(model.scheduler).from_config(model.scheduler.config)
    scheduler.set_timesteps(steps)
    theirs = x.clone()
    with torch.no_grad():
        for t in scheduler.timesteps:
            out_u, out_c = model.denoiser(torch.cat([theirs] * 2), t, encoder_hidden_states=torch.cat([uncond, context])).sample.chunk(2)
            theirs = scheduler.step(out_u + guidance * (out_c - out_u), t, theirs).prev_sample
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=1e-5), (ours - theirs).abs().max()


@pytest.mark.parametrize("kind", ["v", "flow"])
def test_edit_noises_like_the_scheduler_and_runs_its_last_steps(tiny, kind):
    model = with_scheduler(tiny, kind)
    chain = EditChain(model, ddim_steps=20, tau=0.6, offset_noise=0.0)
    scheduler = type(model.scheduler).from_config(model.scheduler.config)
    scheduler.set_timesteps(20)
    assert chain.steps_run == 12 and chain.timesteps == [(float if kind == "flow" else int)(t) for t in scheduler.timesteps[-12:]]
    x0 = torch.randn(1, 4, 4, 8, 8)
    noisy = chain.noise_to_start(x0, torch.Generator().manual_seed(0))
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    start = scheduler.timesteps[-12:][:1]
    expected = scheduler.scale_noise(x0, start, noise) if kind == "flow" else scheduler.add_noise(x0, noise, start)
    assert torch.allclose(noisy, expected, atol=1e-6)


def test_flow_matching_rejects_eta_and_unknown_predictions_are_a_clear_error(tiny):
    from engine.errors import UserError
    from engine.models import VideoDiffusion

    with pytest.raises(ValueError, match="deterministic"):
        EditChain(with_scheduler(tiny, "flow"), eta=0.5)
    sample_prediction = DDIMScheduler(prediction_type="sample")
    with pytest.raises(UserError, match="supports epsilon- and v-prediction"):
        VideoDiffusion(tiny.denoiser, tiny.vae, tiny.text_encoder, tiny.tokenizer, sample_prediction)
