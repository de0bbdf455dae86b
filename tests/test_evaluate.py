"""engine.evaluate: Table-1 style scoring of the base model and LoRA checkpoints on prompt sets."""

import json

import pytest
import torch

from engine.builtin import BUILTINS
from engine.evaluate import main, markdown_table, parse_checkpoints
from engine.lora import add_lora
from engine.rewards import ColorfulnessReward
from engine.chain import generate
from engine.video_reward import SegmentalReward

QUICK = ["--model", "tiny", "--ddim-steps", "2", "--num-frames", "4", "--height", "16", "--width", "16", "--segments", "2"]


def test_evaluate_scores_sets_for_base_and_checkpoints(tmp_path, lora_folder, _tiny_model_session):
    (tmp_path / "a.txt").write_text("a red ball bouncing on a lawn\na cat\n")
    (tmp_path / "b.txt").write_text("a city at night\n")
    out = tmp_path / "eval"
    report = main(["--lora", f"mine={lora_folder}", "--prompt-set", f"animals={tmp_path / 'a.txt'}",
                   "--prompt-set", f"other={tmp_path / 'b.txt'}", "--samples-per-prompt", "2", "--batch-size", "3",
                   "--output", str(out), *QUICK])
    assert list(report["results"]) == ["base", "mine"]
    base = report["videos"]["base"]
    assert [v["set"] for v in base] == ["animals"] * 4 + ["other"] * 2
    assert [v["seed"] for v in base] == [v["seed"] for v in report["videos"]["mine"]] == list(range(6))

    # the base model's score of video 1 (prompt "a red ball...", second sample), recomputed by hand:
    # noise seed 1, full chain, SegVR evaluation frames 0 and 2 (first of each segment), no TAR -> plain mean
    model = _tiny_model_session
    latents = generate(model, ["a red ball bouncing on a lawn"], [1], (4, 16, 16), ddim_steps=2, guidance=3.0)
    frames = model.decode_latents(latents[0].transpose(0, 1)[[0, 2]])
    expected = ColorfulnessReward()(frames, ["x", "x"]).mean().item()
    assert base[1]["reward"] == pytest.approx(expected, rel=1e-4)
    scores = torch.tensor([v["reward"] for v in base[:4]], dtype=torch.float64)
    assert report["results"]["base"]["animals"]["mean"] == pytest.approx(scores.mean().item())
    assert report["results"]["base"]["animals"]["std"] == pytest.approx(scores.std(unbiased=False).item())
    assert report["results"]["mine"]["other"]["n"] == 2
    assert report["results"]["mine"] != report["results"]["base"]  # the checkpoint changes the videos

    table = (out / "results.md").read_text().splitlines()
    assert table[0] == "| model (colorfulness) | animals | other |"
    assert table[2].startswith("| base | ") and table[3].startswith("| mine | ") and " ± " in table[2]
    assert json.loads((out / "results.json").read_text())["settings"]["frames_scored"].startswith("first")
    assert (out / "results.png").stat().st_size > 1000


def test_tiny_defaults_scale_zero_equals_base_and_tar_option(tmp_path, lora_folder):
    report = main(["--lora", str(lora_folder), "--lora-scale", "0", "--tar", "--batch-size", "4",
                   "--output", str(tmp_path), *QUICK])
    assert set(report["prompt_sets"]) == set(BUILTINS["tiny"].prompt_sets())
    label = list(report["results"])[1]
    assert label.endswith("/lora")  # named after the run folder that holds lora/
    assert report["results"][label] == report["results"]["base"]  # same noise for every model: paired
    assert report["settings"]["tar"] is True


def test_several_lora_strengths_are_scored_as_rows(tmp_path, lora_folder):
    report = main(["--lora", f"mine={lora_folder}", "--lora-scale", "0,1", "--batch-size", "4", "--output",
                   str(tmp_path), *QUICK])
    assert list(report["results"]) == ["base", "mine @0", "mine @1"]
    assert report["results"]["mine @0"] == report["results"]["base"] != report["results"]["mine @1"]
    assert report["settings"]["lora_scale"] == [0.0, 1.0]


def test_the_world_models_gold_metrics_are_reported_per_lora_strength(tmp_path):
    """On the world model each strength of a checkpoint gets its row of gold metrics (jitter among them), from the
    same noise as the base model's: strength 0 is the base model, metric for metric."""
    from engine.builtin import build_model
    from engine.lora import save_lora

    unet = build_model("world").denoiser
    add_lora(unet, rank=4)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    folder = save_lora(unet, tmp_path / "run" / "lora", rank=4, alpha=None)
    captions = list(BUILTINS["world"].clips())[:2]
    (tmp_path / "set.txt").write_text("\n".join(captions) + "\n")
    report = main(["--model", "world", "--lora", f"tuned={folder}", "--lora-scale", "0,1", "--ddim-steps", "4",
                   "--prompt-set", f"two={tmp_path / 'set.txt'}", "--output", str(tmp_path / "eval")])
    gold = report["gold"]
    assert list(gold) == ["base", "tuned @0", "tuned @1"]
    assert gold["tuned @0"] == gold["base"] != gold["tuned @1"]
    assert {"quality", "jitter", "direction_acc"} <= set(gold["base"]["two"])
    text = (tmp_path / "eval" / "results.md").read_text()
    assert "jitter (px)" in text and "| tuned @1 |" in text


def test_segmental_reward_eval_mode_with_tar_matches_training_weights(tiny):
    """--tar uses exactly the trainer's SegmentalReward (TAR weights) in evaluation mode."""
    latents = torch.randn(1, 4, 4, 8, 8)
    scorer = SegmentalReward(ColorfulnessReward(), segments=2, tar_lambda=1.0, tar=True)
    video, frame_scores = scorer(tiny, latents, ["x"], train=False)
    weights = torch.exp(-torch.tensor([2.0, 0.0]))  # frames 0 and 2, centre F//2 = 2
    assert torch.allclose(video, (weights * frame_scores).mean(1))


def test_checkpoint_labels(tmp_path, lora_folder):
    labels = [l for l, _ in parse_checkpoints([str(lora_folder), f"base={lora_folder}", str(lora_folder)])]
    assert labels[0].endswith("/lora") and labels[1] == "base#2" and labels[2] == f"{labels[0]}#3"
    assert markdown_table({"m": {"s": {"mean": 0.25, "std": 0.01}}}, ["s"], "hpsv2").splitlines()[2] == \
        "| m | 0.2500 ± 0.0100 |"


@pytest.mark.parametrize("extra, message", [
    (["--prompt-set", "nofile"], "must be NAME=FILE"),
    (["--prompt-set", "a=/nonexistent.txt"], "does not exist"),
    (["--lora", "/nonexistent"], "does not exist"),
    (["--segments", "5"], "must not exceed --num-frames"),
    (["--reward", "nope"], "unknown reward"),
    (["--reward", "hpsv2:/nonexistent.pt"], "does not exist"),
])
def test_evaluate_bad_options_exit_2(tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["--output", str(tmp_path), *QUICK, *extra])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err


def test_real_model_needs_prompt_sets_and_reward(tmp_path, capsys, _tiny_model_session):
    folder = _tiny_model_session.save(tmp_path / "model")
    (tmp_path / "p.txt").write_text("a cat\n")
    for extra, message in [([], "--prompt-set"), (["--prompt-set", f"s={tmp_path / 'p.txt'}"], "pass --reward")]:
        with pytest.raises(SystemExit):
            main(["--model", str(folder), "--output", str(tmp_path / "o"), *extra])
        assert message in capsys.readouterr().err


# ---------------------------------------------------------------------------------- reward-hacking guards
# (engine/regularize.py: early stopping on the held-out reward and the motion-preservation penalty)
from engine.regularize import EarlyStopping, base_model_edit, motion_magnitude, motion_penalty  # noqa: E402


def test_early_stopping_patience_min_delta_and_resume():
    stopper = EarlyStopping(patience=2, min_delta=0.01)
    decisions = [stopper.update(v, step) for step, v in enumerate([0.10, 0.20, 0.205, float("nan"), 0.30, 0.29, 0.305])]
    assert [d.stop for d in decisions] == [False, False, False, True, False, False, True]
    assert [d.best for d in decisions][-1] == 0.30 and stopper.best_step == 4 and not stopper.improved
    resumed = EarlyStopping(patience=2, min_delta=0.01)
    resumed.load_state_dict(stopper.state_dict())
    assert resumed.update(0.5).stop is False and resumed.improved and resumed.best == 0.5
    assert not any(EarlyStopping(patience=0).update(v).stop for v in [1.0, 0.5, 0.4, 0.3])
    loss = EarlyStopping(patience=1, mode="min")
    assert [loss.update(v).stop for v in [1.0, 0.5, 0.6]] == [False, False, True]
    with pytest.raises(ValueError):
        EarlyStopping(patience=-1)


def test_motion_penalty_ignores_static_changes_and_punishes_frozen_video():
    reference = torch.randn(2, 4, 6, 3, 3)
    assert torch.equal(motion_penalty(reference, reference), torch.zeros(2))
    restyled = reference + torch.randn(2, 4, 1, 3, 3)  # the same change in every frame: no motion change
    assert motion_penalty(restyled, reference).abs().max() < 1e-10
    frozen = reference[:, :, :1].expand_as(reference).clone().requires_grad_(True)
    penalty = motion_penalty(frozen, reference)
    diffs = reference[:, :, 1:] - reference[:, :, :-1]
    assert torch.allclose(penalty, diffs.pow(2).flatten(1).mean(1))
    penalty.sum().backward()
    assert frozen.grad.abs().sum() > 0
    assert torch.equal(motion_magnitude(frozen), torch.zeros(2)) and (motion_magnitude(reference) > 0).all()
    assert motion_penalty(reference[:, :, :1], reference[:, :, :1]).shape == (2,)


def test_base_model_edit_uses_the_noise_of_the_next_edit(tiny):
    from engine.chain import EditChain
    from engine.lora import adapters_disabled

    add_lora(tiny.denoiser, rank=4)
    with torch.no_grad():
        for name, p in tiny.denoiser.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    chain = EditChain(tiny, ddim_steps=4, tau=0.5, guidance=2.0)
    latents, context = torch.randn(1, 4, 4, 8, 8), tiny.encode_prompts(["a cat"])
    uncond = tiny.encode_prompts([""])
    generator = torch.Generator().manual_seed(3)
    reference = base_model_edit(chain, latents, context, uncond, generator)
    edited = chain.edit(latents, context, uncond, generator)
    with torch.no_grad(), adapters_disabled(tiny.denoiser):
        expected_reference = chain.edit(latents, context, uncond, torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected_edit = chain.edit(latents, context, uncond, torch.Generator().manual_seed(3))
    assert torch.equal(reference, expected_reference) and torch.equal(edited, expected_edit)
    assert not torch.equal(reference, edited) and not reference.requires_grad


@pytest.mark.parametrize("command", ["engine.evaluate", "engine.sample", "engine.export"])
def test_help_shows_defaults_there_are(command, capsys):
    """--help gives each option's default after its help, but no "(default: None)" or a flag's "(default: False)",
    and no second default after one the help says in words; a zero default is still shown."""
    import importlib

    with pytest.raises(SystemExit):
        importlib.import_module(command).main(["--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps the help
    assert "(default: None)" not in text and "(default: False)" not in text and "(default: world)" in text
    assert "colorfulness for tiny) (default:" not in text and "both forms) (default:" not in text
    if command == "engine.evaluate":
        assert "DDIM eta (0 = deterministic) (default: 0.0)" in text
