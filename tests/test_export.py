"""engine.export: the stock TextToVideoSDPipeline with the merged UNet, and with the peft adapter applied by the
README's calls, gives the frames the engine's own sampler gives with the LoRA."""

import json

import pytest
import torch

from engine.errors import UserError
from engine.export import main, merge_lora
from engine.lora import add_lora, load_lora, lora_layers, save_lora
from engine.chain import generate, initial_noise

SIZE = (4, 16, 16)  # frames, height, width: latents 4x4x8x8 with the tiny VAE (factor 2)
STEPS, GUIDANCE, SEED, PROMPT = 3, 3.0, 5, "a red ball bouncing on a lawn"


@pytest.fixture(scope="module")
def exported(tmp_path_factory, _tiny_model_session):
    """A saved base pipeline, a LoRA with large random weights (so it visibly changes the video), its export."""
    import copy

    root = tmp_path_factory.mktemp("export")
    _tiny_model_session.save(root / "base")
    model = copy.deepcopy(_tiny_model_session)
    add_lora(model.denoiser, rank=4)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.denoiser.named_parameters():
            if "lora_" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=generator))
    save_lora(model.denoiser, root / "lora", rank=4, alpha=None)
    written = main(["--model", str(root / "base"), "--lora", str(root / "lora"), "--output", str(root / "out")])
    assert set(written) == {"merged", "peft"}
    return root


def stock_frames(pipe, output_type="pt"):
    """The stock pipeline from the engine's starting noise (same x_T), returning [F, 3, H, W] or latents."""
    c, f, h, w = 4, SIZE[0], SIZE[1] // 2, SIZE[2] // 2
    out = pipe(PROMPT, num_inference_steps=STEPS, guidance_scale=GUIDANCE, num_frames=SIZE[0], height=SIZE[1],
               width=SIZE[2], latents=initial_noise((c, f, h, w), SEED)[None], output_type=output_type).frames
    return out[0]


@pytest.fixture(scope="module")
def engine_result(exported):
    from engine.models import load_model

    model = load_model(exported / "base")
    load_lora(model.denoiser, exported / "lora")
    latents = generate(model, [PROMPT], [SEED], SIZE, STEPS, GUIDANCE)
    return latents[0], model.decode_video(latents[0])


def test_merged_export_loads_in_stock_diffusers_and_matches_engine(exported, engine_result):
    from diffusers import TextToVideoSDPipeline, UNet3DConditionModel

    unet = UNet3DConditionModel.from_pretrained(str(exported / "out" / "merged" / "unet"))
    assert not lora_layers(unet) and not any("lora" in k for k in unet.state_dict())
    pipe = TextToVideoSDPipeline.from_pretrained(str(exported / "out" / "merged"))
    latents, frames = engine_result
    stock_latents = stock_frames(pipe, "latent")
    # W + s B A rounds differently from W x + s B (A x): float32 rounding only (measured ~5e-7 relative)
    assert (stock_latents - latents).abs().max() <= 1e-5 * latents.abs().max()
    stock = stock_frames(pipe)
    assert stock.shape == frames.shape
    assert (stock - frames).abs().max() < 1e-4
    base = stock_frames(TextToVideoSDPipeline.from_pretrained(str(exported / "base")))
    assert (base - frames).abs().max() > 1e-2  # the LoRA changes the video: the equalities above mean something


def test_peft_export_with_readme_calls_matches_engine(exported, engine_result):
    from diffusers import TextToVideoSDPipeline
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    folder = exported / "out" / "peft"
    readme = (folder / "README.md").read_text()
    for call in ("LoraConfig.from_pretrained", "inject_adapter_in_model(config, pipe.unet)",
                 "set_peft_model_state_dict(pipe.unet, load_file("):
        assert call in readme
    pipe = TextToVideoSDPipeline.from_pretrained(str(exported / "base"))
    config = LoraConfig.from_pretrained(str(folder))
    inject_adapter_in_model(config, pipe.unet)
    set_peft_model_state_dict(pipe.unet, load_file(str(folder / "adapter_model.safetensors")))
    latents, frames = engine_result
    # the same unmerged arithmetic as the engine: equal up to the VAE's batching of frames
    assert torch.allclose(stock_frames(pipe, "latent"), latents, atol=1e-6, rtol=0)
    assert torch.allclose(stock_frames(pipe), frames, atol=1e-5, rtol=0)


def test_lora_scale_is_baked_into_both_forms(tmp_path, exported, _tiny_model_session):
    import copy

    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from safetensors.torch import load_file
    from diffusers import UNet3DConditionModel

    main(["--model", str(exported / "base"), "--lora", str(exported / "lora"), "--output", str(tmp_path),
          "--lora-scale", "0.5"])
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["lora_alpha"] == 2.0
    reference = copy.deepcopy(_tiny_model_session.denoiser)
    load_lora(reference, exported / "lora", scale=0.5)
    peft_unet = copy.deepcopy(_tiny_model_session.denoiser)
    inject_adapter_in_model(LoraConfig.from_pretrained(str(tmp_path / "peft")), peft_unet)
    set_peft_model_state_dict(peft_unet, load_file(str(tmp_path / "peft" / "adapter_model.safetensors")))
    merged = UNet3DConditionModel.from_pretrained(str(tmp_path / "merged" / "unet"))
    x, context = torch.randn(1, 4, 4, 8, 8), torch.randn(1, 77, 32)
    with torch.no_grad():
        expected = reference(x, 500, encoder_hidden_states=context).sample
        assert torch.equal(peft_unet(x, 500, encoder_hidden_states=context).sample, expected)
        assert torch.allclose(merged(x, 500, encoder_hidden_states=context).sample, expected, atol=1e-5)


def test_merge_lora_removes_every_wrapper(_tiny_model_session):
    import copy

    unet = copy.deepcopy(_tiny_model_session.denoiser)
    add_lora(unet, rank=2)
    count = len(lora_layers(unet))
    assert merge_lora(unet) == count > 0 and not lora_layers(unet) and not hasattr(unet, "peft_config")
    assert type(unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q) is torch.nn.Linear


def test_export_bad_inputs_exit_2(tmp_path, exported, capsys):
    (tmp_path / "file").write_text("x")
    (tmp_path / "out" / "peft").mkdir(parents=True)
    cases = [
        (["--lora", str(tmp_path / "missing"), "--output", str(tmp_path / "o")], "does not exist"),
        (["--lora", str(tmp_path), "--output", str(tmp_path / "o")], "lacks adapter_model.safetensors"),
        (["--lora", str(exported / "lora"), "--output", str(tmp_path / "file")], "is a file"),
        (["--lora", str(exported / "lora"), "--output", str(tmp_path / "out"), "--peft"], "already exists"),
        (["--lora", str(exported / "lora"), "--model", str(tmp_path / "nope"), "--output", str(tmp_path / "o")],
         "not a folder"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and message in err and "\n" not in err


def test_export_rejects_adapter_of_another_model(tmp_path, exported):
    from engine.models import tiny_model

    other = tiny_model(seed=0)
    other.denoiser = type(other.denoiser).from_config({**other.denoiser.config, "cross_attention_dim": 16})
    add_lora(other.denoiser, rank=4)
    save_lora(other.denoiser, tmp_path / "lora16", rank=4, alpha=None)
    with pytest.raises(UserError, match="does not fit this model"):
        from engine.export import export_peft
        from engine.models import load_model

        export_peft(load_model(exported / "base"), tmp_path / "lora16", 1.0, tmp_path / "p", "base")


def test_a_full_disk_keeps_the_old_export_and_leaves_no_partial_one(tmp_path, exported, monkeypatch, capsys):
    import errno
    import shutil

    out = tmp_path / "out"
    shutil.copytree(exported / "out" / "peft", out / "peft")
    before = {p.name: p.read_bytes() for p in (out / "peft").iterdir()}

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("engine.export.shutil.copyfile", no_space)
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", str(exported / "base"), "--lora", str(exported / "lora"), "--output", str(out), "--peft",
              "--overwrite"])
    assert exit_info.value.code == 4
    error = capsys.readouterr().err.strip()
    assert error.startswith(f"error: the disk holding {out} is full: writing the peft export") and "\n" not in error
    assert {p.name: p.read_bytes() for p in (out / "peft").iterdir()} == before
    assert sorted(p.name for p in out.iterdir()) == ["peft"]
