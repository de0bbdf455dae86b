"""Image rewards: a small interface, the built-in demonstration reward, HPSv2, PickScore, the LAION
aesthetic predictor, and weighted sums; and the interface of video-level rewards (``ClipReward``: whole clips),
with the built-in world motion reward (``engine.rewards.motion``) and VideoAlign's VideoReward
(``engine.rewards.videoalign``, imported on its own: it needs transformers' Qwen2-VL).

A reward maps images [N, 3, H, W] in [0, 1] and N prompts to N scores, differentiably in the images.
Specs on the command line: ``NAME[:PATH][@WEIGHT]``, comma-separated to combine, e.g.
``hpsv2:/weights/HPS_v2.1_compressed.pt@1.0,aesthetic:/weights/aesthetic@0.1``.
Where a reward needs two files, PATH is ``FIRST;SECOND`` (quote it in a shell) or a folder holding both.

| name         | PATH                                                             | score (typical range)           |
|--------------|------------------------------------------------------------------|---------------------------------|
| colorfulness | none                                                             | colourfulness, prompt-blind     |
| hpsv2        | HPS_v2_compressed.pt or HPS_v2.1_compressed.pt[;ARCH] (ARCH: open_clip name, default ViT-H-14 or the file's 'architecture'); `world`: the built-in reward | cosine(image, text), ~0.25-0.30 |
| pickscore    | MODEL_DIR[;PROCESSOR_DIR]: transformers CLIPModel folder (PickScore_v1) and, when that folder has no tokenizer files, the processor folder (CLIP-ViT-H-14-laion2B-s32B-b79K) | logit_scale * cosine, ~18-23 |
| aesthetic    | CLIP_FILE;HEAD_FILE or a folder with both: OpenAI CLIP ViT-L/14 (``ViT-L-14.pt`` from the ``clip`` package, a TorchScript archive, or an open_clip state dict such as ``open_clip_model.safetensors``) and the LAION head ``sac+logos+ava1-l14-linearMSE.pth`` | aesthetic rating, ~4-7 of 10 |
| motion       | a motion reward's safetensors file; `world`: the built-in one (video-level: whole clips) | logit that the clip moves as captioned, smoothly, over the file's scale (the built-in's: the image reward's spread); ~0.14 on the base model's generations |
| videoalign   | VideoAlign's VideoReward folder[:vq|mq|ta|overall] (video-level: whole clips) | each score less the checkpoint's mean, over its deviation (VQ, MQ, TA); overall their sum |

Scores on different scales can be combined with weights, e.g. ``hpsv2:A@1.0,pickscore:B@0.01``; the trainer's
loss is 1 - R, so only the gradient's direction and size matter, not the offset.

ImageReward is not included: its checkpoint is a BLIP model built from the ``image-reward`` package's own
BLIP/BERT classes (LAVIS-style ``med.py``), not a transformers or open_clip architecture, and its loader
fetches ``bert-base-uncased`` files from the hub at load time; a faithful local loader would mean porting
that model and mapping its keys without a real file to check against.

Modules: ``base`` (the interface, colorfulness, weighted sums), ``clip`` (what the CLIP-based rewards share),
``hpsv2``, ``pickscore``, ``aesthetic`` (one model each), ``registry`` (names to builders, spec parsing);
``motion`` and ``videoalign`` (video-level rewards).
Importing ``engine.rewards`` or any of its modules fills the registry with the built-in names.
"""

from engine.rewards.aesthetic import (AESTHETIC_CLIP_FILES, AESTHETIC_HEAD_FILE, AestheticHead, AestheticReward,
                                      load_clip_weights)
from engine.rewards.base import ClipReward, ColorfulnessReward, Reward, WeightedSum
from engine.rewards.clip import (CLIP_MEAN, CLIP_STD, check_state_dict, clip_preprocess, load_state_dict_file,
                                 read_checkpoint, register_open_clip_configs)
from engine.rewards.hpsv2 import HPSv2Reward
from engine.rewards.pickscore import PickScoreReward
from engine.rewards.registry import REWARDS, build_reward, register_reward

__all__ = [
    "AESTHETIC_CLIP_FILES", "AESTHETIC_HEAD_FILE", "CLIP_MEAN", "CLIP_STD", "REWARDS", "AestheticHead",
    "AestheticReward", "ClipReward", "ColorfulnessReward", "HPSv2Reward", "PickScoreReward", "Reward", "WeightedSum",
    "build_reward", "check_state_dict", "clip_preprocess", "load_clip_weights", "load_state_dict_file",
    "read_checkpoint", "register_open_clip_configs", "register_reward",
]
