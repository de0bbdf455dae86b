"""engine.sample: generation equals the engine's chain, LoRA loading and scale, the CLI's files and errors."""

import copy
import json
import subprocess
import sys

import pytest
import torch

from engine.chain import EditChain
from engine.chain import generate, initial_noise
from engine.cli import slug
from engine.lora import add_lora, load_lora, lora_layers, set_lora_scale
from engine.sample import main

SIZE = (4, 16, 16)  # frames, height, width (latents 4x4x8x8 with the tiny VAE)


def test_generate_is_the_chains_full_sampler(tiny):
    """Same seed, same noise, same CFG + DDIM steps as EditChain.sample (used for the trainer's samples)."""
    context, uncond = tiny.encode_prompts(["a cat"]), tiny.encode_prompts([""])
    chain = EditChain(tiny, ddim_steps=3, guidance=3.0)
    expected = chain.sample((1, 4, 4, 8, 8), context, uncond, torch.Generator().manual_seed(7))
    assert torch.equal(generate(tiny, ["a cat"], [7], SIZE, ddim_steps=3, guidance=3.0), expected)
    assert torch.equal(initial_noise((4, 4, 8, 8), 7), torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(7)))


def test_generate_does_not_depend_on_batching(tiny):
    prompts = ["a cat", "a dog on a beach"]
    batched = generate(tiny, prompts, [3, 4], SIZE, ddim_steps=2)
    single = torch.cat([generate(tiny, [p], [s], SIZE, ddim_steps=2) for p, s in zip(prompts, [3, 4])])
    assert torch.allclose(batched, single, atol=1e-5)


def test_load_lora_injected_matches_in_place_and_scales(tiny, lora_folder):
    """Injected from the folder's config (sample, evaluate, export: frozen) equals loaded into the adapter that
    add_lora made (--init-lora: stays trainable); the scale multiplies each layer's delta."""
    reference = copy.deepcopy(tiny.denoiser)
    add_lora(reference, rank=4)
    load_lora(reference, lora_folder)
    assert any(p.requires_grad for p in reference.parameters())
    load_lora(tiny.denoiser, lora_folder)
    assert all(not p.requires_grad for p in tiny.denoiser.parameters())
    x, context = torch.randn(1, 4, 4, 8, 8), torch.randn(1, 77, 32)
    run = lambda unet: unet(x, 400, encoder_hidden_states=context).sample
    with torch.no_grad():
        assert torch.equal(run(tiny.denoiser), run(reference))
        set_lora_scale(tiny.denoiser, 0.0)
        base = copy.deepcopy(tiny.denoiser)
        for layer in lora_layers(base):
            layer.enable_adapters(False)
        assert torch.equal(run(tiny.denoiser), run(base))
    # each layer: base(x) + s * delta(x)
    set_lora_scale(tiny.denoiser, 0.5)
    layer = lora_layers(tiny.denoiser)[0]
    h = torch.randn(3, layer.in_features)
    with torch.no_grad():
        half = layer(h) - layer.get_base_layer()(h)
        set_lora_scale(tiny.denoiser, 1.0)
        full = layer(h) - layer.get_base_layer()(h)
    assert torch.allclose(half, 0.5 * full, atol=1e-6) and full.abs().max() > 0


def test_sample_cli_writes_videos_grids_and_manifest(tmp_path, lora_folder):
    import av
    from PIL import Image

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red ball bouncing\n\n")
    out = tmp_path / "samples"
    summary = main(["--model", "tiny", "--prompts", str(prompts), "--prompt", "a blue car!", "--lora", str(lora_folder),
                    "--lora-scale", "0.5", "--ddim-steps", "2", "--num-frames", "4", "--height", "16", "--width", "16",
                    "--batch-size", "2", "--output", str(out)])
    assert [v["prompt"] for v in summary["videos"]] == ["a blue car!", "a red ball bouncing"]  # --prompt first
    assert [v["seed"] for v in summary["videos"]] == [0, 1]
    for stem in ("000_a_blue_car", "001_a_red_ball_bouncing"):
        with Image.open(out / f"{stem}.gif") as gif:
            assert gif.n_frames == 4
        with av.open(str(out / f"{stem}.mp4")) as container:
            assert sum(1 for _ in container.decode(video=0)) == 4
        with Image.open(out / f"{stem}.png") as grid:
            assert grid.width == 4 * grid.height  # one row of 4 frames
    saved = json.loads((out / "samples.json").read_text())
    assert saved["lora_scale"] == [0.5] and saved["num_frames"] == 4


def test_sample_several_lora_strengths_from_the_same_noise(tmp_path, lora_folder):
    """--lora-scale 0,1: a video per strength from the same noise (strength 0 is the base model's video) and
    one grid with a labelled row per strength."""
    from PIL import Image

    quick = ["--model", "tiny", "--prompt", "a red ball", "--ddim-steps", "2", "--num-frames", "4", "--height", "16",
             "--width", "16"]
    main([*quick, "--lora", str(lora_folder), "--lora-scale", "0,1", "--output", str(tmp_path / "scales")])
    main([*quick, "--output", str(tmp_path / "base")])
    stem = "000_a_red_ball"
    scaled = {name: (tmp_path / "scales" / f"{stem}_{name}.gif").read_bytes() for name in ("scale0", "scale1")}
    assert scaled["scale0"] == (tmp_path / "base" / f"{stem}.gif").read_bytes() != scaled["scale1"]
    with Image.open(tmp_path / "scales" / f"{stem}.png") as grid, Image.open(tmp_path / "base" / f"{stem}.png") as one:
        assert grid.height == 2 * one.height and grid.width > one.width  # two rows and the label band
    assert json.loads((tmp_path / "scales" / "samples.json").read_text())["lora_scale"] == [0.0, 1.0]


def test_slug():
    assert slug("A Cat, on a MAT!") == "a_cat_on_a_mat"
    assert slug("!!!") == "prompt"


@pytest.mark.parametrize("extra, message", [
    ([], "no prompts"),
    (["--prompt", "x", "--prompts", "/nonexistent.txt"], "does not exist"),
    (["--prompt", "x", "--lora", "/nonexistent"], "LoRA folder /nonexistent does not exist"),
    (["--prompt", "x", "--height", "12"], "multiples of 8"),
    (["--prompt", "x", "--guidance", "0.5"], "at least 1"),
    (["--prompt", "x", "--model", "/nonexistent"], "not a folder"),
    (["--prompt", "x", "--device", "cuda:0"] if not torch.cuda.is_available() else ["--prompt", "x", "--device", "tpu"],
     "CUDA" if not torch.cuda.is_available() else "not a device"),
    (["--prompt", "x", "--fps", "0"], "must be positive"),
    (["--prompt", "x", "--lora-scale", "1,x"], "not a number"),
    (["--prompt", "x", "--lora-scale", "0.5,0.5"], "distinct"),
    (["--prompt", "x", "--lora-scale", "0,1"], "needs --lora"),
])
def test_sample_bad_options_exit_2_with_one_line(tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["--output", str(tmp_path / "o"), *extra])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err


def test_sample_rejects_output_file_and_broken_lora(tmp_path, capsys, lora_folder):
    import shutil

    (tmp_path / "file").write_text("x")
    broken = tmp_path / "broken"
    shutil.copytree(lora_folder, broken)
    (broken / "adapter_config.json").write_text("{not json")
    for argv, message in [(["--output", str(tmp_path / "file")], "is a file"),
                          (["--output", str(tmp_path / "o"), "--lora", str(broken), "--ddim-steps", "1"],
                           "not a peft LoRA config")]:
        with pytest.raises(SystemExit) as exit_info:
            main(["--model", "tiny", "--prompt", "x", *argv])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("module, argv", [
    ("engine.sample", ["--output", "o"]),
    ("engine.evaluate", ["--output", "o", "--prompt-set", "nonsense"]),
    ("engine.export", ["--lora", "/nonexistent", "--output", "o"]),
])
def test_commands_exit_2_from_the_shell(tmp_path, module, argv):
    result = subprocess.run([sys.executable, "-m", module, *argv], cwd=tmp_path, capture_output=True, text=True,
                            env={**__import__("os").environ, "PYTHONPATH": str(__import__("pathlib").Path(__file__).parents[1])})
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
