"""The reward registry: names to builders (the built-in rewards and any added with ``register_reward``), and
``build_reward``, which parses a command line's ``NAME[:PATH][@WEIGHT],...`` spec into one reward."""

from __future__ import annotations

from typing import Callable

from engine.errors import UserError
from engine.rewards.aesthetic import AestheticReward
from engine.rewards.base import ColorfulnessReward, Reward, WeightedSum
from engine.rewards.hpsv2 import HPSv2Reward
from engine.rewards.motion import MotionReward
from engine.rewards.pickscore import PickScoreReward


def _videoalign(path: str) -> Reward:
    from engine.rewards.videoalign import VideoAlignReward  # transformers' Qwen2-VL: imported when asked for

    return VideoAlignReward.from_spec(path)


# name -> (builder taking an optional path, needs a path)
REWARDS: dict[str, tuple[Callable[[str | None], Reward], bool]] = {
    "colorfulness": (lambda path: ColorfulnessReward(), False),
    "hpsv2": (lambda path: HPSv2Reward.from_spec(path), True),
    "pickscore": (lambda path: PickScoreReward.from_spec(path), True),
    "aesthetic": (lambda path: AestheticReward.from_spec(path), True),
    "motion": (lambda path: MotionReward.from_spec(path), True),  # video-level; motion:world is the built-in
    "videoalign": (_videoalign, True),  # video-level; videoalign:PATH[:vq|mq|ta|overall]
}


def register_reward(name: str, builder: Callable[[str | None], Reward], needs_path: bool = True) -> None:
    """Plug in another image reward under ``name`` for ``--reward name:PATH``."""
    REWARDS[name] = (builder, needs_path)


def build_reward(spec: str) -> Reward:
    """Parse ``NAME[:PATH][@WEIGHT],...`` into one reward (a WeightedSum when several or weighted)."""
    parts: list[tuple[Reward, float]] = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        item, _, weight_text = item.partition("@")
        name, _, path = item.partition(":")
        if name not in REWARDS:
            raise UserError(f"unknown reward {name!r}; choose from {', '.join(sorted(REWARDS))} (NAME[:PATH][@WEIGHT])")
        builder, needs_path = REWARDS[name]
        if needs_path and not path:
            raise UserError(f"reward {name!r} needs a weights file: --reward {name}:PATH")
        try:
            weight = float(weight_text) if weight_text else 1.0
        except ValueError:
            raise UserError(f"reward weight {weight_text!r} in {spec!r} is not a number; use NAME[:PATH]@0.5") from None
        parts.append((builder(path or None), weight))
    if not parts:
        raise UserError("--reward is empty; name at least one reward, e.g. --reward hpsv2:PATH")
    if len(parts) == 1 and parts[0][1] == 1.0:
        return parts[0][0]
    return WeightedSum(parts)


def reward_label(spec: str) -> str:
    """A spec's rewards by name with their weights, for a plot's title: ``hpsv2:A,motion:B@0.5`` -> ``hpsv2 + 0.5
    motion``."""
    terms = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        item, _, weight = item.partition("@")
        name = item.partition(":")[0]
        terms.append(f"{float(weight):g} {name}" if weight and float(weight) != 1.0 else name)
    return " + ".join(terms)


def reward_architecture(spec: str) -> Reward:
    """The reward a spec names, on the meta device, for counting what a run costs (``--dry-run``): HPSv2's
    architecture without reading its checkpoint (ViT-H-14, the spec's ``;ARCH``, or the built-in reward's for
    ``world``); any other reward is loaded as usual and moved there, but for its 0-dim flags and counts (videoalign
    cannot be: a one-line error says so)."""
    from engine.assets import REWARD_ARCH
    from engine.rewards.clip import split_paths

    def hpsv2(path: str) -> Reward:
        parts = split_paths(path, "hpsv2", "hpsv2:PATH or hpsv2:PATH;ARCH")
        arch = parts[1] if len(parts) > 1 else REWARD_ARCH if parts[0] == "world" else "ViT-H-14"
        print(f"reward hpsv2: open_clip {arch}, its weights not read (--dry-run)")
        return HPSv2Reward(None, arch, device="meta")

    def videoalign(path: str) -> Reward:
        raise UserError("--dry-run cannot count the videoalign reward: Qwen2-VL reads its token positions and video "
                        "grid from tensor values, which the meta device does not hold; its cost at 2B (and that of "
                        "decoding its frames with gradient) is in bench/RESULTS.md; leave it out of --reward to "
                        "forecast the rest")

    registered = dict(REWARDS)
    REWARDS["hpsv2"], REWARDS["videoalign"] = (hpsv2, True), (videoalign, True)
    try:
        reward = build_reward(spec)
    finally:
        REWARDS.clear()
        REWARDS.update(registered)
    # a 0-dim bool or integer buffer is a flag or a count the forward may branch on (the motion reward's fitted
    # cap): it keeps its value on the CPU, as a Python bool or int would; float scalars, which enter arithmetic with
    # the frames, go to the meta device with the weights
    flags = [(module, name, buffer) for module in reward.modules() for name, buffer in module._buffers.items()
             if buffer is not None and buffer.dim() == 0 and not buffer.is_floating_point()]
    reward = reward.to("meta")
    for module, name, buffer in flags:
        module._buffers[name] = buffer
    return reward
