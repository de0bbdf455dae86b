"""The procedural world, its gold metrics, and the built-in model and reward trained on it (engine/assets)."""

import json
import random
import shutil
import subprocess
import sys

import pytest
import torch

from engine import world
from engine.assets import ASSETS, MODEL_DIR, MOTION_REWARD_FILE, REWARD_ARCH, REWARD_FILE
from engine.world.scene import world_words
from engine.rewards.motion import MotionReward, edge_energy
from engine.world.figures import QUALITY_GAP
from engine.world.motion_reward import (JITTER_GAP, MOTION_FAULTS, ShakenClip, caption_energy, generation_pairs,
                                        motion_pairs, pair_accuracy, shake_accuracy, shake_pairs)
from engine.world.training import BACKGROUND_FAULTS, background_fault


def clips(count, seed=0, **kw):
    rng = random.Random(seed)
    return [world.random_clip(rng, **kw) for _ in range(count)]


def gold(clip, frames=None):
    return world.gold_metrics(world.render(clip) if frames is None else frames, clip.clean(), world.intended_path(clip))


# ---------------------------------------------------------------------------------- gold metrics
def test_gold_metrics_rank_rendered_ground_truth():
    """Clean renders score best on every metric each degradation spoils; the right caption beats a wrong one."""
    for clip in clips(12):
        clean = gold(clip)
        assert clean["quality"] > 28 and clean["colour_acc"] == clean["shape_acc"] == clean["direction_acc"] == 1.0
        assert clean["motion_error"] < 0.05 and clean["jitter"] < 0.05 and abs(clean["motion"] - world.SPEED) < 0.05
        degraded = {d: gold(world.Clip(**{**clip.__dict__, "degradation": d})) for d in world.DEGRADATIONS}
        for d in ("blur", "noise", "washed", "wrong_colour"):
            assert degraded[d]["quality"] < clean["quality"] - 3, (clip.caption, d)
        assert degraded["blur"]["sharpness"] < 0.7 * clean["sharpness"]
        assert degraded["washed"]["sharpness"] < 0.5 * clean["sharpness"]
        assert degraded["noise"]["bg_noise"] > 0.1 > 0.01 > clean["bg_noise"]
        assert degraded["wrong_colour"]["colour_acc"] == 0.0
        assert degraded["jitter"]["jitter"] > 1.0 and degraded["jitter"]["motion_error"] > 1.0
        frames = world.render(clip)
        other_colour = world.Clip(**{**clip.__dict__, "colour": next(c for c in world.COLOURS if c != clip.colour)})
        assert world.gold_metrics(frames, other_colour)["colour_acc"] == 0.0
        other_shape = world.Clip(**{**clip.__dict__, "shape": next(s for s in world.SHAPES if s != clip.shape)})
        assert world.gold_metrics(frames, other_shape)["shape_acc"] == 0.0
        static = frames[:1].expand_as(frames)
        assert world.gold_metrics(static, clip)["direction_acc"] == 0.0 and gold(clip, static)["motion_error"] > 3


def test_clean_reference_is_what_quality_compares_against():
    """The clean render with the object where the frames show it: a jittered clip is close to its reference, far
    from the clean render on the intended path, and a clean render is its own reference."""
    clip = world.Clip("square", "red", "right", "white", start=(10.0, 16.0), degradation="jitter", seed=3)
    frames = world.render(clip)

    def psnr(a, b):
        return (-10 * ((a - b) ** 2).mean().log10()).item()

    assert psnr(world.clean_reference(frames, clip.clean()), frames) > 30 > 20 > psnr(world.render(clip.clean()), frames)
    clean = world.render(clip.clean())
    assert psnr(world.clean_reference(clean, clip.clean()), clean) > 30


def test_splits_hold_out_what_they_say():
    train, held_out = world.finetune_split(200, 8, seed=0)
    assert not {c.caption for c in train} & {c.caption for c in held_out}
    assert all(c.shape in world.FINETUNE_SHAPES and c.colour in world.FINETUNE_COLOURS for c in train + held_out)
    assert {c.degradation for c in train} == {None, *world.DEGRADATIONS}  # mixed quality, as in pre-training
    new = world.prompt_set("new_categories", 20, seed=1)
    assert all(c.shape not in world.FINETUNE_SHAPES or c.colour not in world.FINETUNE_COLOURS for c in new)
    unrelated = world.prompt_set("unrelated", 5, seed=2)
    assert all(c.template == "B" and "backdrop" in c.caption for c in unrelated)
    assert all(c.degradation is None for name in world.PROMPT_SETS for c in world.prompt_set(name, 5, seed=3))


def test_clips_stay_inside_the_frame():
    for clip in clips(200, seed=5):
        path = clip.trajectory()
        assert path.min() >= world.RADIUS and path.max() <= world.SIZE - world.RADIUS


# ---------------------------------------------------------------------------------- the shipped assets
def test_shipped_assets_are_small_and_complete():
    files = [p for p in ASSETS.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 40 * 1024 ** 2
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (MODEL_DIR / part).is_dir()
    assert all(p.suffix != ".bin" for p in files)  # weights as safetensors (the reward: HPS_v2's torch format)
    data = torch.load(REWARD_FILE, weights_only=True)
    assert data["architecture"] == REWARD_ARCH and isinstance(data["state_dict"], dict)


def test_stock_pipeline_loads_the_built_in_model_and_the_engine_samples_it():
    """A stock TextToVideoSDPipeline loads the folder and generates; the engine samples it and the gold metrics
    read its videos (how faithful they are is measured, not asserted: see the README's world section)."""
    from diffusers import TextToVideoSDPipeline

    from engine.builtin import build_model
    from engine.chain import generate

    pipe = TextToVideoSDPipeline.from_pretrained(str(MODEL_DIR))
    frames = pipe("a red circle moving left on a black background", num_inference_steps=2, height=32, width=32,
                  num_frames=8, output_type="pt", generator=torch.Generator().manual_seed(0)).frames
    assert frames.shape[-3:] == (3, 32, 32) and torch.isfinite(frames).all()

    model = build_model("world")
    prompts = world.prompt_set("in_domain", 2, seed=11)
    latents = generate(model, [c.caption for c in prompts], [0, 1], (8, 32, 32), ddim_steps=4)
    assert latents.shape == (2, model.denoiser.config.in_channels, 8, 8, 8) and torch.isfinite(latents).all()
    scores = world.mean_metrics([world.gold_metrics(model.decode_video(v), c) for v, c in zip(latents, prompts)])
    assert set(scores) == set(world.GOLD_METRICS)


def test_world_words_are_single_tokens():
    from engine.builtin import build_model

    tokenizer = build_model("world").tokenizer
    assert all(len(tokenizer.tokenize(w)) == 1 for w in world_words())
    assert tokenizer.tokenize("zebra")  # anything else still tokenizes (bytes)


def test_built_in_reward_loads_through_hpsv2_and_prefers_clean_faithful_frames():
    from engine.rewards import HPSv2Reward, build_reward

    reward = build_reward("hpsv2:world")
    assert isinstance(reward, HPSv2Reward) and reward.image_size == world.SIZE
    wins, total = 0, 0
    for clip in clips(24, seed=7):
        frame = lambda c: world.render(c)[3:4]
        score = lambda c, caption=clip.caption: reward(frame(c), [caption]).item()
        clean = score(clip)
        worse = [world.Clip(**{**clip.__dict__, "degradation": d}) for d in ("blur", "noise", "washed", "wrong_colour")]
        worse.append(world.Clip(**{**clip.__dict__, "shape": next(s for s in world.SHAPES if s != clip.shape)}))
        faults = [background_fault(frame(clip)[0], clip, f, random.Random(1))[None] for f in BACKGROUND_FAULTS]
        wins += sum(clean > score(c) for c in worse) + sum(clean > reward(f, [clip.caption]).item() for f in faults)
        total += len(worse) + len(faults)
    assert wins / total > 0.85, (wins, total)


def test_a_motion_reward_saves_its_scale_and_one_without_is_refused(tmp_path):
    from safetensors.torch import save_file

    from engine.errors import UserError

    reward = MotionReward(["red", "left"], scale=2.5)
    reward.save(tmp_path / "m.safetensors")
    assert MotionReward.from_file(tmp_path / "m.safetensors").scale == 2.5
    save_file(reward.state_dict(), str(tmp_path / "old.safetensors"), metadata={"vocabulary": '["red", "left"]', "scale": "1.0"})
    with pytest.raises(UserError, match="earlier design"):
        MotionReward.from_file(tmp_path / "old.safetensors")


def test_training_a_motion_reward_from_zero_learns_to_rank_clips_that_move_as_captioned(tmp_path):
    """The motion reward's training stage (``train_motion_reward``), short: its cap fitted, then 150 steps of 8
    fault and 8 shake pairs lift the ranking of held-out fault pairs well above the untrained reward's, and the
    stage leaves its checkpoint for a resume."""
    from engine.world.motion_reward import train_motion_reward
    from engine.world.scene import world_words

    reward, pairs = MotionReward(world_words()), motion_pairs(random.Random(12345), 8 * len(MOTION_FAULTS))
    before = pair_accuracy(reward, pairs)
    train_motion_reward(reward, steps=150, seed=0, work=tmp_path, config={}, batch=8, reference_steps=200)
    after = pair_accuracy(reward, pairs)
    assert bool(reward.has_reference) and not reward.training
    assert after["all"] >= before["all"] + 0.2 and after["reversed"] == 1.0, (before, after)
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=False)["step"] == 150


def _moving_clips(count: int = 16) -> tuple[list, torch.Tensor]:
    """In-domain clips and the velocity [count, 2] (pixels per frame) each caption asks for."""
    clips = [world.random_clip(random.Random(i), world.FINETUNE_SHAPES, world.FINETUNE_COLOURS) for i in range(count)]
    return clips, torch.tensor([[world.SPEED * m for m in world.MOTIONS[c.motion]] for c in clips])


def _shaken(clips: list, shake: float) -> torch.Tensor:
    return torch.stack([world.render(ShakenClip.of(c, shake)) for c in clips])


def test_the_motion_rewards_displacement_error_is_the_shake_in_pixels_whatever_the_look():
    """d_t measures how far each frame pair's translation misses the caption's velocity, in pixels: near 0 for the
    clean motion, growing with the shake, about the same when the object is blurred or faded or the background's
    shade moves (what fine-tuning changed to steady the object's measured centre against a path-reading reward),
    and the full velocity, as if frozen, when nothing moves or nothing is visible."""
    from engine.rewards.motion import displacement_errors
    from engine.world.rendering import gaussian_blur

    clips, velocity = _moving_clips()

    def error(frames):
        return displacement_errors(frames, velocity).sqrt().mean().item()

    clean, shaken = _shaken(clips, 0.0), _shaken(clips, 0.3)
    assert error(clean) < 0.2
    assert 0.4 < error(shaken) < 0.8  # shake 0.3 px a frame: pair steps 0.3 sqrt(2) per axis
    assert error(_shaken(clips, 1.0)) > 2 * error(shaken)
    for looks in (torch.stack([gaussian_blur(v, 1.3) for v in shaken]), 0.4 * shaken + 0.3, (shaken + 0.2).clamp(0, 1)):
        assert abs(error(looks) - error(shaken)) < 0.2 * error(shaken)
    assert error(clean[:, :1].expand_as(clean)) > 1.2 and error(torch.full_like(clean, 0.5)) == pytest.approx(world.SPEED)


def test_content_carried_along_lowers_the_motion_error_only_up_to_the_clean_renders_edge_energy():
    """A texture carried exactly at the caption's velocity adds edge energy and no residual: with the edge energy
    uncapped the displacement error of a shaking clip falls by half (halos and rings painted around the object are
    what fine-tuning against the reward alone learned); capped at the clean render's edge energy it stays within
    the little the shaken clip's edge energy lacks of that cap."""
    from engine.rewards.motion import displacement_errors, edge_energy
    from engine.world.rendering import gaussian_blur

    clips, velocity = _moving_clips()
    clean, shaken = _shaken(clips, 0.0), _shaken(clips, 0.3)
    texture = gaussian_blur(torch.rand(len(clips), 3, world.SIZE, world.SIZE, generator=torch.Generator().manual_seed(0)), 0.5)
    carried = torch.stack([torch.stack([texture[i].roll((t * int(v[1]), t * int(v[0])), dims=(-2, -1))
                                        for t in range(world.FRAMES)]) for i, v in enumerate(velocity)])
    painted = shaken + 0.5 * carried

    def error(frames, reference=None):
        return displacement_errors(frames, velocity, reference).sqrt().mean().item()

    assert error(painted) < 0.5 * error(shaken)
    reference = edge_energy(clean).mean(1)
    assert error(painted, reference) > 0.95 * error(shaken, reference)  # below the cap the shaken clip's own energy


def test_built_in_motion_reward_loads_and_prefers_clips_that_move_as_captioned():
    """The shipped video reward on fresh render pairs (clips of another seed than its training and validation):
    the clip moving as captioned above the same clip jittered, frozen, reversed or moved sideways, and a clip
    shaking by 0.1 px or more below itself steadier (the base model's generations shake about that much); gradients
    reach every frame; its cap on edge energy is a clean render's edge energy wherever the clip starts, within 3%."""
    reward = MotionReward.from_file(MOTION_REWARD_FILE)
    assert reward.frame_indices(world.FRAMES, fps=8.0).tolist() == list(range(world.FRAMES))
    accuracy = pair_accuracy(reward, motion_pairs(random.Random(12345), 8 * len(MOTION_FAULTS)))
    assert accuracy["all"] >= 0.9 and min(accuracy[f] for f in MOTION_FAULTS) >= 0.75, accuracy
    shaken = [pair for pair in shake_pairs(random.Random(12346), 96) if pair[3] >= 0.1]  # gold jitter 0.3 px and up
    assert shake_accuracy(reward, shaken)["all"] >= 0.85, shake_accuracy(reward, shaken)
    frames = world.render(clips(1, seed=3)[0])[None].requires_grad_()
    reward(frames, ["a red circle moving left on a black background"]).sum().backward()
    assert (frames.grad.abs().sum(dim=(2, 3, 4)) > 0).all()
    captions = [world.random_clip(random.Random(i), template="AB"[i % 2]) for i in range(8)]
    predicted = reward.reference_energy([c.caption for c in captions])  # its cap: a clean render's edge energy
    assert torch.allclose(predicted, torch.stack([caption_energy(c) for c in captions]), rtol=0.03)


def test_a_shaken_clip_keeps_its_appearance_and_its_gold_jitter_grows_with_the_shake():
    """The motion reward's shake pairs: shake 0 is the clip itself; one clip at growing shakes, appearance and
    pattern kept, reads as growing gold jitter (about 3x the shake), from sub-pixel up."""
    for clip in clips(4, seed=5, degradation="noise"):
        assert torch.equal(world.render(ShakenClip.of(clip, 0.0)), world.render(clip))
        jitter = [gold(clip.clean(), world.render(ShakenClip.of(clip.clean(), s)))["jitter"] for s in (0.0, 0.1, 0.3, 1.0)]
        assert jitter[0] < 0.05 and jitter == sorted(jitter) and 0.1 < jitter[1] < 0.6 < jitter[2] < 1.5, jitter


def test_generation_pairs_order_a_fine_tuned_and_a_base_generation_by_gold_direction_quality_then_jitter():
    """The motion reward's on-policy pairs: per noise, the generation moving the caption's way first; where both
    do, the one QUALITY_GAP better first (a smeared object steadies its path); then the smoother by JITTER_GAP
    first; otherwise no pair, whichever model made which."""
    def row(direction: float, jitter: float, quality: float = 30.0) -> dict:
        return {"direction_acc": direction, "jitter": jitter, "quality": quality}

    base = [row(1, 0.3), row(0, 0.2), row(1, 0.2), row(1, 0.6), row(0, 0.1), row(1, 0.3), row(1, 0.5)]
    tuned = [row(0, 0.1), row(1, 0.9), row(1, 0.2 + JITTER_GAP + 0.05), row(1, 0.2), row(0, 0.9), row(1, 0.3 + JITTER_GAP / 2),
             row(1, 0.1, 30.0 - QUALITY_GAP - 0.5)]
    base_videos, tuned_videos = [torch.full((1,), float(i)) for i in range(7)], [torch.full((1,), 10.0 + i) for i in range(7)]
    pairs = generation_pairs(base, base_videos, tuned, tuned_videos, [f"c{i}" for i in range(7)])
    assert [(caption, better.item(), worse.item(), why) for caption, better, worse, why in pairs] == [
        ("c0", 0.0, 10.0, "direction"), ("c1", 11.0, 1.0, "direction"), ("c2", 2.0, 12.0, "jitter"),
        ("c3", 13.0, 3.0, "jitter"), ("c6", 6.0, 16.0, "quality")]


def test_background_faults_change_the_background_only():
    clip = world.Clip("square", "green", "right", "white", (9.0, 16.0))
    frame = world.render(clip)[0]
    inside = world.shape_mask("square", clip.trajectory()[:1])[0] > 0.999
    for fault in BACKGROUND_FAULTS:
        faulty = background_fault(frame, clip, fault, random.Random(0))
        assert torch.equal(faulty[:, inside], frame[:, inside])
        assert (faulty[:, ~inside] - frame[:, ~inside]).abs().mean() > 0.02, fault


def test_every_build_stage_runs_at_smoke_size_and_writes_loadable_files_and_reports(tmp_path):
    """The regeneration command, every stage at --smoke size: a pipeline folder a stock pipeline loads, an
    HPS-format reward, and one JSON report per stage with its figures."""
    result = subprocess.run([sys.executable, "-m", "engine.world.build", "all", "--smoke", "--output", str(tmp_path)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    from diffusers import TextToVideoSDPipeline

    from engine.models import load_model
    from engine.rewards import HPSv2Reward

    TextToVideoSDPipeline.from_pretrained(str(tmp_path / MODEL_DIR.name))
    model = load_model(tmp_path / MODEL_DIR.name)
    assert model.vae_downsample == 4 and model.denoiser.config.cross_attention_dim == model.text_encoder.config.hidden_size
    reward = HPSv2Reward(tmp_path / REWARD_FILE.name)
    assert reward(torch.rand(2, 3, 32, 32), ["a", "b"]).shape == (2,)
    reports = {p.stem: json.loads(p.read_text()) for p in (tmp_path / "reports").glob("*.json")}
    assert set(reports) == {"vae", "text-encoder", "unet", "motion", "reward", "onpolicy", "motion-reward", "motion-onpolicy"}
    assert set(reports["motion-reward"]["render_pairs"]) >= {"jitter", "frozen", "reversed", "sideways"}
    assert MotionReward.from_file(tmp_path / MOTION_REWARD_FILE.name)(
        torch.rand(2, world.FRAMES, 3, 32, 32), ["a", "b"]).shape == (2,)
    assert all(r["smoke"] for r in reports.values())
    assert set(reports["vae"]["clean_in_domain"]) >= {"colour_acc", "shape_acc"}
    assert reports["unet"]["effect_set"]["clips"] == 4 and "outside_clean_render_range" in reports["unet"]["effect_set"]
    assert {"quality_agreement", "same_caption_quality_agreement", "reference_agreement",
            "fidelity_agreement"} <= set(reports["reward"]["reward_validation"])
    assert reports["reward"]["reference_pairs"] >= 0
    for stage in ("unet", "motion"):
        assert reports[stage]["effect_set"]["clips"] == 4
        assert set(reports[stage]["direction_probe"]["t650"]) >= {"opposite_direction_gap", "perpendicular_direction_gap"}
    for stage in ("vae", "text-encoder", "unet", "motion", "reward", "motion-reward"):
        assert (tmp_path / "work" / stage / "checkpoint.pt").is_file() and (tmp_path / "work" / stage / "log.txt").is_file()
    # the motion reward's on-policy round: a LoRA fine-tuned against it alone, a fresh reward trained, and the
    # fine-tuned generations of held-out captions ordered by the reward before and after
    motion_round = reports["motion-onpolicy"]
    assert motion_round["round"] == 1 and len(motion_round["loras"]) == 1 and motion_round["earlier_rounds"] == []
    assert set(motion_round["held_out_fine_tuned_generations"]) == {"before", "after"}
    assert motion_round["onpolicy_pairs"] == motion_round["new_pairs"] and motion_round["scale"] > 0
    assert (tmp_path / "work" / "motion-onpolicy" / "round-1" / "reward" / "checkpoint.pt").is_file()
    # on-policy rounds: the first fine-tuned a LoRA against the reward with the engine's trainer on the model built
    # here; a second run is the second round, retrained on the first one's pairs as well
    first = reports["onpolicy"]
    assert first["round"] == 1 and first["earlier_rounds"] == [] and len(first["loras"]) == 1
    assert (tmp_path / "work" / "onpolicy" / "round-1" / "lora-0" / "lora" / "adapter_config.json").is_file()
    result = subprocess.run([sys.executable, "-m", "engine.world.build", "onpolicy", "--smoke", "--output", str(tmp_path)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    second = json.loads((tmp_path / "reports" / "onpolicy.json").read_text())
    assert second["round"] == 2 and [r["round"] for r in second["earlier_rounds"]] == [1]
    assert second["onpolicy_pairs"] == first["new_pairs"] + second["new_pairs"]


def test_the_motion_reward_stage_refuses_an_output_without_the_base_model_before_it_trains(tmp_path):
    """It scales the reward on the base model's generations: a folder without the model is refused in one line,
    before minutes of training, and nothing is written."""
    result = subprocess.run([sys.executable, "-m", "engine.world.build", "motion-reward", "--smoke", "--output",
                             str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "lacks vae, text_encoder, tokenizer, unet; run the stages before this one first" \
        in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "work").exists()


def test_the_world_preset_loads_the_folder_it_is_pointed_at_and_reverts(tmp_path):
    """The asset build fine-tunes the model it is building: ``world_model_at`` makes ``--model world`` load that
    folder meanwhile, and the shipped one after."""
    from diffusers import UNet3DConditionModel

    from engine.builtin import build_model, world_model_at

    shipped = build_model("world").denoiser.conv_in.weight
    other = tmp_path / "world-t2v"
    shutil.copytree(MODEL_DIR, other)
    changed = UNet3DConditionModel.from_pretrained(str(other / "unet"))
    changed.conv_in.weight.data.add_(1.0)
    changed.save_pretrained(str(other / "unet"))
    with world_model_at(other):
        assert torch.equal(build_model("world").denoiser.conv_in.weight, shipped + 1.0)
    assert torch.equal(build_model("world").denoiser.conv_in.weight, shipped)


def test_direction_probe_tells_a_model_that_reads_the_motion_word_from_one_that_does_not():
    """A denoiser whose clean-latent prediction is near the clip for the clip's own caption and 0 for any other: its
    x0 error is small with the caption and the same, far larger, with either swapped motion word; one that ignores
    its caption has gaps of exactly 0."""
    from types import SimpleNamespace

    from engine.world.figures import direction_probe
    from engine.world.scene import evaluation_set

    clips = [c for c, _ in evaluation_set("reward_train", 1)][:4]
    scheduler = SimpleNamespace(alphas_cumprod=torch.linspace(0.9, 0.01, 1000))
    latents = torch.randn(len(clips), 2, 8, 3, 3)
    captions = [c.caption for c in clips]

    def model(reads_caption: bool):
        def predict(denoiser, x, t, context):
            a = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1, 1)
            right = torch.tensor([reads_caption and own for _, own in context], dtype=torch.float32)
            target = 0.9 * torch.stack([latents[i] for i, _ in context]) * right.view(-1, 1, 1, 1, 1)
            return (x - a.sqrt() * target) / (1 - a).sqrt()

        return SimpleNamespace(encode_video=lambda frames: latents, scheduler=scheduler, denoiser=None, predict=predict,
                               encode_prompts=lambda texts: [(i, text in captions) for i, text in enumerate(texts)])

    reading = direction_probe(model(True), clips, timesteps=(100, 900), batch=3)
    for figures in reading.values():
        assert figures["x0_mse"]["opposite_direction"] == figures["x0_mse"]["perpendicular_direction"]
        assert figures["opposite_direction_gap"] > 50
    for figures in direction_probe(model(False), clips, timesteps=(100, 900), batch=3).values():
        assert figures["opposite_direction_gap"] == figures["perpendicular_direction_gap"] == 0.0


def test_a_stopped_stage_continues_where_it_stopped(tmp_path):
    """A stage run stopped after 3 of 6 steps continues at step 3 and ends where an uninterrupted run ends; a
    checkpoint of other settings is refused, naming them."""
    from engine.errors import UserError
    from engine.world.stages import StageRun

    def run(folder, stop=None, lr=0.1):
        torch.manual_seed(0)
        layer = torch.nn.Linear(3, 1)
        optimizer = torch.optim.Adam(layer.parameters(), lr=lr)
        generator = torch.Generator().manual_seed(1)
        steps = StageRun("test", folder, {"lr": lr}, 6, {"layer": layer, "optimizer": optimizer,
                                                          "generator": generator}, save_every_s=0)
        for step in steps:
            if step == stop:  # stopped between steps 3 and 4 (a step under way when a run is killed is lost)
                break
            x = torch.randn(4, 3, generator=generator)
            optimizer.zero_grad()
            layer(x).square().mean().backward()
            optimizer.step()
        return steps.start, layer.weight.detach().clone()

    _, straight = run(tmp_path / "straight")
    assert run(tmp_path / "stopped", stop=3)[0] == 0
    start, resumed = run(tmp_path / "stopped")
    assert start == 3 and torch.equal(resumed, straight)
    with pytest.raises(UserError, match=r"other settings \(lr\)"):
        run(tmp_path / "stopped", lr=0.2)


def test_build_refuses_bad_input_before_writing(tmp_path):
    for argv in (["unet", "--steps", "0", "--output", str(tmp_path / "o")], ["all", "--smoke", "--output", str(ASSETS)]):
        result = subprocess.run([sys.executable, "-m", "engine.world.build", *argv], capture_output=True, text=True)
        assert result.returncode == 2 and result.stderr.startswith("error: "), result.stderr
    assert not (tmp_path / "o").exists()
    result = subprocess.run([sys.executable, "-m", "engine.world.build", "unet", "--smoke", "--output",
                             str(tmp_path / "empty")], capture_output=True, text=True)
    assert result.returncode == 2 and "run the stages before this one first" in result.stderr, result.stderr


def test_evaluation_sets_are_disjoint_and_fixed():
    groups = {name: world.caption_group(name) for name in world.CAPTION_GROUPS}
    captions = [c.caption for g in groups.values() for c in g]
    assert len(captions) == len(set(captions)) == 144 and all(len(g) == 36 for g in groups.values())
    seeds = [{s for _, s in world.evaluation_set(name, 8)} for name in world.CAPTION_GROUPS]
    assert all(not (a & b) for i, a in enumerate(seeds) for b in seeds[i + 1:])
    assert world.evaluation_set("effect", 2)[:3] == world.evaluation_set("effect", 2)[:3]
    assert world.caption_group("effect")[0].caption == "a yellow square moving right on a black background"


def test_gold_reward_is_the_gold_quality_per_frame_with_a_gradient():
    import engine.builtin  # noqa: F401  (registers --reward gold)
    from engine.errors import UserError
    from engine.rewards import build_reward

    reward = build_reward("gold")
    clip = world.prompt_set("in_domain", 2, seed=100)[0]
    for degradation in (None, "blur", "noise"):
        frames = world.render(world.Clip(**{**clip.__dict__, "degradation": degradation, "seed": 1}))
        x = frames.clone().requires_grad_(True)
        scores = reward(x, [clip.caption] * len(x))
        assert abs(10 * scores.mean().item() - world.gold_metrics(frames, clip)["quality"]) < 1e-3, degradation
        if degradation:
            scores.sum().backward()
            assert x.grad.abs().sum() > 0
    with pytest.raises(UserError, match="world captions only"):
        reward(frames[:1], ["a cat on a mat"])


def test_reward_slopes_point_each_generation_once_at_its_clean_reference():
    """What the reward's pixel gradient is trained to follow: each generated video once (pairs share them), the
    direction to its clean reference; a clean reference itself gives none."""
    from engine.world.gold import clean_reference
    from engine.world.reward_stages import slopes
    from engine.world.scene import in_domain_grid

    clip = in_domain_grid()[0]
    reference = world.render(clip)
    blurred = world.gaussian_blur(reference, 1.0)
    noisy = (reference + 0.1 * torch.randn(reference.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    pairs = [(reference, clip.caption, blurred, clip.caption), (blurred, clip.caption, noisy, clip.caption)]
    found = slopes(pairs)
    assert [video is v for (video, _, _), v in zip(found, (blurred, noisy))] == [True, True] and len(found) == 2
    for video, caption, direction in found:
        assert caption == clip.caption
        assert torch.allclose(direction, clean_reference(video, clip) - video)
