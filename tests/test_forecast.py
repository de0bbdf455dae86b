"""``--dry-run`` (engine.train.forecast): the step counted on the meta device, from a folder's configs alone, against
the same step run for real on the CPU (bytes saved for backward within 5%, FLOPs equal); the command line prints the
forecast and writes nothing."""

from __future__ import annotations

import dataclasses
import json
import shutil
from contextlib import nullcontext

import pytest
import torch

from engine.config import resolve_config
from engine.errors import UserError
from engine.counting import FlopCount
from engine.memory import SavedTensorMeter
from engine.models import tiny_model
from engine.train import Trainer
from engine.train.forecast import forecast

SMALL = ["--reward", "colorfulness", "--ddim-steps", "4", "--num-frames", "9", "--height", "32", "--width", "32",
         "--segments", "2", "--grad-steps", "2", "--batch-size", "1", "--device", "cpu", "--sample-steps", "2",
         "--num-held-out", "1"]


@pytest.fixture(scope="module", params=["unet3d", "wan", "cogvideox"])
def folders(request, tmp_path_factory):
    """(the saved tiny model, the same folder with its weight files removed)."""
    folder = tmp_path_factory.mktemp(request.param)
    tiny_model(seed=0, family=request.param).save(folder / "model")
    shutil.copytree(folder / "model", folder / "configs",
                    ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    return request.param, folder / "model", folder / "configs"


def real_step(config) -> tuple[int, float]:
    """(bytes saved for backward, FLOPs) of a real CPU step of the run's code, after one step the planner measures
    on; the SegVR draws start from the run's seed, as the forecast's do."""
    trainer = Trainer(config).setup()
    trainer.frame_generator.generator.manual_seed(config.seed + 2)
    latents = torch.randn(config.batch_size, *trainer.latent_shape)
    prompts = ["a red ball moving left"] * config.batch_size
    context = trainer.model.encode_prompts(prompts)

    def step(saving=nullcontext()):
        with saving:
            loss, _ = trainer.loss_step(latents, prompts, context)
        loss.backward()

    step()
    trainer.optimizer.zero_grad(set_to_none=True)
    model = trainer.model
    saved = SavedTensorMeter(model.denoiser, model.vae, model.text_encoder, trainer.reward.reward)
    with FlopCount(reuse=False) as flops:  # FlopCounterMode's formulas, without its module hooks
        step(saved)
    return saved.bytes, flops.total


@pytest.mark.parametrize("options", [("--checkpoint", "plan"), ("--checkpoint", "blocks"), ("--decode-recompute",)],
                         ids=["plan", "blocks", "decode-recompute"])
def test_forecast_matches_a_real_cpu_step(folders, options, tmp_path):
    """From the configs alone (no weight file in the folder) the forecast's bytes saved for backward are within 5%
    of what the real step saves and its FLOPs are the real step's; with nothing recomputed the FLOPs are fewer or
    equal; the weights are counted at the bytes the real model holds."""
    family, model, configs = folders
    if "--decode-recompute" in options and family == "unet3d":
        pytest.skip("a per-frame VAE has no decoder recompute")
    config = resolve_config(["--model", str(configs), *options, "--output", str(tmp_path / "f"), *SMALL])
    predicted = forecast(config)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red ball moving left\na blue cube moving up\n")
    saved, flops = real_step(dataclasses.replace(config, model=str(model), output=str(tmp_path / "run"),
                                                 prompts=str(prompts)))
    assert saved > 0
    assert abs(predicted.saved_bytes - saved) <= 0.05 * saved, (predicted.saved_bytes, saved)
    assert predicted.tflop * 1e12 == pytest.approx(flops, rel=1e-6)
    assert predicted.tflop_without_recompute <= predicted.tflop
    real = tiny_model(seed=0, family=family)
    assert predicted.weights["denoiser"] == sum(p.numel() * 4 for p in real.denoiser.parameters()) + \
        sum(b.numel() * b.element_size() for b in real.denoiser.buffers())
    assert not (tmp_path / "f").exists()


def test_dry_run_prints_the_forecast_and_writes_nothing(tmp_path, capsys):
    from engine.train.command import main

    out = tmp_path / "run"
    summary = main(["--model", "tiny", "--dry-run", "--output", str(out), "--steps", "1", "--device", "cpu"])
    printed = capsys.readouterr().out
    assert "device peak" in printed and "TFLOP per step" in printed
    assert summary["device_peak_gb"] > 0 and summary["tflops"] > 0
    assert not out.exists()
    json.dumps(summary)


def test_the_default_jobs_forecast_with_its_video_level_reward_matches_a_real_step(tmp_path):
    """The default job (the world preset: the image reward mixed with the motion reward, a video-level reward whose
    forward reads its fitted flag; a 4-step chain here) is forecast on the meta device, and its bytes saved for
    backward and FLOPs are the real step's."""
    from engine.rewards.motion import MotionReward
    from engine.rewards.registry import reward_architecture

    config = resolve_config(["--output", str(tmp_path / "f"), "--device", "cpu", "--ddim-steps", "4"])
    assert "motion:world" in config.reward
    motion = [m for m in reward_architecture(config.reward).modules() if isinstance(m, MotionReward)]
    assert len(motion) == 1 and motion[0].velocity.weight.is_meta and bool(motion[0].has_reference)  # its cap kept
    predicted = forecast(config)
    saved, flops = real_step(dataclasses.replace(config, output=str(tmp_path / "run")))
    assert abs(predicted.saved_bytes - saved) <= 0.05 * saved, (predicted.saved_bytes, saved)
    assert predicted.tflop * 1e12 == pytest.approx(flops, rel=1e-6)


def test_a_dry_run_that_cannot_count_videoalign_says_so_in_one_line(tmp_path, capsys):
    """Qwen2-VL cannot run on the meta device: the dry run names that and where VideoAlign's cost is, before it
    reads any weights, and writes nothing."""
    from engine.train.command import main

    with pytest.raises(SystemExit) as exit_:
        main(["--dry-run", "--reward", f"hpsv2:world,videoalign:{tmp_path / 'absent'}@0.5",
              "--output", str(tmp_path / "run")])
    assert exit_.value.code == 2
    assert "--dry-run cannot count the videoalign reward" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_dry_run_world_size_must_divide_the_batch(capsys):
    from engine.train.command import main

    with pytest.raises(SystemExit) as exit_:
        main(["--model", "tiny", "--dry-run", "--world-size", "3", "--batch-size", "2"])
    assert exit_.value.code == 2
    assert "--world-size 3" in capsys.readouterr().err


def test_counting_what_is_saved_changes_no_peak(tmp_path, monkeypatch):
    """The meter of bytes saved for backward holds what it counts until it exits: it counts the forward only, so
    the step's peak is the same with it and without it (held through backward it raised tiny Wan's by 8%)."""
    from engine.train import forecast as module

    class NoMeter:
        bytes = 0

        def __init__(self, *modules):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            pass

    config = resolve_config(["--model", str(tiny_model(seed=0, family="wan").save(tmp_path / "wan")), *SMALL])
    metered = forecast(config)
    monkeypatch.setattr(module, "SavedTensorMeter", NoMeter)
    assert metered.saved_bytes > 0 and forecast(config).step_peak == metered.step_peak


def test_context_parallel_forecast_splits_the_tokens(tmp_path):
    """--context-parallel: one of 2 processes splitting each clip's tokens (a fake process group) keeps less for
    backward than one process with the whole clip, with the same batch; CogVideoX, which has no plan, is refused."""
    from engine.errors import UserError

    folders = {}
    for family in ("wan", "cogvideox"):
        folders[family] = tiny_model(seed=0, family=family).save(tmp_path / family)
    args = ["--checkpoint", "none", *SMALL, "--batch-size", "2"]
    whole = forecast(resolve_config(["--model", str(folders["wan"]), *args]))
    split = forecast(resolve_config(["--model", str(folders["wan"]), *args, "--context-parallel"]), world_size=2)
    assert split.batch_per_process == whole.batch_per_process == 2
    assert 0 < split.saved_bytes < whole.saved_bytes
    with pytest.raises(UserError, match="needs --world-size N"):
        forecast(resolve_config(["--model", str(folders["wan"]), *args, "--context-parallel"]))
    with pytest.raises(UserError, match="no context-parallel plan"):
        forecast(resolve_config(["--model", str(folders["cogvideox"]), *args, "--context-parallel"]), world_size=2)


def test_cached_text_encoder_leaves_the_device(tmp_path):
    """--text-encoder cached: the forecast counts no text encoder weights on the device."""
    folder = tiny_model(seed=0, family="wan").save(tmp_path / "wan")
    live = forecast(resolve_config(["--model", str(folder), *SMALL]))
    cached = forecast(resolve_config(["--model", str(folder), *SMALL, "--text-encoder", "cached"]))
    assert live.weights["text encoder"] > 0 == cached.weights["text encoder"]
    assert cached.device_peak == live.device_peak - live.weights["text encoder"]


def test_live_bytes_counts_what_ops_allocate_not_views_of_weights():
    """A linear layer on the meta device: its output is new memory, the transpose of its weight that the layer
    takes is a view of a weight that was there before, and nothing is left alive after the block."""
    from engine.counting import LiveBytes

    layer = torch.nn.Linear(256, 512, device="meta")
    x = torch.empty(8, 256, device="meta")
    with LiveBytes("meta") as live:
        y = layer(x)
        assert live.live == y.numel() * 4
    assert live.peak == 8 * 512 * 4
    del y
    assert live.live == 0


def test_frozen_weights_are_counted_in_the_dtype_the_run_holds_them(tmp_path):
    """On CUDA (bf16 autocast) the frozen denoiser, text encoder and reward are held in bf16, half their fp32
    bytes; the VAE stays fp32 and LoRA is fp32 either way. On the CPU bf16 weights are refused."""
    folder = tiny_model(seed=0, family="wan").save(tmp_path / "wan")
    on_cuda = [*SMALL, "--device", "cuda"]
    held = forecast(resolve_config(["--model", str(folder), *on_cuda])).weights
    full = forecast(resolve_config(["--model", str(folder), *on_cuda, "--frozen-dtype", "fp32"])).weights
    for part in ("denoiser", "text encoder"):
        assert held[part] * 2 == full[part] > 0
    assert held["vae"] == full["vae"] and held["LoRA"] == full["LoRA"] > 0
    with pytest.raises(UserError, match="--frozen-dtype bf16 needs the step under autocast"):
        forecast(resolve_config(["--model", str(folder), *SMALL, "--frozen-dtype", "bf16"]))


def test_a_flop_count_is_the_same_with_the_kernels_on_or_off_and_gives_the_backend_back():
    """Here the kernels run (the interpreter), as on CUDA. A Triton launch is invisible to the dispatcher and the
    fused CFG+DDIM step saves no tensors, so the official recipe's checkpointed step counted with them on came out
    one convolution (2.4 MFLOP) short: FlopCount runs the reference path whatever the backend, and restores it."""
    from bench.recipes import BY_KEY, Step
    from engine.rewards import ColorfulnessReward
    from kernels.dispatch import Backend, get_backend, use_backend

    def count(backend: str) -> int:
        torch.manual_seed(0)
        step = Step(tiny_model(), ColorfulnessReward(), BY_KEY["official"], (4, 4, 8, 8), (77, 32), batch=2)
        with use_backend(backend):
            with FlopCount() as counter:
                step("cpu")
            assert get_backend() is Backend(backend)
        return counter.total

    assert count("fused") == count("reference") > 0
    with use_backend("fused"), pytest.raises(RuntimeError):
        with FlopCount():
            assert get_backend() is Backend.REFERENCE
            raise RuntimeError
    assert get_backend() is Backend.AUTO
