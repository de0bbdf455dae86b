"""Rewards: HPSv2 through the real open_clip loader on a tiny saved checkpoint, colourfulness, specs."""

import json

import pytest
import torch
import torch.nn.functional as F

from engine.errors import UserError
from engine.rewards import ColorfulnessReward, HPSv2Reward, WeightedSum, build_reward, clip_preprocess

TINY_CLIP = "tiny-hps-test"


@pytest.fixture(scope="module")
def tiny_clip_arch(tmp_path_factory):
    """Register a tiny open_clip architecture (same code as ViT-H-14, small sizes)."""
    import open_clip

    folder = tmp_path_factory.mktemp("clip_cfg")
    config = {"embed_dim": 32,
              "vision_cfg": {"image_size": 224, "layers": 2, "width": 32, "head_width": 16, "patch_size": 32},
              "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}
    (folder / f"{TINY_CLIP}.json").write_text(json.dumps(config))
    open_clip.add_model_config(str(folder / f"{TINY_CLIP}.json"))
    return TINY_CLIP


@pytest.fixture(scope="module")
def hps_checkpoint(tmp_path_factory, tiny_clip_arch):
    """A random checkpoint in the HPS_v2 file format: a torch pickle of {'state_dict': ...}."""
    import open_clip

    torch.manual_seed(0)
    model = open_clip.create_model(tiny_clip_arch, pretrained=None)
    path = tmp_path_factory.mktemp("hps") / "HPS_v2_compressed.pt"
    torch.save({"state_dict": model.state_dict()}, path)
    return path, model


def test_hpsv2_loads_checkpoint_and_scores_cosine(hps_checkpoint, tiny_clip_arch):
    path, reference = hps_checkpoint
    reward = HPSv2Reward(path, arch=tiny_clip_arch)
    images = torch.rand(3, 3, 32, 48, requires_grad=True)
    prompts = ["a cat", "a dog", "a cat"]
    scores = reward(images, prompts)
    import open_clip

    tokens = open_clip.get_tokenizer(tiny_clip_arch)(prompts)
    with torch.no_grad():
        img = F.normalize(reference.encode_image(clip_preprocess(images, 224, fit="pad")), dim=-1)
        txt = F.normalize(reference.encode_text(tokens), dim=-1)
    assert torch.allclose(scores, (img * txt).sum(-1), atol=1e-5)
    assert scores.abs().max() <= 1.0
    scores.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    assert all(not p.requires_grad for p in reward.parameters())


def test_hpsv2_accepts_plain_and_dataparallel_state_dicts(tmp_path, hps_checkpoint, tiny_clip_arch):
    _, reference = hps_checkpoint
    path = tmp_path / "plain.pt"
    torch.save({"module." + k: v for k, v in reference.state_dict().items()}, path)
    reward = HPSv2Reward(path, arch=tiny_clip_arch)
    assert torch.equal(reward.model.visual.conv1.weight, reference.visual.conv1.weight)


def test_hpsv2_wrong_checkpoint_is_a_clear_error(tmp_path, tiny_clip_arch):
    path = tmp_path / "wrong.pt"
    torch.save({"state_dict": {"foo": torch.zeros(2)}}, path)
    with pytest.raises(UserError, match="does not match"):
        HPSv2Reward(path, arch=tiny_clip_arch)
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot be read"):
        HPSv2Reward(tmp_path / "garbage.pt", arch=tiny_clip_arch)
    with pytest.raises(UserError, match="does not exist"):
        HPSv2Reward(tmp_path / "missing.pt", arch=tiny_clip_arch)


def test_clip_preprocess_resizes_crops_and_normalises():
    images = torch.full((2, 3, 64, 128), 0.5)
    out = clip_preprocess(images, 224)
    assert out.shape == (2, 3, 224, 224)
    expected = (0.5 - torch.tensor([0.48145466, 0.4578275, 0.40821073])) / torch.tensor([0.26862954, 0.26130258, 0.27577711])
    assert torch.allclose(out.mean(dim=(2, 3)), expected.expand(2, 3), atol=1e-4)


def test_colorfulness_is_zero_for_grey_and_grows_with_colour():
    reward = ColorfulnessReward()
    grey = torch.full((1, 3, 8, 8), 0.5)
    colourful = torch.rand(1, 3, 8, 8)
    assert reward(grey, ["x"]).item() < 1e-3
    assert reward(colourful, ["x"]).item() > 0.1


def test_reward_specs():
    assert isinstance(build_reward("colorfulness"), ColorfulnessReward)
    combined = build_reward("colorfulness@0.5,colorfulness@2")
    assert isinstance(combined, WeightedSum)
    images = torch.rand(2, 3, 8, 8)
    assert torch.allclose(combined(images, ["a", "b"]), 2.5 * ColorfulnessReward()(images, ["a", "b"]))
    for spec, message in [("nope", "unknown reward"), ("hpsv2", "needs a weights file"),
                          ("colorfulness@x", "not a number"), ("", "empty")]:
        with pytest.raises(UserError, match=message):
            build_reward(spec)


def test_hpsv2_says_which_file_it_loaded(hps_checkpoint, tiny_clip_arch, capsys, caplog):
    """open_clip's "No pretrained weights loaded ... initialized randomly" would say the opposite of what happens."""
    path, _ = hps_checkpoint
    build_reward(f"hpsv2:{path};{tiny_clip_arch}")
    out, err = capsys.readouterr()
    assert out.strip() == f"reward hpsv2: open_clip {tiny_clip_arch} with the weights of {path}"
    assert "initialized randomly" not in err + caplog.text
