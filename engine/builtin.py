"""The built-in presets, ``--model world`` and ``--model tiny``: the one place that knows them.

Every command asks here what a built-in name means: how to build its model, its default reward, its clip size,
its training options (``engine/presets/NAME.yaml``: between the config's defaults and a YAML file), its fine-tuning sources, its
evaluation prompt sets and, for the world, the clips behind its captions, from which the gold metrics are read.

- ``world``: the project's own text-to-video model and preference reward, trained on the procedural world
  (``engine.world``; shipped in ``engine/assets``, made by ``python -m engine.world.build``);
- ``tiny``: ModelScope's classes at a tiny random size with the weight-free colourfulness reward, which
  exercises the machinery in seconds (its videos are noise).
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
import yaml

from engine import assets, world
from engine.data import Source
from engine.errors import UserError
from engine.models import VideoDiffusion, load_model, tiny_model
from engine.rewards import register_reward
from engine.world.gold_reward import GoldQualityReward

PRESETS = Path(__file__).parent / "presets"


class Builtin:
    """What a built-in name stands for; the subclasses below fill it in."""

    name: str
    reward: str  # the reward spec a run scores with when it names none; it trains with it unless its preset names another
    size = (8, 32, 32)  # frames, height, width of its clips

    @property
    def train_options(self) -> dict[str, Any]:
        """Its training preset (between engine.config's defaults and a YAML file): its scoring reward unless
        ``engine/presets/NAME.yaml`` names another, and that file's options; data, not code, so that changing the
        default job changes the configuration a study record is keyed by and none of the code it ran."""
        return {"reward": self.reward, **yaml.safe_load((PRESETS / f"{self.name}.yaml").read_text())}

    def build(self, seed: int, device: str | torch.device) -> VideoDiffusion:
        raise NotImplementedError

    def sources(self, held_out: int, seed: int, num_frames: int, height: int, width: int) -> list[Source]:
        """Its fine-tuning sources, the last ``held_out`` of them for evaluation."""
        raise NotImplementedError

    def prompt_sets(self) -> dict[str, list[str]]:
        """Table 1's three kinds of prompts (in-domain, new categories, unrelated) for ``engine.evaluate``."""
        raise NotImplementedError

    def clips(self) -> dict[str, world.Clip]:
        """Caption -> the world clip it describes, for the gold metrics of ``engine.evaluate``'s videos."""
        return {}

    def base_name(self) -> str:
        """How an export names its base model (the folder ``from_pretrained`` reads)."""
        return self.name


class WorldPreset(Builtin):
    name = "world"
    reward = "hpsv2:world"
    size = (world.FRAMES, world.SIZE, world.SIZE)
    prompts_per_set = 12
    model_dir = assets.MODEL_DIR  # the shipped pipeline; the asset build points it at the one it is building

    def build(self, seed, device):
        model = load_model(self.model_dir, device)
        model.name = "world"
        return model

    def sources(self, held_out, seed, num_frames, height, width, train_count: int = 256):
        """In-domain clips of mixed quality, the last ``held_out`` of them with captions no training source has
        (prompts never fine-tuned on)."""
        if (num_frames, height, width) != self.size:
            raise UserError(f"the world model's clips are {world.FRAMES} frames of {world.SIZE}x{world.SIZE}; drop "
                            "--num-frames/--height/--width or pass --videos/--prompts")
        train, evaluation = world.finetune_split(train_count, held_out, seed)
        return [Source(c.caption, lambda c=c: world.render(c) * 2 - 1, c) for c in train + evaluation]

    def clip_sets(self) -> dict[str, list[world.Clip]]:
        """The world's Table-1 splits, fixed (seeded by the split's position)."""
        return {name: world.prompt_set(name, self.prompts_per_set, seed=100 + i)
                for i, name in enumerate(world.PROMPT_SETS)}

    def prompt_sets(self):
        return {name: [c.caption for c in clips] for name, clips in self.clip_sets().items()}

    def clips(self):
        return {c.caption: c for group in self.clip_sets().values() for c in group}

    def base_name(self):
        return str(Path(self.model_dir).resolve())


class TinyPreset(Builtin):
    name = "tiny"
    reward = "colorfulness"
    prompts = [
        "a red ball bouncing on a lawn", "a blue car driving along a coast road", "a yellow bird flying over a lake",
        "an orange fish swimming in a reef", "a green frog jumping on lily pads", "a purple kite in a windy sky",
        "a pink flamingo wading at sunset", "a white horse running on a beach",
        # held out
        "a golden retriever playing in autumn leaves", "a hot air balloon above red canyons",
    ]
    evaluation_prompts = {  # Table 1's three kinds, at tiny size
        "in_domain": ["a red ball bouncing on a lawn", "a yellow bird flying over a lake",
                      "a white horse running on a beach"],
        "new_categories": ["a grey elephant walking in the savanna", "a small turtle crawling on the sand"],
        "unrelated": ["a city skyline at night with traffic", "a cup of coffee steaming on a wooden table"],
    }

    def build(self, seed, device):
        return tiny_model(seed, device)

    def sources(self, held_out, seed, num_frames, height, width):
        return [Source(p, lambda i=i: synthetic_video(i, num_frames, height, width)) for i, p in enumerate(self.prompts)]

    def prompt_sets(self):
        return {name: list(prompts) for name, prompts in self.evaluation_prompts.items()}


def synthetic_video(index: int, num_frames: int, height: int, width: int) -> torch.Tensor:
    """A muted clip for the tiny preset: a soft square drifting over a grey gradient, in [-1, 1]."""
    g = torch.Generator().manual_seed(1000 + index)
    ys = torch.linspace(0, 1, height).view(height, 1)
    xs = torch.linspace(0, 1, width).view(1, width)
    tint = 0.1 * (torch.rand(3, generator=g) - 0.5)
    colour = 0.5 + 0.2 * (torch.rand(3, generator=g) - 0.5)
    start, velocity = torch.rand(2, generator=g), (torch.rand(2, generator=g) - 0.5) * 0.4
    frames = []
    for f in range(num_frames):
        cy, cx = (start + velocity * f / max(1, num_frames - 1)).clamp(0.2, 0.8)
        blob = torch.exp(-(((ys - cy) ** 2 + (xs - cx) ** 2) / 0.02))
        background = 0.35 + 0.3 * ys + tint.view(3, 1, 1)
        frames.append(background * (1 - blob) + colour.view(3, 1, 1) * blob)
    return torch.stack(frames).clamp(0, 1) * 2 - 1


BUILTINS: dict[str, Builtin] = {"world": WorldPreset(), "tiny": TinyPreset()}
# the world's gold quality as a reward, for studying how far a learned reward is from it (README, default job)
register_reward("gold", lambda path: GoldQualityReward(), needs_path=False)


@contextmanager
def world_model_at(folder: Path) -> Iterator[None]:
    """``--model world`` loads the pipeline in ``folder`` meanwhile: the asset build fine-tunes the model it is
    building with the engine's own trainer."""
    preset = BUILTINS["world"]
    previous, preset.model_dir = preset.model_dir, Path(folder)
    try:
        yield
    finally:
        preset.model_dir = previous


def builtin(spec: str | None) -> Builtin | None:
    """The preset a ``--model`` value names, or None for a model folder."""
    return BUILTINS.get(spec) if spec is not None else None


def build_model(spec: str, seed: int = 0, device: str | torch.device = "cpu") -> VideoDiffusion:
    """'world': the built-in model trained on engine.world (shipped in engine/assets); 'tiny': random weights;
    anything else: a diffusers folder."""
    preset = builtin(spec)
    return preset.build(seed, device) if preset else load_model(spec, device)
