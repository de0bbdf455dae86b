"""``pytest bench/``: what reward fine-tuning costs on today's video transformers at their real size.

Wan 2.1 T2V 1.3B (81 frames of 480 x 832, flow matching, causal VAE) and CogVideoX-2B (49 frames of 480 x 720,
v-prediction DDIM), each with HPSv2's ViT-H-14, in bf16, batch 1, CFG 3, D = 20, LoRA r4 on the attention
projections, on the meta device (exact, machine-independent): FLOPs per step (FlopCounterMode's formulas),
bytes autograd saves for backward, what the planner spills to host memory, and how many latent frames are
decoded with gradient. Three recipes per model (bench.recipes.TRANSFORMER_RECIPES): the public way (whole chain
from noise, K = 1, first latent frame), the editing recipe at K = 1 and at K = all under the same budget.
A fourth recipe recomputes the decoder's activations in backward (causal VAEs' ``decode_recompute``); a fifth mixes
in a video-level reward that asks for the frames VideoAlign samples (``bench.recipes.VideoAlignFrames``: the
decoding of those frames with gradient is counted here, the reward model's own cost in test_reward_costs.py), and
a sixth does both.
The report goes to stdout, bench/RESULTS.md ("video transformers at real size") and
bench/results_transformers.json. Only exact relations are asserted.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bench import fullsize
from bench.counters import count_step
from bench.recipes import TRANSFORMER_RECIPES, Step, VideoAlignFrames, trainable_bytes
from bench.report import markdown_table, measured_line, update_section
from csrc import STAT_NAMES

HERE = Path(__file__).parent
GB = 1e9
BUDGET = 8 * 1024 ** 3  # the planner's device budget for the gradient steps and the decode + reward region
MODELS = list(fullsize.TRANSFORMER_CLIPS)


def count(name: str, recipe) -> dict:
    torch.manual_seed(0)  # the same SegVR draw for every recipe: their figures compare the same frames
    model, latent_shape, context_shape = fullsize.video_transformer(name, "meta", torch.bfloat16)
    reward = fullsize.hpsv2("meta", torch.bfloat16)
    step = Step(model, reward, recipe, latent_shape, context_shape, batch=1, memory_budget=BUDGET,
                fps=fullsize.TRANSFORMER_FPS[name])
    decoded = []
    decode_prefix = model.decode_prefix

    def counted(latents, needed, graded=None):
        n = model.decoded_prefix(needed, latents.shape[2])
        decoded.append((n, n if graded is None else model.decoded_with_gradient(graded, n)))
        return decode_prefix(latents, needed, graded)

    model.decode_prefix = counted  # the counted step decodes last
    flops, saved = count_step(step)
    host = dict(zip(STAT_NAMES, step.memory.store.stats()))["peak_host_bytes"] if step.memory is not None else 0
    return {**trainable_bytes(step.params), "tflops": flops / 1e12, "saved_gb_bf16": saved / GB,
            "host_gb_bf16": host / GB, "latent_frames_decoded": decoded[-1][0],
            "latent_frames_with_gradient": decoded[-1][1], "latent_frames": latent_shape[1],
            "steps_run": len(step.chain.timesteps), "grad_steps": step.chain.grad_steps}


@pytest.fixture(scope="module")
def report():
    figures: dict[str, dict] = {name: {} for name in MODELS}
    yield figures
    if any(len(figures[name]) < len(TRANSFORMER_RECIPES) for name in MODELS):
        return  # a partial run (tests deselected, as .ci/run's) keeps the last complete table and its JSON
    measured = measured_line()
    path = HERE / "results_transformers.json"
    kept = json.loads(path.read_text()) if path.exists() else {}  # other benchmarks' sections ("fit")
    path.write_text(json.dumps(kept | {"measured": measured, "models": figures}, indent=2))
    text = render(figures, measured)
    print("\n" + text)
    update_section(HERE / "RESULTS.md", "video transformers at real size", text)


def render(figures: dict, measured: str) -> str:
    lines = [measured + f" Meta-device counts; bf16, batch 1, CFG 3 in one batched call, planner budget "
                               f"{BUDGET / 1024 ** 3:.0f} GiB.", ""]
    for name in MODELS:
        rows = []
        for recipe in TRANSFORMER_RECIPES:
            f = figures[name].get(recipe.key)
            if f is None:
                continue
            base = figures[name].get("noise_k1")
            rows.append([recipe.title, f"{f['steps_run']} / {f['grad_steps']}",
                         f"{f['latent_frames_decoded']} of {f['latent_frames']} ({f['latent_frames_with_gradient']})",
                         f"{f['tflops']:,.0f}",
                         f"{f['tflops'] / base['tflops']:.2f}x" if base else "-", f"{f['saved_gb_bf16']:.2f}",
                         f"{f['host_gb_bf16']:.2f}"])
        frames, height, width = fullsize.TRANSFORMER_CLIPS[name]
        lines += [f"**{name}** ({frames} frames of {height} x {width}):", "",
                  markdown_table(["recipe", "steps run / with gradient", "latent frames decoded (with gradient)", "TFLOP / step",
                                  "vs from noise", "saved for backward GB", "spilled to host GB"], rows), ""]
        f = figures[name]
        if {"noise_k1", "edit"} <= set(f):
            noise, edit = f["noise_k1"], f["edit"]
            lines.append(f"- {name}: the editing recipe scores 4 SegVR frames spread over the clip for "
                         f"{edit['tflops'] / noise['tflops']:.2f}x the FLOPs of the chain from noise scoring frame 0; "
                         f"what backward needs is {edit['saved_gb_bf16']:.1f} GB on the device + "
                         f"{edit['host_gb_bf16']:.1f} GB in host memory against {noise['saved_gb_bf16']:.1f} GB + "
                         f"{noise['host_gb_bf16']:.1f} GB.")
        if {"edit", "edit_recompute"} <= set(f):
            lines.append(f"- {name}: with the decoder recomputed in backward (`decode_recompute`: each chunk decoded "
                         f"with gradient keeps its input and the causal cache it read), "
                         f"{_instead(f['edit_recompute'], f['edit'])}.")
        if {"edit", "edit_video_reward"} <= set(f):
            video = f["edit_video_reward"]
            frames = len(VideoAlignFrames().frame_indices(fullsize.TRANSFORMER_CLIPS[name][0], fullsize.TRANSFORMER_FPS[name]))
            lines.append(f"- {name}: with a video-level reward that also asks for the {frames} frames VideoAlign samples "
                         f"({fullsize.VIDEOALIGN_DATA['fps']:g} fps), {video['latent_frames_with_gradient']} latent frames decode with gradient instead of "
                         f"{f['edit']['latent_frames_with_gradient']}: {_instead(video, f['edit'])} (the reward model's own "
                         "cost: \"video-level rewards at real size\").")
        if {"edit_video_reward", "edit_video_reward_recompute"} <= set(f):
            lines.append(f"- {name}: the same with the decoder recomputed in backward, "
                         f"{_instead(f['edit_video_reward_recompute'], f['edit_video_reward'])}.")
        lines.append("")
    lines += ["The decoder is what costs memory: the SegVR frames' latent frames decode with gradient at full "
                  "resolution (the causal context before them without, `--decode-context no-grad`), and the planner "
                  "spills those activations to host memory when they do not fit beside the chain's plan. The SegVR frames are one "
                  "random draw per step (here from seed 0, the same for every recipe), so how many latent frames decode "
                  "varies from step to step."]
    return "\n".join(lines)


def _instead(new: dict, old: dict) -> str:
    """What backward needs under one recipe against another, and the FLOPs it costs."""
    return (f"{new['saved_gb_bf16']:.1f} GB on the device + {new['host_gb_bf16']:.1f} GB in host memory instead of "
            f"{old['saved_gb_bf16']:.1f} GB + {old['host_gb_bf16']:.1f} GB, for {new['tflops'] / old['tflops']:.3f}x the FLOPs")


@pytest.mark.parametrize("recipe", TRANSFORMER_RECIPES, ids=lambda r: r.key)
@pytest.mark.parametrize("name", MODELS)
def test_transformer_counts(name, recipe, report):
    report[name][recipe.key] = count(name, recipe)
    assert report[name][recipe.key]["tflops"] > 0


def test_transformer_relations(report):
    """What the counts make exact: editing runs fewer denoiser calls than the chain from noise; K = all costs
    more FLOPs than K = 1; scoring frame 0 decodes no more latent frames than scoring the SegVR frames, and these
    no more with gradient than the SegVR frames and a video-level reward's."""
    for name in MODELS:
        f = report[name]
        if not {"noise_k1", "edit", "edit_kall", "edit_video_reward"} <= set(f):
            pytest.skip("run the whole module for the relations")
        assert f["noise_k1"]["latent_frames_decoded"] <= f["edit"]["latent_frames_decoded"]
        assert f["edit"]["steps_run"] < f["noise_k1"]["steps_run"]
        assert f["edit"]["tflops"] < f["edit_kall"]["tflops"]
        # the video-level reward's frames are decoded beside the SegVR frames, from the same SegVR draw
        assert f["edit_video_reward"]["latent_frames_with_gradient"] >= f["edit"]["latent_frames_with_gradient"]
