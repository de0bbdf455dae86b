"""Scoring a video with an image reward: SegVR frame sampling and TAR weights; and with video-level rewards.

SegVR splits F frames into S segments and scores one frame per segment (random in training, the first of
each segment in evaluation). TAR weighs frame g(i) by f_i = exp(-lambda |g(i) - F//2|). The video reward is
R = (1/S) sum_i f_i r_i and the loss is mean over the batch of (1 - R). A video-level reward (``ClipReward``)
in the mix scores the frames it declares as one clip, R = w_image R_image + sum_j w_j r_j(clip). Only the chosen
frames are decoded, in one call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.distributed import rand
from engine.models import VideoDiffusion
from engine.rewards import ClipReward, Reward, WeightedSum


def segment_bounds(num_frames: int, segments: int) -> torch.Tensor:
    """Start of each segment and the end: segment i holds frames [b_i, b_{i+1})."""
    return torch.div(torch.arange(segments + 1) * num_frames, segments, rounding_mode="floor")


def segment_frame_indices(batch: int, num_frames: int, segments: int, train: bool = True,
                          generator: torch.Generator | None = None) -> torch.Tensor:
    """g(i) per video, shape [batch, S]: uniform within each segment in training, segment starts in evaluation."""
    bounds = segment_bounds(num_frames, segments)
    starts, lengths = bounds[:-1], bounds[1:] - bounds[:-1]
    if not train:
        return starts.expand(batch, segments).clone()
    u = rand((batch, segments), generator)
    return starts + (u * lengths).long().clamp(max=lengths - 1)


def tar_weights(indices: torch.Tensor, num_frames: int, tar_lambda: float) -> torch.Tensor:
    """f_i = exp(-lambda |g(i) - F//2|)."""
    return torch.exp(-tar_lambda * (indices - num_frames // 2).abs().float())


def split_reward(reward: Reward) -> tuple[Reward | None, list[tuple[ClipReward, float]]]:
    """(the image part, the video-level parts with their weights) of a reward or a weighted mix; an image-only
    reward is its own image part."""
    parts = list(zip(reward.parts, reward.weights)) if isinstance(reward, WeightedSum) else [(reward, 1.0)]
    clips = [(r, w) for r, w in parts if isinstance(r, ClipReward)]
    if not clips:
        return reward, []
    images = [(r, w) for r, w in parts if not isinstance(r, ClipReward)]
    image = None if not images else images[0][0] if len(images) == 1 and images[0][1] == 1.0 else WeightedSum(images)
    return image, clips


@dataclass
class SegmentalReward:
    """SegVR + TAR around an image reward. With ``segvr=False`` every frame is scored; ``tar=False`` weighs uniformly."""

    reward: Reward
    segments: int = 4
    tar_lambda: float = 1.0
    segvr: bool = True
    tar: bool = True
    fps: float = 8.0  # the clips' frame rate: video-level rewards sample their frames by time

    def frame_indices(self, batch: int, num_frames: int, train: bool, generator=None) -> torch.Tensor:
        if not self.segvr:
            return torch.arange(num_frames).expand(batch, num_frames).clone()
        return segment_frame_indices(batch, num_frames, self.segments, train, generator)

    def weights(self, indices: torch.Tensor, num_frames: int) -> torch.Tensor:
        if not self.tar:
            return torch.ones(indices.shape)
        return tar_weights(indices, num_frames, self.tar_lambda)

    def __call__(self, model: VideoDiffusion, latents: torch.Tensor, prompts: list[str], train: bool = True,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Video rewards R [B] and the image reward's per-frame scores [B, S] ([B, 0] without one); decodes only
        the chosen frames, once."""
        image, clips = split_reward(self.reward)
        b, f = latents.shape[0], model.pixel_frames(latents.shape[2])  # a causal VAE's latent frame holds several
        indices = self.frame_indices(b, f, train, generator) if image is not None else torch.zeros(b, 0, dtype=torch.long)
        wanted = [reward.frame_indices(f, self.fps) for reward, _ in clips]
        chosen = torch.cat([indices, *(w.expand(b, -1) for w in wanted)], 1)
        frames = model.decode_frames(latents, chosen).unflatten(0, (b, chosen.shape[1]))
        s = indices.shape[1]
        rewards, scores = torch.zeros(b, device=frames.device), frames.new_zeros(b, 0)
        if image is not None:
            scores = image(frames[:, :s].flatten(0, 1), [p for p in prompts for _ in range(s)]).view(b, s)
            rewards = (self.weights(indices, f).to(scores.device) * scores).mean(1)
        start = s
        for (reward, weight), w in zip(clips, wanted):
            rewards = rewards + weight * reward(frames[:, start:start + len(w)], prompts)
            start += len(w)
        return rewards, scores


def reward_loss(video_rewards: torch.Tensor) -> torch.Tensor:
    """mean over the batch of (1 - R): the same gradient as -R, and positive for rewards below 1."""
    return (1 - video_rewards).mean()
