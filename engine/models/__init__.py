"""The text-to-video model: diffusers components loaded from a folder, or a tiny random one.

One interface, several families; the chain, the trainer and the reward only use ``VideoDiffusion``'s methods:
encode prompts, one denoiser call, the latent layout, encode clips, decode chosen frames. The family is read
from the folder's ``model_index.json`` (its pipeline class):

- ``TextToVideoSDPipeline`` (ModelScope ``text-to-video-ms-1.7b``, ``zeroscope_v2``): ``unet/``
  UNet3DConditionModel, ``vae/`` AutoencoderKL (one latent per frame), CLIP text encoder, DDIM epsilon;
- ``WanPipeline`` (Wan 2.1): ``transformer/`` WanTransformer3DModel, ``vae/`` AutoencoderKLWan (causal, 4x
  temporal compression), UMT5, flow matching;
- ``CogVideoXPipeline`` (CogVideoX 2B / 5B): ``transformer/`` CogVideoXTransformer3DModel, ``vae/``
  AutoencoderKLCogVideoX (causal, 4x), T5, v-prediction DDIM.

Latents are [B, C, f, h, w] everywhere in the engine (CogVideoX's [B, f, C, h, w] stays inside its calls).

Files: ``base.py`` the interface ``VideoDiffusion`` (its defaults the UNet3D family's) and ``gather_frames``;
``causal.py`` ``CausalVideoDiffusion``, the causal-VAE layout and decoding; ``wan.py`` ``WanVideo``;
``cogvideox.py`` ``CogVideoXVideo``; ``loading.py`` ``FAMILIES``, ``model_family`` and ``load_model`` (a diffusers
folder); ``tiny.py`` ``tiny_model`` and ``TINY_FAMILIES`` (small random models, offline tokenizers).
diffusers and transformers are imported inside the functions that need them, so importing this is cheap.
"""

from engine.models.base import VideoDiffusion, gather_frames
from engine.models.causal import CausalVideoDiffusion
from engine.models.cogvideox import CogVideoXVideo
from engine.models.loading import FAMILIES, load_model, model_family
from engine.models.tiny import TINY_FAMILIES, tiny_model
from engine.models.wan import WanVideo

__all__ = ["VideoDiffusion", "CausalVideoDiffusion", "WanVideo", "CogVideoXVideo", "FAMILIES", "model_family",
           "load_model", "tiny_model", "TINY_FAMILIES", "gather_frames"]
