"""The text-to-video model: diffusers components loaded from a folder, or a built-in preset.

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
"""

from __future__ import annotations

import functools
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from engine.errors import UserError


@dataclass
class VideoDiffusion:
    """The components and the operations the chain needs; the methods here are the UNet3D family's (one VAE
    latent per frame), overridden by the transformer families below."""

    denoiser: nn.Module
    vae: nn.Module
    text_encoder: nn.Module
    tokenizer: object
    scheduler: object
    name: str = "model"
    pipeline_class = "TextToVideoSDPipeline"
    denoiser_name = "unet"  # the pipeline's attribute and folder
    default_size = (16, 256, 256)  # frames, height, width its pipeline generates by default (ModelScope's training size)
    context_gradient = False  # causal VAEs: the SegVR frames' gradient flows through the causal context too

    def __post_init__(self):
        for module in (self.denoiser, self.vae, self.text_encoder):
            module.requires_grad_(False)
            module.eval()
        from engine.chain import editing_scheduler

        editing_scheduler(self.scheduler)  # a clear error now for a scheduler the chain cannot run
        self.check_denoiser(dict(self.denoiser.config), self.name)

    @classmethod
    def check_denoiser(cls, config: dict, where: str) -> None:
        """A clear error for a variant of the family that the engine does not run (read before loading weights)."""

    @property
    def latent_scale(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def vae_downsample(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    def to(self, device) -> "VideoDiffusion":
        for module in (self.denoiser, self.vae, self.text_encoder):
            module.to(device)
        return self

    def pipeline(self):
        """The stock diffusers pipeline over these very components (no copy)."""
        import diffusers

        return getattr(diffusers, self.pipeline_class)(
            vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer, scheduler=self.scheduler,
            **{self.denoiser_name: self.denoiser})

    def save(self, path: str | Path) -> Path:
        """Write the diffusers pipeline layout (model_index.json and one folder per component)."""
        self.pipeline().save_pretrained(str(path))
        return Path(path)

    # -- layout ----------------------------------------------------------------------------------------------
    def latent_frames(self, num_frames: int) -> int:
        return num_frames

    def pixel_frames(self, latent_frames: int) -> int:
        """Frames of the clip that ``latent_frames`` latent frames decode to (SegVR and TAR count these)."""
        return latent_frames

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """[C, f, h, w] of a clip of ``num_frames`` frames of height x width pixels; a clear error otherwise."""
        down, multiple = self.vae_downsample, self.spatial_multiple
        if height % multiple or width % multiple:
            raise UserError(f"--height/--width {height}x{width} must be multiples of {multiple} (the VAE's factor "
                            f"{down}{' times the patch size' if multiple != down else ''})")
        return self.denoiser.config.in_channels, self.latent_frames(num_frames), height // down, width // down

    @property
    def spatial_multiple(self) -> int:
        """What height and width must be multiples of: the VAE's factor, times a transformer's patch size."""
        patch = getattr(self.denoiser.config, "patch_size", 1)
        return self.vae_downsample * (patch[-1] if isinstance(patch, (list, tuple)) else patch or 1)

    # -- text and denoiser -----------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Text embeddings [B, 77, D] as the pipeline computes them (last hidden state)."""
        ids = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        return self.text_encoder(ids.to(self.device))[0]

    def predict(self, denoiser: nn.Module, x: torch.Tensor, timestep, context: torch.Tensor) -> torch.Tensor:
        """One denoiser call on latents [B, C, f, h, w]: its prediction (noise, v or velocity), same layout.
        ``denoiser`` is this model's or a wrapper of it (DDP, torch.compile)."""
        return denoiser(x, timestep, encoder_hidden_states=context).sample

    # -- pixels ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_video(self, frames: torch.Tensor) -> torch.Tensor:
        """Frames [B, F, 3, H, W] in [-1, 1] -> scaled latents [B, C, F, h, w] (posterior mean, per frame)."""
        b, f = frames.shape[:2]
        posterior = self.vae.encode(frames.flatten(0, 1).to(self.device, self.vae.dtype)).latent_dist
        z = posterior.mode() * self.latent_scale
        return z.unflatten(0, (b, f)).transpose(1, 2).float()

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Per-frame latents [N, C, h, w] -> images [N, 3, H, W] in [0, 1]; differentiable."""
        images = self.vae.decode(latents / self.latent_scale).sample
        return (images.float() * 0.5 + 0.5).clamp(0, 1)

    def decode_frames(self, latents: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Latents [B, C, f, h, w] and pixel-frame indices [B, S] -> those frames [B*S, 3, H, W] in [0, 1],
        decoding no more than they need; differentiable."""
        from engine.video_reward import gather_frames

        return self.decode_latents(gather_frames(latents, indices))

    @torch.no_grad()
    def decode_video(self, latent: torch.Tensor, chunk: int = 8) -> torch.Tensor:
        """One video's latent [C, f, h, w] -> frames [F, 3, H, W] in [0, 1] on the CPU."""
        frames = latent.transpose(0, 1).to(self.vae.dtype)
        return torch.cat([self.decode_latents(frames[i:i + chunk]) for i in range(0, frames.shape[0], chunk)]).float().cpu()


class CausalVideoDiffusion(VideoDiffusion):
    """A family whose VAE compresses time causally: latent frame 0 holds pixel frame 0, latent frame k >= 1 pixel
    frames 4k-3 .. 4k (ratio 4), so a clip has 4k + 1 frames. Pixel frames depend on earlier latents only: the
    SegVR frames need the latents up to the last chosen one, not the clip's tail. Subclasses set ``text_length``,
    the tokens of the prompt embedding."""

    @property
    def temporal_ratio(self) -> int:
        raise NotImplementedError

    def latent_frames(self, num_frames: int) -> int:
        r = self.temporal_ratio
        if num_frames % r != 1:
            raise UserError(f"--num-frames {num_frames}: {self.family_label}'s causal VAE encodes {r}k + 1 frames; "
                            f"use e.g. {num_frames - num_frames % r + 1}")
        return (num_frames - 1) // r + 1

    def pixel_frames(self, latent_frames: int) -> int:
        return 1 + self.temporal_ratio * (latent_frames - 1)

    @property
    def family_label(self) -> str:
        return self.pipeline_class.removesuffix("Pipeline")

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Text embeddings [B, L, D] by the pipeline's own ``encode_prompt`` (its padding and truncation)."""
        embeds, _ = self.prompt_pipeline.encode_prompt(list(prompts), do_classifier_free_guidance=False,
                                                       max_sequence_length=self.text_length, device=self.device)
        return embeds

    @functools.cached_property
    def prompt_pipeline(self):
        """The pipeline whose ``encode_prompt`` the prompts go through: built once (its text encoder and tokenizer
        are this model's; training calls it every step)."""
        return self.pipeline()

    def to_unit(self, z: torch.Tensor) -> torch.Tensor:
        """VAE latent -> the denoiser's scaled latent."""
        return z * self.latent_scale

    def from_unit(self, latents: torch.Tensor) -> torch.Tensor:
        return latents / self.latent_scale

    @torch.no_grad()
    def encode_video(self, frames: torch.Tensor) -> torch.Tensor:
        """Frames [B, F, 3, H, W] in [-1, 1] -> scaled latents [B, C, f, h, w] (posterior mean, whole clip)."""
        self.latent_frames(frames.shape[1])
        video = frames.transpose(1, 2).to(self.device, self.vae.dtype)
        return self.to_unit(self.vae.encode(video).latent_dist.mode()).float()

    def decoded_prefix(self, needed: int, total: int) -> int:
        """How many leading latent frames to decode so the first ``needed`` come out as in a whole-clip decode."""
        return needed

    def latent_index(self, frame: int) -> int:
        """The latent frame that holds pixel frame ``frame``."""
        return 0 if frame == 0 else (frame - 1) // self.temporal_ratio + 1

    def decode_prefix(self, latents: torch.Tensor, needed: int, graded: set[int] | None = None) -> torch.Tensor:
        """The first latents [B, C, :n, h, w] (n from ``decoded_prefix``) -> frames [B, F', 3, H, W] in [0, 1].

        ``graded``: the latent frames decoded with gradient, the others (the causal context) without; the values
        are the same either way. None: all of them."""
        n = self.decoded_prefix(needed, latents.shape[2])
        z = self.from_unit(latents[:, :, :n].to(self.vae.dtype))
        if graded is None or not torch.is_grad_enabled() or getattr(self.vae, "use_tiling", False):
            video = self.vae.decode(z).sample
        else:
            video = self.decode_selected(z, graded)
        return (video.float() * 0.5 + 0.5).clamp(0, 1).transpose(1, 2)

    def chunks(self, n: int) -> list[range]:
        """The groups of latent frames the VAE decodes together (one call each, the causal cache between them)."""
        return [range(i, i + 1) for i in range(n)]

    def decoded_with_gradient(self, graded: set[int], n: int) -> int:
        """How many of ``n`` decoded latent frames run with gradient when ``graded`` are the chosen ones."""
        return sum(len(c) for c in self.chunks(n) if any(k in c for k in graded))

    def decode_selected(self, z: torch.Tensor, graded: set[int]) -> torch.Tensor:
        """The VAE's own decode loop over ``chunks``, each with gradient only if it holds a graded frame."""
        raise NotImplementedError

    def decode_frames(self, latents: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """The chosen frames from the shortest exact prefix; with ``context_gradient`` off (the default) only the
        latent frames that hold a chosen frame decode with gradient: the decoder's activations are saved for those
        alone, and the reward's gradient does not flow through the causal context into earlier latents."""
        chosen = {self.latent_index(int(i)) for i in indices.flatten()}
        video = self.decode_prefix(latents, max(chosen) + 1, None if self.context_gradient else chosen)
        b, s = indices.shape
        index = indices.to(video.device).view(b, s, 1, 1, 1).expand(b, s, *video.shape[2:])
        return video.gather(1, index).flatten(0, 1)

    @torch.no_grad()
    def decode_video(self, latent: torch.Tensor, chunk: int = 8) -> torch.Tensor:
        """The whole clip in one decode (a causal VAE carries its cache through it; ``chunk`` does not apply)."""
        return self.decode_prefix(latent[None], latent.shape[1])[0].cpu()


class WanVideo(CausalVideoDiffusion):
    """Wan 2.1: latents normalised by the VAE's per-channel mean and std; the timestep per video."""

    pipeline_class = "WanPipeline"
    denoiser_name = "transformer"
    text_length = 512
    default_size = (81, 480, 832)

    @property
    def temporal_ratio(self) -> int:
        return int(self.vae.config.scale_factor_temporal)

    @property
    def vae_downsample(self) -> int:
        return int(self.vae.config.scale_factor_spatial)

    def _stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (1, -1, 1, 1, 1)
        mean = torch.tensor(self.vae.config.latents_mean, device=like.device, dtype=like.dtype).view(shape)
        std = torch.tensor(self.vae.config.latents_std, device=like.device, dtype=like.dtype).view(shape)
        return mean, std

    def to_unit(self, z):
        mean, std = self._stats(z)
        return (z - mean) / std

    def from_unit(self, latents):
        mean, std = self._stats(latents)
        return latents * std + mean

    def predict(self, denoiser, x, timestep, context):
        timestep = torch.as_tensor(timestep, device=x.device).expand(x.shape[0])
        return denoiser(hidden_states=x, timestep=timestep, encoder_hidden_states=context, return_dict=False)[0]

    def decode_selected(self, z, graded):
        """AutoencoderKLWan's decode: one latent frame at a time, the causal convolutions' cache carried over."""
        from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

        vae = self.vae
        vae.clear_cache()
        x = vae.post_quant_conv(z)
        frames = []
        for chunk in self.chunks(z.shape[2]):
            vae._conv_idx = [0]
            with torch.set_grad_enabled(any(k in chunk for k in graded)):
                frames.append(vae.decoder(x[:, :, chunk.start:chunk.stop], feat_cache=vae._feat_map,
                                          feat_idx=vae._conv_idx, first_chunk=chunk.start == 0))
        vae.clear_cache()
        out = torch.cat(frames, 2)
        if vae.config.patch_size is not None:
            out = unpatchify(out, patch_size=vae.config.patch_size)
        return out.clamp(-1.0, 1.0)


class CogVideoXVideo(CausalVideoDiffusion):
    """CogVideoX 1.0 (2B / 5B): the transformer takes [B, f, C, h, w]; 3-D rotary embeddings when configured."""

    pipeline_class = "CogVideoXPipeline"
    denoiser_name = "transformer"
    default_size = (49, 480, 720)

    def __post_init__(self):
        super().__post_init__()
        self.text_length = int(self.denoiser.config.max_text_seq_length)
        self._rotary: dict[tuple, object] = {}

    @property
    def temporal_ratio(self) -> int:
        return int(self.vae.config.temporal_compression_ratio)

    def decoded_prefix(self, needed: int, total: int) -> int:
        """The VAE decodes latent frames in pairs, the odd one out joining the first pair: a prefix decodes
        alike only with the clip's parity and its first group whole."""
        n = max(needed, min(total, 2 + total % 2))
        return min(total, n + (total - n) % 2)

    def decode_selected(self, z, graded):
        """AutoencoderKLCogVideoX's decode: latent frames in pairs (the odd one in the first), the causal
        convolutions' cache carried over."""
        vae = self.vae
        conv_cache, decoded = None, []
        for chunk in self.chunks(z.shape[2]):
            with torch.set_grad_enabled(any(k in chunk for k in graded)):
                frames = z[:, :, chunk.start:chunk.stop]
                if vae.post_quant_conv is not None:
                    frames = vae.post_quant_conv(frames)
                frames, conv_cache = vae.decoder(frames, conv_cache=conv_cache)
            decoded.append(frames)
        return torch.cat(decoded, 2)

    def chunks(self, n: int) -> list[range]:
        size = self.vae.num_latent_frames_batch_size
        extra = n % size
        return [range(size * i + (extra if i else 0), min(n, size * (i + 1) + extra)) for i in range(max(n // size, 1))]

    @classmethod
    def check_denoiser(cls, config: dict, where: str) -> None:
        if config.get("patch_size_t"):
            raise UserError(f"{where}: CogVideoX 1.5 (a transformer with patch_size_t) is not supported; use "
                            "CogVideoX-2b or -5b")

    def rotary_embedding(self, latent_shape: torch.Size, device: torch.device):
        if not self.denoiser.config.use_rotary_positional_embeddings:
            return None
        key = (tuple(latent_shape[2:]), str(device))
        if key not in self._rotary:
            f, h, w = latent_shape[2:]
            down = self.vae_downsample
            self._rotary[key] = self.pipeline()._prepare_rotary_positional_embeddings(h * down, w * down, f, device)
        return self._rotary[key]

    def predict(self, denoiser, x, timestep, context):
        timestep = torch.as_tensor(timestep, device=x.device).expand(x.shape[0])
        out = denoiser(hidden_states=x.transpose(1, 2), encoder_hidden_states=context, timestep=timestep,
                       image_rotary_emb=self.rotary_embedding(x.shape, x.device), return_dict=False)[0]
        return out.transpose(1, 2)


FAMILIES: dict[str, type[VideoDiffusion]] = {cls.pipeline_class: cls for cls in (VideoDiffusion, WanVideo, CogVideoXVideo)}


def model_family(root: Path) -> type[VideoDiffusion]:
    """The family named by the folder's model_index.json (a folder without one is read as UNet3D)."""
    index = root / "model_index.json"
    if not index.is_file():
        return VideoDiffusion
    try:
        named = json.loads(index.read_text())
        pipeline = named.get("_class_name")
    except (json.JSONDecodeError, AttributeError):
        raise UserError(f"{index} is not valid JSON; re-save the pipeline (pipe.save_pretrained)") from None
    if pipeline is None:
        raise UserError(f"{index} does not name its pipeline (no _class_name); re-save it (pipe.save_pretrained)")
    if pipeline not in FAMILIES:
        raise UserError(f"{root} holds a {pipeline}; supported pipelines are {', '.join(FAMILIES)}")
    if (named.get("transformer_2") or [None, None])[-1]:
        raise UserError(f"{root} is a two-expert {pipeline} (transformer_2: Wan 2.2 A14B); only single-transformer "
                        "Wan folders (Wan 2.1) are supported")
    return FAMILIES[pipeline]


def _component_loaders(family: type[VideoDiffusion], root: Path) -> dict:
    """Component name -> loader, from model_index.json's (library, class) pairs where it names them."""
    import diffusers
    import transformers

    defaults = {
        VideoDiffusion: {"unet": "UNet3DConditionModel", "vae": "AutoencoderKL", "text_encoder": "CLIPTextModel",
                         "tokenizer": "CLIPTokenizer", "scheduler": "DDIMScheduler"},
        WanVideo: {"transformer": "WanTransformer3DModel", "vae": "AutoencoderKLWan",
                   "text_encoder": "UMT5EncoderModel", "tokenizer": "AutoTokenizer",
                   "scheduler": "FlowMatchEulerDiscreteScheduler"},
        CogVideoXVideo: {"transformer": "CogVideoXTransformer3DModel", "vae": "AutoencoderKLCogVideoX",
                         "text_encoder": "T5EncoderModel", "tokenizer": "AutoTokenizer",
                         "scheduler": "CogVideoXDDIMScheduler"},
    }[family]
    index = root / "model_index.json"
    named = json.loads(index.read_text()) if index.is_file() else {}
    loaders = {}
    for component, default in defaults.items():
        library = transformers if component in ("text_encoder", "tokenizer") else diffusers
        entry = named.get(component)
        if isinstance(entry, list) and len(entry) == 2 and entry[1]:
            library = {"diffusers": diffusers, "transformers": transformers}.get(entry[0])
            default = entry[1]
        cls = getattr(library, default, None)
        if cls is None:
            raise UserError(f"{root}/model_index.json names {component} class {entry}, which neither diffusers nor "
                            "transformers provides; re-save the pipeline")
        loaders[component] = cls.from_pretrained
    return loaders


def load_model(path: str | Path, device: str | torch.device = "cpu") -> VideoDiffusion:
    """Load every component from a diffusers text-to-video folder; one clear error for anything missing."""
    from transformers.utils import logging as hf_logging

    root = Path(path)
    if not root.exists():
        raise UserError(f"model folder {root} does not exist; pass --model a diffusers text-to-video folder "
                        "(e.g. text-to-video-ms-1.7b, Wan2.1-T2V-1.3B-Diffusers, CogVideoX-2b), 'world' or 'tiny'")
    if not root.is_dir():
        raise UserError(f"--model {root} is a file; pass the folder that holds model_index.json and the "
                        "component folders")
    family = model_family(root)
    loaders = _component_loaders(family, root)
    missing = [c for c in loaders if not (root / c).is_dir()]
    if missing:
        raise UserError(f"model folder {root} lacks {', '.join(m + '/' for m in missing)}; a "
                        f"{family.pipeline_class} folder needs {' '.join(c + '/' for c in loaders)}")
    try:
        denoiser_config = json.loads((root / family.denoiser_name / "config.json").read_text())
    except (OSError, ValueError):
        denoiser_config = {}  # unreadable: loading the component below says so
    family.check_denoiser(denoiser_config, str(root))
    parts = {}
    bar_was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # transformers' per-file "Loading weights" bar: noise before every run's own
    try:
        for name, load in loaders.items():
            try:
                parts["denoiser" if name == family.denoiser_name else name] = load(str(root / name))
            except Exception as err:  # diffusers/transformers raise many types; the user needs the component and reason
                reason = str(err).splitlines()[0] if str(err) else type(err).__name__
                raise UserError(f"cannot load {name}/ from {root} ({reason}); re-download or re-save that "
                                "component") from None
    finally:
        if bar_was_on:
            hf_logging.enable_progress_bar()
    return family(**parts, name=root.name).to(device)


def _tiny_tokenizer():
    """A byte-level CLIP tokenizer with no merges: real CLIPTokenizer code on a 514-token vocabulary."""
    from open_clip.tokenizer import bytes_to_unicode
    from transformers import CLIPTokenizer

    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"]
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps({v: i for i, v in enumerate(vocab)}))
        (Path(tmp) / "merges.txt").write_text("#version: 0.2\n")
        return CLIPTokenizer(str(Path(tmp) / "vocab.json"), str(Path(tmp) / "merges.txt"), model_max_length=77)


def _tiny_t5_tokenizer(max_length: int):
    """A character-level T5 tokenizer (sentencepiece-style Unigram, built offline): real T5TokenizerFast code."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    chars = "abcdefghijklmnopqrstuvwxyz0123456789.,'-!?"
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(c, -3.0) for c in chars] + [("\u2581" + c, -2.5) for c in chars]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                           extra_ids=0, model_max_length=max_length)


def _tiny_unet3d():
    from diffusers import AutoencoderKL, DDIMScheduler, UNet3DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    unet = UNet3DConditionModel(
        sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"), up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
        block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
        cross_attention_dim=32, attention_head_dim=8,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=32,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, scaling_factor=0.18215,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=514, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, bos_token_id=512, eos_token_id=513, pad_token_id=513,
    ))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")
    return unet, vae, text_encoder, _tiny_tokenizer(), scheduler


def _tiny_wan():
    """Wan 2.1's classes and scheduler setting (UniPC with flow sigmas, shift 3) at a tiny size."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=8, out_channels=8,
        text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32)
    vae = AutoencoderKLWan(base_dim=16, z_dim=8, dim_mult=[1, 1, 2, 2], num_res_blocks=1,
                           temperal_downsample=[False, True, True],
                           latents_mean=[0.1 * i - 0.35 for i in range(8)], latents_std=[1.0 + 0.2 * i for i in range(8)])
    tokenizer = _tiny_t5_tokenizer(WanVideo.text_length)
    text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                               num_heads=4, relative_attention_num_buckets=8))
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0,
                                        num_train_timesteps=1000)
    return transformer, vae, text_encoder, tokenizer, scheduler


def _tiny_cogvideox():
    """CogVideoX-2B's classes and scheduler setting (v-prediction DDIM, SNR shift 3, zero terminal SNR)."""
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXTransformer3DModel
    from transformers import T5Config, T5EncoderModel

    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=4, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=16,
        text_embed_dim=32, num_layers=2, sample_width=32, sample_height=32, sample_frames=9, patch_size=2,
        temporal_compression_ratio=4, max_text_seq_length=64)
    vae = AutoencoderKLCogVideoX(
        in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * 4,
        up_block_types=("CogVideoXUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8), latent_channels=4,
        layers_per_block=1, norm_num_groups=2, temporal_compression_ratio=4)
    tokenizer = _tiny_t5_tokenizer(64)
    text_encoder = T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                           num_heads=4, relative_attention_num_buckets=8))
    scheduler = CogVideoXDDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       clip_sample=False, set_alpha_to_one=True, steps_offset=0,
                                       prediction_type="v_prediction", rescale_betas_zero_snr=True,
                                       snr_shift_scale=3.0, timestep_spacing="trailing")
    return transformer, vae, text_encoder, tokenizer, scheduler


TINY_FAMILIES = {"unet3d": (VideoDiffusion, _tiny_unet3d), "wan": (WanVideo, _tiny_wan),
                 "cogvideox": (CogVideoXVideo, _tiny_cogvideox)}


def tiny_model(seed: int = 0, device: str | torch.device = "cpu", family: str = "unet3d") -> VideoDiffusion:
    """A family's classes at a small random size, built in a second: ModelScope's (the tiny preset, about 1.5M
    parameters), Wan 2.1's or CogVideoX's (tests of the transformer families)."""
    if family not in TINY_FAMILIES:
        raise ValueError(f"family {family!r}: use one of {', '.join(TINY_FAMILIES)}")
    cls, build = TINY_FAMILIES[family]
    torch.manual_seed(seed)
    name = "tiny" if family == "unet3d" else f"tiny-{family}"
    return cls(*build(), name=name).to(device)


BUILTIN_MODELS = ("world", "tiny")


def build_model(spec: str, seed: int = 0, device: str | torch.device = "cpu") -> VideoDiffusion:
    """'world': the built-in model trained on engine.world (shipped in engine/assets); 'tiny': random weights;
    anything else: a diffusers folder."""
    if spec == "tiny":
        return tiny_model(seed, device)
    if spec == "world":
        from engine.world_assets import MODEL_DIR

        model = load_model(MODEL_DIR, device)
        model.name = "world"
        return model
    return load_model(spec, device)
