"""The three training stages of the built-in assets (engine.world.build): the VAE, the UNet with its text
encoder, and the preference reward, each on clips of the procedural world and seeded."""

from __future__ import annotations

import math
import random

import torch
import torch.nn.functional as F
from tqdm import tqdm

from engine.rewards.clip import clip_preprocess
from engine.world.gold import object_weights
from engine.world.rendering import render
from engine.world.scene import COLOURS, DEGRADATIONS, FRAMES, SHAPES, Clip, random_clip, training_mixture


def render_batch(rng: random.Random, count: int, sample=training_mixture) -> tuple[torch.Tensor, list[Clip]]:
    clips = [sample(rng) for _ in range(count)]
    return torch.stack([render(c) for c in clips]), clips


def cosine_lr(optimizer, steps: int, warmup: int):
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
        frames, clips = render_batch(rng, batch // FRAMES + 1)
        objects = torch.stack([object_weights(render(c.clean()), c.background) for c in clips])
        chosen = torch.randperm(frames.shape[0] * FRAMES)[:batch]
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
            latents = latents.unflatten(0, (batch, FRAMES)).transpose(1, 2)
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
    clip = random_clip(rng)
    frame = rng.randrange(FRAMES)
    degradation = rng.choice([d for d in DEGRADATIONS if d != "jitter"])  # jitter is invisible in one frame
    degraded = Clip(**{**clip.__dict__, "degradation": degradation})
    if rng.random() < 0.5:
        other = Clip(**{**clip.__dict__, "colour": rng.choice([c for c in COLOURS if c != clip.colour])})
    else:
        other = Clip(**{**clip.__dict__, "shape": rng.choice([s for s in SHAPES if s != clip.shape])})
    return [render(c)[frame] for c in (clip, degraded, other)], clip.caption


def train_reward(model, tokenizer, vae, steps: int, seed: int, batch: int = 32, lr: float = 1e-3) -> None:
    """HPS-style ranking (cross-entropy over each caption's group, best first) plus CLIP's contrastive loss over
    the clean pairs. Half the batches go through the video model's VAE, so decoded frames are ranked as well."""
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
