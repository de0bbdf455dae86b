"""The fine-tuning configurations compared by ``pytest bench/``, and one fine-tuning step of each.

1. full       full fine-tuning: every UNet weight trains; the chain starts from pure noise and runs all D steps
              with gradient through every step (blocks checkpointed so it fits at all); every frame decoded.
2. draft1     the full chain from pure noise with LoRA, gradient through the last step only (DRaFT-1).
3. official   the official InstructVideo recipe as its code runs it: tau 0.6, D 20, K 1, LoRA r4, all 16 frames
              decoded with gradient before SegVR picks 4, every UNet block checkpointed, and the gradient step
              itself wrapped in a non-reentrant checkpoint around that (so its UNet forward runs three times:
              forward, the step's recomputation, each block's recomputation), eager PyTorch.
4. engine     the same recipe run the way this engine runs it: only the SegVR frames are decoded, activations
              handled by the chain-memory planner (keep / spill to host / recompute within a budget), fused
              kernels where a GPU is present.
5. engine_k4, engine_kall: the engine with gradient through 4 and all 12 steps.

Beside them, ``PlainLoop``: the loop a user would otherwise write with diffusers + peft, the way public VADER- and
DRaFT-style code does it. ``PhaseClock`` splits a step's time (and FLOPs) into its phases (bench/test_phases.py).
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from bench.fullsize import VIDEOALIGN_DATA
from engine.chain import EditChain
from engine.memory import checkpoint_blocks
from engine.lora import add_lora
from engine.models import VideoDiffusion, gather_frames
from engine.rewards import ClipReward, Reward, WeightedSum
from engine.rewards.videoalign import sampled_frame_indices
from engine.runtime import NoGradPath
from engine.video_reward import SegmentalReward, reward_loss, segment_frame_indices

PHASES = ("no-grad steps", "gradient steps, forward", "decode", "reward", "backward", "optimizer",
          "planner and store")


class PhaseClock:
    """Wall time and FLOPs of a step, per phase. Phases nest: a phase entered inside another is taken out of it
    (the planner's and the host store's calls inside the gradient steps count as "planner and store" only).

    ``counter`` (a running ``bench.counters.FlopCount``) attributes FLOPs the same way; ``sync`` waits for the
    GPU at every boundary, so that CUDA times land in the phase that launched the work."""

    def __init__(self, counter=None, sync: bool = False):
        self.counter, self.sync = counter, sync
        self.seconds: dict[str, float] = defaultdict(float)
        self.flops: dict[str, int] = defaultdict(int)
        self._stack: list[list] = []  # [name, start time, start flops, time of children, flops of children]

    def _now(self) -> tuple[float, int]:
        if self.sync:
            torch.cuda.synchronize()
        return time.perf_counter(), self.counter.total if self.counter is not None else 0

    @contextmanager
    def __call__(self, name: str):
        self._stack.append([name, *self._now(), 0.0, 0])
        try:
            yield
        finally:
            _, start, start_flops, child_s, child_flops = self._stack.pop()
            now, flops = self._now()
            self.seconds[name] += now - start - child_s
            self.flops[name] += flops - start_flops - child_flops
            if self._stack:
                self._stack[-1][3] += now - start
                self._stack[-1][4] += flops - start_flops

    def wrap(self, name: str, fn):
        def timed(*args, **kwargs):
            with self(name):
                return fn(*args, **kwargs)

        return timed

    @contextmanager
    def patched(self, owner, attribute: str, name: str):
        """``owner.attribute`` timed as ``name`` for the duration (an instance attribute, removed afterwards)."""
        had_own = attribute in vars(owner)
        original = getattr(owner, attribute)
        setattr(owner, attribute, self.wrap(name, original))
        try:
            yield
        finally:
            if had_own:
                setattr(owner, attribute, original)
            else:
                delattr(owner, attribute)


class _Timed:
    """Every method call of ``target`` timed as ``name`` (the chain memory's host store)."""

    def __init__(self, target, clock: PhaseClock, name: str):
        self._target, self._clock, self._name = target, clock, name

    def __getattr__(self, attribute):
        value = getattr(self._target, attribute)
        return self._clock.wrap(self._name, value) if callable(value) else value


@dataclass(frozen=True)
class Recipe:
    key: str
    title: str
    full_finetune: bool = False
    from_noise: bool = False      # start from pure noise and run all D steps (tau = 1)
    tau: float = 0.6
    ddim_steps: int = 20
    grad_steps: int | None = 1    # None: every step run
    decode_all: bool = False      # decode every frame with gradient, then pick the SegVR frames
    memory: str = "blocks"        # "blocks": recompute every UNet block; "plan": the chain-memory planner
    step_checkpoint: bool = False  # also recompute each gradient step as a whole (the official code's outer checkpoint)
    segments: int = 4
    tar: bool = True
    first_frame: bool = False      # score only pixel frame 0 (decode the first latent frame; no SegVR)
    decode_recompute: bool = False  # causal VAEs: the graded chunks' decoder activations recomputed in backward
    lora_rank: int = 4
    video_reward: bool = False     # a video-level reward in the mix too, asking for VideoAlign's frames


RECIPES = [
    Recipe("full", "1. full fine-tuning, full chain", full_finetune=True, from_noise=True, tau=1.0,
           grad_steps=None, decode_all=True),
    Recipe("draft1", "2. full chain, LoRA, last step (DRaFT-1)", from_noise=True, tau=1.0, decode_all=True),
    Recipe("official", "3. official InstructVideo recipe", decode_all=True, step_checkpoint=True),
    Recipe("engine", "4. this engine, same recipe", memory="plan"),
    Recipe("engine_k4", "5. this engine, K = 4", grad_steps=4, memory="plan"),
    Recipe("engine_kall", "5. this engine, K = all (12)", grad_steps=None, memory="plan"),
]
BY_KEY = {r.key: r for r in RECIPES}

# The video transformers (Wan 2.1, CogVideoX): the public reward-backpropagation way (VideoX-Fun: the whole chain
# from noise, gradient through the last step, every transformer block checkpointed, only the first latent frame
# decoded and scored) against the editing recipe, at K = 1 and K = all under the planner's budget.
TRANSFORMER_RECIPES = [
    Recipe("noise_k1", "full chain from noise, K = 1, first latent frame scored (VideoX-Fun's way)", from_noise=True,
           tau=1.0, segments=1, tar=False, first_frame=True),
    Recipe("edit", "editing recipe: tau 0.6, K = 1, SegVR 4 frames + TAR", memory="plan"),
    Recipe("edit_kall", "editing recipe, K = all (12)", grad_steps=None, memory="plan"),
    Recipe("edit_recompute", "editing recipe, K = 1, the decoder recomputed in backward", memory="plan",
           decode_recompute=True),
    Recipe("edit_video_reward", "editing recipe, K = 1, SegVR 4 frames + a video-level reward's frames (VideoAlign's "
           "sampling)", memory="plan", video_reward=True),
    Recipe("edit_video_reward_recompute", "the same, the decoder recomputed in backward", memory="plan",
           video_reward=True, decode_recompute=True),
]


class VideoAlignFrames(ClipReward):
    """In a cost count, the video-level part of a mix: it asks for the frames VideoAlign's VideoReward samples (its
    released 2 fps) and scores their mean, so what is counted is decoding those frames with gradient; the reward
    model's own cost is counted apart (bench/test_reward_costs.py)."""

    name = "VideoAlign's frames"

    def frame_indices(self, num_frames: int, fps: float) -> torch.Tensor:
        return sampled_frame_indices(num_frames, fps, VIDEOALIGN_DATA["fps"], VIDEOALIGN_DATA["num_frames"])

    def forward(self, clips: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return clips.float().mean((1, 2, 3, 4))


class StepCheckpointedChain(EditChain):
    """The official recipe's chain: a gradient step's ``guided_step`` recomputed in backward as a whole
    (non-reentrant checkpoint around the block-checkpointed UNet)."""

    def guided_step(self, x, t, context, uncond, generator):
        if not torch.is_grad_enabled():
            return super().guided_step(x, t, context, uncond, generator)
        return checkpoint(super().guided_step, x, t, context, uncond, generator, use_reentrant=False)


def make_trainable(model: VideoDiffusion, recipe: Recipe) -> list[torch.nn.Parameter]:
    """LoRA (rank ``recipe.lora_rank``) or every UNet weight for full fine-tuning."""
    if recipe.full_finetune:
        model.denoiser.requires_grad_(True)
        return list(model.denoiser.parameters())
    return add_lora(model.denoiser, recipe.lora_rank)


def random_inputs(batch: int, latent_shape, context_shape, device, dtype) -> tuple[torch.Tensor, ...]:
    """Source latents, prompt context and empty-prompt context of one step (random: costs do not depend on values)."""
    return (torch.randn(batch, *latent_shape, device=device, dtype=dtype),
            torch.randn(batch, *context_shape, device=device, dtype=dtype),
            torch.randn(batch, *context_shape, device=device, dtype=dtype))


class Step:
    """One fine-tuning step of ``recipe`` on ``model``: edit (or sample), decode, reward, backward."""

    def __init__(self, model: VideoDiffusion, reward: Reward, recipe: Recipe, latent_shape, context_shape,
                 batch: int = 1, guidance: float = 3.0, memory_budget: int | str = "auto", optimizer: bool = False,
                 no_grad_path: str = "off", fps: float = 8.0):
        self.model, self.recipe, self.batch = model, recipe, batch
        self.latent_shape, self.context_shape = latent_shape, context_shape
        self.params = make_trainable(model, recipe)
        if recipe.decode_recompute:
            model.decode_recompute = True
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-5) if optimizer else None
        chain = (StepCheckpointedChain if recipe.step_checkpoint else EditChain)(model, recipe.ddim_steps, recipe.tau,
                                                                                 1, guidance)
        grad_steps = recipe.grad_steps or chain.steps_run
        if recipe.video_reward:
            reward = WeightedSum([(reward, 1.0), (VideoAlignFrames(), 1.0)])
        self.scorer = SegmentalReward(reward, recipe.segments, tar=recipe.tar, fps=fps)
        self.memory = self._memory_policy(memory_budget, grad_steps)
        self.chain = chain.replace(grad_steps=grad_steps, memory=self.memory,
                                   no_grad_path=NoGradPath.resolve(no_grad_path, next(model.denoiser.parameters()).device))

    def _memory_policy(self, budget, grad_steps: int):
        if self.recipe.memory == "blocks":
            checkpoint_blocks(self.model.denoiser)
            return None
        if self.recipe.memory == "none":
            return None
        from engine.memory import ChainMemory

        return ChainMemory(self.model.denoiser, grad_steps, budget)

    def __call__(self, device, clock: PhaseClock | None = None, no_grad_steps: bool = True) -> torch.Tensor:
        """Run forward and backward (and the optimizer, when it has one); returns the (detached) loss.
        ``no_grad_steps=False`` leaves out the chain's steps without gradient (a cheaper warm-up)."""
        clock = clock or PhaseClock()
        with (clock.patched(self.model, "decode_frames", "decode"), clock.patched(self.scorer.reward, "forward", "reward"),
              self._bookkeeping_timed(clock)):
            return self._step(device, clock, no_grad_steps)

    @contextmanager
    def _bookkeeping_timed(self, clock: PhaseClock):
        """The planner's solve and the host store's calls, timed as "planner and store"."""
        if self.memory is None:
            yield
            return
        import csrc

        store, self.memory.store = self.memory.store, _Timed(self.memory.store, clock, "planner and store")
        try:
            with clock.patched(csrc, "make_plan", "planner and store"):
                yield
        finally:
            self.memory.store = store

    def _step(self, device, clock: PhaseClock, no_grad_steps: bool) -> torch.Tensor:
        b = self.batch
        latents, context, uncond = random_inputs(b, self.latent_shape, self.context_shape, device, self.model.denoiser.dtype)
        prompts = ["a corgi running on the beach"] * b
        x = latents if self.recipe.from_noise else self.chain.noise_to_start(latents)
        first_grad = len(self.chain.timesteps) - self.chain.grad_steps
        if no_grad_steps:
            with clock("no-grad steps"):
                x = self.chain.denoise(x, context, uncond, timesteps=self.chain.timesteps[:first_grad], grad_steps=0)
        with clock("gradient steps, forward"):
            edited = self.chain.denoise(x, context, uncond, timesteps=self.chain.timesteps[first_grad:])
        if self.recipe.decode_all:  # the official code: decode all frames with gradient, then pick
            frames_total = edited.shape[2]
            indices = self.scorer.frame_indices(b, frames_total, train=True)
            every = self.model.decode_frames(edited, torch.arange(frames_total).expand(b, -1)).unflatten(0, (b, frames_total))
            chosen = every.gather(1, indices.to(every.device).view(b, -1, 1, 1, 1).expand(-1, -1, *every.shape[2:]))
            scores = self.scorer.reward(chosen.flatten(0, 1), [p for p in prompts for _ in range(indices.shape[1])])
            rewards = (self.scorer.weights(indices, frames_total).to(scores.device) * scores.view(b, -1)).mean(1)
        else:
            with self.memory.region(self.model.vae, self.scorer.reward) if self.memory else nullcontext():
                rewards, _ = self.scorer(self.model, edited, prompts, train=not self.recipe.first_frame)
        loss = reward_loss(rewards)
        with clock("backward"):
            loss.backward()
        if self.optimizer is not None:
            with clock("optimizer"):
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()


class PlainLoop:
    """The loop a user would write with diffusers + peft, as public VADER / DRaFT-style code does: peft LoRA on the
    attention projections, the scheduler's own ``step`` after classifier-free guidance, the gradient step's UNet call
    under ``torch.utils.checkpoint``, ``vae.decode`` of the frames the reward looks at (the SegVR frames, or all of
    them), the image reward, AdamW. The edit is recipe 3's: tau 0.6 of 20 DDIM steps, gradient through the last."""

    def __init__(self, model: VideoDiffusion, reward: Reward, latent_shape, context_shape, batch: int = 1,
                 guidance: float = 3.0, decode_all: bool = False, segments: int = 4, lora_rank: int = 4):
        from peft import LoraConfig, inject_adapter_in_model

        self.model, self.reward, self.batch, self.guidance = model, reward, batch, guidance
        self.latent_shape, self.context_shape, self.decode_all, self.segments = latent_shape, context_shape, decode_all, segments
        model.denoiser.requires_grad_(False)
        inject_adapter_in_model(LoraConfig(r=lora_rank, lora_alpha=lora_rank,
                                           target_modules=["to_q", "to_k", "to_v", "to_out.0"]), model.denoiser)
        self.params = [p for name, p in model.denoiser.named_parameters() if "lora_" in name]
        for p in self.params:
            p.requires_grad_(True)
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-5)
        self.scheduler = type(model.scheduler).from_config(model.scheduler.config)
        self.scheduler.set_timesteps(20)
        self.timesteps = self.scheduler.timesteps[-round(0.6 * 20):]

    def _guided_step(self, x, t, context, uncond):
        eps_u, eps_c = self.model.denoiser(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([uncond, context])).sample.chunk(2)
        return self.scheduler.step(eps_u + self.guidance * (eps_c - eps_u), t, x).prev_sample

    def __call__(self, device, clock: PhaseClock | None = None, no_grad_steps: bool = True) -> torch.Tensor:
        clock = clock or PhaseClock()
        b = self.batch
        latents, context, uncond = random_inputs(b, self.latent_shape, self.context_shape, device, self.model.denoiser.dtype)
        x = self.scheduler.add_noise(latents, torch.randn_like(latents), self.timesteps[:1])
        with clock("no-grad steps"), torch.no_grad():
            for t in self.timesteps[:-1] if no_grad_steps else []:
                x = self._guided_step(x, t, context, uncond)
        with clock("gradient steps, forward"):
            x = checkpoint(self._guided_step, x, self.timesteps[-1], context, uncond, use_reentrant=False)
        frames_total = x.shape[2]
        indices = torch.arange(frames_total).expand(b, -1) if self.decode_all else \
            segment_frame_indices(b, frames_total, self.segments)
        with clock("decode"):
            vae = self.model.vae
            frames = (vae.decode(gather_frames(x, indices) / vae.config.scaling_factor).sample * 0.5 + 0.5).clamp(0, 1)
        with clock("reward"):
            scores = self.reward(frames, ["a corgi running on the beach"] * len(frames))
        loss = -scores.mean()
        with clock("backward"):
            loss.backward()
        with clock("optimizer"):
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()


def trainable_bytes(params: list[torch.nn.Parameter]) -> dict[str, int]:
    """Parameters, AdamW state (two fp32 moments) and fp32 gradients."""
    n = sum(p.numel() for p in params)
    return {"trainable_params": n, "optimizer_bytes": 8 * n, "gradient_bytes": 4 * n}

