"""A procedural video world: captioned clips rendered from known parameters (``scene``, ``rendering``) and
gold metrics read back from pixels with the same renderer (``gold``), so what a generated clip shows can be
measured without any reward model. ``python -m engine.world.build`` trains the built-in model and reward on it
(its stages: ``training``).

The package re-exports the pure modules' names (``world.render``, ``world.gold_scores``, ``world.FRAMES``...);
it does not import the build command or its stages (those import engine.rewards).
"""

from engine.world.gold import (GOLD_METRICS, centre_of_mass_offset, centroids, centroids_of, clean_reference, gold_metrics,
                               gold_scores, intended_path, mean_metrics, object_weights)
from engine.world.rendering import compose, gaussian_blur, render, shape_mask
from engine.world.scene import (BACKGROUNDS, CAPTION_GROUPS, COLOURS, DEGRADATIONS, FINETUNE_COLOURS, FINETUNE_SHAPES, FRAMES,
                                MOTIONS, PROMPT_SETS, RADIUS, SHAPES, SIZE, SPEED, SUPERSAMPLE, TEMPLATE_B_MOTION,
                                Clip, caption_group, evaluation_set, finetune_split, prompt_set, random_clip,
                                shape_word, training_mixture)

__all__ = [
    "BACKGROUNDS", "CAPTION_GROUPS", "COLOURS", "DEGRADATIONS", "FINETUNE_COLOURS", "FINETUNE_SHAPES", "FRAMES", "GOLD_METRICS",
    "MOTIONS", "PROMPT_SETS", "RADIUS", "SHAPES", "SIZE", "SPEED", "SUPERSAMPLE", "TEMPLATE_B_MOTION", "Clip",
    "caption_group", "centre_of_mass_offset", "centroids", "centroids_of", "clean_reference", "compose", "evaluation_set", "finetune_split", "gaussian_blur",
    "gold_metrics", "gold_scores", "intended_path", "mean_metrics", "object_weights", "prompt_set", "random_clip",
    "render", "shape_mask", "shape_word", "training_mixture",
]
