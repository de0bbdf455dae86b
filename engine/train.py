"""InstructVideo reward fine-tuning: ``python -m engine.train [--config FILE] [--flags]``.

With no arguments it fine-tunes the built-in tiny model on the CPU in a minute or two. On a real model:

    python -m engine.train --model /weights/text-to-video-ms-1.7b \
        --reward hpsv2:/weights/HPS_v2.1_compressed.pt --videos /data/clips --steps 20000
    torchrun --nproc_per_node 4 -m engine.train ...        # data parallel; --batch-size is the global batch
    python -m engine.train --resume runs/my-run            # continue from the last checkpoint

Each step: pick source videos, noise their latents to fraction tau of the D-step DDIM chain, run the remaining
steps with classifier-free guidance (gradient through the last K), decode the SegVR frames, score them with the
reward weighted by TAR, and update the LoRA weights. Outputs (in ``--output``): config.yaml, metrics.jsonl,
checkpoint.pt, lora/ (peft safetensors), reward_curve.png and samples/ (before/after mp4, GIF, PNG grids; the
held-out edits).

``--finetune full`` trains every denoiser weight instead (the baseline the benchmarks compare against), sharded
with FSDP under torchrun, and writes unet/ or transformer/ (diffusers layout, by the pipeline's name) in place of
lora/.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import sys
import time
from contextlib import nullcontext
from datetime import datetime
from pathlib import Path

import torch
import yaml
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

import kernels
from engine import distributed as dist_utils
from engine import media
from engine.accelerate import accelerate
from engine.chain import EditChain
from engine.checkpointing import ChainMemory, checkpoint_blocks, denoiser_blocks
from engine.config import TrainConfig, resolve_config
from engine.data import BatchSampler, Source, build_sources, split_held_out
from engine.distributed import ShardedGenerator, randn
from engine.errors import UserError, cli_entry
from engine.lora import add_lora, adapters_disabled, load_lora, lora_state_dict, save_lora
from engine.models import BUILTIN_MODELS, VideoDiffusion, build_model
from engine.regularize import EarlyStopping, base_model_edit, motion_magnitude, motion_penalty
from engine.rewards import build_reward
from engine.runtime import NoGradPath, autocast, autocast_dtype, resolve_device
from engine.tracking import Tracker, gpu_stats
from engine.video_reward import SegmentalReward, reward_loss
from engine.world import gold_scores, mean_metrics

RUN_FILES = ("config.yaml", "metrics.jsonl", "checkpoint.pt")
WEIGHT_FOLDERS = ("lora", "unet", "transformer")  # LoRA, or the full denoiser by its pipeline name; "_best" added
SAMPLES, TENSORBOARD, REWARD_CURVE = "samples", "tensorboard", "reward_curve.png"
# everything a run writes: what --overwrite clears, so nothing of the old run is mistaken for the new one's
RUN_OUTPUTS = (*RUN_FILES, *(f"{name}{best}" for name in WEIGHT_FOLDERS for best in ("", "_best")),
               SAMPLES, TENSORBOARD, REWARD_CURVE)
CHECKPOINT = "checkpoint.pt"


class Stop(Exception):
    """Training must end early; the message says why and how to go on."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def check_output(config: TrainConfig) -> Path:
    """The run folder, checked but not yet written: one that holds another run needs --overwrite (or
    --resume); a non-empty folder holding no run (a model folder, say) is never written into."""
    if config.output is None:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        out = Path("runs") / f"{Path(config.model).name}-{stamp}"
    else:
        out = Path(config.output)
    if out.exists() and not out.is_dir():
        raise UserError(f"--output {out} is a file; pass a folder")
    holds_run = any((out / f).exists() for f in RUN_FILES)
    if not config.overwrite and holds_run:
        raise UserError(f"output folder {out} already holds a run; pass another --output, --resume {out} or --overwrite")
    if out.is_dir() and not holds_run and any(out.iterdir()):
        raise UserError(f"output folder {out} is not empty and holds no run; pass a new or empty --output")
    return out


def open_output(out: Path, config: TrainConfig) -> None:
    """Rank 0, once setup has succeeded: create the run folder; --overwrite (not --resume) clears the old run."""
    if config.overwrite and not config.resume:
        for name in RUN_OUTPUTS:
            path = out / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    out.mkdir(parents=True, exist_ok=True)


def atomic_write(path: Path, write) -> None:
    """write(tmp_path), then rename over ``path``: a crash (or power loss: both are synced) leaves the old file
    or the new one, never half."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


class Trainer:
    """The recipe: ``setup()`` builds everything from the config, ``train()`` runs the loop, ``finish()``
    writes the LoRA weights, the reward curve and the before/after samples.

    Under torchrun, LoRA runs the model on every rank independently (only gradients are exchanged, and rank 0
    alone evaluates and samples); a full fine-tuning run is sharded, so every rank takes part in every
    model call (``self.sharded``) and rank 0 alone writes."""

    def __init__(self, config: TrainConfig):
        self.config = config
        self.records: list[dict] = []
        self.step = 0
        self.bad_in_row = 0
        self.signal_received: int | None = None
        # edited latents of the held-out sources: the latest evaluation's, and the first's (the base model's)
        self.held_out_edits: list[torch.Tensor] = []
        self.before_edits: list[torch.Tensor] = []

    # ---------------------------------------------------------------------------------- setup
    def setup(self) -> "Trainer":
        cfg = self.config
        torch.manual_seed(cfg.seed)
        # Set the CPU thread count explicitly, even to its current value: a process where it was never set
        # computes some CPU ops in other rounding than one where it was (measured), and a resumed run must
        # compute bit for bit as the run it continues, wherever each was started.
        torch.set_num_threads(torch.get_num_threads())
        self.world = dist_utils.init_world("cuda" if cfg.device.startswith("cuda") or
                                           (cfg.device == "auto" and torch.cuda.is_available()) else "cpu")
        if cfg.batch_size % self.world.size:
            raise UserError(f"--batch-size {cfg.batch_size} (the global batch) must be divisible by the "
                            f"{self.world.size} processes")
        self.device = resolve_device(cfg.device, self.world.local_rank)
        self.amp_dtype = autocast_dtype(cfg.precision, self.device)
        self.output = check_output(cfg)
        self.model: VideoDiffusion = build_model(cfg.model, cfg.seed, self.device)
        self.reward = SegmentalReward(build_reward(cfg.reward).to(self.device), cfg.segments, cfg.tar_lambda,
                                      cfg.segvr, cfg.tar)
        self._setup_data()
        self._setup_chain()
        self._setup_trainable_and_optimizer()
        self._setup_backend()
        self.early_stopping = EarlyStopping(cfg.early_stop_patience, cfg.early_stop_min_delta)
        self._setup_base_model_outputs()
        if cfg.resume:
            self._load_checkpoint()
        # nothing is written before here, so a bad input leaves the output folder as it was
        dist_utils.barrier(self.world)
        if self.world.is_main:
            open_output(self.output, cfg)
            if cfg.resume:
                self._rewrite_metrics()
            else:
                self._write_config()
        self.tracker = Tracker(self.output / TENSORBOARD, enabled=cfg.tensorboard and self.world.is_main)
        return self

    def _setup_data(self):
        cfg = self.config
        self.latent_shape = self.model.latent_shape(cfg.num_frames, cfg.height, cfg.width)  # checks the sizes
        sources = build_sources(cfg.prompts, cfg.videos, cfg.model if cfg.model in BUILTIN_MODELS else None,
                                cfg.num_frames, cfg.fps, cfg.height, cfg.width, held_out=cfg.num_held_out)
        self.train_sources, held_out = split_held_out(sources, cfg.num_held_out)
        self.eval_sources = held_out or self.train_sources[:2]
        self._latent_cache: dict[int, torch.Tensor] = {}
        self.sampler = BatchSampler(len(self.train_sources), cfg.batch_size, cfg.seed)
        # Noise and SegVR draws are made for the global batch, so any number of processes gives one result.
        self.noise_generator = ShardedGenerator(torch.Generator(self.device).manual_seed(cfg.seed + 1), self.world)
        self.frame_generator = ShardedGenerator(torch.Generator().manual_seed(cfg.seed + 2), self.world)
        self.uncond = self.model.encode_prompts([""])

    def _setup_chain(self):
        cfg = self.config
        trained_steps = self.model.scheduler.config.num_train_timesteps
        for option, steps in (("--ddim-steps", cfg.ddim_steps), ("--sample-steps", cfg.sample_steps)):
            if steps > trained_steps:
                raise UserError(f"{option} {steps} exceeds the {trained_steps} timesteps the model was trained with; "
                                f"use at most {trained_steps}")
        self.chain = EditChain(self.model, cfg.ddim_steps, cfg.tau, cfg.grad_steps_resolved, cfg.guidance,
                               cfg.eta, cfg.offset_noise)
        self.model.context_gradient = cfg.decode_context == "grad"
        self.chain.no_grad_path = NoGradPath.resolve(cfg.no_grad_path, self.device, cfg.precision)
        self.memory = None
        if cfg.checkpoint == "blocks":
            checkpoint_blocks(self.model.denoiser)
        elif cfg.checkpoint == "plan":
            self.memory = ChainMemory(self.model.denoiser, self.chain.grad_steps, cfg.memory_budget).attach(self.chain)

    def _setup_trainable_and_optimizer(self):
        cfg = self.config
        denoiser = self.model.denoiser
        self.sharded = cfg.finetune == "full" and self.world.size > 1
        if cfg.finetune == "lora":
            self.trainable = add_lora(denoiser, cfg.lora_rank, cfg.lora_alpha)
            if cfg.init_lora:
                load_lora(denoiser, cfg.init_lora)
            if self.world.size > 1:
                self.chain.denoiser = dist_utils.data_parallel(denoiser, self.device)
        else:
            self.denoiser_class = type(denoiser).__name__  # FSDP renames the class; the saved config keeps this one
            denoiser.requires_grad_(True)
            if self.sharded:
                dist_utils.shard_model(denoiser, denoiser_blocks(denoiser), self.world, self.device)
            self.trainable = list(denoiser.parameters())
        self.optimizer = torch.optim.AdamW(self.trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
        warmup = max(1, cfg.warmup_steps)
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: min(1.0, (s + 1) / warmup))
        # fp16 loss scaling; sharded, every rank must see an overflow in any shard (ShardedGradScaler agrees on it)
        if self.sharded:
            from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler as Scaler
        else:
            from torch.amp import GradScaler as Scaler
        self.scaler = Scaler(self.device.type, enabled=self.amp_dtype == torch.float16)

    def _setup_backend(self):
        """fused: Triton kernels for LoRA, temporal attention and the CFG + DDIM step; reference: PyTorch.
        auto is fused on CUDA and the reference on the CPU."""
        backend = self.config.backend
        if backend == "auto":
            backend = "fused" if self.device.type == "cuda" else "reference"
        self.backend = backend
        kernels.set_backend(backend)
        if backend == "fused":
            accelerate(self.model.denoiser)

    @property
    def runs_model(self) -> bool:
        """Whether this rank runs evaluation and sampling: rank 0, or every rank when the model is sharded."""
        return self.world.is_main or self.sharded

    def _setup_base_model_outputs(self):
        """What needs the base model (LoRA off, or weights not yet updated): the prompt-generated source
        latents (only in full fine-tuning, where no switch brings the base model back later) and the "before"
        sample latents. Made before a checkpoint is loaded, so a resumed run uses the same ones."""
        if self.config.finetune == "full":
            sources = [(group, i) for group in (self.train_sources, self.eval_sources) for i in range(len(group))
                       if group[i].frames is None]
            for group, index in tqdm(sources, desc="source latents (base model)", disable=not self.world.is_main):
                self.source_latent(group, index)
        self.before_latents = None
        if self.runs_model:
            with adapters_disabled(self.model.denoiser):
                self.before_latents = self.sample_latents()

    def _write_config(self):
        cfg = self.config
        resolved = cfg.to_dict() | {
            "output": str(self.output),
            "derived": {"start_timestep": self.chain.timesteps[0], "steps_run": self.chain.steps_run,
                        "grad_steps": self.chain.grad_steps, "device": str(self.device), "backend": self.backend,
                        "no_grad_path": self.chain.no_grad_path.mode if self.chain.no_grad_path else "off",
                        "processes": self.world.size,
                        "trainable_parameters": sum(p.numel() for p in self.trainable),
                        "train_sources": len(self.train_sources), "eval_sources": len(self.eval_sources)},
        }
        (self.output / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))

    # ---------------------------------------------------------------------------------- checkpoints
    def weights_and_optimizer(self) -> dict:
        """The trained weights and the optimizer state, whole: LoRA's are on every rank; a sharded model's are
        gathered (a collective) and arrive on rank 0 only."""
        if self.config.finetune == "lora":
            return {"lora": lora_state_dict(self.model.denoiser), "optimizer": self.optimizer.state_dict()}
        model, optimizer = dist_utils.full_state(self.model.denoiser, self.optimizer)
        return {"unet": model, "optimizer": optimizer}  # "unet" for any denoiser: older checkpoints resume

    def save_checkpoint(self) -> None:
        """Everything a bitwise-identical continuation needs, written atomically by rank 0."""
        if not (self.world.is_main or self.sharded):
            return
        trained = self.weights_and_optimizer()
        if not self.world.is_main:
            return
        state = trained | {
            "step": self.step, "bad_in_row": self.bad_in_row, "records": self.records,
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "scaler": self.scaler.state_dict(), "sampler": self.sampler.state_dict(),
            "noise_generator": self.noise_generator.get_state(), "frame_generator": self.frame_generator.get_state(),
            "torch_rng": torch.get_rng_state(), "early_stopping": self.early_stopping.state_dict(),
        }
        atomic_write(self.output / CHECKPOINT, lambda tmp: torch.save(state, tmp))

    def _load_checkpoint(self) -> None:
        from peft import set_peft_model_state_dict

        path = self.output / CHECKPOINT
        if not path.is_file():
            raise UserError(f"--resume {self.output} has no {CHECKPOINT}; the run saved none (use --save-every)")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 (a damaged pickle fails in many ways: any of them means corrupt)
            raise UserError(f"{path} is corrupt ({str(err).splitlines()[0]}); resume from a copy of the run, "
                            "or start again") from None
        try:
            if self.config.finetune == "lora":
                set_peft_model_state_dict(self.model.denoiser, state["lora"])
                self.optimizer.load_state_dict(state["optimizer"])
            else:
                dist_utils.load_full_state(self.model.denoiser, self.optimizer, state["unet"], state["optimizer"])
        except (RuntimeError, KeyError, ValueError) as err:
            raise UserError(f"{path} does not fit this configuration ({str(err).splitlines()[0]}); "
                            "resume with the options the run was started with") from None
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.sampler.load_state_dict(state["sampler"])
        self.noise_generator.set_state(state["noise_generator"])
        self.frame_generator.set_state(state["frame_generator"])
        torch.set_rng_state(state["torch_rng"])
        self.early_stopping.load_state_dict(state["early_stopping"])
        self.step, self.bad_in_row, self.records = state["step"], state["bad_in_row"], list(state["records"])
        self._apply_optimizer_options()

    def _apply_optimizer_options(self) -> None:
        """--lr and --weight-decay given with --resume win over the values the optimizer state restored (same
        arithmetic as LambdaLR, so unchanged options resume bitwise)."""
        cfg = self.config
        self.lr_scheduler.base_lrs = [cfg.lr] * len(self.optimizer.param_groups)
        factor = self.lr_scheduler.lr_lambdas[0](self.lr_scheduler.last_epoch)
        for group in self.optimizer.param_groups:
            group |= {"initial_lr": cfg.lr, "lr": cfg.lr * factor, "weight_decay": cfg.weight_decay}

    def _rewrite_metrics(self) -> None:
        """Resumed: the metric lines up to the checkpoint (lines written after it are dropped)."""
        lines = "".join(json.dumps(r) + "\n" for r in self.records)
        atomic_write(self.output / "metrics.jsonl", lambda tmp: tmp.write_text(lines))

    def _on_signal(self, signum, frame):
        self.signal_received = signum

    # ---------------------------------------------------------------------------------- data
    def autocast(self):
        return autocast(self.device, self.config.precision)

    def source_latent(self, sources: list[Source], index: int) -> torch.Tensor:
        """Encode a clip, or let the base model (LoRA off) generate one from the prompt; cached."""
        key = id(sources[index])
        if key not in self._latent_cache:
            source = sources[index]
            with torch.no_grad(), self.autocast():
                if source.frames is not None:
                    latent = self.model.encode_video(source.frames()[None])[0]
                else:
                    generator = torch.Generator(self.device).manual_seed(self.config.seed * 100_003 + index)
                    context = self.model.encode_prompts([source.prompt])
                    with adapters_disabled(self.model.denoiser):
                        latent = self.chain.sample((1, *self.latent_shape), context, self.uncond, generator)[0]
            self._latent_cache[key] = latent.float()
        return self._latent_cache[key]

    def batch(self, sources: list[Source], indices: list[int]):
        latents = torch.stack([self.source_latent(sources, i) for i in indices])
        prompts = [sources[i].prompt for i in indices]
        return latents, prompts, self.model.encode_prompts(prompts)

    # ---------------------------------------------------------------------------------- steps
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
            edited = self.chain.edit(latents, context, uncond, self.noise_generator)
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

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean held-out video reward (fixed noise, SegVR evaluation frames: first of each segment) and, for the
        world model's clips, the gold metrics of the edited videos (``gold_*``, read from pixels). Keeps the
        edited latents, on the CPU, in ``held_out_edits`` for the edits grid."""
        values, gold, edits = [], [], []
        for indices in self.held_out_batches():
            latents, prompts, context = self.batch(self.eval_sources, indices)
            noise, generator = self.held_out_noise(indices, latents.shape[1:], lambda i: self.config.seed + 7 + 1009 * i,
                                                   self.chain.draw_noise)
            with self.autocast():
                edited = self.chain.edit(latents, context, self.uncond.expand(len(prompts), -1, -1), generator, noise)
                rewards, _ = self.reward(self.model, edited, prompts, train=False)
            values.append(rewards.float())
            edits += list(edited.float().cpu())
            clips = [self.eval_sources[i].clip for i in indices]
            if all(clips):
                gold += gold_scores([self.model.decode_video(edit) for edit in edited], clips, against_source=True)
        self.held_out_edits = edits
        result = {"eval_reward": torch.cat(values).mean().item()}
        return result | ({f"gold_{k}": v for k, v in mean_metrics(gold).items()} if gold else {})

    def log(self, record: dict):
        self.records.append(record)
        if self.world.is_main:
            with open(self.output / "metrics.jsonl", "a") as fh:
                fh.write(json.dumps(record) + "\n")
            values = {f"{record['kind']}/{k}": v for k, v in record.items() if k not in ("kind", "step")}
            self.tracker.scalars(record["step"], values | {f"gpu/{k}": v for k, v in gpu_stats(self.device).items()})

    def log_eval(self) -> bool:
        """Held-out evaluation (every sharded rank computes the same value); saves the best weights so far.
        Returns True when early stopping says stop."""
        stop = False
        if self.runs_model:
            values = self.evaluate()
            if self.sharded:  # one value on every rank, so every rank takes the same early-stopping decisions
                values = dist_utils.mean_over_ranks(values, self.world)
            if self.world.is_main:
                self.log({"kind": "eval", "step": self.step, **values})
            stop = self.early_stopping.update(values["eval_reward"], self.step).stop
            if self.early_stopping.improved and self.step > 0:
                self.save_weights("best")
        return not dist_utils.all_ranks_agree(not stop, self.world)

    def weights_folder(self, suffix: str = "") -> Path:
        """lora/ (peft), or unet/ / transformer/ for full fine-tuning (diffusers: config.json + safetensors);
        ``suffix`` "best" gives lora_best/."""
        name = "lora" if self.config.finetune == "lora" else self.model.denoiser_name
        return self.output / (f"{name}_{suffix}" if suffix else name)

    def save_weights(self, suffix: str = "") -> Path:
        cfg = self.config
        folder = self.weights_folder(suffix)
        if cfg.finetune == "lora":
            if self.world.is_main:
                save_lora(self.model.denoiser, folder, cfg.lora_rank, cfg.lora_alpha)
            return folder
        weights, _ = dist_utils.full_state(self.model.denoiser)
        if self.world.is_main:
            from safetensors.torch import save_file

            folder.mkdir(parents=True, exist_ok=True)
            self.model.denoiser.save_config(folder)
            config_file = folder / "config.json"
            config_file.write_text(json.dumps(json.loads(config_file.read_text()) | {"_class_name": self.denoiser_class},
                                              indent=2))
            save_file({k: v.contiguous() for k, v in weights.items()}, str(folder / "diffusion_pytorch_model.safetensors"))
        return folder

    def optimizer_step(self, loss: torch.Tensor) -> tuple[str, float]:
        """Backward, average over processes, clip, update; returns (outcome, grad norm).

        outcome is "updated"; "skipped" for a non-finite loss or gradient (weights, optimizer, scheduler and
        scaler state untouched); or "overflow" when fp16 loss scaling overflowed and the scaler lowered its scale.
        """
        cfg = self.config
        self.scaler.scale(loss).backward()  # DDP (LoRA) or FSDP (full) averages the gradients over ranks
        self.scaler.unscale_(self.optimizer)
        max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf
        grad_norm = dist_utils.total(torch.nn.utils.clip_grad_norm_(self.trainable, max_norm))
        loss_finite = math.isfinite(loss.item())
        outcome = "updated"
        if not dist_utils.all_ranks_agree(loss_finite and math.isfinite(grad_norm), self.world):
            outcome = "overflow" if self.scaler.is_enabled() and loss_finite else "skipped"
        if outcome == "updated":
            self.scaler.step(self.optimizer)
            self.lr_scheduler.step()
        # a skip leaves the scale as it was; update() still runs, since the scaler must be reset after unscale_()
        self.scaler.update(new_scale=self.scaler.get_scale() if outcome == "skipped" else None)
        self.optimizer.zero_grad(set_to_none=True)
        return outcome, grad_norm

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
                    indices = self.world.shard(next(self.sampler))
                    latents, prompts, context = self.batch(self.train_sources, indices)
                    # forward: edit -> decode SegVR frames -> reward with TAR
                    loss, terms = self.loss_step(latents, prompts, context)
                    # backward through the last K steps, average over ranks, clip, update (skipped if non-finite)
                    outcome, grad_norm = self.optimizer_step(loss)
                    # log (reading the loss is a device sync point)
                    seconds = time.perf_counter() - started
                    values = dist_utils.mean_over_ranks(
                        {"loss": loss.item(), **{k: v.float().mean().item() for k, v in terms.items()}}, self.world)
                    record = {"kind": "skipped" if outcome == "skipped" else "train", "step": self.step, **values,
                              "grad_norm": grad_norm, "lr": self.lr_scheduler.get_last_lr()[0], "s_per_step": seconds}
                    self.bad_in_row = self.bad_in_row + 1 if outcome == "skipped" else 0
                    if self.step % cfg.log_every == 0 or self.step == cfg.steps or outcome == "skipped":
                        self.log(record)
                    progress.update(1)
                    progress.set_postfix(reward=f"{record['reward']:.4f}", loss=f"{record['loss']:.4f}",
                                         s_step=f"{seconds:.2f}")
                    if self.bad_in_row >= cfg.max_bad_steps:
                        # skipped steps left weights and optimizer as they were: this is the last good state
                        bad, self.bad_in_row = self.bad_in_row, 0
                        self.save_checkpoint()
                        raise Stop(f"stopping at step {self.step}: {bad} non-finite losses or gradients in a row; the "
                                   f"weights of the last good step are saved in {self.output} (lower --lr or set "
                                   f"--max-grad-norm, then --resume {self.output})", 3)
                    if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step != cfg.steps and self.log_eval():
                        print(f"early stop at step {self.step}: held-out reward {self.early_stopping.best:.4f} at step "
                              f"{self.early_stopping.best_step} was not beaten in {cfg.early_stop_patience} evaluations; "
                              f"best weights in {self.weights_folder('best')}", file=sys.stderr)
                        break
                    if not dist_utils.all_ranks_agree(self.signal_received is None, self.world):
                        self.save_checkpoint()  # every rank stops at the same step (sharded saving is collective)
                        name = signal.Signals(self.signal_received or signal.SIGTERM).name
                        raise Stop(f"{name} at step {self.step}: checkpoint saved; continue with --resume {self.output}",
                                   128 + (self.signal_received or signal.SIGTERM))
                    if cfg.save_every and self.step % cfg.save_every == 0 and self.bad_in_row == 0:
                        self.save_checkpoint()
            finally:
                progress.close()
                for s, handler in handlers.items():
                    signal.signal(s, handler)
        self.log_eval()
        self.save_checkpoint()
        return self

    # ---------------------------------------------------------------------------------- outputs
    def held_out_batches(self) -> list[list[int]]:
        """Indices of the held-out sources in groups of --eval-batch-size."""
        count, size = len(self.eval_sources), self.config.eval_batch_size
        return [list(range(start, min(start + size, count))) for start in range(0, count, size)]

    def held_out_noise(self, indices, shape, seed_of, draw=randn) -> tuple[torch.Tensor, torch.Generator]:
        """Noise [len(indices), *shape] with video i's drawn from its own generator seeded ``seed_of(i)``, so it does
        not depend on how --eval-batch-size groups the videos; and the first generator, for the per-step noise of
        eta > 0, which does."""
        generators = [torch.Generator(self.device).manual_seed(seed_of(i)) for i in indices]
        return torch.cat([draw((1, *shape), g, self.device) for g in generators]), generators[0]

    def sample_latents(self) -> list[torch.Tensor]:
        """One video latent per held-out prompt, each from its own fixed noise (so before and after compare)."""
        latents = []
        for indices in self.held_out_batches():
            noise, generator = self.held_out_noise(indices, self.latent_shape, lambda i: self.config.seed + 11 + i)
            context = self.model.encode_prompts([self.eval_sources[i].prompt for i in indices])
            with self.autocast():
                x = self.chain.sample(noise.shape, context, self.uncond.expand(len(indices), -1, -1), generator,
                                      ddim_steps=self.config.sample_steps, noise=noise)
            latents += list(x.split(1))
        return latents

    def write_samples(self, after_latents: list[torch.Tensor]) -> list[Path]:
        """Before (base model) and after (fine-tuned) videos from the same noise for the held-out prompts, and the
        held-out edits (the videos the held-out reward and gold metrics score): source, base edit, fine-tuned edit."""
        folder = self.output / SAMPLES
        folder.mkdir(exist_ok=True)
        written, rows = [], []
        for i, pair in enumerate(zip(self.before_latents, after_latents)):
            videos = {}
            for label, latent in zip(("before", "after"), pair):
                videos[label] = self.model.decode_video(latent[0])
                written.append(media.write_mp4(videos[label], folder / f"{i:02d}_{label}.mp4", self.config.fps))
                written.append(media.write_gif(videos[label], folder / f"{i:02d}_{label}.gif", self.config.fps))
                self.tracker.video(f"samples/{i:02d}_{label}", videos[label], self.step, self.config.fps)
            written.append(media.write_grid([videos["before"], videos["after"]], folder / f"{i:02d}_before_after.png"))
            rows += [videos["before"], videos["after"]]
        written.append(media.write_grid(rows, folder / "before_after.png"))  # every prompt: before, after, ...
        if self.before_edits:  # a resumed run's base-model edits were made by the run it resumes
            rows = [self.model.decode_video(latent.to(self.device))
                    for i, (before, after) in enumerate(zip(self.before_edits, self.held_out_edits))
                    for latent in (self.source_latent(self.eval_sources, i), before, after)]
            written.append(media.write_grid(rows, folder / "edits.png"))  # every prompt: source, before, after, ...
        (folder / "prompts.txt").write_text("".join(f"{i:02d}: {s.prompt}\n" for i, s in enumerate(self.eval_sources)))
        return written

    def finish(self) -> dict:
        cfg = self.config
        dist_utils.barrier(self.world)
        summary = {"output": str(self.output)}
        self.save_weights()
        after_latents = self.sample_latents() if self.runs_model else None
        if self.world.is_main:
            media.plot_rewards(self.records, self.output / REWARD_CURVE, title=f"reward ({cfg.reward.split(':')[0]})")
            self.write_samples(after_latents)
            self.tracker.reward_curve(self.records, self.step)
            self.tracker.close()
            evals = [r for r in self.records if r["kind"] == "eval"]
            first, last = evals[0], evals[-1]
            summary |= {f"{k}_start": first[k] for k in first if k.startswith(("eval_", "gold_"))}
            summary |= {f"{k}_end": last[k] for k in last if k.startswith(("eval_", "gold_"))}
            print(f"held-out reward {first['eval_reward']:.4f} -> {last['eval_reward']:.4f}")
            if "gold_quality" in first:
                print(f"held-out gold metrics (from pixels, no reward model), before -> after fine-tuning:\n"
                      f"  quality (PSNR to the clean render) {first['gold_quality']:.2f} -> {last['gold_quality']:.2f} dB\n"
                      f"  colour right {first['gold_colour_acc']:.1%} -> {last['gold_colour_acc']:.1%}, "
                      f"shape right {first['gold_shape_acc']:.1%} -> {last['gold_shape_acc']:.1%}\n"
                      f"  sharpness {first['gold_sharpness']:.3f} -> {last['gold_sharpness']:.3f}, "
                      f"background noise {first['gold_bg_noise']:.4f} -> {last['gold_bg_noise']:.4f}\n"
                      f"  motion kept: distance to the source's path {first['gold_motion_error']:.2f} -> "
                      f"{last['gold_motion_error']:.2f} px/frame, speed {first['gold_motion']:.2f} -> "
                      f"{last['gold_motion']:.2f} px/frame")
            print(f"outputs in {self.output}")
        dist_utils.shutdown(self.world)
        return summary


@cli_entry
def main(argv: list[str] | None = None) -> dict:
    config = resolve_config(argv, description=__doc__.splitlines()[0])
    trainer = Trainer(config).setup()
    try:
        trainer.train()
    except Stop as stop:
        print(f"error: {stop}" if stop.exit_code == 3 else str(stop), file=sys.stderr)
        dist_utils.shutdown(trainer.world)
        raise SystemExit(stop.exit_code) from None
    return trainer.finish()


if __name__ == "__main__":
    main()
