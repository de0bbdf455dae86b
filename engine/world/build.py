"""The built-in model and reward, trained by the project on its procedural world (engine.world), in stages that
each fit a session, continue from their own checkpoint when stopped, and write their measurements to a report:

    python -m engine.world.build vae            # the per-frame VAE            -> world-t2v/vae
    python -m engine.world.build text-encoder   # tokenizer + caption encoder  -> world-t2v/tokenizer, text_encoder
    python -m engine.world.build unet           # the UNet3D on both           -> world-t2v (the whole pipeline)
    python -m engine.world.build motion         # the UNet continued to follow the caption's direction -> world-t2v
    python -m engine.world.build reward         # the preference reward        -> world-hps.pt
    python -m engine.world.build onpolicy       # one round of the reward's on-policy refinement -> world-hps.pt
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
engine.world.figures, the resumable runner in engine.world.stages.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.assets import ASSETS, MODEL_DIR, REWARD_ARCH, REWARD_FILE
from engine.errors import UserError, cli_entry
from engine.rewards.clip import register_open_clip_configs
from engine.world.figures import (QUALITY_GAP, base_model_figures, ceiling, clean_clips, clean_references,
                                  direction_probe, from_noise, reconstruct, reward_agreement, vae_fidelity)
from engine.world.gold import mean_metrics
from engine.world.rendering import render
from engine.world.scene import FINETUNE_COLOURS, FINETUNE_SHAPES, evaluation_set, random_clip, training_mixture
from engine.world.stages import write_report
from engine.world.training import train_motion, train_reward, train_text_encoder, train_unet, train_vae


CONTEXT_LENGTH = 16
VAE_CHANNELS = (16, 32, 64)
LATENT_CHANNELS = 8


# ---------------------------------------------------------------------------------- architecture
def world_words() -> list[str]:
    """Every word and punctuation mark the world's captions use (both templates)."""
    rng = random.Random(0)
    words: set[str] = set()
    for _ in range(3000):
        clip = random_clip(rng, template=rng.choice("AB"))
        words.update(re.findall(r"[a-z]+|[^\sa-z]", clip.caption))
    return sorted(words)


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
STAGES = ("vae", "text-encoder", "unet", "motion", "reward", "onpolicy")
STEPS = {"vae": 5000, "text-encoder": 600, "unet": 7000, "motion": 1600, "reward": 1000, "onpolicy": 1000}


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

    def load(self, *parts: str) -> dict:
        from diffusers import AutoencoderKL, UNet3DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        classes = {"vae": AutoencoderKL, "unet": UNet3DConditionModel, "text_encoder": CLIPTextModel,
                   "tokenizer": CLIPTokenizer}
        missing = [p for p in parts if not (self.model_dir / p).is_dir()]
        if missing:
            raise UserError(f"{self.model_dir} lacks {', '.join(missing)}; run the stages before this one first "
                            f"(python -m engine.world.build {' / '.join(STAGES)}, same --output)")
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


def ranked_generations(model, pairs) -> tuple[list, list]:
    """The base model's generations of ``pairs`` (reward-training captions and seeds only) as (better video, its
    caption, worse video, its caption), ranked the way figure 5 measures the reward: any two clips whose gold
    quality differs by 2 dB or more, the better first, and within a caption, colour and shape right first; and
    apart, each generation below its clean reference through the VAE (``clean_references``) where that is 2 dB
    better. Without those the reward scored the model's generations as high as the clean renders (61% of
    references above their generation), and fine-tuning from noise had nothing to climb."""
    rows, videos = from_noise(model, pairs)
    clips = [c for c, _ in pairs]
    captions = [c.caption for c in clips]
    right = [r["colour_acc"] > 0.5 and r["shape_acc"] > 0.5 for r in rows]
    ranked = []
    for i in range(len(rows)):
        for j in range(len(rows)):
            same = captions[i] == captions[j]
            if rows[i]["quality"] - rows[j]["quality"] >= QUALITY_GAP or (same and right[i] and not right[j]):
                ranked.append((videos[i], captions[i], videos[j], captions[j]))
    references, quality = clean_references(model, videos, clips)
    below = [(r, c, v, c) for r, q, v, c, row in zip(references, quality, videos, captions, rows)
             if q - row["quality"] >= QUALITY_GAP]
    return ranked, below


def stage_reward(build: Build, steps: int, restart: bool, generations: int = 288) -> dict:
    from engine.models import load_model

    model = load_model(build.model_dir)
    ranked, references = (ranked_generations(model, evaluation_set("reward_train", 8)[:build.count(generations)])
                          if generations else ([], []))
    figures = _train_and_save_reward(build, model, steps, build.stage_work("reward", restart),
                                     {"seed": build.seed, "steps": steps}, ranked, references)
    if (build.work / "onpolicy").exists():  # its rounds refined the reward this stage has just replaced
        shutil.rmtree(build.work / "onpolicy")
    return {"ranked_generation_pairs": len(ranked), "reference_pairs": len(references), **figures}


def _train_and_save_reward(build: Build, model, steps: int, work: Path, config: dict, ranked: list,
                           references: list) -> dict:
    """A fresh reward trained on the world's preference groups and the given pairs of generations, written to
    ``world-hps.pt`` in the HPS_v2 checkpoint format, and its agreement with the gold metrics (figure 5)."""
    import open_clip

    from engine.rewards import HPSv2Reward

    register_open_clip_configs()
    torch.manual_seed(build.seed + 3)
    reward = open_clip.create_model(REWARD_ARCH, pretrained=None)
    train_reward(reward, open_clip.get_tokenizer(REWARD_ARCH), model.vae, steps, build.seed + 3, work, config,
                 ranked=ranked, references=references)
    state = {k: v.half() if v.is_floating_point() else v for k, v in reward.state_dict().items()}
    path = build.output / REWARD_FILE.name
    torch.save({"state_dict": state, "architecture": REWARD_ARCH}, str(path))
    pairs = evaluation_set("reward_validation", 8)[:build.count(288)]
    return {"reward_validation": reward_agreement(model, HPSv2Reward(path), pairs)}


# The fine-tuning recipes whose generations teach the reward each round: the world preset, the whole chain from
# noise (DRaFT-style), and both three times longer, where a reward is hacked first.
ONPOLICY_RECIPES = ({}, {"tau": 1.0}, {"steps": 120}, {"tau": 1.0, "steps": 120})
ONPOLICY_GAP = 1.0  # dB between a fine-tuned generation and the base model's of the same noise to make a pair


def stage_onpolicy(build: Build, steps: int, restart: bool) -> dict:
    """One round of the reward's on-policy refinement: LoRAs fine-tuned against the current reward (the engine's
    own trainer, ``ONPOLICY_RECIPES``) generate from noise on reward-training captions and seeds; each generation
    is ranked against the base model's of the same noise where their gold quality differs by ``ONPOLICY_GAP`` dB,
    and below its clean reference; then the reward is trained afresh on the reward stage's data plus every round's
    pairs. What fine-tuning learns to exploit in one round is what the next reward learns to score down. Each run
    is one more round (``build/world/onpolicy/round-N``); the reward stage starts the rounds over."""
    from engine.models import load_model

    root = build.work / "onpolicy"
    done = sorted(root.glob("round-*/figures.json"), key=lambda p: int(p.parent.name.split("-")[1]))
    work = root / f"round-{len(done) + 1}"
    if restart and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    reward_file = build.output / REWARD_FILE.name
    if not reward_file.exists():
        raise UserError(f"{reward_file} is missing; run the reward stage first (same --output)")
    base_model = load_model(build.model_dir)
    base_data = _cached(root / "base.pt", lambda: ranked_generations(
        base_model, evaluation_set("reward_train", 8)[:build.count(288)]))
    pairs = evaluation_set("reward_train", 8)[:build.count(288)][::2]
    base_rows, base_videos = _cached(root / "base_generations.pt", lambda: from_noise(base_model, pairs))
    round_pairs, loras = _cached(work / "pairs.pt", lambda: _onpolicy_pairs(
        build, work, reward_file, len(done) + 1, pairs, base_rows, base_videos))
    earlier = [p for f in done for p in torch.load(f.parent / "pairs.pt", weights_only=False)[0]]
    ranked, references = base_data
    figures = _train_and_save_reward(build, base_model, steps, work / "reward",
                                     {"seed": build.seed, "steps": steps, "round": len(done) + 1},
                                     ranked, references + earlier + round_pairs)
    figures = {"round": len(done) + 1, "loras": loras, "new_pairs": len(round_pairs),
               "onpolicy_pairs": len(earlier) + len(round_pairs), **figures,
               "earlier_rounds": [json.loads(f.read_text()) for f in done]}
    (work / "figures.json").write_text(json.dumps({k: v for k, v in figures.items() if k != "earlier_rounds"}))
    return figures


def _cached(path: Path, compute):
    """``compute()``, kept in ``path`` so that a stopped stage does not redo it."""
    if path.exists():
        return torch.load(path, weights_only=False)
    value = compute()
    torch.save(value, path.with_suffix(".partial"))
    path.with_suffix(".partial").replace(path)
    return value


def _onpolicy_pairs(build: Build, work: Path, reward_file: Path, round_: int, pairs, base_rows, base_videos):
    """Fine-tunes one LoRA per recipe against ``reward_file`` and turns its generations of ``pairs`` into
    (better video, caption, worse video, caption) pairs; returns them and what each LoRA did to the gold quality."""
    from engine.builtin import build_model, world_model_at
    from engine.lora import load_lora
    from engine.train.command import main as train

    clips = [c for c, _ in pairs]
    found, loras = [], []
    for k, recipe in enumerate(ONPOLICY_RECIPES[:1] if build.smoke else ONPOLICY_RECIPES):
        run, seed = work / f"lora-{k}", build.seed + 100 * round_ + k
        options = {"seed": seed, "reward": f"hpsv2:{reward_file}", **recipe}
        if build.smoke:
            options.update(steps=2, num_held_out=1, sample_steps=2)
        with world_model_at(build.model_dir):
            if not (run / "lora" / "adapter_config.json").exists():
                train(["--model", "world", "--output", str(run), "--overwrite", "--no-tensorboard",
                       *[a for key, value in options.items() for a in (f"--{key.replace('_', '-')}", str(value))]])
            model = build_model("world")
        load_lora(model.denoiser, run / "lora")
        rows, videos = from_noise(model, pairs)
        references, reference_quality = clean_references(model, videos, clips)
        counts = {"worse_than_base": 0, "better_than_base": 0, "below_reference": 0}
        for clip, base_row, base_video, row, video, reference, quality in zip(
                clips, base_rows, base_videos, rows, videos, references, reference_quality):
            if base_row["quality"] - row["quality"] >= ONPOLICY_GAP:
                found.append((base_video, clip.caption, video, clip.caption))
                counts["worse_than_base"] += 1
            elif row["quality"] - base_row["quality"] >= ONPOLICY_GAP:
                found.append((video, clip.caption, base_video, clip.caption))
                counts["better_than_base"] += 1
            if quality - row["quality"] >= QUALITY_GAP:
                found.append((reference, clip.caption, video, clip.caption))
                counts["below_reference"] += 1
        change = sum(r["quality"] - b["quality"] for r, b in zip(rows, base_rows)) / len(rows)
        loras.append({"recipe": recipe, "seed": seed, "from_noise_quality_change_db": change, **counts})
        print(f"onpolicy round {round_}, LoRA {k + 1} ({recipe or 'the preset'}): from noise {change:+.2f} dB; "
              + ", ".join(f"{n.replace('_', ' ')} {c}" for n, c in counts.items()), flush=True)
    return found, loras


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
           "reward": stage_reward, "onpolicy": stage_onpolicy}


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
        extra = {"generations": args.generations} if stage == "reward" else {}
        figures = RUNNERS[stage](build, steps, args.restart, **extra)
        path = write_report(build.reports, stage, {"stage": stage, "seed": args.seed, "steps": steps,
                                                   "smoke": args.smoke, **figures})
        print(f"{stage}: written to {output}; figures in {path}")


if __name__ == "__main__":
    main()
