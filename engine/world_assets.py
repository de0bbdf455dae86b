"""The built-in model and reward, trained by the project on its procedural world (engine.world):

    python -m engine.world_assets --seed 0            # 68 min on 2 CPU cores; writes engine/assets/

1. a base text-to-video model with ModelScope's diffusers classes (``UNet3DConditionModel``, ``AutoencoderKL``,
   ``CLIPTextModel`` + ``CLIPTokenizer``, ``DDIMScheduler``, epsilon prediction), saved in the pipeline layout
   (``engine/assets/world-t2v``, loadable by a stock ``TextToVideoSDPipeline``), trained on the world's mixed
   clean and degraded clips, so it generates mixed quality;
2. a preference reward: a small open_clip architecture (``WorldCLIP-XS``, config in engine/assets) trained so
   that clean, caption-faithful frames score above degraded or mismatched ones, saved in the HPS_v2 checkpoint
   format (``{"state_dict": ...}``, fp16 tensors) and loaded through ``--reward hpsv2:PATH``.

Each stage is seeded; the same seed and thread count give the same files. Progress bars show each stage.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from engine import world
from engine.errors import UserError, cli_entry

ASSETS = Path(__file__).parent / "assets"
MODEL_DIR = ASSETS / "world-t2v"
REWARD_FILE = ASSETS / "world-hps.pt"
REWARD_ARCH = "WorldCLIP-XS"  # its open_clip config: engine/assets/WorldCLIP-XS.json


# ---------------------------------------------------------------------------------- architecture
def world_words() -> list[str]:
    """Every word and punctuation mark the world's captions use (both templates)."""
    rng = random.Random(0)
    words: set[str] = set()
    for _ in range(3000):
        clip = world.random_clip(rng, template=rng.choice("AB"))
        words.update(re.findall(r"[a-z]+|[^\sa-z]", clip.caption))
    return sorted(words)


def world_tokenizer(folder: Path):
    """A CLIP BPE tokenizer whose merges make each world word one token (other text falls back to bytes)."""
    from open_clip.tokenizer import bytes_to_unicode
    from transformers import CLIPTokenizer

    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols]
    merges: list[tuple[str, str]] = []

    def build(merge_list):
        (folder / "vocab.json").write_text(json.dumps({v: i for i, v in enumerate(vocab + ["<|startoftext|>", "<|endoftext|>"])}))
        (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merge_list))
        return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)

    # Merge each word left to right; a word that an earlier word's merges split differently gets merges for
    # the pieces it ends up with, appended last (a later merge never changes a word already in one piece).
    for _ in range(10):
        tokenizer = build(merges)
        unmerged = [w for w in world_words() if len(tokenizer.tokenize(w)) > 1]
        if not unmerged:
            return tokenizer
        for word in unmerged:
            pieces = tokenizer.tokenize(word)
            current = pieces[0]
            for piece in pieces[1:]:
                merges.append((current, piece))
                current = current + piece
                if current not in vocab:
                    vocab.append(current)
    raise RuntimeError("could not build whole-word merges for the world's vocabulary")


def world_model_components(tokenizer, seed: int):
    """Untrained components at the built-in size: latent 4 x F x 8 x 8 for 32 x 32 frames."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet3DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet3DConditionModel(
        sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock3D", "CrossAttnDownBlock3D"),
        up_block_types=("CrossAttnUpBlock3D", "CrossAttnUpBlock3D"),
        block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
        cross_attention_dim=64, attention_head_dim=8,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=32,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 64), layers_per_block=1, norm_num_groups=1, scaling_factor=1.0,
    )  # one norm group: with one channel per group, GroupNorm removed each channel's mean and the VAE lost colour
    vocab = tokenizer.get_vocab()
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"],
    ))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")
    return unet, vae, text_encoder, scheduler


def render_batch(rng: random.Random, count: int, sample=world.training_mixture) -> tuple[torch.Tensor, list[world.Clip]]:
    clips = [sample(rng) for _ in range(count)]
    return torch.stack([world.render(c) for c in clips]), clips


def cosine_lr(optimizer, steps: int, warmup: int):
    import math

    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))))


# ---------------------------------------------------------------------------------- stage 1: the VAE
def train_vae(vae, steps: int, seed: int, batch: int = 32, object_weight: float = 10.0) -> None:
    """Per-frame autoencoder on clean and degraded frames, trained on the posterior mean (the chain encodes
    sources with it; the KL term only keeps latents bounded); the latent scale makes scaled latents unit-variance.

    The object covers about a tenth of a frame, so its pixels weigh ``1 + object_weight`` in the loss: with
    uniform weights the VAE reconstructed every object as the same orange blob (measured), and a model cannot
    generate a colour or shape its VAE cannot decode."""
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    schedule = cosine_lr(optimizer, steps, 50)
    vae.train()
    for _ in (bar := tqdm(range(steps), desc="1/3 VAE", dynamic_ncols=True)):
        frames, clips = render_batch(rng, batch // world.FRAMES + 1)
        objects = torch.stack([world.object_weights(world.render(c.clean()), c.background) for c in clips])
        chosen = torch.randperm(frames.shape[0] * world.FRAMES)[:batch]
        x = frames.flatten(0, 1)[chosen] * 2 - 1
        weight = 1 + object_weight * objects.flatten(0, 1)[chosen].unsqueeze(1)
        posterior = vae.encode(x).latent_dist
        error = vae.decode(posterior.mode()).sample - x
        loss = ((error.abs() + error.pow(2)) * weight).mean() / weight.mean() + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    vae.eval()
    with torch.no_grad():
        frames, _ = render_batch(random.Random(seed + 1), 64)
        x = frames.flatten(0, 1) * 2 - 1
        latents = vae.encode(x).latent_dist.mode()
        mse = F.mse_loss(vae.decode(latents).sample.clamp(-1, 1) * 0.5, x * 0.5)
    vae.register_to_config(scaling_factor=round(1.0 / latents.std().item(), 5))
    print(f"VAE reconstruction PSNR {10 * torch.log10(1 / mse).item():.1f} dB, latent scale {vae.config.scaling_factor}")


# ---------------------------------------------------------------------------------- stage 2: the UNet
def train_unet(unet, vae, text_encoder, tokenizer, scheduler, steps: int, seed: int, batch: int = 16,
               lr: float = 1e-3, caption_dropout: float = 0.1, ema_decay: float = 0.998, min_snr: float = 5.0) -> None:
    """Epsilon-prediction training of the UNet and text encoder together, with temporal offset noise as the
    chain draws it; the EMA of the weights is what is saved.

    Min-SNR loss weights (Hang et al. 2023: min(SNR, gamma) / SNR for epsilon prediction) move the weight from
    the easy low-noise steps to the noisy ones, where colour, shape and motion are decided: with uniform weights
    2,000 steps learned the backgrounds but hardly the captions' colours or any motion (measured)."""
    rng = random.Random(seed)
    generator = torch.Generator().manual_seed(seed)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    schedule = cosine_lr(optimizer, steps, 100)
    ema = [p.detach().clone() for p in params]
    alphas = scheduler.alphas_cumprod
    unet.train()
    text_encoder.train()
    scale = vae.config.scaling_factor
    for step in (bar := tqdm(range(steps), desc="2/3 UNet + text encoder", dynamic_ncols=True)):
        frames, clips = render_batch(rng, batch)
        with torch.no_grad():
            latents = vae.encode(frames.flatten(0, 1) * 2 - 1).latent_dist.mode() * scale
            latents = latents.unflatten(0, (batch, world.FRAMES)).transpose(1, 2)
        captions = ["" if rng.random() < caption_dropout else c.caption for c in clips]
        ids = tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        context = text_encoder(ids)[0]
        noise = torch.randn(latents.shape, generator=generator)
        noise = noise + 0.1 * torch.randn((*latents.shape[:3], 1, 1), generator=generator)
        t = torch.randint(0, len(alphas), (batch,), generator=generator)
        a = alphas[t].view(-1, 1, 1, 1, 1)
        noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
        snr = alphas[t] / (1 - alphas[t])
        weight = snr.clamp(max=min_snr) / snr if min_snr > 0 else torch.ones_like(snr)
        error = (unet(noisy, t, encoder_hidden_states=context).sample - noise).pow(2).mean((1, 2, 3, 4))
        loss = (weight * error).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        decay = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema, params):
                e.lerp_(p.detach(), 1 - decay)
        bar.set_postfix(loss=f"{loss.item():.4f}")
    with torch.no_grad():
        for e, p in zip(ema, params):
            p.copy_(e)
    unet.eval()
    text_encoder.eval()


# ---------------------------------------------------------------------------------- stage 3: the reward
def preference_group(rng: random.Random) -> tuple[list[torch.Tensor], str]:
    """One caption and three frames, best first: the clean render, a degraded render, and a clean render of
    another caption (other colour or shape) at the same place."""
    clip = world.random_clip(rng)
    frame = rng.randrange(world.FRAMES)
    degradation = rng.choice([d for d in world.DEGRADATIONS if d != "jitter"])  # jitter is invisible in one frame
    degraded = world.Clip(**{**clip.__dict__, "degradation": degradation})
    if rng.random() < 0.5:
        other = world.Clip(**{**clip.__dict__, "colour": rng.choice([c for c in world.COLOURS if c != clip.colour])})
    else:
        other = world.Clip(**{**clip.__dict__, "shape": rng.choice([s for s in world.SHAPES if s != clip.shape])})
    return [world.render(c)[frame] for c in (clip, degraded, other)], clip.caption


def train_reward(model, tokenizer, vae, steps: int, seed: int, batch: int = 32, lr: float = 1e-3) -> None:
    """HPS-style ranking (cross-entropy over each caption's group, best first) plus CLIP's contrastive loss over
    the clean pairs. Half the batches go through the video model's VAE, so decoded frames are ranked as well."""
    from engine.rewards import clip_preprocess

    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    schedule = cosine_lr(optimizer, steps, 50)
    model.train()
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else int(size)
    for _ in (bar := tqdm(range(steps), desc="3/3 reward", dynamic_ncols=True)):
        groups, captions = zip(*(preference_group(rng) for _ in range(batch)))
        images = torch.stack([torch.stack(g) for g in groups])  # [B, 3, 3, H, W]
        if rng.random() < 0.5:
            with torch.no_grad():
                images = (vae.decode(vae.encode(images.flatten(0, 1) * 2 - 1).latent_dist.mode()).sample * 0.5 + 0.5)
                images = images.clamp(0, 1).unflatten(0, (batch, 3))
        image = F.normalize(model.encode_image(clip_preprocess(images.flatten(0, 1), size)), dim=-1).unflatten(0, (batch, 3))
        text = F.normalize(model.encode_text(tokenizer(list(captions))), dim=-1)
        scale = model.logit_scale.exp()
        ranking = F.cross_entropy(scale * torch.einsum("bgd,bd->bg", image, text), torch.zeros(batch, dtype=torch.long))
        logits = scale * image[:, 0] @ text.T
        target = torch.arange(batch)
        contrastive = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))
        loss = ranking + contrastive
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, 4.6052)
        bar.set_postfix(rank=f"{ranking.item():.3f}", clip=f"{contrastive.item():.3f}")
    model.eval()


# ---------------------------------------------------------------------------------- the command
def build_and_train(seed: int, vae_steps: int, unet_steps: int, reward_steps: int, output: Path,
                    unet_lr: float = 1e-3, min_snr: float = 5.0) -> None:
    import open_clip
    from diffusers import TextToVideoSDPipeline

    from engine.rewards import register_open_clip_configs

    torch.set_num_threads(torch.get_num_threads())
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = world_tokenizer(Path(tmp))
        unet, vae, text_encoder, scheduler = world_model_components(tokenizer, seed)
        train_vae(vae, vae_steps, seed)
        vae.requires_grad_(False)
        train_unet(unet, vae, text_encoder, tokenizer, scheduler, unet_steps, seed + 1, lr=unet_lr, min_snr=min_snr)
        model_dir = output / MODEL_DIR.name
        TextToVideoSDPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                              scheduler=scheduler).save_pretrained(str(model_dir))
    print(f"base model written to {model_dir}")

    register_open_clip_configs()
    torch.manual_seed(seed + 2)
    reward = open_clip.create_model(REWARD_ARCH, pretrained=None)
    train_reward(reward, open_clip.get_tokenizer(REWARD_ARCH), vae, reward_steps, seed + 2)
    state = {k: v.half() if v.is_floating_point() else v for k, v in reward.state_dict().items()}
    torch.save({"state_dict": state, "architecture": REWARD_ARCH}, str(output / REWARD_FILE.name))
    print(f"reward written to {output / REWARD_FILE.name}")


@cli_entry
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vae-steps", type=int, default=2500)
    parser.add_argument("--unet-steps", type=int, default=2400)
    parser.add_argument("--reward-steps", type=int, default=1000)
    parser.add_argument("--unet-lr", type=float, default=1e-3, help="peak learning rate of the UNet stage")
    parser.add_argument("--min-snr", type=float, default=5.0, help="min-SNR loss weighting gamma (0 = uniform weights)")
    parser.add_argument("--output", default=str(ASSETS), help="folder for world-t2v/ and world-hps.pt")
    args = parser.parse_args(argv)
    if min(args.vae_steps, args.unet_steps, args.reward_steps) < 1:
        raise UserError("--vae-steps, --unet-steps and --reward-steps must be at least 1")
    if not (0 < args.unet_lr < float("inf")) or not (0 <= args.min_snr < float("inf")):
        raise UserError("--unet-lr must be a positive number and --min-snr a non-negative one (0 = uniform weights)")
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    build_and_train(args.seed, args.vae_steps, args.unet_steps, args.reward_steps, output, args.unet_lr, args.min_snr)


if __name__ == "__main__":
    main()
