"""The built-in model and reward, trained by the project on its procedural world (engine.world):

    python -m engine.world.build --seed 0             # 68 min on 2 CPU cores; writes engine/assets/

1. a base text-to-video model with ModelScope's diffusers classes (``UNet3DConditionModel``, ``AutoencoderKL``,
   ``CLIPTextModel`` + ``CLIPTokenizer``, ``DDIMScheduler``, epsilon prediction), saved in the pipeline layout
   (``engine/assets/world-t2v``, loadable by a stock ``TextToVideoSDPipeline``), trained on the world's mixed
   clean and degraded clips, so it generates mixed quality;
2. a preference reward: a small open_clip architecture (``WorldCLIP-XS``, config in engine/assets) trained so
   that clean, caption-faithful frames score above degraded or mismatched ones, saved in the HPS_v2 checkpoint
   format (``{"state_dict": ...}``, fp16 tensors) and loaded through ``--reward hpsv2:PATH``.

Each stage is seeded; the same seed and thread count give the same files. Progress bars show each stage.
This file builds the untrained components and writes the files; the stages are in engine.world.training.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import tempfile
from pathlib import Path

import torch

from engine.assets import ASSETS, MODEL_DIR, REWARD_ARCH, REWARD_FILE
from engine.errors import UserError, cli_entry
from engine.rewards.clip import register_open_clip_configs
from engine.world.scene import random_clip
from engine.world.training import train_reward, train_unet, train_vae


# ---------------------------------------------------------------------------------- architecture
def world_words() -> list[str]:
    """Every word and punctuation mark the world's captions use (both templates)."""
    rng = random.Random(0)
    words: set[str] = set()
    for _ in range(3000):
        clip = random_clip(rng, template=rng.choice("AB"))
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


# ---------------------------------------------------------------------------------- the command
def build_and_train(seed: int, vae_steps: int, unet_steps: int, reward_steps: int, output: Path,
                    unet_lr: float = 1e-3, min_snr: float = 5.0) -> None:
    import open_clip
    from diffusers import TextToVideoSDPipeline

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
