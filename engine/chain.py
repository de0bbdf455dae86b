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

import torch

import kernels
from engine.distributed import randn
from engine.errors import UserError
from engine.models import VideoDiffusion
from engine.runtime import NoGradPath


def is_flow_matching(scheduler) -> bool:
    from diffusers import FlowMatchEulerDiscreteScheduler

    return isinstance(scheduler, FlowMatchEulerDiscreteScheduler)


def editing_scheduler(scheduler, steps: int = 20):
    """A fresh scheduler set to ``steps`` steps, whose schedule the chain runs, from a model's own:

    - DDIM (``DDIMScheduler``, ``CogVideoXDDIMScheduler``; epsilon or v) and ``FlowMatchEulerDiscreteScheduler``:
      the same class and config;
    - a multistep solver on flow sigmas (Wan 2.1 ships ``UniPCMultistepScheduler`` with ``use_flow_sigmas``):
      flow-matching Euler over the solver's own sigmas (its spacing and ``flow_shift``, which differ from
      ``FlowMatchEulerDiscreteScheduler``'s), so the chain visits the noise levels the model's sampler does;
    - ``CogVideoXDPMScheduler`` (CogVideoX-5B): DDIM on its noise schedule (``CogVideoXDDIMScheduler``).
    Anything else is a clear error."""
    import diffusers

    config = scheduler.config
    name = type(scheduler).__name__
    prediction = config.get("prediction_type", "epsilon")
    if name in ("DDIMScheduler", "CogVideoXDDIMScheduler", "CogVideoXDPMScheduler"):
        if prediction not in ("epsilon", "v_prediction"):
            raise UserError(f"scheduler predicts {prediction!r}; this engine supports epsilon- and v-prediction DDIM "
                            "models (ModelScope, zeroscope, CogVideoX) and flow matching (Wan)")
        schedule = (diffusers.CogVideoXDDIMScheduler if name == "CogVideoXDPMScheduler" else type(scheduler)).from_config(config)
    elif is_flow_matching(scheduler):
        schedule = type(scheduler).from_config(config)
    elif config.get("use_flow_sigmas") and prediction == "flow_prediction":
        solver = type(scheduler).from_config(config)
        solver.set_timesteps(steps)
        schedule = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=config.num_train_timesteps, shift=1.0)
        # its sigmas (shifted already: shift 1 keeps them) and its timesteps (whole numbers), as its sampler has them
        schedule.set_timesteps(sigmas=solver.sigmas[:-1].tolist(), timesteps=solver.timesteps.float().tolist())
        return schedule
    else:
        raise UserError(f"scheduler {name} ({prediction}) is not supported; the chain runs DDIM (epsilon or "
                        "v-prediction), CogVideoX's DDIM/DPM schedules and flow matching "
                        "(FlowMatchEulerDiscreteScheduler, or a solver with use_flow_sigmas)")
    schedule.set_timesteps(steps)
    return schedule


class EditChain:
    """Timesteps, noising and denoising for one model and one (D, tau, K, guidance, eta) setting."""

    def __init__(self, model: VideoDiffusion, ddim_steps: int = 20, tau: float = 0.6, grad_steps: int = 1,
                 guidance: float = 3.0, eta: float = 0.0, offset_noise: float = 0.1):
        self.model = model
        self.guidance = guidance
        self.eta = eta
        self.offset_noise = offset_noise
        self.ddim_steps = ddim_steps
        self.schedule = editing_scheduler(model.scheduler, ddim_steps)
        self.flow = is_flow_matching(self.schedule)
        self.prediction = "flow" if self.flow else self.schedule.config.prediction_type
        if self.flow and eta > 0:
            raise ValueError(f"eta={eta}: flow-matching Euler steps are deterministic; eta applies to DDIM only")
        self.steps_run = max(1, round(tau * ddim_steps))
        if self.flow:  # float timesteps; step i goes from sigmas[i] to sigmas[i + 1]
            self.timesteps = [float(t) for t in self.schedule.timesteps[-self.steps_run:]]
            self.sigmas = [float(s) for s in self.schedule.sigmas]
            self._step_index = {float(t): i for i, t in enumerate(self.schedule.timesteps)}
        else:
            self.timesteps = [int(t) for t in self.schedule.timesteps[-self.steps_run:]]
        self.grad_steps = grad_steps
        if not 1 <= grad_steps <= self.steps_run:
            raise ValueError(f"grad_steps={grad_steps} must be in [1, {self.steps_run}]")
        # Memory policy for the gradient steps (see engine.checkpointing): set by the trainer.
        self.step_context = lambda index: nullcontext()
        # What calls the denoiser: the trainer's DistributedDataParallel wrapper under torchrun; None = model.denoiser.
        self.denoiser: torch.nn.Module | None = None
        # How the no-grad steps call it (bf16 autocast, compiled, ...; engine.runtime.NoGradPath): set by the trainer.
        self.no_grad_path: NoGradPath | None = None

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
        gradient, through ``no_grad_path`` when the trainer set one."""
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
             generator: torch.Generator | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
        """The InstructVideo edit: noise the source latent to tau, then run the remaining steps."""
        return self.denoise(self.noise_to_start(latents, generator, noise), context, uncond, generator)

    @torch.no_grad()
    def sample(self, shape, context: torch.Tensor, uncond: torch.Tensor, generator: torch.Generator | None = None,
               ddim_steps: int | None = None, progress=None, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Generate from pure noise (drawn from ``generator``, or ``noise`` when given) with the full D-step chain
        (no gradient): sources and samples."""
        chain = self if ddim_steps in (None, self.ddim_steps) else EditChain(
            self.model, ddim_steps, 1.0, 1, self.guidance, self.eta, self.offset_noise)
        timesteps = [(float if chain.flow else int)(t) for t in chain.schedule.timesteps]
        x = randn(shape, generator, context.device) if noise is None else noise
        for t in (progress(timesteps) if progress else timesteps):
            x = chain.guided_step(x, t, context, uncond, generator)
        return x
