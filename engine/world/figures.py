"""What the build stages measure on their outputs (engine.world.build writes it to bench/world/<stage>.json):
the gold metrics' ceiling on the training data, the VAE's fidelity on clean clips, the base model's generations
from noise, and the reward's agreement with the gold metrics."""

from __future__ import annotations

import random
from dataclasses import replace

import torch

from engine.chain import generate
from engine.world.gold import centroids, clean_reference, gold_metrics, mean_metrics
from engine.world.rendering import render
from engine.world.scene import FRAMES, SIZE, SPEED, Clip, opposite_motion, perpendicular_motion, random_clip, training_mixture

RANGE_METRICS = ("sharpness", "bg_noise", "jitter")  # the ways a generation's quality can leave the clean range
FIDELITY = ("colour_acc", "shape_acc", "direction_acc")


def ceiling(count: int, seed: int) -> dict[str, dict[str, float]]:
    """The gold metrics read on the training mixture's own clips (degraded ones are wrong by design), on its
    clean clips alone, and on clean in-domain clips: what a perfect model of the data would score."""
    rng = random.Random(seed)
    mixture = [training_mixture(rng) for _ in range(count)]
    clean = [c for c in mixture if c.degradation is None]
    return {"training_mixture": mean_metrics([gold_metrics(render(c), c.clean()) for c in mixture]),
            "clean_clips": mean_metrics([gold_metrics(render(c), c) for c in clean]),
            "clips": {"training_mixture": len(mixture), "clean_clips": len(clean)}}


@torch.no_grad()
def reconstruct(vae, frames: torch.Tensor) -> torch.Tensor:
    """Frames [F, 3, H, W] in [0, 1] through the VAE (posterior mean), back in [0, 1]."""
    return (vae.decode(vae.encode(frames * 2 - 1).latent_dist.mode()).sample * 0.5 + 0.5).clamp(0, 1)


def vae_fidelity(vae, clips: list[Clip]) -> dict[str, float]:
    """Gold metrics of the VAE's reconstructions of clean clips (a model cannot draw what its VAE cannot)."""
    return mean_metrics([gold_metrics(reconstruct(vae, render(c.clean())), c.clean()) for c in clips])


def clean_clips(count: int, seed: int, **kw) -> list[Clip]:
    rng = random.Random(seed)
    return [random_clip(rng, **kw) for _ in range(count)]


@torch.no_grad()
def from_noise(model, pairs: list[tuple[Clip, int]], ddim_steps: int = 20, guidance: float = 3.0,
               batch: int = 32, scorer=None) -> tuple[list[dict[str, float]], list[torch.Tensor]]:
    """Gold metrics of generations from the initial noise of each (clip, seed) for the clip's caption (and, with
    ``scorer``, an ``engine.video_reward.SegmentalReward``, their ``reward`` on its evaluation frames), and the
    videos [F, 3, H, W] in [0, 1]. The same pairs give the same noise for every model: a paired design."""
    rows, videos = [], []
    for i in range(0, len(pairs), batch):
        chunk = pairs[i:i + batch]
        captions = [c.caption for c, _ in chunk]
        latents = generate(model, captions, [s for _, s in chunk], (FRAMES, SIZE, SIZE), ddim_steps=ddim_steps,
                           guidance=guidance)
        rewards = scorer(model, latents, captions, train=False)[0].float().tolist() if scorer else [None] * len(chunk)
        for video, (clip, _), reward in zip(latents, chunk, rewards):
            frames = model.decode_video(video)
            videos.append(frames)
            rows.append(gold_metrics(frames, clip) | ({"reward": reward} if scorer else {}))
    return rows, videos


@torch.no_grad()
def direction_probe(model, clips: list[Clip], timesteps=(850, 750, 650, 550), seed: int = 0,
                    batch: int = 16) -> dict[str, dict[str, float]]:
    """Whether the denoiser reads the caption's motion: at each timestep, the error of its clean-latent
    prediction (x0, from the epsilon it predicts) on the noised clean clips, with each clip's own caption and
    with the motion word swapped for the opposite and for a perpendicular one (the same noise). A model that
    ignores the motion word predicts the same under all three; one that reads only the axis of motion predicts
    worse with the perpendicular word but not with the opposite one (the opposite direction tells the first
    frame from the last: the denoiser must know the order of the frames)."""
    latents = model.encode_video(torch.stack([render(c) for c in clips]) * 2 - 1)
    captions = {"caption": [c.caption for c in clips],
                "opposite_direction": [replace(c, motion=opposite_motion(c.motion)).caption for c in clips],
                "perpendicular_direction": [replace(c, motion=perpendicular_motion(c.motion)).caption for c in clips]}
    contexts = {k: model.encode_prompts(v) for k, v in captions.items()}
    alphas, generator = model.scheduler.alphas_cumprod, torch.Generator().manual_seed(seed)
    figures = {}
    for t in timesteps:
        a = alphas[t].to(latents)
        noisy = a.sqrt() * latents + (1 - a).sqrt() * torch.randn(latents.shape, generator=generator).to(latents)
        errors = {}
        for name, context in contexts.items():
            eps = torch.cat([model.predict(model.denoiser, noisy[i:i + batch], torch.full((len(noisy[i:i + batch]),), t),
                                           context[i:i + batch]) for i in range(0, len(noisy), batch)])
            errors[name] = ((noisy - (1 - a).sqrt() * eps) / a.sqrt() - latents).pow(2).mean().item()
        figures[f"t{t}"] = {"x0_mse": errors, "snr": (a / (1 - a)).item(),
                            **{f"{k}_gap": errors[k] / errors["caption"] - 1 for k in captions if k != "caption"}}
    return figures


def quality_spread(rows: list[dict[str, float]], references: list[dict[str, float]]) -> float:
    """Share of ``rows`` outside the range ``references`` span on any of sharpness, background noise or jitter."""
    bounds = {k: (min(r[k] for r in references), max(r[k] for r in references)) for k in RANGE_METRICS}
    outside = [any(not (bounds[k][0] <= r[k] <= bounds[k][1]) for k in RANGE_METRICS) for r in rows]
    return sum(outside) / len(outside)


def base_model_figures(model, pairs: list[tuple[Clip, int]], ceilings: dict[str, dict[str, float]],
                       ddim_steps: int = 20, guidance: float = 3.0) -> dict:
    """Figure 1 of the base-model issue: caption fidelity from noise (and as a share of the ceiling), how many
    generations move across the frame at all (in any direction: the direction test's distance), and how many fall
    outside the clean renders' range of quality (and outside the range of the VAE's reconstructions of them)."""
    rows, videos = from_noise(model, pairs, ddim_steps, guidance)
    clips = [c for c, _ in pairs]
    net = [centroids(v, c.background)[[0, -1]] for v, c in zip(videos, clips)]
    moves = [(p[1] - p[0]).norm().item() > SPEED * (FRAMES - 1) / 2 for p in net]  # the direction test's distance
    renders = [gold_metrics(render(c), c) for c in clips]
    reconstructions = [gold_metrics(reconstruct(model.vae, render(c)), c) for c in clips]
    means = mean_metrics(rows)
    return {
        "clips": len(rows), "ddim_steps": ddim_steps, "guidance": guidance, "mean": means,
        "share_of_ceiling": {name: {k: means[k] / ceilings[name][k] for k in FIDELITY if ceilings[name][k] > 0}
                             for name in ("training_mixture", "clean_clips")},
        "moves_across_any_direction": sum(moves) / len(moves),
        "outside_clean_render_range": quality_spread(rows, renders),
        "outside_vae_reconstruction_range": quality_spread(rows, reconstructions),
    }


def _video_scores(reward, videos: list[torch.Tensor], captions: list[str]) -> list[float]:
    """The reward of each video: the mean of its per-frame scores (every frame, no SegVR draw)."""
    with torch.no_grad():
        return [reward(v, [caption] * len(v)).mean().item() for v, caption in zip(videos, captions)]


@torch.no_grad()
def clean_references(model, videos: list[torch.Tensor], clips: list[Clip]) -> tuple[list[torch.Tensor], list[float]]:
    """For each generation, the clean render its gold quality compares it against (the caption's object where the
    generation shows it) through the VAE, the best the model could draw there, and that reconstruction's quality."""
    references = [reconstruct(model.vae, clean_reference(v, c)) for v, c in zip(videos, clips)]
    return references, [gold_metrics(r, c)["quality"] for r, c in zip(references, clips)]


QUALITY_GAP = 2.0  # dB: a difference in gold quality the reward is asked to see (figure 5 and its training pairs)


def reward_agreement(model, reward, pairs: list[tuple[Clip, int]], quality_gap: float = QUALITY_GAP) -> dict:
    """Figure 5: on the base model's generations, how often the reward orders two clips as the gold metrics do.
    ``quality``: pairs whose gold quality differs by ``quality_gap`` dB or more (``same_caption``: those of one
    caption, where the caption's own reward level cannot decide); ``reference``: each generation against its
    clean reference through the VAE (``clean_references``) where that is ``quality_gap`` dB better: what
    fine-tuning from noise asks of the reward; ``fidelity``: pairs of one caption, one with colour and shape right
    (in most frames), the other with either wrong."""
    rows, videos = from_noise(model, pairs)
    clips, captions = [c for c, _ in pairs], [c.caption for c, _ in pairs]
    scores = _video_scores(reward, videos, captions)
    quality = [(i, j) for i in range(len(rows)) for j in range(i + 1, len(rows))
               if abs(rows[i]["quality"] - rows[j]["quality"]) >= quality_gap]
    agree = [(scores[i] > scores[j]) == (rows[i]["quality"] > rows[j]["quality"]) for i, j in quality]
    same = [a for a, (i, j) in zip(agree, quality) if captions[i] == captions[j]]
    references, reference_quality = clean_references(model, videos, clips)
    reference_scores = _video_scores(reward, references, captions)
    reference = [reference_scores[i] > scores[i] for i in range(len(rows))
                 if reference_quality[i] - rows[i]["quality"] >= quality_gap]
    right = [r["colour_acc"] > 0.5 and r["shape_acc"] > 0.5 for r in rows]
    fidelity = [scores[i] > scores[j] for i in range(len(rows)) for j in range(len(rows))
                if captions[i] == captions[j] and right[i] and not right[j]]
    return {"clips": len(rows), "quality_gap_db": quality_gap,
            **_share("quality", agree), **_share("same_caption_quality", same), **_share("reference", reference),
            **_share("fidelity", fidelity),  # no pair where the base model draws every colour and shape right
            "gradient_alignment": gradient_alignment(reward, videos, clips), "base_model_mean": mean_metrics(rows)}


def gradient_alignment(reward, videos: list[torch.Tensor], clips: list[Clip]) -> float:
    """Mean cosine, over ``videos``, between the reward's gradient in pixel space and the gold quality's (towards
    the clean reference): what fine-tuning climbs against what it should climb. Near 0 the reward can rise while
    the videos get no better."""
    cosines = []
    for video, clip in zip(videos, clips):
        x = video.float().clamp(0, 1).requires_grad_(True)
        gradient, = torch.autograd.grad(reward(x, [clip.caption] * len(x)).sum(), x)
        towards = clean_reference(video, clip) - video.float()
        cosines.append(torch.nn.functional.cosine_similarity(gradient.flatten(), towards.flatten(), 0).item())
    return sum(cosines) / len(cosines)


def _share(name: str, outcomes: list[bool]) -> dict:
    """``name_pairs`` and ``name_agreement`` (the share of True; None without a pair: 0 would mislead)."""
    return {f"{name}_pairs": len(outcomes), f"{name}_agreement": sum(outcomes) / len(outcomes) if outcomes else None}
