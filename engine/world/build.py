"""The built-in model and reward, trained by the project on its procedural world (engine.world), in stages that
each fit a session, continue from their own checkpoint when stopped, and write their measurements to a report:

    python -m engine.world.build vae            # the per-frame VAE            -> world-t2v/vae
    python -m engine.world.build text-encoder   # tokenizer + caption encoder  -> world-t2v/tokenizer, text_encoder
    python -m engine.world.build unet           # the UNet3D on both           -> world-t2v (the whole pipeline)
    python -m engine.world.build motion         # the UNet continued to follow the caption's direction -> world-t2v
    python -m engine.world.build reward         # the preference reward        -> world-hps.pt
    python -m engine.world.build onpolicy       # one round of the reward's on-policy refinement -> world-hps.pt
    python -m engine.world.build motion-reward  # the video (motion) reward    -> world-motion.safetensors
    python -m engine.world.build motion-onpolicy  # one round of its on-policy refinement -> world-motion.safetensors
    python -m engine.world.build all --smoke    # every stage in minutes, into build/world-smoke

1. a base text-to-video model with ModelScope's diffusers classes (``UNet3DConditionModel``, ``AutoencoderKL``,
   ``CLIPTextModel`` + ``CLIPTokenizer``, ``DDIMScheduler``, epsilon prediction), saved in the pipeline layout
   (``engine/assets/world-t2v``, loadable by a stock ``TextToVideoSDPipeline``), trained on the world's mixed
   clean and degraded clips, so it generates mixed quality;
2. a preference reward: a small open_clip architecture (``WorldCLIP-XS``, config in engine/assets) trained so
   that clean, caption-faithful frames score above degraded or mismatched ones, saved in the HPS_v2 checkpoint
   format (``{"state_dict": ...}``, fp16 tensors) and loaded through ``--reward hpsv2:PATH``.

Each stage is seeded and reads the stages before it from ``--output``; its figures go to ``<reports>/<stage>.json``
(bench/world for the shipped assets). The training loops are in engine.world.training, the measurements in
engine.world.figures, the resumable runner in engine.world.stages, the rewards' stages in engine.world.reward_stages
and engine.world.motion_stages.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.assets import ASSETS, MODEL_DIR, REWARD_FILE
from engine.errors import UserError, cli_entry
from engine.world.figures import (base_model_figures, ceiling, clean_clips, direction_probe, from_noise, reconstruct,
                                  vae_fidelity)
from engine.world.gold import mean_metrics
from engine.world.rendering import render
from engine.world.scene import (FINETUNE_COLOURS, FINETUNE_SHAPES, evaluation_set, random_clip, training_mixture,
                                world_words)
from engine.world.stages import write_report
from engine.world.motion_stages import stage_motion_onpolicy, stage_motion_reward
from engine.world.reward_stages import SLOPE_WEIGHT, stage_onpolicy, stage_reward
from engine.world.training import train_motion, train_text_encoder, train_unet, train_vae


CONTEXT_LENGTH = 16
VAE_CHANNELS = (16, 32, 64)
LATENT_CHANNELS = 8


# ---------------------------------------------------------------------------------- architecture
def world_tokenizer(folder: Path):
    """A CLIP BPE tokenizer whose merges make each world word one token (other text falls back to bytes), padding
    to 16 tokens: the longest caption's 12 words and its two markers, so no attention runs over 60 pads."""
    from open_clip.tokenizer import bytes_to_unicode
    from transformers import CLIPTokenizer

    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols]
    merges: list[tuple[str, str]] = []

    def build(merge_list):
        (folder / "vocab.json").write_text(json.dumps({v: i for i, v in enumerate(vocab + ["<|startoftext|>", "<|endoftext|>"])}))
        (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merge_list))
        return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=CONTEXT_LENGTH)

    # Merge each word left to right; a word that an earlier word's merges split differently gets merges for
    # the pieces it ends up with, appended last (a later merge never changes a word already in one piece).
    for _ in range(10):
        tokenizer = build(merges)
        unmerged = [w for w in world_words() if len(tokenizer.tokenize(w)) > 1]
        if not unmerged:
            return tokenizer
        for word in unmerged:
            pieces = tokenizer.tokenize(word)
            current = pieces[0]
            for piece in pieces[1:]:
                merges.append((current, piece))
                current = current + piece
                if current not in vocab:
                    vocab.append(current)
    raise RuntimeError("could not build whole-word merges for the world's vocabulary")


def new_vae(seed: int):
    """The untrained per-frame VAE: 32 x 32 frames to 8 x 8 x 8 latents (factor 4). Eight latent channels, not
    four: with four, a 4 x 4 pixel patch had too few numbers for where an object's edge crosses it, and the VAE
    rounded every shape."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=LATENT_CHANNELS, sample_size=32,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=VAE_CHANNELS, layers_per_block=1, norm_num_groups=1, scaling_factor=1.0,
    )  # one norm group: with one channel per group, GroupNorm removed each channel's mean and the VAE lost colour


def new_text_encoder(tokenizer, seed: int):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    vocab = tokenizer.get_vocab()
    return CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=CONTEXT_LENGTH, bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"],
    ))


def new_unet(vae, text_encoder, seed: int):
    from diffusers import UNet3DConditionModel

    torch.manual_seed(seed)
    return UNet3DConditionModel(
        sample_size=8, in_channels=vae.config.latent_channels, out_channels=vae.config.latent_channels,
        down_block_types=("CrossAttnDownBlock3D", "CrossAttnDownBlock3D"),
        up_block_types=("CrossAttnUpBlock3D", "CrossAttnUpBlock3D"),
        block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
        cross_attention_dim=text_encoder.config.hidden_size, attention_head_dim=8,
    )


def new_scheduler():
    """DDPM's linear schedule: its last step keeps 1% of the signal. SD's scaled-linear one, made for 64 x 64
    latents, keeps 9% at the first of 20 DDIM steps, which on 8 x 8 latents lets training read the layout from
    the noise, where generation from pure noise finds nothing to read."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="linear", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")


# ---------------------------------------------------------------------------------- the stages
STAGES = ("vae", "text-encoder", "unet", "motion", "reward", "onpolicy", "motion-reward", "motion-onpolicy")
STEPS = {"vae": 5000, "text-encoder": 600, "unet": 7000, "motion": 1600, "reward": 1000, "onpolicy": 1000,
         "motion-reward": 1500, "motion-onpolicy": 1500}


@dataclass(frozen=True)
class Build:
    """Where a build reads and writes, and how large its measurements are (``--smoke``: a few of each)."""

    seed: int
    output: Path
    work: Path
    reports: Path
    smoke: bool

    @property
    def model_dir(self) -> Path:
        return self.output / MODEL_DIR.name

    def count(self, full: int) -> int:
        return 4 if self.smoke else full

    def stage_work(self, stage: str, restart: bool) -> Path:
        folder = self.work / stage
        if restart and folder.exists():
            shutil.rmtree(folder)
        return folder

    def require(self, *parts: str) -> None:
        """Refuses, before any work, a ``--output`` whose model lacks ``parts`` that the stage reads."""
        missing = [p for p in parts if not (self.model_dir / p).is_dir()]
        if missing:
            raise UserError(f"{self.model_dir} lacks {', '.join(missing)}; run the stages before this one first "
                            f"(python -m engine.world.build {' / '.join(STAGES)}, same --output)")

    def load(self, *parts: str) -> dict:
        from diffusers import AutoencoderKL, UNet3DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        classes = {"vae": AutoencoderKL, "unet": UNet3DConditionModel, "text_encoder": CLIPTextModel,
                   "tokenizer": CLIPTokenizer}
        self.require(*parts)
        return {p: classes[p].from_pretrained(str(self.model_dir / p)) for p in parts}


def stage_vae(build: Build, steps: int, restart: bool) -> dict:
    vae = new_vae(build.seed)
    monitor_clips = clean_clips(32, build.seed + 10)
    train_vae(vae, steps, build.seed, build.stage_work("vae", restart), {"seed": build.seed, "steps": steps,
              "channels": VAE_CHANNELS, "latent_channels": LATENT_CHANNELS}, monitor=lambda v: _fidelity(vae_fidelity(v, monitor_clips)))
    vae.save_pretrained(str(build.model_dir / "vae"))
    in_domain = clean_clips(build.count(128), build.seed + 20, shapes=FINETUNE_SHAPES, colours=FINETUNE_COLOURS)
    every = clean_clips(build.count(128), build.seed + 21)
    rng = random.Random(build.seed + 22)
    mixture = [training_mixture(rng) for _ in range(build.count(64))]
    return {"ceiling": ceiling(build.count(512), build.seed + 23),
            "clean_in_domain": vae_fidelity(vae, in_domain), "clean_every_category": vae_fidelity(vae, every),
            "training_mixture_psnr_db": _mixture_psnr(vae, mixture), "latent_scale": vae.config.scaling_factor}


def stage_text_encoder(build: Build, steps: int, restart: bool) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = world_tokenizer(Path(tmp))
        text_encoder = new_text_encoder(tokenizer, build.seed + 1)
        train_text_encoder(text_encoder, tokenizer, steps, build.seed + 1, build.stage_work("text-encoder", restart),
                           {"seed": build.seed, "steps": steps})
        tokenizer.save_pretrained(str(build.model_dir / "tokenizer"))
    text_encoder.save_pretrained(str(build.model_dir / "text_encoder"))
    return {"attribute_accuracy": attribute_accuracy(text_encoder, tokenizer, build.count(512), build.seed + 30)}


def stage_unet(build: Build, steps: int, restart: bool) -> dict:
    parts = build.load("vae", "text_encoder", "tokenizer")
    unet = new_unet(parts["vae"], parts["text_encoder"], build.seed + 2)
    return _train_denoiser(build, unet, new_scheduler(), lambda unet, scheduler, monitor: train_unet(
        unet, parts["vae"], parts["text_encoder"], parts["tokenizer"], scheduler, steps, build.seed + 2,
        build.stage_work("unet", restart), {"seed": build.seed, "steps": steps}, monitor=monitor,
        monitor_every=max(1, min(1000, steps))), parts)


def stage_motion(build: Build, steps: int, restart: bool) -> dict:
    """The UNet stage's output, continued so that it moves objects the way the caption says (MotionTerms)."""
    from diffusers import DDIMScheduler

    parts = build.load("vae", "text_encoder", "tokenizer", "unet")
    scheduler = DDIMScheduler.from_pretrained(str(build.model_dir / "scheduler"))
    return _train_denoiser(build, parts["unet"], scheduler, lambda unet, scheduler, monitor: train_motion(
        unet, parts["vae"], parts["text_encoder"], parts["tokenizer"], scheduler, steps, build.seed + 4,
        build.stage_work("motion", restart), {"seed": build.seed, "steps": steps}, monitor=monitor,
        monitor_every=max(1, min(400, steps))), parts)


def _train_denoiser(build: Build, unet, scheduler, train, parts: dict) -> dict:
    """Trains ``unet`` (monitored from noise on reward-training captions, with the direction probe), saves the
    pipeline, and measures it: caption fidelity and quality from noise on the effect set, the direction probe."""
    from diffusers import TextToVideoSDPipeline

    from engine.models import VideoDiffusion

    vae, text_encoder, tokenizer = parts["vae"].eval(), parts["text_encoder"].eval(), parts["tokenizer"]
    vae.requires_grad_(False)
    text_encoder.requires_grad_(False)
    unet.requires_grad_(True)
    monitor_pairs = evaluation_set("reward_train", 1)[:build.count(36)]
    probe_clips = [c for c, _ in evaluation_set("reward_train", 2)][:build.count(64)]

    def monitor(ema):
        model = VideoDiffusion(ema, vae, text_encoder, tokenizer, scheduler)
        rows, _ = from_noise(model, monitor_pairs)
        probe = direction_probe(model, probe_clips[:32], timesteps=(750,))["t750"]
        gaps = ("opposite_direction_gap", "perpendicular_direction_gap")
        return {**_fidelity(mean_metrics(rows)), **{k: probe[k] for k in gaps}}

    train(unet, scheduler, monitor)
    TextToVideoSDPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                          scheduler=scheduler).save_pretrained(str(build.model_dir))
    ceilings = ceiling(build.count(512), build.seed + 23)
    model = VideoDiffusion(unet, vae, text_encoder, tokenizer, scheduler)
    return {"ceiling": ceilings,
            "effect_set": base_model_figures(model, evaluation_set("effect", 4)[:build.count(144)], ceilings),
            "direction_probe": direction_probe(model, probe_clips)}


def _fidelity(means: dict[str, float]) -> dict[str, float]:
    return {k: means[k] for k in ("colour_acc", "shape_acc", "direction_acc", "quality")}


def _mixture_psnr(vae, clips) -> float:
    frames = torch.stack([render(c) for c in clips]).flatten(0, 1)
    mse = torch.nn.functional.mse_loss(reconstruct(vae, frames), frames)
    return float(10 * torch.log10(1 / mse))


@torch.no_grad()
def attribute_accuracy(text_encoder, tokenizer, count: int, seed: int) -> dict[str, float]:
    """How often a nearest-class-mean readout of the summary token names each attribute, on fresh captions of
    both templates (class means from one half, tested on the other)."""
    from engine.world.training import ATTRIBUTES

    rng = random.Random(seed)
    clips = [random_clip(rng, template=rng.choice("AB")) for _ in range(2 * count)]
    ids = tokenizer([c.caption for c in clips], padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids
    summary = text_encoder(ids).pooler_output
    fit, test = summary[:count], summary[count:]
    accuracy = {}
    for name, values in ATTRIBUTES.items():
        labels = torch.tensor([values.index(getattr(c, name)) for c in clips])
        means = torch.stack([fit[labels[:count] == i].mean(0) if (labels[:count] == i).any()
                             else torch.full_like(fit[0], float("inf")) for i in range(len(values))])
        accuracy[name] = (torch.cdist(test, means).argmin(1) == labels[count:]).float().mean().item()
    return accuracy


RUNNERS = {"vae": stage_vae, "text-encoder": stage_text_encoder, "unet": stage_unet, "motion": stage_motion,
           "reward": stage_reward, "onpolicy": stage_onpolicy, "motion-reward": stage_motion_reward,
           "motion-onpolicy": stage_motion_onpolicy}


# ---------------------------------------------------------------------------------- the command
@cli_entry
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m engine.world.build", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("stage", choices=(*STAGES, "all"), help="the stage to run; 'all': every stage in order")
    parser.add_argument("--steps", type=int, help="training steps of the stage (default: "
                        + ", ".join(f"{k} {v}" for k, v in STEPS.items()) + "; --smoke: 3)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", help=f"folder for {MODEL_DIR.name}/ and {REWARD_FILE.name} (default: {ASSETS}; "
                        "--smoke: build/world-smoke)")
    parser.add_argument("--work", help="checkpoints and logs of the stages (default: build/world, or OUTPUT/work)")
    parser.add_argument("--reports", help="the stages' JSON reports (default: bench/world, or OUTPUT/reports)")
    parser.add_argument("--generations", type=int, default=288, help="reward stage: this many base-model generations "
                        "of the reward-training captions and seeds, ranked by the gold metrics, join its training data")
    parser.add_argument("--slope-weight", type=float, default=SLOPE_WEIGHT, help="reward and onpolicy stages: how much "
                        "the reward's gradient in pixels is trained to point where the gold quality improves (0: off)")
    parser.add_argument("--smoke", action="store_true", help="a few steps and clips of each: the whole build in minutes")
    parser.add_argument("--restart", action="store_true", help="start the stage over instead of continuing its checkpoint")
    args = parser.parse_args(argv)
    if args.steps is not None and args.steps < 1:
        raise UserError("--steps must be at least 1")
    root = ASSETS.parents[1]
    output = Path(args.output) if args.output else (root / "build" / "world-smoke" if args.smoke else ASSETS)
    shipped = output.resolve() == ASSETS.resolve()
    if args.smoke and shipped:
        raise UserError(f"--smoke would overwrite the shipped assets in {ASSETS}; pass --output another folder")
    build = Build(args.seed, output, Path(args.work) if args.work else (root / "build" / "world" if shipped else output / "work"),
                  Path(args.reports) if args.reports else (root / "bench" / "world" if shipped else output / "reports"),
                  args.smoke)
    for stage in STAGES if args.stage == "all" else (args.stage,):
        steps = args.steps or (3 if args.smoke else STEPS[stage])
        extra = ({"generations": args.generations} if stage == "reward" else {}) | (
            {"slope_weight": args.slope_weight} if stage in ("reward", "onpolicy") else {})
        figures = RUNNERS[stage](build, steps, args.restart, **extra)
        path = write_report(build.reports, stage, {"stage": stage, "seed": args.seed, "steps": steps,
                                                   "smoke": args.smoke, **figures})
        print(f"{stage}: written to {output}; figures in {path}")


if __name__ == "__main__":
    main()
