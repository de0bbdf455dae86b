"""The model loader on a real (tiny) diffusers folder, and its errors."""

import json
import shutil
import subprocess
import sys

import pytest
import torch

from engine.errors import UserError
from engine.models import load_model


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory, _tiny_model_session):
    folder = tmp_path_factory.mktemp("tiny_model")
    _tiny_model_session.save(folder)
    return folder


def test_tiny_model_round_trips_through_a_diffusers_folder(saved_tiny, _tiny_model_session):
    for name in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (saved_tiny / name).is_dir()
    loaded = load_model(saved_tiny)
    original = _tiny_model_session
    prompts = ["a dog surfing", "sunset"]
    assert torch.equal(loaded.encode_prompts(prompts), original.encode_prompts(prompts))
    x = torch.randn(1, 4, 8, 16, 16)
    ctx = original.encode_prompts(["a"])
    with torch.no_grad():
        assert torch.equal(loaded.denoiser(x, 10, encoder_hidden_states=ctx).sample,
                           original.denoiser(x, 10, encoder_hidden_states=ctx).sample)
    assert loaded.latent_scale == pytest.approx(0.18215)
    assert loaded.scheduler.config.steps_offset == 1


def test_stock_diffusers_pipeline_loads_the_saved_folder(saved_tiny):
    from diffusers import TextToVideoSDPipeline

    pipe = TextToVideoSDPipeline.from_pretrained(str(saved_tiny))
    assert type(pipe.unet).__name__ == "UNet3DConditionModel"


def test_missing_folder(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_model(tmp_path / "nope")


def test_file_instead_of_folder(tmp_path):
    (tmp_path / "model.bin").write_bytes(b"x")
    with pytest.raises(UserError, match="is a file"):
        load_model(tmp_path / "model.bin")


def test_missing_component(tmp_path, saved_tiny):
    broken = tmp_path / "m"
    shutil.copytree(saved_tiny, broken)
    shutil.rmtree(broken / "vae")
    with pytest.raises(UserError, match="lacks vae/"):
        load_model(broken)


def test_corrupt_component(tmp_path, saved_tiny):
    broken = tmp_path / "m"
    shutil.copytree(saved_tiny, broken)
    (broken / "unet" / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="cannot load unet/"):
        load_model(broken)


def test_wrong_weights_in_component(tmp_path, saved_tiny):
    broken = tmp_path / "m"
    shutil.copytree(saved_tiny, broken)
    config = json.loads((broken / "unet" / "config.json").read_text())
    config["block_out_channels"] = [48, 64]
    (broken / "unet" / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="cannot load unet/"):
        load_model(broken)


def test_cli_bad_model_path_is_one_line_and_exit_2(tmp_path):
    result = subprocess.run([sys.executable, "-m", "engine.train", "--model", str(tmp_path / "missing"),
                             "--reward", "colorfulness", "--output", str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and result.stderr.startswith("error: model folder")
    assert not (tmp_path / "out" / "metrics.jsonl").exists()
