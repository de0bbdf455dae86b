"""The fine-tuning recipe: ``Trainer.setup()`` builds a run from its config, ``Trainer.train()`` is the loop,
``Trainer.finish()`` writes the weights, the reward curve and the samples; ``engine.train.command.main`` runs
the three.

Each step of the loop: this process's share of a batch of source latents -> the edit (noise to tau, the
remaining steps with CFG, gradient through the last K) -> the SegVR frames decoded and scored with TAR ->
backward, clip, update (skipped when not finite) -> log -> held-out evaluation and checkpoint when due. The
pieces live beside this file: ``sources`` (source latents), ``optim`` (the optimizer and its step),
``evaluation`` (held-out edits and samples), ``checkpoint`` (checkpoint and weight files), ``run_folder`` (the
output folder), ``samples`` (pictures and the printed summary), ``command`` (the CLI: exit codes, the lock).
"""

from __future__ import annotations

import json
import signal
import sys
import time
from contextlib import nullcontext

import torch
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

import kernels
from engine import distributed as dist_utils
from engine import media
from engine.acceleration import accelerate, use_attention
from engine.builtin import build_model
from engine.chain import EditChain
from engine.config import TrainConfig, resolve_config
from engine.context_parallel import ContextParallel
from engine.errors import UserError, disk_writes
from engine.lora import add_lora, adapters_disabled, load_lora
from engine.memory import ChainMemory, checkpoint_blocks, denoiser_blocks
from engine.models import CausalVideoDiffusion, VideoDiffusion
from engine.regularize import EarlyStopping, base_model_edit, motion_magnitude, motion_penalty
from engine.rewards import Reward, build_reward
from engine.rewards.registry import reward_label
from engine.runtime import NoGradPath, autocast, autocast_dtype, frozen_dtype, quiet_casts, resolve_device
from engine.tracking import Tracker, gpu_stats
from engine.train import checkpoint
from engine.train.evaluation import HeldOut
from engine.train.optim import make_optimizer, optimizer_step
from engine.train.run_folder import (REWARD_CURVE, SAMPLES, TENSORBOARD, append_line, check_output, open_output,
                                     write_config)
from engine.train.samples import edit_quality, print_summary, write_samples
from engine.train.sources import SourceLatents, setup_draws, setup_sources
from engine.video_reward import SegmentalReward, reward_loss


DESCRIPTION = "InstructVideo reward fine-tuning: ``python -m engine.train [--config FILE] [--flags]``."


class Stop(Exception):
    """Training must end early; the message says why and how to go on."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class Trainer:
    """One run. Under torchrun, LoRA runs the model on every rank independently (only gradients are exchanged,
    and rank 0 alone evaluates and samples); a full fine-tuning run is sharded, so every rank takes part in
    every model call (``sharded``) and rank 0 alone writes."""

    def __init__(self, config: TrainConfig):
        self.config = config
        self.records: list[dict] = []
        self.step = 0
        self.bad_in_row = 0
        self.signal_received: int | None = None
        # edited latents of the held-out sources: the latest evaluation's, and the first's (the base model's)
        self.held_out_edits: list[torch.Tensor] = []
        self.before_edits: list[torch.Tensor] = []
        self.parallel: ContextParallel | None = None  # --context-parallel: each clip's tokens across the processes

    # ---------------------------------------------------------------------------------- setup
    def setup(self) -> "Trainer":
        """Model, reward, data, trainable weights, chain and backend, then the base model's outputs and a resumed
        run's state; nothing is written before all of it has succeeded, so a bad input leaves the output folder
        as it was."""
        cfg = self.config
        torch.manual_seed(cfg.seed)
        # Set the CPU thread count explicitly, even to its current value: a process where it was never set
        # computes some CPU ops in other rounding than one where it was (measured), and a resumed run must
        # compute bit for bit as the run it continues, wherever each was started.
        torch.set_num_threads(torch.get_num_threads())
        self.world = dist_utils.init_world("cuda" if cfg.device.startswith("cuda") or
                                           (cfg.device == "auto" and torch.cuda.is_available()) else "cpu")
        # the processes that share out the batch: all of them, or with --context-parallel none (they split its tokens)
        self.data_world = dist_utils.World() if cfg.context_parallel else self.world
        if cfg.batch_size % self.data_world.size:
            raise UserError(f"--batch-size {cfg.batch_size} (the global batch) must be divisible by the "
                            f"{self.world.size} processes")
        self.device = resolve_device(cfg.device, self.world.local_rank)
        self.amp_dtype = autocast_dtype(cfg.precision, self.device)
        self.frozen = frozen_dtype(cfg.frozen_dtype, cfg.precision, self.device)
        self.output = check_output(cfg.output, cfg.model, cfg.overwrite, cfg.break_lock)
        self._setup_model(build_model(cfg.model, cfg.seed, self.device), build_reward(cfg.reward).to(self.device))
        setup_draws(self)
        setup_sources(self)
        self._check_steps()
        self._setup_step()
        self.backend = self._setup_backend()
        self.early_stopping = EarlyStopping(cfg.early_stop_patience, cfg.early_stop_min_delta)
        self.latents = SourceLatents(self.model, self.chain, self.uncond, self.latent_shape, cfg.seed, self.device,
                                     self.autocast)
        self.held_out = HeldOut(self.model, self.chain, self.reward, self.eval_sources, self.latents, cfg.seed,
                                cfg.eval_batch_size, cfg.sample_steps, self.autocast)
        self._setup_base_model_outputs()
        if cfg.resume:
            checkpoint.load_checkpoint(self)
        dist_utils.barrier(self.world)
        if self.world.is_main:
            open_output(self.output, clear=cfg.overwrite and not cfg.resume, break_lock=cfg.break_lock)
            if cfg.resume:
                checkpoint.rewrite_metrics(self.output, self.records)
            else:
                write_config(self)
        self.tracker = Tracker(self.output / TENSORBOARD, enabled=cfg.tensorboard and self.world.is_main)
        return self

    def _setup_model(self, model: VideoDiffusion, reward: Reward):
        """The run's model with its decoding options, and its reward under SegVR and TAR (``--dry-run`` passes their
        meta-device architectures)."""
        cfg = self.config
        self.model = model
        if self.frozen != torch.float32:  # as loaded otherwise (a model may keep a buffer in float64)
            with quiet_casts():
                for module in (model.text_encoder, reward, *([model.denoiser] if cfg.finetune == "lora" else [])):
                    module.to(self.frozen)  # LoRA's own weights are made fp32 when they are added
        model.context_gradient = cfg.decode_context == "grad"
        if cfg.decode_recompute:
            if not isinstance(model, CausalVideoDiffusion):
                raise UserError(f"--decode-recompute applies to causal VAEs (Wan, CogVideoX); {cfg.model} decodes "
                                "frame by frame, so leave it off")
            model.decode_recompute = True
        self.reward = SegmentalReward(reward, cfg.segments, cfg.tar_lambda, cfg.segvr, cfg.tar, cfg.fps)

    def _setup_step(self):
        """What a step runs on top of the model: the memory policy, the trainable weights and their optimizer, the
        chain, the attention backend."""
        cfg = self.config
        self.memory = self._setup_memory()
        denoiser = self._setup_trainable_and_optimizer()
        self.chain = EditChain(self.model, cfg.ddim_steps, cfg.tau, cfg.grad_steps_resolved, cfg.guidance, cfg.eta,
                               cfg.offset_noise, denoiser=denoiser, memory=self.memory,
                               no_grad_path=NoGradPath.resolve(cfg.no_grad_path, self.device, cfg.precision))
        self.attention = use_attention(self.model, cfg.attention)

    def _check_steps(self):
        """The chain's D and the samples' steps within the timesteps the model was trained with."""
        cfg = self.config
        trained_steps = self.model.scheduler.config.num_train_timesteps
        for option, steps in (("--ddim-steps", cfg.ddim_steps), ("--sample-steps", cfg.sample_steps)):
            if steps > trained_steps:
                raise UserError(f"{option} {steps} exceeds the {trained_steps} timesteps the model was trained with; "
                                f"use at most {trained_steps}")

    def _setup_memory(self) -> ChainMemory | None:
        """Activation memory of the gradient steps: the planner (keep, spill or recompute each layer within the
        budget), every block recomputed (the official way), or everything kept."""
        cfg = self.config
        if cfg.checkpoint == "blocks":
            checkpoint_blocks(self.model.denoiser)
        elif cfg.checkpoint == "plan":
            return ChainMemory(self.model.denoiser, cfg.grad_steps_resolved, cfg.memory_budget, strict=True,
                               host_budget=cfg.host_memory_budget)
        return None

    def _setup_trainable_and_optimizer(self) -> torch.nn.Module | None:
        """LoRA (or every weight) and its optimizer (engine.train.optim); returns what the chain calls in
        place of the denoiser (DistributedDataParallel under torchrun), or None."""
        cfg = self.config
        denoiser, caller = self.model.denoiser, None
        self.sharded = cfg.finetune == "full" and self.world.size > 1
        if cfg.finetune == "lora":
            self.trainable = add_lora(denoiser, cfg.lora_rank, cfg.lora_alpha)
            for weight in self.trainable:  # peft makes them in the frozen weights' dtype; AdamW updates fp32
                weight.data = weight.data.float()
            if cfg.init_lora:
                load_lora(denoiser, cfg.init_lora)
            if cfg.context_parallel:
                self.parallel = ContextParallel(denoiser)
            elif self.world.size > 1:
                caller = dist_utils.data_parallel(denoiser, self.device)
        else:
            self.denoiser_class = type(denoiser).__name__  # FSDP renames the class; the saved config keeps this one
            denoiser.requires_grad_(True)
            if self.sharded:
                dist_utils.shard_model(denoiser, denoiser_blocks(denoiser), self.world, self.device)
            self.trainable = list(denoiser.parameters())
        self.optimizer, self.lr_scheduler, self.scaler = make_optimizer(
            self.trainable, cfg.lr, cfg.weight_decay, cfg.warmup_steps, self.device, self.amp_dtype == torch.float16,
            self.sharded)
        return caller

    def _setup_backend(self) -> str:
        """fused: Triton kernels for LoRA, temporal attention and the CFG + sampler step; reference: PyTorch.
        auto is fused on CUDA and the reference on the CPU."""
        backend = self.config.backend
        if backend == "auto":
            backend = "fused" if self.device.type == "cuda" else "reference"
        kernels.set_backend(backend)
        if backend == "fused":
            accelerate(self.model.denoiser)
        return backend

    @property
    def runs_model(self) -> bool:
        """Whether this rank runs evaluation and sampling: rank 0, or every rank when the model is sharded or each
        clip is split across the processes."""
        return self.world.is_main or self.sharded or self.config.context_parallel

    def _setup_base_model_outputs(self):
        """What needs the base model (LoRA off, or weights not yet updated): the prompt-generated source
        latents (only in full fine-tuning, where no switch brings the base model back later) and the "before"
        sample latents. Made before a checkpoint is loaded, so a resumed run uses the same ones."""
        if self.config.finetune == "full":
            sources = [(group, i) for group in (self.train_sources, self.eval_sources) for i in range(len(group))
                       if group[i].frames is None]
            for group, index in tqdm(sources, desc="source latents (base model)", disable=not self.world.is_main):
                self.latents.get(group, index)
        self.before_latents = None
        if self.runs_model:
            with adapters_disabled(self.model.denoiser):
                self.before_latents = self.held_out.sample_latents()

    # ---------------------------------------------------------------------------------- one step
    def autocast(self):
        return autocast(self.device, self.config.precision)

    def batch(self, sources, indices: list[int]):
        """(latents, prompts, text embeddings) of ``sources[i]`` for i in ``indices``."""
        return self.latents.batch(sources, indices)

    def loss_step(self, latents, prompts, context) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Edit, decode the SegVR frames, score with TAR (plus the optional motion penalty).

        Returns the loss and the per-video terms to log."""
        cfg = self.config
        uncond = self.uncond.expand(len(prompts), -1, -1)
        with self.autocast():
            reference = None
            if cfg.motion_weight > 0:
                reference = (latents if cfg.motion_reference == "source" else
                             base_model_edit(self.chain, latents, context, uncond, self.noise_generator))
            edited = self.chain.edit(latents, context, uncond, self.noise_generator, grad_steps=self._grad_steps())
            # decode + reward under the chain's memory budget (kept or spilled to the host, see ChainMemory)
            with self.memory.region(self.model.vae, self.reward.reward) if self.memory else nullcontext():
                rewards, _ = self.reward(self.model, edited, prompts, train=True, generator=self.frame_generator)
        loss = reward_loss(rewards)
        terms = {"reward": rewards.detach()}
        if reference is not None:
            penalty = motion_penalty(edited, reference)
            loss = loss + cfg.motion_weight * penalty.mean()
            terms |= {"motion_penalty": penalty.detach(), "motion": motion_magnitude(edited),
                      "motion_reference": motion_magnitude(reference)}
        return loss, terms

    def _grad_steps(self) -> int | None:
        """K for this step: the chain's, or with ``--grad-steps rand`` drawn from 1 .. the steps run (from the
        SegVR generator: the same draw on every rank, and saved with the checkpoint)."""
        if not self.config.random_grad_steps:
            return None
        return int(torch.randint(1, self.chain.steps_run + 1, (1,), generator=self.frame_generator.generator))

    def optimizer_step(self, loss: torch.Tensor) -> tuple[str, float]:
        """Backward, clip, update: "updated", "skipped" (not finite: nothing changed) or "overflow" (fp16)."""
        return optimizer_step(loss, self.trainable, self.optimizer, self.lr_scheduler, self.scaler,
                              self.config.max_grad_norm, self.world,
                              self.parallel.reduce_gradients if self.parallel is not None else None)

    def log(self, record: dict):
        self.records.append(record)
        if self.world.is_main:
            append_line(self.output / "metrics.jsonl", json.dumps(record) + "\n", "metrics.jsonl")
            values = {f"{record['kind']}/{k}": v for k, v in record.items() if k not in ("kind", "step")}
            with disk_writes(self.output / TENSORBOARD, "TensorBoard scalars"):
                self.tracker.scalars(record["step"], values | {f"gpu/{k}": v for k, v in gpu_stats(self.device).items()})

    def log_eval(self) -> bool:
        """Held-out evaluation (every sharded rank computes the same value); saves the best weights so far.
        Returns True when early stopping says stop."""
        stop = False
        if self.runs_model:
            values, self.held_out_edits = self.held_out.evaluate()
            if self.sharded:  # one value on every rank, so every rank takes the same early-stopping decisions
                values = dist_utils.mean_over_ranks(values, self.world)
            if self.world.is_main:
                self.log({"kind": "eval", "step": self.step, **values})
            stop = self.early_stopping.update(values["eval_reward"], self.step).stop
            if self.early_stopping.improved and self.step > 0:
                checkpoint.save_weights(self, "best")
        return not dist_utils.all_ranks_agree(not stop, self.world)

    # ---------------------------------------------------------------------------------- the loop
    def train(self) -> "Trainer":
        cfg = self.config
        handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        if self.step == 0:
            self.log_eval()
            self.before_edits = self.held_out_edits
        progress = tqdm(total=cfg.steps, initial=self.step, desc="fine-tuning", unit="step", dynamic_ncols=True,
                        disable=not self.world.is_main)
        # warnings (the memory planner's, once its first step is measured) print on their own line, not in the bar
        with logging_redirect_tqdm():
            try:
                while self.step < cfg.steps:
                    self.step += 1
                    started = time.perf_counter()
                    # data: this process's share of the global batch (latents cached), prompts, text embeddings
                    latents, prompts, context = self.batch(self.train_sources, self.data_world.shard(next(self.sampler)))
                    # forward: edit -> decode SegVR frames -> reward with TAR
                    loss, terms = self.loss_step(latents, prompts, context)
                    # backward through the last K steps, average over ranks, clip, update (skipped if non-finite)
                    outcome, grad_norm = self.optimizer_step(loss)
                    # log (reading the loss is a device sync point)
                    seconds = time.perf_counter() - started
                    record = self._step_record(loss, terms, outcome, grad_norm, seconds)
                    if self.step % cfg.log_every == 0 or self.step == cfg.steps or outcome == "skipped":
                        self.log(record)
                    progress.update(1)
                    progress.set_postfix(reward=f"{record['reward']:.4f}", loss=f"{record['loss']:.4f}",
                                         s_step=f"{seconds:.2f}")
                    # stop on bad steps; evaluate; stop on a signal; checkpoint
                    self._stop_after_bad_steps()
                    if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step != cfg.steps and self.log_eval():
                        print(f"early stop at step {self.step}: held-out reward {self.early_stopping.best:.4f} at step "
                              f"{self.early_stopping.best_step} was not beaten in {cfg.early_stop_patience} evaluations; "
                              f"best weights in {checkpoint.weights_folder(self, 'best')}", file=sys.stderr)
                        break
                    self._stop_on_signal()
                    if cfg.save_every and self.step % cfg.save_every == 0 and self.bad_in_row == 0:
                        checkpoint.save_checkpoint(self)
            finally:
                progress.close()
                for s, handler in handlers.items():
                    signal.signal(s, handler)
        self.log_eval()
        checkpoint.save_checkpoint(self)
        return self

    def _step_record(self, loss, terms, outcome: str, grad_norm: float, seconds: float) -> dict:
        """The step's metrics, averaged over processes; counts a skipped step towards --max-bad-steps."""
        values = dist_utils.mean_over_ranks(
            {"loss": loss.item(), **{k: v.float().mean().item() for k, v in terms.items()}}, self.world)
        self.bad_in_row = self.bad_in_row + 1 if outcome == "skipped" else 0
        return {"kind": "skipped" if outcome == "skipped" else "train", "step": self.step, **values,
                "grad_norm": grad_norm, "lr": self.lr_scheduler.get_last_lr()[0], "s_per_step": seconds}

    def _stop_after_bad_steps(self) -> None:
        if self.bad_in_row >= self.config.max_bad_steps:
            # skipped steps left weights and optimizer as they were: this is the last good state
            bad, self.bad_in_row = self.bad_in_row, 0
            checkpoint.save_checkpoint(self)
            raise Stop(f"stopping at step {self.step}: {bad} non-finite losses or gradients in a row; the weights "
                       f"of the last good step are saved in {self.output} (lower --lr or set --max-grad-norm, then "
                       f"--resume {self.output})", 3)

    def _stop_on_signal(self) -> None:
        if not dist_utils.all_ranks_agree(self.signal_received is None, self.world):
            checkpoint.save_checkpoint(self)  # every rank stops at the same step (sharded saving is collective)
            signum = self.signal_received or signal.SIGTERM
            raise Stop(f"{signal.Signals(signum).name} at step {self.step}: checkpoint saved; continue with "
                       f"--resume {self.output}", 128 + signum)

    def _on_signal(self, signum, frame):
        self.signal_received = signum

    # ---------------------------------------------------------------------------------- outputs
    def finish(self) -> dict:
        """The weights, the reward curve, the samples and the printed before -> after summary."""
        cfg = self.config
        dist_utils.barrier(self.world)
        summary = {"output": str(self.output)}
        checkpoint.save_weights(self)
        after_latents = self.held_out.sample_latents() if self.runs_model else None
        if self.world.is_main:
            with disk_writes(self.output, "the reward curve, the sample videos and pictures"):
                media.plot_rewards(self.records, self.output / REWARD_CURVE, title=f"reward ({reward_label(cfg.reward)})")
                edits = [(self.latents.get(self.eval_sources, i), before, after)
                         for i, (before, after) in enumerate(zip(self.before_edits, self.held_out_edits))]
                write_samples(self.output / SAMPLES, self.model, [s.prompt for s in self.eval_sources],
                              self.before_latents, after_latents, edits, self.tracker, self.step, cfg.fps,
                              [s.clip for s in self.eval_sources], edit_quality(self.held_out.evaluations))
                self.tracker.reward_curve(self.records, self.step)
                self.tracker.close()
            evals = [r for r in self.records if r["kind"] == "eval"]
            first = evals[0] | self.held_out.score_samples(self.before_latents)
            last = evals[-1] | self.held_out.score_samples(after_latents)
            summary |= {f"{k}_start": first[k] for k in first if k.startswith(("eval_", "gold_", "noise_"))}
            summary |= {f"{k}_end": last[k] for k in last if k.startswith(("eval_", "gold_", "noise_"))}
            print_summary(first, last, self.output)
        dist_utils.shutdown(self.world)
        return summary
