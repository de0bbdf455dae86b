"""Guards against reward hacking: early stopping on the held-out reward, and a motion-preservation penalty.

Image rewards score frames one at a time, so fine-tuning can raise them by freezing the video (every frame the
same pretty picture) or by drifting into over-saturated, adversarial patterns that the reward model likes and
people do not (the paper stops at 20k steps because more over-optimises). Two cheap defences:

* ``EarlyStopping``: evaluate on held-out prompts every N steps and stop once the held-out reward has not
  improved by ``min_delta`` for ``patience`` evaluations (keep the best LoRA, not the last).
* ``motion_penalty``: keep the edited video's frame-to-frame changes close to those of a reference with the
  motion we want to keep -- the base model's (LoRA off) edit of the same source from the same noise
  (``base_model_edit``, exact but one extra no-grad pass of the chain), or the source latents themselves
  (free, but also penalises motion the edit changes on purpose). In latent space, with Δ_t x = x_{t+1} - x_t
  over frames:

      P(x) = mean_{c, t, h, w} (Δ_t x - Δ_t x_ref)^2        per video, x_ref without gradient

  A change that is the same in every frame (colour, lighting, style) has Δ_t = 0 and costs nothing; a frozen
  video where the reference moves costs mean (Δ_t x_ref)^2. The trainer adds ``weight * P.mean()`` to the
  reward loss. Latents are [B, C, F, h, w], as the chain returns them; no decoding is needed.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from engine.lora import adapters_disabled


# ---------------------------------------------------------------------------------- early stopping
class Decision(NamedTuple):
    stop: bool
    best: float


class EarlyStopping:
    """Stop after ``patience`` evaluations without an improvement of more than ``min_delta`` over the best.

    ``mode="max"`` for rewards (higher is better). ``patience=0`` never stops (it only tracks the best).
    A non-finite value never counts as an improvement. ``improved`` tells whether the last value set a new best
    (the moment to save the best LoRA); ``state_dict()`` / ``load_state_dict()`` carry it across a resume.
    """

    def __init__(self, patience: int, min_delta: float = 0.0, mode: str = "max"):
        if patience < 0:
            raise ValueError(f"patience {patience} must be non-negative (0 = never stop)")
        if min_delta < 0:
            raise ValueError(f"min_delta {min_delta} must be non-negative")
        if mode not in ("max", "min"):
            raise ValueError(f"mode {mode!r} must be 'max' or 'min'")
        self.patience, self.min_delta, self.mode = patience, min_delta, mode
        self.best = -math.inf if mode == "max" else math.inf
        self.best_step: int | None = None
        self.bad_evals = 0
        self.improved = False

    def _better(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.best_step is None and not math.isfinite(self.best):
            return True
        return value > self.best + self.min_delta if self.mode == "max" else value < self.best - self.min_delta

    def update(self, value: float, step: int | None = None) -> Decision:
        value = float(value)
        self.improved = self._better(value)
        if self.improved:
            self.best, self.best_step, self.bad_evals = value, step, 0
        else:
            self.bad_evals += 1
        return Decision(stop=self.patience > 0 and self.bad_evals >= self.patience, best=self.best)

    def state_dict(self) -> dict:
        return {"best": self.best, "best_step": self.best_step, "bad_evals": self.bad_evals, "improved": self.improved}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.best_step = float(state["best"]), state["best_step"]
        self.bad_evals, self.improved = int(state["bad_evals"]), bool(state["improved"])


# ---------------------------------------------------------------------------------- motion
def frame_differences(latents: torch.Tensor) -> torch.Tensor:
    """Δ_t x = x[:, :, t+1] - x[:, :, t] for latents [B, C, F, h, w] -> [B, C, F-1, h, w]."""
    if latents.dim() != 5:
        raise ValueError(f"expected video latents [B, C, F, h, w], got shape {tuple(latents.shape)}")
    return latents[:, :, 1:] - latents[:, :, :-1]


def motion_penalty(edited: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per-video P = mean (Δ_t edited - Δ_t reference)^2, shape [B]; differentiable in ``edited`` only.

    Computed in fp32 (the differences of nearby frames are small; bf16 would round many of them to zero).
    """
    if edited.shape != reference.shape:
        raise ValueError(f"edited {tuple(edited.shape)} and reference {tuple(reference.shape)} latents differ in shape")
    if edited.shape[2] < 2:
        return edited.new_zeros(edited.shape[0], dtype=torch.float32)
    gap = frame_differences(edited.float()) - frame_differences(reference.detach().float())
    return gap.pow(2).flatten(1).mean(1)


@torch.no_grad()
def motion_magnitude(latents: torch.Tensor) -> torch.Tensor:
    """Per-video mean |Δ_t x| [B]: log edited / base to see motion freezing as it happens."""
    return frame_differences(latents.float()).abs().flatten(1).mean(1)


@torch.no_grad()
def base_model_edit(chain, latents: torch.Tensor, context: torch.Tensor, uncond: torch.Tensor,
                    generator) -> torch.Tensor:
    """The base model's (LoRA off) edit of ``latents`` with the noise the next ``chain.edit`` call will draw.

    Call it just before the LoRA edit with the same generator: its state is saved and restored, so both edits
    start from the same noised latent (and draw the same eta noise). Works with torch.Generator and
    engine.distributed.ShardedGenerator. Costs one no-grad pass of the chain (steps_run CFG UNet calls).
    """
    state = generator.get_state() if generator is not None else None
    with adapters_disabled(chain.model.denoiser):
        reference = chain.edit(latents, context, uncond, generator)
    if generator is not None:
        generator.set_state(state)
    return reference
