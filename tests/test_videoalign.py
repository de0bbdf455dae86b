"""VideoAlign's VideoReward on a tiny random Qwen2-VL saved in the released layout: the engine's differentiable
scores equal the stock transformers processor path, and gradients reach the frames.

Where the layout comes from (VideoAlign's repository, KwaiVGI/VideoAlign):
- ``model_config.json`` with ``data_config``, ``model_config``, ``peft_lora_config``, ``inference_config``:
  ``inference.py`` (``load_configs_from_json``, ``VideoVLMRewardInference._norm``);
- ``checkpoint-N/`` with ``adapter_model.safetensors`` and ``non_lora_state_dict.pth``, or ``model.pth``; the
  largest N is taken: ``utils.load_model_from_checkpoint``;
- key names: peft's (``base_model.model.`` prefix, ``.base_layer.`` on LoRA-wrapped layers, ``lora_A`` /
  ``lora_B`` without the adapter name in the adapter file) over ``Qwen2VLRewardModelBT``, which is
  transformers 4's ``Qwen2VLForConditionalGeneration`` (``model.layers.*``, ``visual.*``) plus ``rm_head``:
  ``trainer.py`` (``Qwen2VLRewardModelBT``, ``_save_checkpoint``), ``train_reward.py``
  (``create_model_and_processor``: special tokens ``<|VQ_reward|>``, ``<|MQ_reward|>``, ``<|TA_reward|>``);
- the prompt: ``prompt_template.py``'s template with ``{text_prompt}`` (the test writes its own template text).
"""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import (PreTrainedTokenizerFast, Qwen2VLConfig, Qwen2VLImageProcessor, Qwen2VLModel,  # noqa: E402
                          Qwen2VLProcessor)

from engine.errors import UserError  # noqa: E402
from engine.rewards.videoalign import (SPECIAL_TOKENS, VideoAlignReward, sampled_frame_count,  # noqa: E402
                                       smart_resize)

CHAT_TEMPLATE = (  # the layout of Qwen2-VL's chat template for a user turn with a video and text
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% for content in message['content'] %}{% if content['type'] == 'video' %}"
    "<|vision_start|><|video_pad|><|vision_end|>{% elif content['type'] == 'text' %}{{ content['text'] }}"
    "{% endif %}{% endfor %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
QWEN_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
               "<|image_pad|>", "<|video_pad|>"]
TEMPLATE = "Rate this clip. Prompt: {text_prompt}\nquality <|VQ_reward|> motion <|MQ_reward|> text <|TA_reward|>"
STATS = {"VQ_mean": 0.3, "VQ_std": 2.0, "MQ_mean": -0.1, "MQ_std": 0.5, "TA_mean": 0.2, "TA_std": 1.5}
LORA = {"lora_enable": True, "lora_r": 4, "lora_alpha": 8, "use_rslora": False}


def tiny_processor(folder) -> Qwen2VLProcessor:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    corpus = [TEMPLATE, "a red ball moving left", "a blue square moving up", "You are a helpful assistant."]
    tokenizer.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=400, special_tokens=QWEN_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=QWEN_TOKENS[1:])
    vision = dict(min_pixels=56 * 56, max_pixels=28 * 28 * 256, patch_size=14, temporal_patch_size=2, merge_size=2)
    from transformers import Qwen2VLVideoProcessor

    processor = Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(**vision), tokenizer=fast,
                                 video_processor=Qwen2VLVideoProcessor(**vision), chat_template=CHAT_TEMPLATE)
    processor.save_pretrained(folder)
    return processor


def tiny_config(tokenizer) -> Qwen2VLConfig:
    ids = tokenizer.convert_tokens_to_ids(["<|image_pad|>", "<|video_pad|>", "<|vision_start|>"])
    return Qwen2VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]}),
        vision_config=dict(depth=2, embed_dim=32, num_heads=4, hidden_size=32, mlp_ratio=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, in_channels=3),
        image_token_id=ids[0], video_token_id=ids[1], vision_start_token_id=ids[2])


def release(tmp_path, full: bool = False):
    """A tiny VideoReward folder in the released layout; returns (folder, the reference model, head, processor)."""
    from safetensors.torch import save_file

    folder, base = tmp_path / "VideoReward", tmp_path / "VideoReward" / "Qwen2-VL-tiny"
    processor = tiny_processor(base)
    processor.tokenizer.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS)})
    config = tiny_config(processor.tokenizer)
    config.save_pretrained(base)
    torch.manual_seed(0)
    model, head = Qwen2VLModel(config).eval(), torch.nn.Linear(32, 3, bias=False)

    def released_name(key: str) -> str:  # transformers 4's Qwen2VLForConditionalGeneration naming
        return "model." + key.removeprefix("language_model.") if key.startswith("language_model.") else key

    targets = [k.removesuffix(".weight") for k in model.state_dict() if k.endswith(("q_proj.weight", "v_proj.weight"))
               and k.startswith("language_model.")]
    non_lora, adapter, frozen = {}, {}, {}
    scale = LORA["lora_alpha"] / LORA["lora_r"]
    for key, value in model.state_dict().items():
        module = key.removesuffix(".weight")
        if key.startswith("visual."):  # vision tower frozen in training: its weights are the base model's
            frozen[released_name(key)] = value.clone()
        elif module in targets:
            down, up = torch.randn(LORA["lora_r"], value.shape[1]) * 0.3, torch.randn(value.shape[0], LORA["lora_r"]) * 0.3
            name = f"base_model.model.{released_name(module)}"
            non_lora[f"{name}.base_layer.weight"] = value - scale * up @ down
            adapter[f"{name}.lora_A.weight"], adapter[f"{name}.lora_B.weight"] = down, up
        else:
            non_lora[f"base_model.model.{released_name(key)}"] = value.clone()
    non_lora["base_model.model.rm_head.weight"] = head.weight.detach().clone()
    save_file(frozen, base / "model.safetensors")
    checkpoint = folder / "checkpoint-12"
    checkpoint.mkdir(parents=True)
    (folder / "checkpoint-3").mkdir()  # an older checkpoint, not taken
    if full:
        torch.save({**{released_name(k): v for k, v in model.state_dict().items()},  # the merged weights
                    "rm_head.weight": head.weight.detach().clone()}, checkpoint / "model.pth")
    else:
        save_file(adapter, checkpoint / "adapter_model.safetensors")
        torch.save(non_lora, checkpoint / "non_lora_state_dict.pth")
    data = {"meta_data": "x.csv", "data_dir": "x", "fps": 2.0, "num_frames": None, "max_frame_pixels": 200704,
            "eval_dim": ["VQ", "MQ", "TA"], "prompt_template_type": "detailed_special", "sample_type": "uniform"}
    model_config = {"model_name_or_path": "Qwen/Qwen2-VL-tiny", "output_dim": 3, "use_special_tokens": True,
                    "reward_token": "special"}
    (folder / "model_config.json").write_text(json.dumps({"data_config": data, "model_config": model_config,
                                                          "peft_lora_config": LORA, "inference_config": STATS}))
    (folder / "prompt_template.py").write_text(f"DETAILED_PROMPT_WITH_SPECIAL_TOKEN = {TEMPLATE!r}\n")
    return folder, model, head, processor


def stock_scores(model, head, processor, clips_uint8, prompts) -> torch.Tensor:
    """The authors' path: chat data with the video, the stock processor on 8-bit frames their reader resized to the
    sampled size, the model, the head at the special tokens, the norm."""
    chats = [[{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": TEMPLATE.replace(
        "{text_prompt}", p)}]}] for p in prompts]
    texts = [processor.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in chats]
    batch = processor(text=texts, videos=[clip.float() for clip in clips_uint8], padding=True, return_tensors="pt",
                      videos_kwargs={"do_rescale": True})
    hidden = model(**batch).last_hidden_state
    ids = processor.tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS))
    logits = head(hidden)[torch.isin(batch["input_ids"], torch.tensor(ids))].view(len(prompts), 3, 3)
    scores = logits.diagonal(dim1=1, dim2=2)
    mean = torch.tensor([STATS[f"{n}_mean"] for n in ("VQ", "MQ", "TA")])
    std = torch.tensor([STATS[f"{n}_std"] for n in ("VQ", "MQ", "TA")])
    return (scores - mean) / std


@pytest.mark.parametrize("full, size", [(False, (280, 392)), (True, (280, 392)), (False, (120, 200))],
                         ids=["lora", "whole", "lora-resized"])
def test_scores_match_the_stock_processor_path_and_reach_the_frames(tmp_path, full, size):
    """At a size the authors' reader keeps (sides multiples of 28, area within [128, 256] x 28 x 28) and at one it
    resizes (120 x 200 grows to 252 x 420): there the reference resizes the 8-bit frames as qwen-vl-utils'
    ``fetch_video`` does (torchvision, bicubic, antialiased), and the engine's resize of float frames must agree."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.functional import resize

    folder, model, head, processor = release(tmp_path, full)
    reward = VideoAlignReward.from_spec(f"{folder}:overall")
    torch.manual_seed(1)
    frames = 16  # at 8 fps and the config's 2 fps: 4 frames sampled
    indices = reward.frame_indices(frames, fps=8.0)
    assert indices.tolist() == [0, 5, 10, 15]
    clips_uint8 = torch.randint(0, 256, (2, len(indices), 3, *size), dtype=torch.uint8)
    read = smart_resize(*size, 128 * 28 * 28, reward.max_pixels)
    assert (read == size) == (size == (280, 392))
    resized = torch.stack([resize(clip, list(read), interpolation=InterpolationMode.BICUBIC, antialias=True)
                           for clip in clips_uint8])
    prompts = ["a red ball moving left", "a blue square moving up"]
    expected = stock_scores(model, head, processor, resized, prompts)
    clips = (clips_uint8.float() / 255).requires_grad_()
    got = reward(clips, prompts)
    torch.testing.assert_close(got, expected.sum(1), rtol=1e-3, atol=1e-4)
    got.sum().backward()
    assert clips.grad is not None and clips.grad.abs().sum() > 0
    for index, score in enumerate(("vq", "mq", "ta")):
        reward.score = score
        torch.testing.assert_close(reward(clips.detach(), prompts), expected[:, index], rtol=1e-3, atol=1e-4)


def test_checkpoint_names_map_to_the_model_these_transformers_build():
    from engine.rewards.videoalign import plain_state_dict

    w = torch.zeros(1)
    named = plain_state_dict({
        "base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight": w,  # peft, transformers 4
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": w,
        "base_model.model.visual.blocks.0.attn.qkv.weight": w,
        "base_model.model.rm_head.modules_to_save.default.weight": w,  # a head trained as modules_to_save
        "base_model.model.rm_head.original_module.weight": w,
        "model.language_model.norm.weight": w, "model.visual.merger.mlp.0.weight": w,  # transformers 5
        "lm_head.weight": w})
    assert sorted(named) == ["language_model.layers.0.self_attn.q_proj.lora_A.weight",
                             "language_model.layers.0.self_attn.q_proj.weight", "language_model.norm.weight",
                             "rm_head.weight", "visual.blocks.0.attn.qkv.weight", "visual.merger.mlp.0.weight"]


def test_frame_sampling_and_sizes_follow_the_authors_rules():
    assert sampled_frame_count(16, 8.0, 2.0) == 4  # 2 s at 2 fps
    assert sampled_frame_count(81, 16.0, 2.0) == 10  # 5.06 s x 2 = 10.1, even
    assert sampled_frame_count(8, 8.0, 2.0) == 4  # at least 4
    assert sampled_frame_count(3, 8.0, 2.0) == 2  # the largest even count the clip holds
    assert sampled_frame_count(49, 8.0, None, num_frames=9) == 8  # a fixed count made even: 4.5 rounds to 4
    assert smart_resize(480, 832, 128 * 28 * 28, 200704) == (336, 588)  # Wan frames at the released bound
    assert smart_resize(32, 32, 128 * 28 * 28, 200704) == (336, 336)  # small frames grow to the least area


def test_a_folder_that_is_not_a_videoreward_is_named(tmp_path):
    with pytest.raises(UserError, match="model_config.json"):
        VideoAlignReward.from_spec(str(tmp_path))
    with pytest.raises(UserError, match="score 'xq'"):
        VideoAlignReward.from_spec(f"{tmp_path}:xq")


def test_missing_pieces_of_a_release_are_named_with_where_to_put_them(tmp_path):
    folder, *_ = release(tmp_path)
    (folder / "prompt_template.py").unlink()
    with pytest.raises(UserError, match="copy prompt_template.py from the VideoAlign repository into"):
        VideoAlignReward.from_folder(folder)
    (folder / "prompt_template.py").write_text(f"DETAILED_PROMPT_WITH_SPECIAL_TOKEN = {TEMPLATE!r}\n")
    (folder / "Qwen2-VL-tiny" / "config.json").rename(folder / "Qwen2-VL-tiny" / "moved.json")
    with pytest.raises(UserError, match="base model Qwen/Qwen2-VL-tiny is not on this machine: put a copy"):
        VideoAlignReward.from_folder(folder)


def test_the_command_lines_spec_builds_it_alone_and_in_a_mix(tmp_path):
    """``--reward videoalign:PATH:mq`` and ``hpsv2:world,videoalign:PATH@0.5`` (its video-level part, weighted)."""
    from engine.rewards import build_reward
    from engine.video_reward import split_reward

    folder = release(tmp_path)[0]
    alone = build_reward(f"videoalign:{folder}:mq")
    assert isinstance(alone, VideoAlignReward) and alone.score == "mq"
    image, clips = split_reward(build_reward(f"hpsv2:world,videoalign:{folder}@0.5"))
    assert image.name == "hpsv2" and [(type(r), w, r.score) for r, w in clips] == [(VideoAlignReward, 0.5, "overall")]
