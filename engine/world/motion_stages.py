"""The motion reward's build stages (engine.world.build): ``motion-reward``, the video reward trained on renders
(engine.world.motion_reward), and ``motion-onpolicy``, its refinement one round at a time on what fine-tuning
against it alone produces, each generation ordered against the base model's by the gold metrics; both scale it
to the image reward's spread and measure it."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import torch

from engine.assets import MOTION_REWARD_FILE
from engine.errors import UserError
from engine.world.figures import from_noise
from engine.world.gold import mean_metrics
from engine.world.reward_stages import cached, next_round, onpolicy_models
from engine.world.scene import evaluation_set, world_words


def new_motion_reward():
    """A fresh motion reward over the world's words."""
    from engine.rewards.motion import MotionReward

    return MotionReward(world_words())


def stage_motion_reward(build, steps: int, restart: bool) -> dict:
    """The built-in video reward (engine.world.motion_reward) trained on renders, and how it ranks held-out
    render pairs (motion broken, and shaken less against more) and the base model's generations against the gold
    direction and jitter."""
    from engine.world.motion_reward import train_motion_reward

    build.require("vae", "text_encoder", "tokenizer", "unet")  # before training: it is scaled on their generations
    torch.manual_seed(build.seed + 5)
    reward = new_motion_reward()
    train_motion_reward(reward, steps, build.seed + 5, build.stage_work("motion-reward", restart),
                        {"seed": build.seed, "steps": steps}, reference_steps=build.count(3000))
    if (build.work / "motion-onpolicy").exists():  # its rounds refined the reward this stage has just replaced
        shutil.rmtree(build.work / "motion-onpolicy")
    pairs = motion_validation(build)
    return save_motion_reward(build, reward, pairs, base_validation_generations(build, pairs))


def motion_validation(build) -> list:
    """The base-model generations that scale the motion reward and measure its agreement with the gold metrics:
    ``reward_validation`` captions and seeds."""
    return evaluation_set("reward_validation", 8)[:build.count(288)]


def base_validation_generations(build, pairs: list) -> tuple[list, list]:
    """The base model's generations of ``pairs`` with their image reward (SegVR's evaluation frames)."""
    from engine.models import load_model
    from engine.rewards import build_reward
    from engine.video_reward import SegmentalReward

    return from_noise(load_model(build.model_dir), pairs, scorer=SegmentalReward(build_reward("hpsv2:world")))


def save_motion_reward(build, reward, pairs: list, generations: tuple[list, list]) -> dict:
    """Scales ``reward`` so that it pushes the pixels of the base model's ``generations`` of ``pairs`` as hard as the
    built-in image reward does through SegVR and TAR (median norm of the gradient in pixels; a mix's weight then
    says how hard each pushes), writes it, and measures it on held-out render pairs and on those generations.
    Matching their scores' spread instead (interquartile range) leaves this reward's gradient 8x the image reward's,
    so that a mix at weight 0.5 would be mostly motion."""
    from engine.rewards import build_reward
    from engine.rewards.motion import MotionReward
    from engine.video_reward import SegmentalReward
    from engine.world.motion_reward import (generation_agreement, motion_pairs, pair_accuracy, reference_error,
                                            shake_accuracy, shake_pairs)

    rows, videos = generations
    captions = [c.caption for c, _ in pairs]
    reward.scale = 1.0
    image = SegmentalReward(build_reward("hpsv2:world"))

    def image_score(frames, prompts):  # the image reward as training scores a clip: SegVR's frames, TAR's weights
        b, f = frames.shape[:2]
        chosen = image.frame_indices(b, f, train=False)
        scores = image.reward(frames[torch.arange(b)[:, None], chosen].flatten(0, 1),
                              [p for p in prompts for _ in range(chosen.shape[1])]).view(b, -1)
        return (image.weights(chosen, f) * scores).mean(1)

    reward.scale = (pixel_push(reward, videos, captions) / pixel_push(image_score, videos, captions)).item()
    path = build.output / MOTION_REWARD_FILE.name
    reward.save(path)
    reward = MotionReward.from_file(path)
    validation = [clip for clip, _ in evaluation_set("reward_validation", 2)][:build.count(256)]
    held_out = motion_pairs(random.Random(build.seed + 50), len(validation), validation)
    shaken = shake_pairs(random.Random(build.seed + 51), len(validation), validation)
    return {"scale": reward.scale, "reference_energy_largest_error": reference_error(reward),
            "render_pairs": pair_accuracy(reward, held_out), "shake_pairs": shake_accuracy(reward, shaken),
            "base_model_generations": generation_agreement(reward, rows, videos, captions)}


def pixel_push(score, videos: list, captions: list[str], batch: int = 64) -> torch.Tensor:
    """How hard ``score`` (clips [B, F, 3, H, W], prompts -> [B]) pushes the pixels of ``videos``: the median over
    them of the norm of its gradient in their pixels."""
    norms = []
    for i in range(0, len(videos), batch):
        frames = torch.stack(videos[i:i + batch]).float().requires_grad_()
        score(frames, captions[i:i + batch]).sum().backward()
        norms.append(frames.grad.flatten(1).norm(dim=1))
    return torch.cat(norms).median()


# The recipes whose fine-tunes against the motion reward alone teach it each round: the method study's base recipe
# (where the reward alone lost 11 points of direction and 3.6 dB) and the default job's then; spelled out in full, so
# that later presets leave the build as it was.
MOTION_ONPOLICY_RECIPES = ({"tau": 0.6, "steps": 40, "grad_steps": 6}, {"tau": 1.0, "steps": 37, "grad_steps": 1})


def stage_motion_onpolicy(build, steps: int, restart: bool) -> dict:
    """One round of the motion reward's on-policy refinement. LoRAs fine-tuned against the current motion reward
    alone (``MOTION_ONPOLICY_RECIPES``) generate from noise; each generation and the base model's of the same noise
    are ordered by the gold metrics alone (``generation_pairs``: direction, then quality, then jitter); a fresh
    motion reward is trained on the renders plus every round's pairs from ``reward_train`` captions and seeds. The
    pairs from
    ``reward_validation`` captions and seeds, which it never trains on, measure how the reward before and after
    the round orders what fine-tuning against the first produced. Each run is one more round
    (``build/world/motion-onpolicy/round-N``); the motion-reward stage starts the rounds over."""
    from engine.models import load_model
    from engine.rewards.motion import MotionReward
    from engine.world.motion_reward import generation_accuracy, train_motion_reward

    root = build.work / "motion-onpolicy"
    done, work = next_round(root, restart)
    round_ = len(done) + 1
    reward_file = build.output / MOTION_REWARD_FILE.name
    if not reward_file.exists():
        raise UserError(f"{reward_file} is missing; run the motion-reward stage first (same --output)")
    training = evaluation_set("reward_train", 8)[:build.count(288)][::2]
    validation = motion_validation(build)
    base_model = load_model(build.model_dir)
    base_training = cached(root / "base_training.pt", lambda: from_noise(base_model, training))
    base_validation = cached(root / "base_validation.pt", lambda: base_validation_generations(build, validation))
    found, held_out, loras = cached(work / "pairs.pt", lambda: _motion_onpolicy_pairs(
        build, work, reward_file, round_, {"training": (training, base_training),
                                           "held_out": (validation[::2], [g[::2] for g in base_validation])}))
    earlier = [p for f in done for p in torch.load(f.parent / "pairs.pt", weights_only=False)[0]]
    before = generation_accuracy(MotionReward.from_file(reward_file), held_out)
    torch.manual_seed(build.seed + 5)
    reward = new_motion_reward()
    train_motion_reward(reward, steps, build.seed + 5, work / "reward", {"seed": build.seed, "steps": steps, "round": round_},
                        generations=earlier + found, reference_steps=build.count(3000))
    figures = save_motion_reward(build, reward, validation, base_validation)
    figures = {"round": round_, "loras": loras, "new_pairs": len(found), "onpolicy_pairs": len(earlier) + len(found),
               "held_out_fine_tuned_generations": {"before": before, "after": generation_accuracy(
                   MotionReward.from_file(reward_file), held_out)}, **figures}
    (work / "figures.json").write_text(json.dumps(figures))
    return figures | {"earlier_rounds": [json.loads(f.read_text()) for f in done]}


def _motion_onpolicy_pairs(build, work: Path, reward_file: Path, round_: int, sets: dict) -> tuple[list, list, list]:
    """Per LoRA fine-tuned against the motion reward in ``reward_file``: its generations of each set's (clip,
    seed) pairs ordered against the base model's (``generation_pairs``); returns the training set's pairs, the
    held-out set's, and what each LoRA did to the gold direction, jitter and quality from noise."""
    from engine.world.motion_reward import generation_pairs

    found = {name: [] for name in sets}
    loras = []
    for recipe, seed, model in onpolicy_models(build, work, f"motion:{reward_file}", MOTION_ONPOLICY_RECIPES, round_):
        figures = {"recipe": recipe, "seed": seed}
        for name, (pairs, (base_rows, base_videos)) in sets.items():
            rows, videos = from_noise(model, pairs)
            new = generation_pairs(base_rows, base_videos, rows, videos, [c.caption for c, _ in pairs])
            found[name] += new
            figures[name] = {"pairs": len(new), **{f"{metric}_change": mean_metrics(rows)[metric] - mean_metrics(base_rows)[metric]
                                                   for metric in ("direction_acc", "jitter", "quality")}}
        loras.append(figures)
        print(f"motion onpolicy round {round_}, LoRA {len(loras)} ({recipe}): {figures}", flush=True)
    return found["training"], found["held_out"], loras
