"""The run's held-out evaluation: the held-out sources edited from fixed noise and scored by the reward (SegVR
evaluation frames) and, for the world model's clips, by the gold metrics; and the "before" / "after" videos
generated from fixed noise for the samples."""

from __future__ import annotations

import torch

from engine.chain import EditChain
from engine.data import Source
from engine.distributed import randn
from engine.models import VideoDiffusion
from engine.train.sources import SourceLatents
from engine.video_reward import SegmentalReward
from engine.world import gold_scores, mean_metrics


class HeldOut:
    """Held-out videos in groups of ``batch_size``; video i's noise comes from its own generator, so no number
    depends on how the videos are grouped (with eta > 0 the per-step noise still follows the group's first)."""

    def __init__(self, model: VideoDiffusion, chain: EditChain, reward: SegmentalReward, sources: list[Source],
                 latents: SourceLatents, seed: int, batch_size: int, sample_steps: int, autocast):
        self.model, self.chain, self.reward, self.sources, self.latents = model, chain, reward, sources, latents
        self.seed, self.batch_size, self.sample_steps, self.autocast = seed, batch_size, sample_steps, autocast
        self.evaluations: list[list[dict[str, float]]] = []  # each evaluate()'s per-clip rows, in order

    def batches(self) -> list[list[int]]:
        """Indices of the held-out sources in groups of --eval-batch-size."""
        count, size = len(self.sources), self.batch_size
        return [list(range(start, min(start + size, count))) for start in range(0, count, size)]

    def noise(self, indices, shape, seed_of, draw=randn) -> tuple[torch.Tensor, torch.Generator]:
        """Noise [len(indices), *shape] with video i's drawn from its own generator seeded ``seed_of(i)``; and the
        first generator, for the per-step noise of eta > 0."""
        device = self.latents.device
        generators = [torch.Generator(device).manual_seed(seed_of(i)) for i in indices]
        return torch.cat([draw((1, *shape), g, device) for g in generators]), generators[0]

    def uncond(self, count: int) -> torch.Tensor:
        return self.latents.uncond.expand(count, -1, -1)

    @torch.no_grad()
    def edit_rows(self) -> tuple[list[dict[str, float]], list[torch.Tensor]]:
        """Per held-out source, the reward of its edit (SegVR evaluation frames: the first of each segment) and,
        for the world model's clips, the gold metrics of the edit (read from pixels, motion against the source's
        path); and the edited latents, on the CPU, for the edits grid."""
        rows, edits = [], []
        for indices in self.batches():
            latents, prompts, context = self.latents.batch(self.sources, indices)
            noise, generator = self.noise(indices, latents.shape[1:], lambda i: self.seed + 7 + 1009 * i,
                                          self.chain.draw_noise)
            with self.autocast():
                edited = self.chain.edit(latents, context, self.uncond(len(prompts)), generator, noise)
                rewards, _ = self.reward(self.model, edited, prompts, train=False)
            edits += list(edited.float().cpu())
            clips = [self.sources[i].clip for i in indices]
            gold = (gold_scores([self.model.decode_video(edit) for edit in edited], clips, against_source=True)
                    if all(clips) else [{} for _ in indices])
            rows += [{"reward": reward} | metrics for reward, metrics in zip(rewards.float().tolist(), gold)]
        return rows, edits

    def evaluate(self) -> tuple[dict[str, float], list[torch.Tensor]]:
        """The mean held-out reward (``eval_reward``) and gold metrics (``gold_*``) of ``edit_rows``, and the edits."""
        rows, edits = self.edit_rows()
        self.evaluations.append(rows)
        result = {"eval_reward": torch.tensor([r["reward"] for r in rows]).mean().item()}
        gold = [{k: v for k, v in r.items() if k != "reward"} for r in rows]
        return result | ({f"gold_{k}": v for k, v in mean_metrics(gold).items()} if gold[0] else {}), edits

    @torch.no_grad()
    def score_samples(self, latents: list[torch.Tensor]) -> dict[str, float]:
        """The reward (SegVR evaluation frames) and, for the world model's captions, the gold metrics of videos
        generated from noise for the held-out prompts (``sample_latents``): ``noise_reward``, ``noise_gold_*``."""
        values, gold = [], []
        for indices in self.batches():
            x = torch.cat([latents[i] for i in indices]).to(self.latents.device)
            with self.autocast():
                rewards, _ = self.reward(self.model, x, [self.sources[i].prompt for i in indices], train=False)
            values.append(rewards.float())
            clips = [self.sources[i].clip for i in indices]
            if all(clips):
                gold += gold_scores([self.model.decode_video(v) for v in x], clips)
        result = {"noise_reward": torch.cat(values).mean().item()}
        return result | ({f"noise_gold_{k}": v for k, v in mean_metrics(gold).items()} if gold else {})

    def sample_latents(self) -> list[torch.Tensor]:
        """One video latent per held-out prompt, each from its own fixed noise (so before and after compare)."""
        latents = []
        for indices in self.batches():
            noise, generator = self.noise(indices, self.latents.latent_shape, lambda i: self.seed + 11 + i)
            context = self.model.encode_prompts([self.sources[i].prompt for i in indices])
            with self.autocast():
                x = self.chain.sample(noise.shape, context, self.uncond(len(indices)), generator,
                                      ddim_steps=self.sample_steps, noise=noise)
            latents += list(x.split(1))
        return latents
