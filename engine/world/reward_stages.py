"""The reward's build stages (engine.world.build): ``reward``, a fresh preference reward trained on the world's
preference groups and the base model's ranked generations, and ``onpolicy``, its refinement one round at a time on
what fine-tuning against it produces, each generation labelled by the gold metrics."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from engine.assets import REWARD_ARCH, REWARD_FILE
from engine.errors import UserError
from engine.rewards.clip import register_open_clip_configs
from engine.world.figures import QUALITY_GAP, clean_references, from_noise, reward_agreement
from engine.world.gold import clean_reference
from engine.world.scene import caption_clips, evaluation_set
from engine.world.training import train_reward

# How much the reward's pixel gradient is asked to point where the gold quality improves (``train_reward``'s
# ``slopes``). Chosen on the reward_validation set (cosine of the gradients there; the default job from noise on
# its 72 clips, paired, one seed): weight 0 (two onpolicy rounds) 0.017 and -1.43 dB; 1: 0.046 and -1.02 dB;
# 10: 0.204 and +0.11 dB; 30: 0.227 and +0.36 dB.
SLOPE_WEIGHT = 30.0


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


def stage_reward(build, steps: int, restart: bool, generations: int = 288, slope_weight: float = SLOPE_WEIGHT) -> dict:
    from engine.models import load_model

    model = load_model(build.model_dir)
    ranked, references = (ranked_generations(model, evaluation_set("reward_train", 8)[:build.count(generations)])
                          if generations else ([], []))
    figures = _train_and_save_reward(build, model, steps, build.stage_work("reward", restart),
                                     {"seed": build.seed, "steps": steps}, ranked, references, slope_weight)
    if (build.work / "onpolicy").exists():  # its rounds refined the reward this stage has just replaced
        shutil.rmtree(build.work / "onpolicy")
    return {"ranked_generation_pairs": len(ranked), "reference_pairs": len(references), "slope_weight": slope_weight,
            **figures}


def _train_and_save_reward(build, model, steps: int, work: Path, config: dict, ranked: list,
                           references: list, slope_weight: float) -> dict:
    """A fresh reward trained on the world's preference groups and the given pairs of generations, written to
    ``world-hps.pt`` in the HPS_v2 checkpoint format, and its agreement with the gold metrics (figure 5)."""
    import open_clip

    from engine.rewards import HPSv2Reward

    register_open_clip_configs()
    torch.manual_seed(build.seed + 3)
    reward = open_clip.create_model(REWARD_ARCH, pretrained=None)
    train_reward(reward, open_clip.get_tokenizer(REWARD_ARCH), model.vae, steps, build.seed + 3, work, config,
                 ranked=ranked, references=references, slopes=slopes(ranked + references) if slope_weight else None,
                 slope_weight=slope_weight)
    state = {k: v.half() if v.is_floating_point() else v for k, v in reward.state_dict().items()}
    path = build.output / REWARD_FILE.name
    torch.save({"state_dict": state, "architecture": REWARD_ARCH}, str(path))
    pairs = evaluation_set("reward_validation", 8)[:build.count(288)]
    return {"reward_validation": reward_agreement(model, HPSv2Reward(path), pairs)}


def slopes(pairs) -> list[tuple[torch.Tensor, str, torch.Tensor]]:
    """Every generated video of ``pairs`` once, with the direction in which its gold quality improves (towards its
    clean reference): what the reward's gradient in pixels learns to follow. Clean references themselves (within
    40 dB of their own reference) have none."""
    clips, seen, found = caption_clips(), set(), []
    for better, better_caption, worse, worse_caption in pairs:
        for video, caption in ((better, better_caption), (worse, worse_caption)):
            if id(video) in seen:
                continue
            seen.add(id(video))
            direction = clean_reference(video, clips[caption]) - video.float()
            if direction.pow(2).mean() > 1e-4:
                found.append((video, caption, direction))
    return found


# The fine-tuning recipes whose generations teach the reward each round (the world preset with these options):
# editing (tau 0.6, 40 steps, the preset when the shipped reward was made), the whole chain from noise
# (DRaFT-style), and both three times longer, where a reward is hacked first; gradient through the last 6 steps,
# as the preset had then. Spelled out in full, so that the preset's later recipes (tau 1.0 with 29 steps, then with
# K 1 and 37 steps, then with the motion reward mixed in) leave the build as it was.
ONPOLICY_RECIPES = tuple({"tau": tau, "steps": steps, "grad_steps": 6} for tau, steps in
                         ((0.6, 40), (1.0, 40), (0.6, 120), (1.0, 120)))
ONPOLICY_GAP = 1.0  # dB between a fine-tuned generation and the base model's of the same noise to make a pair


def stage_onpolicy(build, steps: int, restart: bool, slope_weight: float = SLOPE_WEIGHT) -> dict:
    """One round of the reward's on-policy refinement: LoRAs fine-tuned against the current reward (the engine's
    own trainer, ``ONPOLICY_RECIPES``) generate from noise on reward-training captions and seeds; each generation
    is ranked against the base model's of the same noise where their gold quality differs by ``ONPOLICY_GAP`` dB,
    and below its clean reference; then the reward is trained afresh on the reward stage's data plus every round's
    pairs. What fine-tuning learns to exploit in one round is what the next reward learns to score down. Each run
    is one more round (``build/world/onpolicy/round-N``); the reward stage starts the rounds over."""
    from engine.models import load_model

    root = build.work / "onpolicy"
    done, work = next_round(root, restart)
    reward_file = build.output / REWARD_FILE.name
    if not reward_file.exists():
        raise UserError(f"{reward_file} is missing; run the reward stage first (same --output)")
    base_model = load_model(build.model_dir)
    base_data = cached(root / "base.pt", lambda: ranked_generations(
        base_model, evaluation_set("reward_train", 8)[:build.count(288)]))
    pairs = evaluation_set("reward_train", 8)[:build.count(288)][::2]
    base_rows, base_videos = cached(root / "base_generations.pt", lambda: from_noise(base_model, pairs))
    round_pairs, loras = cached(work / "pairs.pt", lambda: _onpolicy_pairs(
        build, work, reward_file, len(done) + 1, pairs, base_rows, base_videos))
    earlier = [p for f in done for p in torch.load(f.parent / "pairs.pt", weights_only=False)[0]]
    ranked, references = base_data
    figures = _train_and_save_reward(build, base_model, steps, work / "reward",
                                     {"seed": build.seed, "steps": steps, "round": len(done) + 1},
                                     ranked, references + earlier + round_pairs, slope_weight)
    figures = {"round": len(done) + 1, "slope_weight": slope_weight, "loras": loras, "new_pairs": len(round_pairs),
               "onpolicy_pairs": len(earlier) + len(round_pairs), **figures,
               "earlier_rounds": [json.loads(f.read_text()) for f in done]}
    (work / "figures.json").write_text(json.dumps({k: v for k, v in figures.items() if k != "earlier_rounds"}))
    return figures


def next_round(root: Path, restart: bool) -> tuple[list[Path], Path]:
    """The rounds finished under ``root`` (their ``figures.json``, in order) and the folder of the next one
    (``round-N``, emptied first with ``restart``; a stopped round continues there)."""
    done = sorted(root.glob("round-*/figures.json"), key=lambda p: int(p.parent.name.split("-")[1]))
    work = root / f"round-{len(done) + 1}"
    if restart and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    return done, work


def cached(path: Path, compute):
    """``compute()``, kept in ``path`` so that a stopped stage does not redo it."""
    if path.exists():
        return torch.load(path, weights_only=False)
    value = compute()
    torch.save(value, path.with_suffix(".partial"))
    path.with_suffix(".partial").replace(path)
    return value


def onpolicy_models(build, work: Path, reward: str, recipes, round_: int):
    """Per recipe (world preset options), a LoRA fine-tuned against ``reward`` (an ``--reward`` value) from the
    model being built, with the engine's own trainer, in ``work/lora-K`` (a finished one is reused); yields
    (recipe, seed, the model with that LoRA loaded)."""
    from engine.builtin import build_model, world_model_at
    from engine.lora import load_lora
    from engine.train.command import main as train

    for k, recipe in enumerate(recipes[:1] if build.smoke else recipes):
        run, seed = work / f"lora-{k}", build.seed + 100 * round_ + k
        options = {"seed": seed, "reward": reward, **recipe}
        if build.smoke:
            options.update(steps=2, num_held_out=1, sample_steps=2)
        with world_model_at(build.model_dir):
            if not (run / "lora" / "adapter_config.json").exists():
                train(["--model", "world", "--output", str(run), "--overwrite", "--no-tensorboard",
                       *[a for key, value in options.items() for a in (f"--{key.replace('_', '-')}", str(value))]])
            model = build_model("world")
        load_lora(model.denoiser, run / "lora")
        yield recipe, seed, model


def _onpolicy_pairs(build, work: Path, reward_file: Path, round_: int, pairs, base_rows, base_videos):
    """Fine-tunes one LoRA per recipe against ``reward_file`` and turns its generations of ``pairs`` into
    (better video, caption, worse video, caption) pairs; returns them and what each LoRA did to the gold quality."""
    clips = [c for c, _ in pairs]
    found, loras = [], []
    for k, (recipe, seed, model) in enumerate(onpolicy_models(build, work, f"hpsv2:{reward_file}", ONPOLICY_RECIPES, round_)):
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
        print(f"onpolicy round {round_}, LoRA {k + 1} ({recipe}): from noise {change:+.2f} dB; "
              + ", ".join(f"{n.replace('_', ' ')} {c}" for n, c in counts.items()), flush=True)
    return found, loras
