"""PickScore and the LAION aesthetic predictor through their real loaders, on tiny random weights saved in the
released file formats; reward specs that combine them."""

import json
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engine.errors import UserError
from engine.rewards import (AESTHETIC_HEAD_FILE, CLIP_STD, AestheticHead, AestheticReward, PickScoreReward,
                            WeightedSum, build_reward, clip_preprocess)

TINY_L14 = "tiny-l14-test"


# ---------------------------------------------------------------------------------- PickScore
@pytest.fixture(scope="module")
def pickscore_dirs(tmp_path_factory):
    """A tiny transformers CLIPModel saved with save_pretrained, the tokenizer in a separate processor folder."""
    from transformers import CLIPConfig, CLIPModel

    from engine.models.tiny import _tiny_tokenizer

    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(vocab_size=514, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, bos_token_id=512, eos_token_id=513,
                         pad_token_id=513),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=224, patch_size=32),
        projection_dim=16, logit_scale_init_value=3.0,
    )
    model = CLIPModel(config).eval()
    root = tmp_path_factory.mktemp("pickscore")
    model.save_pretrained(root / "PickScore_v1")
    _tiny_tokenizer().save_pretrained(str(root / "processor"))
    return root / "PickScore_v1", root / "processor", model


def test_pickscore_loads_and_scores_logit_scaled_cosine(pickscore_dirs):
    model_dir, processor_dir, reference = pickscore_dirs
    reward = build_reward(f"pickscore:{model_dir};{processor_dir}")
    assert isinstance(reward, PickScoreReward)
    images = torch.rand(3, 3, 40, 56, requires_grad=True)
    prompts = ["a cat on a mat", "a dog", "a cat on a mat"]
    scores = reward(images, prompts)

    # The PickScore release: processor -> get_*_features -> normalise -> logit_scale.exp() * text @ image
    from transformers import AutoTokenizer

    tokens = AutoTokenizer.from_pretrained(str(processor_dir))(prompts, padding=True, truncation=True,
                                                               max_length=77, return_tensors="pt")
    with torch.no_grad():
        img = reference.get_image_features(pixel_values=clip_preprocess(images, 224))
        txt = reference.get_text_features(**tokens)
        img, txt = (getattr(t, "pooler_output", t) for t in (img, txt))
        expected = reference.logit_scale.exp() * (F.normalize(img, dim=-1) * F.normalize(txt, dim=-1)).sum(-1)
    assert torch.allclose(scores, expected, atol=1e-5)
    scores.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    assert all(not p.requires_grad for p in reward.parameters())


def test_pickscore_reads_tokenizer_from_model_folder(tmp_path, pickscore_dirs):
    from engine.models.tiny import _tiny_tokenizer

    _, _, reference = pickscore_dirs
    reference.save_pretrained(tmp_path / "both")
    _tiny_tokenizer().save_pretrained(str(tmp_path / "both"))
    reward = build_reward(f"pickscore:{tmp_path / 'both'}")
    assert reward(torch.rand(1, 3, 32, 32), ["x"]).shape == (1,)


def test_pickscore_bad_paths_are_clear_errors(tmp_path, pickscore_dirs):
    model_dir, _, _ = pickscore_dirs
    cases = [
        (f"pickscore:{tmp_path / 'missing'}", "does not exist"),
        (f"pickscore:{tmp_path}", "no config.json"),
        (f"pickscore:{model_dir}", "cannot load a tokenizer.*PROCESSOR_DIR"),
        (f"pickscore:{model_dir};", "empty part"),
        (f"pickscore:{model_dir};a;b", "3 parts"),
    ]
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    cases.append((f"pickscore:{tmp_path / 'broken'};{model_dir}", "cannot load the PickScore CLIPModel"))
    for spec, message in cases:
        with pytest.raises(UserError, match=message):
            build_reward(spec)


# ---------------------------------------------------------------------------------- aesthetic
@pytest.fixture(scope="module")
def tiny_l14(tmp_path_factory):
    """A tiny open_clip architecture with ViT-L-14's code path (QuickGELU, as OpenAI trained it)."""
    import open_clip

    folder = tmp_path_factory.mktemp("l14_cfg")
    config = {"embed_dim": 24, "quick_gelu": True,
              "vision_cfg": {"image_size": 224, "layers": 2, "width": 32, "head_width": 16, "patch_size": 32},
              "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}
    (folder / f"{TINY_L14}.json").write_text(json.dumps(config))
    open_clip.add_model_config(str(folder / f"{TINY_L14}.json"))
    torch.manual_seed(1)
    return open_clip.create_model(TINY_L14, pretrained=None, force_quick_gelu=True).eval()


def save_openai_torchscript(state: dict, path):
    """OpenAI's ``clip`` cache format: a TorchScript archive, fp16 weights, plus input_resolution & co."""

    class Holder(nn.Module):
        pass

    root = Holder()
    for key, value in state.items():
        *parents, leaf = key.split(".")
        module = root
        for name in parents:
            if not hasattr(module, name):
                module.add_module(name, Holder())
            module = getattr(module, name)
        module.register_buffer(leaf, value.half())
    for name, value in (("input_resolution", 224), ("context_length", 77), ("vocab_size", 49408)):
        root.register_buffer(name, torch.tensor(value))
    with warnings.catch_warnings():  # torch.jit is deprecated for new models; OpenAI's files are TorchScript
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(torch.jit.script(root), str(path))


@pytest.fixture(scope="module")
def aesthetic_files(tmp_path_factory, tiny_l14):
    root = tmp_path_factory.mktemp("aesthetic")
    torch.manual_seed(2)
    head = AestheticHead(24).eval()
    torch.save(head.state_dict(), root / AESTHETIC_HEAD_FILE)  # the released .pth is a plain state dict
    save_openai_torchscript(tiny_l14.state_dict(), root / "ViT-L-14.pt")
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tiny_l14.state_dict().items()}, str(root / "open_clip_model.safetensors"))
    return root, head


def laion_reference(clip, head, images, fp16_weights: bool):
    """improved-aesthetic-predictor's simple_inference: encode_image -> L2 normalise -> MLP."""
    import copy

    clip = copy.deepcopy(clip)
    if fp16_weights:  # the TorchScript file stores fp16; the reward upcasts those values to fp32
        with torch.no_grad():
            for p in clip.parameters():
                p.copy_(p.half().float())
    with torch.no_grad():
        embedding = F.normalize(clip.encode_image(clip_preprocess(images, 224)), dim=-1)
        return head(embedding).squeeze(-1)


@pytest.mark.parametrize("clip_file", ["ViT-L-14.pt", "open_clip_model.safetensors"])
def test_aesthetic_loads_released_formats_and_matches_reference(aesthetic_files, tiny_l14, clip_file):
    root, head = aesthetic_files
    reward = AestheticReward(root / clip_file, root / AESTHETIC_HEAD_FILE, arch=TINY_L14)
    assert [k for k, _ in reward.head.named_parameters()][::2] == [f"layers.{i}.weight" for i in (0, 2, 4, 6, 7)]
    images = torch.rand(2, 3, 48, 64, requires_grad=True)
    scores = reward(images, ["ignored", "ignored"])
    expected = laion_reference(tiny_l14, head, images, fp16_weights=clip_file.endswith(".pt"))
    assert torch.allclose(scores, expected, atol=1e-5)
    scores.sum().backward()
    assert images.grad.abs().sum() > 0
    assert all(not p.requires_grad for p in reward.parameters())


def test_aesthetic_folder_spec_and_weighted_combination(aesthetic_files, monkeypatch):
    root, _ = aesthetic_files
    monkeypatch.setattr(AestheticReward, "arch", TINY_L14)
    single = build_reward(f"aesthetic:{root}")
    assert isinstance(single, AestheticReward)
    combined = build_reward(f"aesthetic:{root}@0.5,colorfulness@2")
    assert isinstance(combined, WeightedSum) and combined.weights == [0.5, 2.0]
    images = torch.rand(2, 3, 32, 32)
    from engine.rewards import ColorfulnessReward

    expected = 0.5 * single(images, ["a", "b"]) + 2 * ColorfulnessReward()(images, ["a", "b"])
    assert torch.allclose(combined(images, ["a", "b"]), expected, atol=1e-5)


def test_aesthetic_bad_inputs_are_clear_errors(tmp_path, aesthetic_files, monkeypatch):
    root, _ = aesthetic_files
    monkeypatch.setattr(AestheticReward, "arch", TINY_L14)
    torch.save(AestheticHead(16).state_dict(), tmp_path / "wrong_head.pth")
    torch.save({"foo": torch.zeros(1)}, tmp_path / "not_clip.pt")
    (tmp_path / "empty").mkdir()
    cases = [
        (f"aesthetic:{root / 'ViT-L-14.pt'};{tmp_path / 'wrong_head.pth'}", "aesthetic head .* does not match"),
        (f"aesthetic:{tmp_path / 'not_clip.pt'};{root / AESTHETIC_HEAD_FILE}", "aesthetic CLIP checkpoint .* does not match"),
        (f"aesthetic:{tmp_path / 'missing.pt'};{root / AESTHETIC_HEAD_FILE}", "does not exist"),
        (f"aesthetic:{tmp_path / 'empty'}", "lacks ViT-L-14.pt"),
        (f"aesthetic:{tmp_path / 'nowhere'}", "does not exist"),
        ("aesthetic", "needs a weights file"),
        ("aesthetic:a;b;c", "3 parts"),
    ]
    for spec, message in cases:
        with pytest.raises(UserError, match=message):
            build_reward(spec)


# ---------------------------------------------------------------------------------- preprocessing as the authors do it
GOLDEN = Path(__file__).parent / "golden" / "hpsv2.safetensors"
NON_SQUARE = [(48, 80), (32, 58), (48, 83), (48, 72), (80, 48)]  # 48x80; zeroscope, Wan, CogVideoX at 1/10; portrait


def _pixel_gap(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean absolute difference of two normalised CLIP inputs, in 1/255 steps of the [0, 1] image."""
    return ((a - b) * torch.tensor(CLIP_STD).view(1, 3, 1, 1)).abs().mean().item() * 255


def test_hpsv2_pads_and_scores_as_the_hpsv2_package():
    """Against tests/golden/hpsv2.safetensors, written by the hpsv2 package's own transform and score
    (tests/golden/make_hpsv2_golden.py) on the built-in reward: square and non-square frames."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    golden = load_file(str(GOLDEN))
    with safe_open(str(GOLDEN), "pt") as f:
        prompts = f.metadata()["prompts"].split("\n")
    reward = build_reward("hpsv2:world")
    for h, w in [(32, 32), *NON_SQUARE]:
        images = golden[f"images_{h}x{w}"].float() / 255
        assert _pixel_gap(clip_preprocess(images, 32, fit="pad"), golden[f"pixels_{h}x{w}"]) <= 0.01
        enlarged = golden[f"pixels112_{h}x{w}"].float()[None]
        assert _pixel_gap(clip_preprocess(images[:1], 112, fit="pad"), enlarged) <= 0.05  # fp16 golden
        scores = reward(images, prompts)
        assert torch.allclose(scores, golden[f"scores_{h}x{w}"], atol=2e-4), (h, w)
        if h != w:  # the test can fail: the crop CLIP uses is not what HPSv2 scores
            assert _pixel_gap(clip_preprocess(images, 32, fit="crop"), golden[f"pixels_{h}x{w}"]) > 20


def _frames(h: int, w: int) -> tuple[torch.Tensor, list]:
    from PIL import Image

    g = torch.Generator().manual_seed(h * 1000 + w)
    base = torch.rand(2, 3, h // 4 + 1, w // 4 + 1, generator=g)
    uint8 = (F.interpolate(base, size=(h, w), mode="bilinear") * 255).round().to(torch.uint8)
    return uint8.float() / 255, [Image.fromarray(f.permute(1, 2, 0).numpy()) for f in uint8]


@pytest.mark.parametrize("h, w", [(32, 32), *NON_SQUARE])
def test_pickscore_and_aesthetic_preprocess_as_their_authors(h, w, pickscore_dirs, tiny_l14, aesthetic_files):
    """PickScore: transformers' CLIPImageProcessor (its processor); the aesthetic predictor: open_clip's
    validation transform (torchvision Resize + CenterCrop, what OpenAI's clip.load returns). Within 2/255: PIL
    rounds its resized image to 8 bits, the engine does not."""
    import open_clip
    from transformers import CLIPImageProcessor

    model_dir, processor_dir, reference = pickscore_dirs
    images, pil = _frames(h, w)
    processed = CLIPImageProcessor()(images=pil, return_tensors="pt")["pixel_values"]
    assert _pixel_gap(clip_preprocess(images, 224), processed) <= 2
    reward = build_reward(f"pickscore:{model_dir};{processor_dir}")
    from transformers import AutoTokenizer

    tokens = AutoTokenizer.from_pretrained(str(processor_dir))(["a cat", "a dog"], padding=True, return_tensors="pt")
    with torch.no_grad():
        img = reference.get_image_features(pixel_values=processed)
        txt = reference.get_text_features(**tokens)
        img, txt = (getattr(t, "pooler_output", t) for t in (img, txt))
        expected = reference.logit_scale.exp() * (F.normalize(img, dim=-1) * F.normalize(txt, dim=-1)).sum(-1)
    assert torch.allclose(reward(images, ["a cat", "a dog"]), expected, rtol=1e-2, atol=1e-2)

    transform = open_clip.image_transform(224, is_train=False)
    aesthetic_input = torch.stack([transform(p) for p in pil])
    assert _pixel_gap(clip_preprocess(images, 224, offset="round"), aesthetic_input) <= 2
    root, head = aesthetic_files
    aesthetic = AestheticReward(root / "open_clip_model.safetensors", root / AESTHETIC_HEAD_FILE, arch=TINY_L14)
    with torch.no_grad():
        expected = head(F.normalize(tiny_l14.encode_image(aesthetic_input), dim=-1)).squeeze(-1)
    assert torch.allclose(aesthetic(images, ["", ""]), expected, rtol=1e-2, atol=1e-3)


def test_a_reward_spec_is_labelled_by_its_names_and_weights():
    """The reward curve's axis names what the run optimised: a mix with its weights, not its first reward."""
    from engine.rewards.registry import reward_label

    assert reward_label("hpsv2:world,motion:world@0.5") == "hpsv2 + 0.5 motion"
    assert reward_label("hpsv2:/w/HPS_v2.1.pt@1.0") == "hpsv2" and reward_label("colorfulness@2") == "2 colorfulness"
