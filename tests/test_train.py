"""The command line end to end (the default job on the built-in world model), configuration handling and
repeatability (on the tiny preset)."""

import json
import subprocess
import sys

import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from engine.builtin import BUILTINS
from engine.config import TrainConfig, resolve_config
from engine.errors import UserError
from engine.train import Trainer, main

# What the default job (seed 0) must show on its held-out prompts. Measured on this CPU on 2026-12-07 (tau 1.0, K 1,
# 35 steps, the image reward mixed with the motion reward at 0.5: the method study's recipe): reward (the mix) of the
# edits 0.2335 -> 0.2455, from noise 0.2372 -> 0.2461; gold quality of the edits 29.44 -> 32.56 dB, from noise
# 30.67 -> 31.69 dB.
REWARD_GAIN = 0.001
QUALITY_GAIN_DB = 0.2
MOTION_TOLERANCE_PX = 0.5  # the objects may drift this much further from their source paths, per frame


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """`python -m engine.train` with no options but the output folder, run once for the tests below (one xdist
    group, so one worker runs it)."""
    out = tmp_path_factory.mktemp("default") / "run"
    result = subprocess.run([sys.executable, "-m", "engine.train", "--output", str(out)],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["kind"] == "eval"]
    return out, result, records, evals[0], evals[-1]


@pytest.mark.heavy(2)
@pytest.mark.xdist_group("default_job")
def test_default_cli_run_fine_tunes_the_world_model_and_shows_the_effect(default_run):
    """The built-in world model and reward, end to end: the held-out reward rises, the objects keep to their
    source paths, and the run prints the gold metrics (from pixels, never from the reward model) of the edits and
    of videos generated from noise, before -> after, and writes the pictures."""
    out, result, records, first, last = default_run
    assert "fine-tuning" in result.stderr and "s_step" in result.stderr  # the progress bar
    assert "held-out gold metrics" in result.stdout and "  edits: quality" in result.stdout
    assert "  from noise: quality" in result.stdout and "; from noise " in result.stdout
    assert ("fine-tuning world (LoRA rank 4) on hpsv2 + 0.5 motion (hpsv2:world,motion:world@0.5): 35 steps of "
            "batch 2, tau 1.0 (20 of 20 DDIM steps), K 1; into ") in result.stdout  # the job, before it starts
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["model"] == "world" and config["reward"] == "hpsv2:world,motion:world@0.5"
    train = [r for r in records if r["kind"] == "train"]
    assert len(train) == config["steps"] and {"loss", "reward", "s_per_step", "lr"} <= set(train[0])
    assert last["eval_reward"] > first["eval_reward"] + REWARD_GAIN, (first, last)
    assert last["gold_motion_error"] < first["gold_motion_error"] + MOTION_TOLERANCE_PX, (first, last)
    lora = load_file(str(out / "lora" / "adapter_model.safetensors"))
    assert lora and all(".lora_A.weight" in k or ".lora_B.weight" in k for k in lora)
    assert any("temp_attentions" in k for k in lora) and any("attn2.to_k" in k for k in lora)
    assert json.loads((out / "lora" / "adapter_config.json").read_text())["r"] == 4
    assert (out / "reward_curve.png").stat().st_size > 1000
    for i in range(config["num_held_out"]):
        for label in ("before", "after"):
            assert (out / "samples" / f"{i:02d}_{label}.mp4").stat().st_size > 0
            assert (out / "samples" / f"{i:02d}_{label}.gif").stat().st_size > 0
        assert (out / "samples" / f"{i:02d}_before_after.png").exists()
    # before, after and, for the world model, each one's error against its clean render, per held-out prompt
    strip = Image.open(out / "samples" / "00_before_after.png")  # one prompt's before and after, unlabelled
    pair_height = strip.height
    assert Image.open(out / "samples" / "before_after.png").height == 4 * config["num_held_out"] * pair_height // 2
    # each before / after pair side by side, playing, a row per prompt labelled with its gold quality before -> after
    played = Image.open(out / "samples" / "before_after.gif")
    assert played.n_frames == config["num_frames"]
    label = f"00 {30.0:.1f} -> {30.0:.1f} dB"  # "NN before -> after dB": the world's qualities are 10-99 dB
    assert played.size == (8 + 6 * len(label) + 2 * (128 + 4), 16 + config["num_held_out"] * 128)
    # the held-out edits the numbers above score: source, base edit, fine-tuned edit for every held-out prompt
    edits = Image.open(out / "samples" / "edits.png")
    assert edits.height == 3 * config["num_held_out"] * pair_height // 2
    # a band of labels as wide as the longest, "fine-tuned 32.8 dB": which row is which, and its gold quality
    assert edits.width - strip.width == 8 + 6 * len("fine-tuned 32.8 dB")


@pytest.mark.xdist_group("default_job")
def test_default_run_raises_the_gold_quality_and_steadies_the_objects(default_run):
    """The held-out edits' gold quality (from pixels) rises (measured 29.44 -> 32.56 dB, seed 0) and, with the
    motion reward in the mix, their jitter falls (0.50 -> 0.25 px); from noise the same run moves them 30.67 ->
    31.69 dB and 0.41 -> 0.29 px on its 8 captions: the method study measures that with five seeds."""
    _, _, _, first, last = default_run
    assert last["gold_quality"] > first["gold_quality"] + QUALITY_GAIN_DB, (first, last)
    assert last["gold_jitter"] < first["gold_jitter"], (first, last)


def test_every_preset_option_is_a_training_option():
    """A preset's recipe is data (engine/presets/NAME.yaml): each of its keys names a TrainConfig field, and it
    resolves to a configuration."""
    from dataclasses import fields

    names = {f.name for f in fields(TrainConfig)}
    for name, preset in BUILTINS.items():
        assert preset.train_options and set(preset.train_options) <= names, name
        assert resolve_config(["--model", name]).steps == preset.train_options["steps"]


SMALL = ("--num-frames", "4", "--height", "16", "--width", "16")  # the tiny preset's clips are 8 x 32 x 32


def quick(out, *extra):
    return ["--model", "tiny", "--output", str(out), "--steps", "2", "--ddim-steps", "4", "--sample-steps", "2", *SMALL,
            *extra]


def test_cpu_run_is_repeatable_with_one_seed(tmp_path):
    main(quick(tmp_path / "a", "--seed", "3"))
    main(quick(tmp_path / "b", "--seed", "3"))
    a = load_file(str(tmp_path / "a" / "lora" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "b" / "lora" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    assert any(a[k].abs().sum() > 0 for k in a if "lora_B" in k), "the run must have changed the weights"


def test_video_folder_and_prompts_sources(tmp_path):
    from tests.test_data import ramp_video

    videos = tmp_path / "clips"
    videos.mkdir()
    for name in "abc":
        ramp_video(videos / f"{name}.mp4", count=12)
    (videos / "captions.csv").write_text("video,caption\na.mp4,one\nb.mp4,two\nc.mp4,three\n")
    main(quick(tmp_path / "v", "--videos", str(videos), "--num-held-out", "1", "--grad-steps", "all"))
    (tmp_path / "p.txt").write_text("a cat\na dog\na bird\n")
    main(quick(tmp_path / "p", "--prompts", str(tmp_path / "p.txt"), "--num-held-out", "1", "--eta", "0.5",
               "--checkpoint", "none", "--no-segvr", "--no-tar"))
    for run in ("v", "p"):
        assert (tmp_path / run / "lora" / "adapter_model.safetensors").exists()
    assert (tmp_path / "p" / "samples" / "prompts.txt").read_text().strip() == "00: a bird"


def test_random_truncation_draws_k_per_step_repeatably(tmp_path, monkeypatch):
    """--grad-steps rand: each step keeps gradient through a K drawn from 1 .. the steps run, the same draws
    for the same seed."""
    from engine.chain import EditChain

    drawn = []
    denoise = EditChain.denoise

    def recording(self, *args, grad_steps=None, **kwargs):
        if torch.is_grad_enabled():
            drawn.append(grad_steps)
        return denoise(self, *args, grad_steps=grad_steps, **kwargs)

    monkeypatch.setattr(EditChain, "denoise", recording)
    runs = []
    for name in ("a", "b"):
        drawn.clear()
        main(quick(tmp_path / name, "--grad-steps", "rand", "--checkpoint", "none", "--steps", "8", "--ddim-steps", "10"))
        runs.append(list(drawn))
    assert runs[0] == runs[1] and len(runs[0]) == 8
    assert all(1 <= k <= 6 for k in runs[0]) and len(set(runs[0])) > 1  # tau 0.6 of 10 steps: 6 run


def test_yaml_config_and_flag_precedence(tmp_path):
    (tmp_path / "c.yaml").write_text("tau: 0.5\nddim_steps: 10\nlr: 0.01\nsegvr: false\n")
    config = resolve_config(["--model", "tiny", "--config", str(tmp_path / "c.yaml"), "--lr", "0.02"])
    assert (config.tau, config.ddim_steps, config.lr, config.segvr) == (0.5, 10, 0.02, False)
    assert config.num_frames == BUILTINS["tiny"].train_options["num_frames"]
    assert resolve_config(["--model", "tiny", "--grad-steps", "all"]).grad_steps_resolved == 12
    real = resolve_config(["--model", "/some/folder", "--reward", "colorfulness"])
    assert (real.num_frames, real.lr, real.batch_size) == (16, 1e-5, 2)


def test_help_gives_a_model_folders_defaults_and_each_built_in_models(capsys):
    """--help says what each option is for a model folder and, where a built-in model's preset sets another value,
    for that model: the default job's reward is the preset's (a mix), and a folder has none (it must name one)."""
    with pytest.raises(SystemExit):
        resolve_config(["--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps the help
    world, tiny = BUILTINS["world"].train_options, BUILTINS["tiny"].train_options
    assert (f"optimizer steps (world: {world['steps']}; tiny: {tiny['steps']}; a model folder: {TrainConfig.steps})") in text
    assert f"the built-in models bring their own (world: {world['reward']}; tiny: {tiny['reward']})" in text
    assert "a model folder: None" not in text and "(default: None)" not in text
    assert f"(default: {TrainConfig.ddim_steps})" in text and "TAR on (off = uniform weights) (default: on)" in text
    assert "LoRA alpha (default: the rank, i.e. scale 1) --lr" in text  # said in words: no second default


@pytest.mark.parametrize("argv, message", [
    (["--tau", "1.5"], "--tau"),
    (["--grad-steps", "21"], "--grad-steps"),  # the default job runs 20 steps (tau 1.0 of D = 20)
    (["--grad-steps", "x"], "not a number"),
    (["--grad-steps", "rand"], "needs --checkpoint blocks or none"),
    (["--segments", "9"], "--segments"),
    (["--config", "/nonexistent.yaml"], "does not exist"),
    (["--finetune", "full", "--motion-weight", "1"], "use --motion-reference source"),
    (["--finetune", "full", "--init-lora", "x"], "--init-lora needs --finetune lora"),
])
def test_bad_options_are_user_errors(argv, message):
    with pytest.raises(UserError, match=message):
        resolve_config(argv)


def test_output_holding_another_run_is_refused_and_untouched(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text("precious\n")
    result = subprocess.run([sys.executable, "-m", "engine.train", *quick(out)], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 2 and "already holds a run" in result.stderr
    assert (out / "metrics.jsonl").read_text() == "precious\n"


def test_memory_budget_below_the_least_is_refused_before_any_update(tmp_path):
    out = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "engine.train", *quick(out, "--memory-budget", "1B")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "--memory-budget 1 B is below the" in result.stderr, result.stderr[-2000:]
    assert "MiB or more" in result.stderr and "Traceback" not in result.stderr
    assert not (out / "lora").exists() and not [r for r in map(json.loads, (out / "metrics.jsonl").open())
                                                if r["kind"] == "train"]


def test_early_stopping_and_motion_penalty(tmp_path, capsys):
    out = tmp_path / "early"
    main(quick(out, "--steps", "6", "--eval-every", "1", "--early-stop-patience", "2",
               "--early-stop-min-delta", "10", "--motion-weight", "0.5"))
    assert "early stop at step 2" in capsys.readouterr().err
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2]
    assert all(r["motion_penalty"] >= 0 and "motion_reference" in r for r in train)
    assert (out / "lora" / "adapter_model.safetensors").exists()
    assert any((out / "tensorboard").iterdir())
    with pytest.raises(UserError, match="needs --eval-every"):
        resolve_config(["--early-stop-patience", "2"])


def test_backend_flag_swaps_the_kernels_in(tmp_path):
    """--backend fused accelerates the UNet (tests/test_accelerate.py checks a fused step equals the reference);
    auto on the CPU is the reference."""
    import kernels
    from engine.acceleration import _is_patched_lora
    from engine.train import Trainer

    try:
        # setup samples the held-out prompts' "before" videos: one prompt, one step (the fused kernels run
        # under Triton's interpreter here)
        small = ["--model", "tiny", *SMALL, "--num-held-out", "1", "--sample-steps", "1"]
        fused = Trainer(resolve_config([*small, "--output", str(tmp_path / "f"), "--backend", "fused"])).setup()
        assert kernels.get_backend().value == "fused"
        assert any(_is_patched_lora(m) for m in fused.model.denoiser.modules())
        auto = Trainer(resolve_config([*small, "--output", str(tmp_path / "a")])).setup()
        assert auto.backend == "reference" and kernels.get_backend().value == "reference"
        assert not any(_is_patched_lora(m) for m in auto.model.denoiser.modules())
    finally:
        kernels.set_backend("auto")


def test_held_out_evaluation_does_not_depend_on_the_eval_batch_size(tmp_path):
    """Each held-out video gets its own noise for the evaluation edits and the before/after samples, so grouping
    them differently (--eval-batch-size) changes float rounding only."""
    records = {}
    for size in (1, 3):
        out = tmp_path / f"b{size}"
        main(quick(out, "--steps", "1", "--num-held-out", "3", "--eval-batch-size", str(size)))
        records[size] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    first = [r for r in records[1] if r["kind"] == "eval"][0]
    grouped = [r for r in records[3] if r["kind"] == "eval"][0]
    assert first["eval_reward"] == pytest.approx(grouped["eval_reward"], rel=1e-4)


def test_cached_text_encoder_trains_as_the_live_one_without_calling_the_encoder(tmp_path):
    """--text-encoder cached: every prompt of the run embedded once at setup, the encoder then in host memory and
    never called again; two steps give the live run's LoRA."""
    from engine.train import Trainer

    args = ["--model", "tiny", "--steps", "2", "--num-held-out", "2", "--sample-steps", "2", "--no-tensorboard"]
    main([*args, "--output", str(tmp_path / "live")])
    trainer = Trainer(resolve_config([*args, "--text-encoder", "cached", "--output", str(tmp_path / "cached")])).setup()
    calls = []
    forward = trainer.model.text_encoder.forward
    trainer.model.text_encoder.forward = lambda *a, **k: calls.append(1) or forward(*a, **k)
    trainer.train()
    trainer.finish()
    assert calls == [] and next(trainer.model.text_encoder.parameters()).device.type == "cpu"
    assert set(trainer.model.prompt_cache) >= {""} | {s.prompt for s in trainer.train_sources + trainer.eval_sources}
    live, cached = (load_file(str(tmp_path / run / "lora" / "adapter_model.safetensors")) for run in ("live", "cached"))
    for key, value in live.items():
        torch.testing.assert_close(cached[key], value, rtol=1e-5, atol=1e-7)



def test_xformers_attention_that_cannot_run_here_says_why_and_trains_on_sdpa(tmp_path, capsys):
    """--attention xformers where xformers does not import or its ops do not load (here: not installed, no GPU):
    one line naming why, then the run as with SDPA."""
    args = ["--model", "tiny", "--steps", "1", "--num-held-out", "1", "--sample-steps", "2", "--no-tensorboard"]
    main([*args, "--attention", "xformers", "--output", str(tmp_path / "x")])
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("--attention xformers")]
    assert len(lines) == 1 and lines[0].endswith("attention runs on SDPA"), lines
    assert "fine-tuning tiny (LoRA rank 4) on colorfulness: 1 step of batch" in out  # the job, before it starts
    main([*args, "--output", str(tmp_path / "sdpa")])
    ours, stock = (load_file(str(tmp_path / run / "lora" / "adapter_model.safetensors")) for run in ("x", "sdpa"))
    assert all(torch.equal(ours[k], stock[k]) for k in stock)


def test_frozen_weights_in_bf16_under_autocast_train_a_fp32_lora(tmp_path, monkeypatch):
    """--frozen-dtype auto under bf16 autocast (the CPU's standing in for CUDA's, where it is the default): the
    frozen denoiser and text encoder are held in bf16, the VAE in fp32, LoRA in fp32, and a run trains it."""
    import engine.runtime
    import engine.train.recipe

    bf16 = lambda precision, device: torch.bfloat16  # noqa: E731
    monkeypatch.setattr(engine.runtime, "autocast_dtype", bf16)
    monkeypatch.setattr(engine.train.recipe, "autocast_dtype", bf16)
    trainer = Trainer(resolve_config(quick(tmp_path / "run"))).setup()
    model = trainer.model
    assert {p.dtype for n, p in model.denoiser.named_parameters() if "lora_" not in n} == {torch.bfloat16}
    assert {p.dtype for p in model.text_encoder.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in model.vae.parameters()} == {torch.float32}
    assert trainer.trainable and {p.dtype for p in trainer.trainable} == {torch.float32}
    trainer.train().finish()
    lora = load_file(str(tmp_path / "run" / "lora" / "adapter_model.safetensors"))
    assert lora and all(t.dtype == torch.float32 and t.isfinite().all() for t in lora.values())
    assert any(t.abs().sum() > 0 for k, t in lora.items() if "lora_B" in k), "the run must have changed the LoRA"
