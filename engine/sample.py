"""Generate videos from prompts: ``python -m engine.sample --model PATH|world|tiny --prompt TEXT [--lora FOLDER]``.

    python -m engine.sample --model world --prompt "a red circle moving left on a black background" --output samples/
    python -m engine.sample --model /weights/text-to-video-ms-1.7b --lora runs/my-run/lora --lora-scale 0.8 \\
        --prompts prompts.txt --ddim-steps 50 --guidance 9 --seed 0 --output samples/

Each video is generated from pure noise with the full D-step chain and classifier-free guidance (the engine's
own CFG + sampler update: DDIM with diffusers' DDIMScheduler arithmetic, flow-matching Euler for Wan). The
starting noise of video k is ``torch.randn`` from a CPU generator seeded ``seed + k``, so a seed gives the same
video on any device and batch size (up to float rounding). Outputs in ``--output``, per prompt: ``NNN_<prompt>.mp4``, ``.gif`` and a
PNG grid of the frames; ``samples.json`` records the settings, seeds and files.

The helpers here (``apply_lora``, ``set_lora_scale``, ``generate``) are shared by
``engine.evaluate`` and ``engine.export``.
"""

from __future__ import annotations

import argparse
import json
import re
import warnings
from pathlib import Path

import torch
from tqdm import tqdm

from engine.chain import EditChain
from engine.errors import UserError, cli_entry
from engine.lora import CONFIG_NAME, WEIGHTS_NAME, lora_layers
from engine.models import BUILTIN_MODELS, VideoDiffusion, model_family
from engine.runtime import autocast, resolve_device

BUILTIN_SIZE = (8, 32, 32)  # frames, height, width of the built-in models (engine.config.PRESETS)


# ---------------------------------------------------------------------------------- LoRA
def check_lora_folder(folder: str | Path) -> Path:
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"LoRA folder {folder} does not exist; pass --lora the lora/ folder a training run wrote")
    missing = [n for n in (WEIGHTS_NAME, CONFIG_NAME) if not (folder / n).is_file()]
    if missing:
        raise UserError(f"LoRA folder {folder} lacks {' and '.join(missing)}; pass a peft adapter folder "
                        "(adapter_model.safetensors + adapter_config.json), e.g. runs/<run>/lora")
    return folder


def apply_lora(unet: torch.nn.Module, folder: str | Path, scale: float = 1.0, adapter_name: str = "default") -> None:
    """Inject the peft adapter in ``folder`` under ``adapter_name``, load its weights and make it the active one.

    Several adapters can live side by side (``engine.evaluate`` loads one per checkpoint); ``scale`` multiplies
    the adapter's alpha / r, like peft's ``set_scale``. Any peft LoRA config is accepted (rank, alpha, targets).
    """
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    folder = check_lora_folder(folder)
    try:
        config = LoraConfig.from_pretrained(str(folder))
    except Exception as err:  # peft raises TypeError/ValueError/JSONDecodeError for a bad config
        raise UserError(f"{folder / CONFIG_NAME} is not a peft LoRA config ({_first_line(err)}); "
                        "pass a folder written by engine.train or peft's save_pretrained") from None
    try:
        state = load_file(str(folder / WEIGHTS_NAME))
    except Exception as err:
        raise UserError(f"{folder / WEIGHTS_NAME} cannot be read ({_first_line(err)}); the file is damaged") from None
    with warnings.catch_warnings():  # peft warns whenever a second adapter joins a model: that is intended here
        warnings.simplefilter("ignore", UserWarning)
        try:
            inject_adapter_in_model(config, unet, adapter_name=adapter_name)
        except ValueError as err:
            raise UserError(f"LoRA in {folder} targets modules this model lacks ({_first_line(err)}); "
                            "use the adapter trained for this base model") from None
    try:
        result = set_peft_model_state_dict(unet, state, adapter_name=adapter_name)
    except RuntimeError as err:
        raise UserError(f"LoRA in {folder} does not fit this model ({str(err).strip().splitlines()[-1].strip()}); "
                        "use the adapter trained for this base model") from None
    unexpected = list(getattr(result, "unexpected_keys", None) or [])
    missing = [k for k in getattr(result, "missing_keys", None) or [] if "lora_" in k and f".{adapter_name}." in k]
    if unexpected or missing:
        example = (unexpected or missing)[0]
        raise UserError(f"LoRA in {folder} does not fit this model ({len(unexpected)} unexpected, {len(missing)} "
                        f"missing weights, e.g. {example}); use the adapter trained for this base model")
    activate_adapter(unet, adapter_name)
    set_lora_scale(unet, scale, adapter_name)
    unet.requires_grad_(False)


def activate_adapter(unet: torch.nn.Module, adapter_name: str) -> None:
    for layer in lora_layers(unet):
        layer.set_adapter(adapter_name)
        layer.enable_adapters(True)


def set_lora_scale(unet: torch.nn.Module, scale: float, adapter_name: str = "default") -> None:
    """Output of each LoRA layer = base + scale * (alpha / r) * B A x; 0 turns the adapter off, 1 is as trained."""
    for layer in lora_layers(unet):
        layer.set_scale(adapter_name, scale)


# ---------------------------------------------------------------------------------- generation
def initial_noise(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """x_T for one video: standard normal from a CPU generator, so the seed means the same on every device."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def generate(model: VideoDiffusion, prompts: list[str], seeds: list[int], size: tuple[int, int, int],
             ddim_steps: int = 20, guidance: float = 3.0, eta: float = 0.0, progress=None) -> torch.Tensor:
    """Latents [B, C, F, h, w] for prompts[i] from ``initial_noise(..., seeds[i])`` through all D DDIM steps.

    ``progress(n)`` is called after each step with the number of videos it advanced. With ``eta > 0`` the
    per-step noise comes from one generator seeded with ``seeds[0]``, so it depends on how videos are batched.
    """
    shape = model.latent_shape(*size)
    chain = EditChain(model, ddim_steps, tau=1.0, grad_steps=1, guidance=guidance, eta=eta, offset_noise=0.0)
    device = model.device
    x = torch.stack([initial_noise(shape, s) for s in seeds]).to(device)
    context = model.encode_prompts(prompts)
    uncond = model.encode_prompts([""]).expand(len(prompts), -1, -1)
    generator = torch.Generator(device).manual_seed(seeds[0]) if eta > 0 else None
    for t in chain.timesteps:
        x = chain.guided_step(x, t, context, uncond, generator)
        if progress:
            progress(len(prompts))
    return x.float()


def slug(text: str, length: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:length].rstrip("_") or "prompt"


# ---------------------------------------------------------------------------------- command line
def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Options every generating command shares (sample, evaluate)."""
    parser.add_argument("--model", default="world",
                        help="diffusers text-to-video folder, 'world' (the built-in model) or 'tiny' (random, for tests)")
    parser.add_argument("--lora-scale", type=float, default=1.0, help="LoRA strength: 0 = base model, 1 = as trained")
    parser.add_argument("--ddim-steps", type=positive_int, default=20, help="D: DDIM steps from noise")
    parser.add_argument("--guidance", type=float, default=3.0,
                        help="classifier-free guidance scale (training uses 3; diffusers' ModelScope pipeline 9)")
    parser.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0 = deterministic)")
    parser.add_argument("--seed", type=int, default=0, help="video k starts from CPU randn seeded seed + k")
    parser.add_argument("--num-frames", type=positive_int, help="frames (default 8 for world and tiny, else the family's: 16 ModelScope, 81 Wan, 49 CogVideoX)")
    parser.add_argument("--height", type=positive_int, help="pixels (default 32 for world and tiny, else the family's: 256, 480, 480)")
    parser.add_argument("--width", type=positive_int, help="pixels (default 32 for world and tiny, else the family's: 256, 832, 720)")
    parser.add_argument("--batch-size", type=positive_int, default=1, help="videos generated together")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                        help="autocast on CUDA (auto = bf16); always fp32 on the CPU")
    parser.add_argument("--output", required=True, help="output folder")


def check_common(args: argparse.Namespace) -> tuple[int, int, int]:
    """Validate the shared options before any model loads; returns (frames, height, width)."""
    if args.guidance < 1.0:
        raise UserError(f"--guidance {args.guidance} must be at least 1 (1 = no guidance)")
    if args.eta < 0:
        raise UserError(f"--eta {args.eta} must be non-negative")
    if args.model not in BUILTIN_MODELS and not Path(args.model).is_dir():
        raise UserError(f"--model {args.model} is not a folder; pass a diffusers text-to-video folder, 'world' or 'tiny'")
    default = BUILTIN_SIZE if args.model in BUILTIN_MODELS else model_family(Path(args.model)).default_size
    size = tuple(v if v is not None else d for v, d in zip((args.num_frames, args.height, args.width), default))
    if size[1] % 8 or size[2] % 8:
        raise UserError(f"--height/--width {size[1]}x{size[2]} must be multiples of 8")
    output = Path(args.output)
    if output.exists() and not output.is_dir():
        raise UserError(f"--output {output} is a file; pass a folder")
    return size


def read_prompt_options(prompts: list[str] | None, prompts_file: str | None) -> list[str]:
    from engine.data import read_prompts

    found = list(prompts or [])
    if prompts_file:
        found += read_prompts(prompts_file)
    found = [p.strip() for p in found if p.strip()]
    if not found:
        raise UserError("no prompts: pass --prompt TEXT (repeatable) or --prompts FILE (one per line)")
    return found


def load_model(spec: str, device: torch.device) -> VideoDiffusion:
    from engine.models import build_model

    return build_model(spec, seed=0, device=device)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    parser.add_argument("--prompts", help="text file, one prompt per line (after any --prompt)")
    parser.add_argument("--lora", help="LoRA folder (adapter_model.safetensors + adapter_config.json); none = base model")
    parser.add_argument("--fps", type=float, default=8.0, help="frame rate of the mp4 and GIF")
    add_model_arguments(parser)
    return parser


@cli_entry
def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    size = check_common(args)
    prompts = read_prompt_options(args.prompt, args.prompts)
    if args.lora:
        check_lora_folder(args.lora)
    if args.fps <= 0:
        raise UserError(f"--fps {args.fps} must be positive")
    device = resolve_device(args.device)
    model = load_model(args.model, device)
    model.latent_shape(*size)  # the VAE factor and frame-count checks, before any work
    if args.lora:
        apply_lora(model.denoiser, args.lora, args.lora_scale)

    from engine import media

    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    records = []
    # the bar counts video-steps: a batch of n videos advances it by n per DDIM step
    with tqdm(total=len(prompts) * args.ddim_steps, desc="sampling", unit="step", dynamic_ncols=True) as bar:
        for start in range(0, len(prompts), args.batch_size):
            batch = prompts[start:start + args.batch_size]
            seeds = [args.seed + start + i for i in range(len(batch))]
            with autocast(device, args.precision):
                latents = generate(model, batch, seeds, size, args.ddim_steps, args.guidance, args.eta, bar.update)
                videos = [model.decode_video(latent) for latent in latents]
            for i, (prompt, seed, frames) in enumerate(zip(batch, seeds, videos)):
                stem = f"{start + i:03d}_{slug(prompt)}"
                files = [media.write_mp4(frames, out / f"{stem}.mp4", args.fps),
                         media.write_gif(frames, out / f"{stem}.gif", args.fps),
                         media.write_grid([frames], out / f"{stem}.png")]
                records.append({"prompt": prompt, "seed": seed, "files": [f.name for f in files]})
    summary = {"model": args.model, "lora": args.lora, "lora_scale": args.lora_scale if args.lora else None,
               "ddim_steps": args.ddim_steps, "guidance": args.guidance, "eta": args.eta,
               "num_frames": size[0], "height": size[1], "width": size[2], "videos": records}
    (out / "samples.json").write_text(json.dumps(summary, indent=2))
    print(f"{len(records)} videos in {out}")
    return summary


def _first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


if __name__ == "__main__":
    main()
