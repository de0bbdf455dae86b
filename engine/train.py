"""InstructVideo reward fine-tuning: ``python -m engine.train [--config FILE] [--flags]``.

With no arguments it fine-tunes the built-in tiny model on the CPU in a minute or two. On a real model:

    python -m engine.train --model /weights/text-to-video-ms-1.7b \
        --reward hpsv2:/weights/HPS_v2.1_compressed.pt --videos /data/clips --steps 20000

Each step: pick source videos, noise their latents to fraction tau of the D-step DDIM chain, run the remaining
steps with classifier-free guidance (gradient through the last K), decode the SegVR frames, score them with the
reward weighted by TAR, and update the LoRA weights. Outputs (in ``--output``): config.yaml, metrics.jsonl,
lora/ (peft safetensors), reward_curve.png and samples/ (before/after mp4, GIF and PNG grids).
"""

from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from datetime import datetime
from pathlib import Path

import torch
import yaml
from tqdm import tqdm

from engine import media
from engine.chain import EditChain
from engine.checkpointing import checkpoint_blocks
from engine.config import TrainConfig, resolve_config
from engine.data import Source, batches, build_sources, split_held_out
from engine.errors import UserError, cli_entry
from engine.lora import adapters_disabled, add_lora, save_lora
from engine.models import VideoDiffusion, build_model
from engine.rewards import build_reward
from engine.video_reward import SegmentalReward, reward_loss

RUN_FILES = ("config.yaml", "metrics.jsonl")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name} asked for CUDA but no GPU is visible; use --device cpu")
    return device


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """None means plain fp32 (always on the CPU)."""
    if device.type != "cuda" or precision == "fp32":
        return None
    return {"auto": torch.bfloat16, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def prepare_output(config: TrainConfig) -> Path:
    """The run folder; refuses one that holds another run unless --overwrite."""
    if config.output is None:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        out = Path("runs") / f"{Path(config.model).name}-{stamp}"
    else:
        out = Path(config.output)
    if out.exists() and not out.is_dir():
        raise UserError(f"--output {out} is a file; pass a folder")
    if not config.overwrite and any((out / f).exists() for f in RUN_FILES):
        raise UserError(f"output folder {out} already holds a run; pass another --output or add --overwrite")
    out.mkdir(parents=True, exist_ok=True)
    return out


class Trainer:
    """The recipe: ``setup()`` builds everything from the config, ``train()`` runs the loop, ``finish()``
    writes the LoRA weights, the reward curve and the before/after samples."""

    def __init__(self, config: TrainConfig):
        self.config = config
        self.records: list[dict] = []

    # ---------------------------------------------------------------------------------- setup
    def setup(self) -> "Trainer":
        cfg = self.config
        torch.manual_seed(cfg.seed)
        self.device = resolve_device(cfg.device)
        self.amp_dtype = autocast_dtype(cfg.precision, self.device)
        self.output = prepare_output(cfg)
        self.model: VideoDiffusion = build_model(cfg.model, cfg.seed, self.device)
        self.reward = SegmentalReward(build_reward(cfg.reward).to(self.device), cfg.segments, cfg.tar_lambda,
                                      cfg.segvr, cfg.tar)
        self._setup_data()
        self._setup_chain()
        self._setup_lora_and_optimizer()
        self._write_config()
        return self

    def _setup_data(self):
        cfg = self.config
        down = self.model.vae_downsample
        if cfg.height % down or cfg.width % down:
            raise UserError(f"--height/--width must be multiples of the VAE's factor {down}")
        sources = build_sources(cfg.prompts, cfg.videos, cfg.model == "tiny", cfg.num_frames, cfg.fps,
                                cfg.height, cfg.width)
        self.train_sources, held_out = split_held_out(sources, cfg.num_held_out)
        self.eval_sources = held_out or self.train_sources[:2]
        self.latent_shape = (self.model.unet.config.in_channels, cfg.num_frames, cfg.height // down, cfg.width // down)
        self._latent_cache: dict[int, torch.Tensor] = {}
        self.data_generator = torch.Generator().manual_seed(cfg.seed)
        self.batch_indices = batches(len(self.train_sources), cfg.batch_size, self.data_generator)
        self.noise_generator = torch.Generator(self.device).manual_seed(cfg.seed + 1)
        self.uncond = self.model.encode_prompts([""])

    def _setup_chain(self):
        cfg = self.config
        self.chain = EditChain(self.model, cfg.ddim_steps, cfg.tau, cfg.grad_steps_resolved, cfg.guidance,
                               cfg.eta, cfg.offset_noise)
        self.revert_checkpointing = checkpoint_blocks(self.model.unet) if cfg.checkpoint == "blocks" else None

    def _setup_lora_and_optimizer(self):
        cfg = self.config
        self.lora_params = add_lora(self.model.unet, cfg.lora_rank, cfg.lora_alpha)
        self.optimizer = torch.optim.AdamW(self.lora_params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        warmup = max(1, cfg.warmup_steps)
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: min(1.0, (s + 1) / warmup))
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)

    def _write_config(self):
        cfg = self.config
        resolved = cfg.to_dict() | {
            "output": str(self.output),
            "derived": {"start_timestep": self.chain.timesteps[0], "steps_run": self.chain.steps_run,
                        "grad_steps": self.chain.grad_steps, "device": str(self.device),
                        "trainable_parameters": sum(p.numel() for p in self.lora_params),
                        "train_sources": len(self.train_sources), "eval_sources": len(self.eval_sources)},
        }
        (self.output / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))

    # ---------------------------------------------------------------------------------- data
    def autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

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
                    with adapters_disabled(self.model.unet):
                        latent = self.chain.sample((1, *self.latent_shape), context, self.uncond, generator)[0]
            self._latent_cache[key] = latent.float()
        return self._latent_cache[key]

    def batch(self, sources: list[Source], indices: list[int]):
        latents = torch.stack([self.source_latent(sources, i) for i in indices])
        prompts = [sources[i].prompt for i in indices]
        return latents, prompts, self.model.encode_prompts(prompts)

    # ---------------------------------------------------------------------------------- steps
    def loss_step(self, latents, prompts, context) -> tuple[torch.Tensor, torch.Tensor]:
        """Edit, decode the SegVR frames, score with TAR: returns (loss, video rewards)."""
        uncond = self.uncond.expand(len(prompts), -1, -1)
        with self.autocast():
            edited = self.chain.edit(latents, context, uncond, self.noise_generator)
            rewards, _ = self.reward(self.model, edited, prompts, train=True, generator=self.data_generator)
        return reward_loss(rewards), rewards

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean held-out video reward: fixed noise, SegVR evaluation frames (first of each segment)."""
        generator = torch.Generator(self.device).manual_seed(self.config.seed + 7)
        values = []
        for start in range(0, len(self.eval_sources), self.config.batch_size):
            indices = list(range(start, min(start + self.config.batch_size, len(self.eval_sources))))
            latents, prompts, context = self.batch(self.eval_sources, indices)
            with self.autocast():
                edited = self.chain.edit(latents, context, self.uncond.expand(len(prompts), -1, -1), generator)
                rewards, _ = self.reward(self.model, edited, prompts, train=False)
            values.append(rewards.float())
        return torch.cat(values).mean().item()

    def log(self, record: dict):
        self.records.append(record)
        with open(self.output / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(record) + "\n")

    def train(self) -> "Trainer":
        cfg = self.config
        self.log({"kind": "eval", "step": 0, "eval_reward": self.evaluate()})
        progress = tqdm(range(1, cfg.steps + 1), desc="fine-tuning", unit="step", dynamic_ncols=True)
        for step in progress:
            started = time.perf_counter()
            # data: source latents (cached), prompts, text embeddings
            latents, prompts, context = self.batch(self.train_sources, next(self.batch_indices))
            # forward: edit -> decode SegVR frames -> reward with TAR
            loss, rewards = self.loss_step(latents, prompts, context)
            # backward through the last K steps, clip, update LoRA
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
            max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf
            grad_norm = torch.nn.utils.clip_grad_norm_(self.lora_params, max_norm)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
            self.lr_scheduler.step()
            # log (reading the loss is a device sync point)
            seconds = time.perf_counter() - started
            record = {"kind": "train", "step": step, "loss": loss.item(), "reward": rewards.mean().item(),
                      "grad_norm": grad_norm.item(), "lr": self.lr_scheduler.get_last_lr()[0], "s_per_step": seconds}
            if step % cfg.log_every == 0 or step == cfg.steps:
                self.log(record)
            progress.set_postfix(reward=f"{record['reward']:.4f}", loss=f"{record['loss']:.4f}", s_step=f"{seconds:.2f}")
            if cfg.eval_every and step % cfg.eval_every == 0 and step != cfg.steps:
                self.log({"kind": "eval", "step": step, "eval_reward": self.evaluate()})
        progress.close()
        if cfg.steps:
            self.log({"kind": "eval", "step": cfg.steps, "eval_reward": self.evaluate()})
        return self

    # ---------------------------------------------------------------------------------- outputs
    def write_samples(self) -> list[Path]:
        """Before (LoRA off) and after (LoRA on) videos from the same noise for the held-out prompts."""
        folder = self.output / "samples"
        folder.mkdir(exist_ok=True)
        written = []
        for i, source in enumerate(self.eval_sources):
            context = self.model.encode_prompts([source.prompt])
            videos = {}
            for label in ("before", "after"):
                generator = torch.Generator(self.device).manual_seed(self.config.seed + 11 + i)
                switch = adapters_disabled(self.model.unet) if label == "before" else nullcontext()
                with switch, self.autocast():
                    latent = self.chain.sample((1, *self.latent_shape), context, self.uncond, generator,
                                               ddim_steps=self.config.sample_steps)
                with torch.no_grad():
                    videos[label] = self.model.decode_latents(latent[0].transpose(0, 1))
                written.append(media.write_mp4(videos[label], folder / f"{i:02d}_{label}.mp4", self.config.fps))
                written.append(media.write_gif(videos[label], folder / f"{i:02d}_{label}.gif", self.config.fps))
            written.append(media.write_grid([videos["before"], videos["after"]], folder / f"{i:02d}_before_after.png"))
        (folder / "prompts.txt").write_text("".join(f"{i:02d}: {s.prompt}\n" for i, s in enumerate(self.eval_sources)))
        return written

    def finish(self) -> dict:
        cfg = self.config
        save_lora(self.model.unet, self.output / "lora", cfg.lora_rank, cfg.lora_alpha)
        media.plot_rewards(self.records, self.output / "reward_curve.png", title=f"reward ({cfg.reward.split(':')[0]})")
        self.write_samples()
        evals = [r["eval_reward"] for r in self.records if r["kind"] == "eval"]
        summary = {"output": str(self.output), "eval_reward_start": evals[0], "eval_reward_end": evals[-1]}
        print(f"held-out reward {evals[0]:.4f} -> {evals[-1]:.4f}; outputs in {self.output}")
        return summary


@cli_entry
def main(argv: list[str] | None = None) -> dict:
    config = resolve_config(argv, description=__doc__.splitlines()[0])
    return Trainer(config).setup().train().finish()


if __name__ == "__main__":
    main()
