"""The editing chain: noise a source latent to fraction tau of a D-step schedule, then denoise.

Only the last K steps run with gradient; the earlier ones run under ``no_grad``. The timesteps and the schedule's
values come from the model's own diffusers scheduler, so the arithmetic is its ``step``'s:

- ``DDIMScheduler`` with epsilon prediction (ModelScope, zeroscope) or v-prediction (CogVideoX): noising is
  q_sample, x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) noise, at the first timestep run;
- ``FlowMatchEulerDiscreteScheduler`` (Wan 2.1): noising interpolates to the sigma of the first step run
  (its shift included), x = (1 - sigma) x_0 + sigma noise, and each step is x + (sigma_next - sigma) v.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, fields
from typing import Callable

import torch

import kernels
from engine.distributed import randn
from engine.models import VideoDiffusion
from engine.runtime import NoGradPath
from engine.schedule import editing_scheduler, is_flow_matching


@dataclass(frozen=True)
class ChainConfig:
    """The numbers that define a chain: D, tau, K, the CFG scale, DDIM's eta and the temporal offset noise."""

    ddim_steps: int = 20
    tau: float = 0.6
    grad_steps: int = 1
    guidance: float = 3.0
    eta: float = 0.0
    offset_noise: float = 0.1


class EditChain:
    """Timesteps, noising and denoising for one model and one ``ChainConfig``; fixed once built (``replace``
    gives a chain with other options).

    ``denoiser``: what calls the model's denoiser (the trainer's DistributedDataParallel wrapper under torchrun);
    None = ``model.denoiser``. ``no_grad_path``: how the steps without gradient call it (bf16 autocast, compiled;
    ``engine.runtime.NoGradPath``). ``memory``: the activation-memory manager of the gradient steps
    (``engine.memory.ChainMemory``); None keeps every activation autograd saves."""

    def __init__(self, model: VideoDiffusion, ddim_steps: int = 20, tau: float = 0.6, grad_steps: int = 1,
                 guidance: float = 3.0, eta: float = 0.0, offset_noise: float = 0.1, *,
                 denoiser: torch.nn.Module | None = None, no_grad_path: NoGradPath | None = None, memory=None):
        config = ChainConfig(ddim_steps, tau, grad_steps, guidance, eta, offset_noise)
        schedule = editing_scheduler(model.scheduler, ddim_steps)
        flow = is_flow_matching(schedule)
        if flow and eta > 0:
            raise ValueError(f"eta={eta}: flow-matching Euler steps are deterministic; eta applies to DDIM only")
        steps_run = max(1, round(tau * ddim_steps))
        if not 1 <= grad_steps <= steps_run:
            raise ValueError(f"grad_steps={grad_steps} must be in [1, {steps_run}]")
        values = dict(model=model, config=config, schedule=schedule, flow=flow, steps_run=steps_run,
                      prediction="flow" if flow else schedule.config.prediction_type,
                      denoiser=denoiser, no_grad_path=no_grad_path, memory=memory)
        values |= {f.name: getattr(config, f.name) for f in fields(config)}  # chain.guidance, chain.grad_steps, ...
        if flow:  # float timesteps; step i goes from sigmas[i] to sigmas[i + 1]
            values |= dict(timesteps=[float(t) for t in schedule.timesteps[-steps_run:]],
                           sigmas=[float(s) for s in schedule.sigmas],
                           _step_index={float(t): i for i, t in enumerate(schedule.timesteps)})
        else:
            values["timesteps"] = [int(t) for t in schedule.timesteps[-steps_run:]]
        self.__dict__.update(values)

    def __setattr__(self, name, value):
        raise AttributeError(f"EditChain is fixed once built; use chain.replace({name}=...) for a chain with "
                             "another setting")

    def replace(self, **changes) -> "EditChain":
        """A new chain with some options changed (``ChainConfig`` fields, ``denoiser``, ``no_grad_path``,
        ``memory``); the others as here."""
        numbers = {f.name: changes.pop(f.name, getattr(self.config, f.name)) for f in fields(ChainConfig)}
        extras = {k: changes.pop(k, self.__dict__[k]) for k in ("denoiser", "no_grad_path", "memory")}
        if changes:
            raise TypeError(f"EditChain.replace: unknown options {sorted(changes)}")
        return type(self)(self.model, **numbers, **extras)

    def step_context(self, index: int):
        """The context gradient step ``index`` (0 .. K-1) runs in: the memory manager's, or none."""
        return self.memory.step_context(index) if self.memory is not None else nullcontext()

    # -- schedule ---------------------------------------------------------------------------------
    def alpha(self, t: int) -> float:
        """alphas_cumprod[t], or the scheduler's final alpha past the start of the schedule."""
        if t < 0:
            return float(self.schedule.final_alpha_cumprod)
        return float(self.schedule.alphas_cumprod[t])

    def previous(self, t: int) -> int:
        return t - self.schedule.config.num_train_timesteps // self.ddim_steps

    # -- noising ----------------------------------------------------------------------------------
    def draw_noise(self, shape, generator: torch.Generator | None, device) -> torch.Tensor:
        """randn plus the temporal offset term s * randn(b, c, f, 1, 1) shared by all pixels of a frame."""
        noise = randn(shape, generator, device)
        if self.offset_noise:
            noise = noise + self.offset_noise * randn((*shape[:3], 1, 1), generator, device)
        return noise

    def noise_to_start(self, latents: torch.Tensor, generator: torch.Generator | None = None,
                       noise: torch.Tensor | None = None) -> torch.Tensor:
        """q_sample, x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) noise at the first timestep run; for flow matching
        x = (1 - sigma) x_0 + sigma noise at its sigma (FlowMatchEulerDiscreteScheduler.scale_noise, in fp32).
        ``noise`` (from ``draw_noise``) when given, else drawn from ``generator``."""
        noise = self.draw_noise(latents.shape, generator, latents.device) if noise is None else noise
        if self.flow:
            sigma = torch.tensor(self.sigmas[self._step_index[self.timesteps[0]]], dtype=torch.float32)
            return (float(sigma) * noise + float(1.0 - sigma) * latents.float()).to(latents.dtype)
        a_t = self.alpha(self.timesteps[0])
        return (a_t ** 0.5 * latents.float() + (1 - a_t) ** 0.5 * noise).to(latents.dtype)

    # -- denoising --------------------------------------------------------------------------------
    def guided_step(self, x: torch.Tensor, t: int, context: torch.Tensor, uncond: torch.Tensor,
                    generator: torch.Generator | None) -> torch.Tensor:
        """One denoiser evaluation (both CFG halves in one batched call) and one fused CFG + sampler update; without
        gradient, through ``no_grad_path`` when the chain has one."""
        model = self.model
        denoiser, timestep, path_context = model.denoiser if self.denoiser is None else self.denoiser, t, nullcontext()
        if self.no_grad_path is not None and not torch.is_grad_enabled():
            path = self.no_grad_path
            denoiser, timestep, path_context = path.denoiser(model.denoiser), path.timestep(t), path.context()
        with path_context:
            if self.guidance == 1.0:
                eps_c = model.predict(denoiser, x, timestep, context)
                eps_u = eps_c
            else:
                eps = model.predict(denoiser, torch.cat([x, x]), timestep, torch.cat([uncond, context]))
                eps_u, eps_c = eps.chunk(2)
        if self.flow:
            i = self._step_index[t]
            return kernels.cfg_flow_step(x, eps_u, eps_c, self.guidance, self.sigmas[i], self.sigmas[i + 1])
        noise = randn(x.shape, generator, x.device) if self.eta > 0 else None
        return kernels.cfg_ddim_step(x, eps_u, eps_c, self.guidance, self.alpha(t), self.alpha(self.previous(t)),
                                     self.eta, noise, self.prediction)

    def denoise(self, x: torch.Tensor, context: torch.Tensor, uncond: torch.Tensor,
                generator: torch.Generator | None = None, timesteps: list[int] | None = None,
                grad_steps: int | None = None) -> torch.Tensor:
        """Run ``timesteps`` (default: the edit tail); gradient flows through the last ``grad_steps`` only."""
        timesteps = self.timesteps if timesteps is None else timesteps
        grad_steps = self.grad_steps if grad_steps is None else grad_steps
        first_grad = len(timesteps) - grad_steps
        for i, t in enumerate(timesteps):
            with_grad = i >= first_grad and torch.is_grad_enabled()
            with torch.set_grad_enabled(with_grad), (self.step_context(i - first_grad) if with_grad else nullcontext()):
                x = self.guided_step(x, t, context, uncond, generator)
        return x

    def edit(self, latents: torch.Tensor, context: torch.Tensor, uncond: torch.Tensor,
             generator: torch.Generator | None = None, noise: torch.Tensor | None = None,
             grad_steps: int | None = None) -> torch.Tensor:
        """The InstructVideo edit: noise the source latent to tau, then run the remaining steps (gradient through
        the last ``grad_steps``, default the chain's K)."""
        return self.denoise(self.noise_to_start(latents, generator, noise), context, uncond, generator,
                            grad_steps=grad_steps)

    @torch.no_grad()
    def sample(self, shape, context: torch.Tensor, uncond: torch.Tensor, generator: torch.Generator | None = None,
               ddim_steps: int | None = None, noise: torch.Tensor | None = None,
               on_step: Callable[[], None] | None = None) -> torch.Tensor:
        """Generate from pure noise (drawn from ``generator``, or ``noise`` when given) with the full D-step chain
        (or ``ddim_steps``; no gradient): sources, samples, ``generate``. ``on_step()`` is called after each step."""
        chain = self if ddim_steps in (None, self.ddim_steps) else EditChain(
            self.model, ddim_steps, 1.0, 1, self.guidance, self.eta, self.offset_noise)
        timesteps = [(float if chain.flow else int)(t) for t in chain.schedule.timesteps]
        x = randn(shape, generator, context.device) if noise is None else noise
        for t in timesteps:
            x = chain.guided_step(x, t, context, uncond, generator)
            if on_step is not None:
                on_step()
        return x


def initial_noise(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """x_T for one video: standard normal from a CPU generator, so the seed means the same on every device."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def generate(model: VideoDiffusion, prompts: list[str], seeds: list[int], size: tuple[int, int, int],
             ddim_steps: int = 20, guidance: float = 3.0, eta: float = 0.0, progress=None) -> torch.Tensor:
    """Latents [B, C, F, h, w] for prompts[i] from ``initial_noise(..., seeds[i])`` through all D steps of the
    chain's sampler (``EditChain.sample``, no offset noise): ``engine.sample`` and ``engine.evaluate``.

    ``progress(n)`` is called after each step with the number of videos it advanced. With ``eta > 0`` the
    per-step noise comes from one generator seeded with ``seeds[0]``, so it depends on how videos are batched.
    """
    shape = model.latent_shape(*size)
    chain = EditChain(model, ddim_steps, tau=1.0, grad_steps=1, guidance=guidance, eta=eta, offset_noise=0.0)
    device = model.device
    x = torch.stack([initial_noise(shape, s) for s in seeds]).to(device)
    context = model.encode_prompts(prompts)
    uncond = model.encode_prompts([""]).expand(len(prompts), -1, -1)
    generator = torch.Generator(device).manual_seed(seeds[0]) if eta > 0 else None
    step = (lambda: progress(len(prompts))) if progress else None
    return chain.sample(x.shape, context, uncond, generator, noise=x, on_step=step).float()
