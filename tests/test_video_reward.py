"""SegVR frame sampling, TAR weights, the video reward and decoding only the chosen frames."""

import math

import pytest
import torch

from engine.models import gather_frames
from engine.rewards import ClipReward, Reward, WeightedSum
from engine.video_reward import SegmentalReward, reward_loss, segment_frame_indices, tar_weights


@pytest.mark.parametrize("frames, segments", [(16, 4), (8, 4), (13, 4), (16, 1), (7, 7)])
def test_segvr_draws_one_frame_inside_each_segment(frames, segments):
    g = torch.Generator().manual_seed(0)
    idx = segment_frame_indices(500, frames, segments, train=True, generator=g)
    assert idx.shape == (500, segments)
    for i in range(segments):
        lo, hi = i * frames // segments, (i + 1) * frames // segments
        column = idx[:, i]
        assert column.min() >= lo and column.max() < hi
        assert set(column.tolist()) == set(range(lo, hi)), "every frame of the segment must be reachable"


def test_segvr_is_uniform_within_a_segment():
    g = torch.Generator().manual_seed(1)
    idx = segment_frame_indices(20000, 16, 4, train=True, generator=g)
    counts = torch.bincount(idx[:, 1] - 4, minlength=4).float()
    assert torch.allclose(counts / counts.sum(), torch.full((4,), 0.25), atol=0.015)


def test_segvr_evaluation_takes_first_frame_of_each_segment():
    assert segment_frame_indices(3, 16, 4, train=False).tolist() == [[0, 4, 8, 12]] * 3


def test_tar_weights_formula():
    idx = torch.tensor([[0, 5, 8, 15]])
    expected = [math.exp(-1.0 * abs(g - 8)) for g in (0, 5, 8, 15)]
    assert torch.allclose(tar_weights(idx, 16, 1.0), torch.tensor([expected]))
    assert torch.allclose(tar_weights(idx, 16, 0.0), torch.ones(1, 4))


def test_gather_frames_picks_the_requested_frames():
    latents = torch.arange(2 * 3 * 6).float().view(2, 1, 6, 1, 3)  # [B, C, F, h, w]
    idx = torch.tensor([[0, 5], [2, 3]])
    out = gather_frames(latents, idx)
    assert out.shape == (4, 1, 1, 3)
    assert torch.equal(out[1], latents[0, :, 5]) and torch.equal(out[2], latents[1, :, 2])


class FrameMean(Reward):
    """Reward = mean pixel value, so expected scores are easy to compute."""

    def forward(self, images, prompts):
        assert len(prompts) == images.shape[0]
        return images.mean(dim=(1, 2, 3))


def test_video_reward_is_tar_weighted_mean_and_decodes_only_chosen_frames(tiny):
    calls = []
    decode = tiny.vae.decode
    tiny.vae.decode = lambda z, *a, **k: calls.append(z.shape[0]) or decode(z, *a, **k)
    latents = torch.randn(2, 4, 8, 16, 16)
    scorer = SegmentalReward(FrameMean(), segments=4, tar_lambda=1.0)
    g = torch.Generator().manual_seed(3)
    rewards, scores = scorer(tiny, latents, ["a", "b"], train=True, generator=g)
    assert calls == [2 * 4], "only the 4 SegVR frames of each video may be decoded"
    idx = segment_frame_indices(2, 8, 4, train=True, generator=torch.Generator().manual_seed(3))
    frames = tiny.decode_latents(gather_frames(latents, idx))
    r = frames.mean(dim=(1, 2, 3)).view(2, 4)
    expected = (tar_weights(idx, 8, 1.0) * r).mean(1)
    assert torch.allclose(rewards, expected, atol=1e-6)
    assert torch.allclose(reward_loss(rewards), (1 - expected).mean(), atol=1e-6)


def test_segvr_and_tar_switch_off(tiny):
    scorer = SegmentalReward(FrameMean(), segments=4, segvr=False, tar=False)
    idx = scorer.frame_indices(2, 8, train=True)
    assert idx.tolist() == [list(range(8))] * 2
    assert torch.equal(scorer.weights(idx, 8), torch.ones(2, 8))


class FrameDifference(ClipReward):
    """A video-level reward: mean absolute change between the declared frames (every other frame)."""

    def frame_indices(self, num_frames, fps):
        return torch.arange(0, num_frames, 2)

    def forward(self, clips, prompts):
        assert clips.ndim == 5 and len(prompts) == clips.shape[0]
        return (clips[:, 1:] - clips[:, :-1]).abs().mean(dim=(1, 2, 3, 4))


def test_a_mix_of_image_and_video_level_rewards_decodes_once_and_weighs_both(tiny):
    calls = []
    decode = tiny.vae.decode
    tiny.vae.decode = lambda z, *a, **k: calls.append(z.shape[0]) or decode(z, *a, **k)
    latents = torch.randn(2, 4, 8, 16, 16, requires_grad=True)
    mix = WeightedSum([(FrameMean(), 0.7), (FrameDifference(), 2.0)])
    rewards, scores = SegmentalReward(mix, segments=4)(tiny, latents, ["a", "b"], train=True,
                                                       generator=torch.Generator().manual_seed(3))
    assert calls == [2 * (4 + 4)], "the 4 SegVR frames and the clip reward's 4 frames, in one decode"
    idx = segment_frame_indices(2, 8, 4, train=True, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        every = tiny.decode_latents(gather_frames(latents, torch.arange(8).expand(2, -1))).view(2, 8, 3, 32, 32)
    chosen = every[torch.arange(2)[:, None], idx]
    image = (tar_weights(idx, 8, 1.0) * chosen.mean(dim=(2, 3, 4))).mean(1)
    expected = 0.7 * image + 2.0 * FrameDifference()(every[:, ::2], ["a", "b"])
    assert torch.allclose(rewards, expected, atol=1e-5) and scores.shape == (2, 4)
    rewards.sum().backward()
    assert latents.grad.abs().sum() > 0


def test_a_video_level_reward_alone_scores_its_own_frames(tiny):
    latents = torch.randn(2, 4, 8, 16, 16)
    rewards, scores = SegmentalReward(FrameDifference())(tiny, latents, ["a", "b"], train=False)
    every = tiny.decode_latents(gather_frames(latents, torch.arange(8).expand(2, -1))).view(2, 8, 3, 32, 32)
    assert torch.allclose(rewards, FrameDifference()(every[:, ::2], ["a", "b"]), atol=1e-5)
    assert scores.shape == (2, 0)


def test_the_trainer_fine_tunes_with_the_built_in_motion_reward_mixed_in(tmp_path):
    from engine.train import main

    summary = main(["--model", "world", "--reward", "hpsv2:world,motion:world@0.5", "--steps", "2",
                    "--num-held-out", "2", "--sample-steps", "2", "--output", str(tmp_path / "run"),
                    "--no-tensorboard"])
    assert math.isfinite(summary["eval_reward_start"]) and math.isfinite(summary["eval_reward_end"])
    assert summary["eval_reward_end"] != summary["eval_reward_start"]  # the LoRA changed what the mix scores
