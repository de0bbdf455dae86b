"""``pytest bench/``: what a video-level reward costs at its real size: VideoAlign's VideoReward (Qwen2-VL-2B and
its reward head) scoring one clip of each video model, differentiably in the frames, in bf16.

Per clip: the frames it samples (its released data config: 2 fps, at most 200,704 pixels a frame), the tokens
they make, the weights, the FLOPs of scoring and of its backward to the frames, and the bytes autograd saves for
that backward. Qwen2-VL's blocks are identical within each tower (28 language-model layers, 32 vision blocks), so
each figure is counted exactly on the CPU with real tensors at 1 and 2 blocks per tower and extended linearly:
total = f(1, 1) + 27 (f(2, 1) - f(1, 1)) + 31 (f(1, 2) - f(1, 1)). The prompt counts as ``PROMPT_TOKENS`` text
tokens (the released template is 3,997 characters; English runs at about 4 characters a BPE token). Attention is
CPU SDPA's (its flash kernel saves no attention matrix, as CUDA's do). The report goes to stdout,
bench/RESULTS.md ("video-level rewards at real size") and bench/results_rewards.json.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from bench import fullsize
from bench.counters import FlopCount
from bench.report import markdown_table, measured_line, update_section
from engine.memory import SavedTensorMeter

transformers = pytest.importorskip("transformers")

HERE = Path(__file__).parent
GB = 1e9
# Qwen2-VL-2B-Instruct's config.json (the base of VideoReward); the vocabulary as resized for the 3 reward tokens
TEXT = dict(vocab_size=151_660, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
            num_key_value_heads=2, max_position_embeddings=32_768, tie_word_embeddings=True,
            rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [16, 24, 24]})
VISION = dict(depth=32, embed_dim=1280, hidden_size=1536, num_heads=16, mlp_ratio=4, patch_size=14,
              spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
TOKENS = dict(image_token_id=151_655, video_token_id=151_656, vision_start_token_id=151_652)
SPECIAL_IDS = (151_657, 151_658, 151_659)  # the three reward tokens, added after the base vocabulary
PROMPT_TOKENS = 1_000
CLIPS = {"modelscope": (16, 256, 256, 8.0), **{name: (*clip, fullsize.TRANSFORMER_FPS[name])
                                                for name, clip in fullsize.TRANSFORMER_CLIPS.items()}}


def reward(layers: int, blocks: int, device="cpu"):
    from transformers import Qwen2VLConfig, Qwen2VLModel

    from engine.rewards.clip import CLIP_MEAN, CLIP_STD
    from engine.rewards.videoalign import VideoAlignReward

    config = Qwen2VLConfig(text_config={**TEXT, "num_hidden_layers": layers}, vision_config={**VISION, "depth": blocks},
                           **TOKENS)
    with torch.device(device):
        model = Qwen2VLModel(config).to(torch.bfloat16)
        head = torch.nn.Linear(TEXT["hidden_size"], 3, bias=False).to(torch.bfloat16)
    vision = SimpleNamespace(image_mean=CLIP_MEAN, image_std=CLIP_STD, temporal_patch_size=2, patch_size=14, merge_size=2)
    processor = SimpleNamespace(tokenizer=SimpleNamespace(convert_tokens_to_ids=lambda tokens: list(SPECIAL_IDS)),
                                video_processor=vision)
    return VideoAlignReward(model, head, processor, "{text_prompt}", fullsize.VIDEOALIGN_DATA, None)


def token_inputs(video_tokens: int) -> dict[str, torch.Tensor]:
    """The chat's ids: the video's placeholders between its markers, then the prompt with the reward tokens."""
    text = [100] * (PROMPT_TOKENS - len(SPECIAL_IDS))
    ids = [TOKENS["vision_start_token_id"], *[TOKENS["video_token_id"]] * video_tokens, 151_653, *text[:-2],
           *SPECIAL_IDS, *text[-2:]]
    input_ids = torch.tensor([ids])
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
            "mm_token_type_ids": (input_ids == TOKENS["video_token_id"]).int() * 2}


def count(scorer, frames: int, height: int, width: int, fps: float) -> dict:
    torch.manual_seed(0)
    clip = torch.rand(1, frames, 3, height, width)[:, scorer.frame_indices(frames, fps)].bfloat16().requires_grad_()
    flops, saved = FlopCount(reuse=False), SavedTensorMeter(scorer)
    with flops, saved:
        rows, grid = scorer.pixels(clip[0])
        score = scorer.score_tokens(token_inputs(math.prod(grid) // 4), rows, torch.tensor([grid]))
        saved_bytes = saved.bytes
        score.sum().backward()
    return {"tflops": flops.total / 1e12, "saved_gb": saved_bytes / GB, "frames_scored": clip.shape[1],
            "frame_size": [grid[1] * 14, grid[2] * 14], "video_tokens": math.prod(grid) // 4}


@pytest.fixture(scope="module")
def report():
    figures: dict[str, dict] = {}
    yield figures
    if set(figures) != set(CLIPS):
        return
    measured = measured_line()
    weights = sum(p.numel() for p in reward(TEXT["num_hidden_layers"], VISION["depth"], "meta").parameters()) * 2 / GB
    (HERE / "results_rewards.json").write_text(json.dumps(
        {"measured": measured, "videoalign_2b": {"weights_gb_bf16": weights, "prompt_tokens": PROMPT_TOKENS,
                                                 "clips": figures}}, indent=2) + "\n")
    rows = [[name, "{} x {} x {} at {:g} fps".format(*CLIPS[name]),
             f"{v['frames_scored']} of {v['frame_size'][0]} x {v['frame_size'][1]}",
             f"{v['video_tokens']:,} + {PROMPT_TOKENS:,}", f"{v['tflops']:.1f}", f"{v['saved_gb']:.2f}"]
            for name, v in figures.items()]
    text = (f"{measured} Counted on the CPU with real tensors at 1 and 2 blocks per tower, extended linearly over "
            f"the 28 + 32 identical blocks; bf16, batch 1, gradient to the frames.\n\nVideoAlign's VideoReward "
            f"(Qwen2-VL-2B + its reward head): {weights:.2f} GB of weights in bf16.\n\n"
            + markdown_table(["clip", "model's clip", "frames scored (resized to)", "tokens (video + prompt)",
                              "TFLOP (score + backward)", "saved for backward GB"], rows))
    print("\n" + text)
    update_section(HERE / "RESULTS.md", "video-level rewards at real size", text)


@pytest.mark.parametrize("name", list(CLIPS))
def test_videoalign_costs(name, report):
    counts = {depths: count(reward(*depths), *CLIPS[name]) for depths in ((1, 1), (2, 1), (1, 2))}
    base, layer, block = counts[(1, 1)], counts[(2, 1)], counts[(1, 2)]
    extended = {key: base[key] + (TEXT["num_hidden_layers"] - 1) * (layer[key] - base[key])
                + (VISION["depth"] - 1) * (block[key] - base[key]) for key in ("tflops", "saved_gb")}
    assert layer["tflops"] > base["tflops"] and block["tflops"] > base["tflops"]
    report[name] = {**base, **extended}
