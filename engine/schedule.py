"""The schedule side of the step math: the scheduler the editing chain runs (its timesteps and values), built
from a model's own, and whether that schedule is flow matching.

Nothing here touches a model or a tensor: diffusers' schedulers only (imported inside the functions).
"""

from __future__ import annotations

from engine.errors import UserError


def is_flow_matching(scheduler) -> bool:
    """Whether ``scheduler`` is diffusers' ``FlowMatchEulerDiscreteScheduler`` (the chain then steps in sigma)."""
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
