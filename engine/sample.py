"""Generate videos from prompts: ``python -m engine.sample --model PATH|world|tiny --prompt TEXT [--lora FOLDER]``.

    python -m engine.sample --model world --prompt "a red circle moving left on a black background" --output samples/
    python -m engine.sample --model /weights/text-to-video-ms-1.7b --lora runs/my-run/lora --lora-scale 0.8 \\
        --prompts prompts.txt --ddim-steps 50 --guidance 9 --seed 0 --output samples/

Each video is generated from pure noise with the full D-step chain and classifier-free guidance (the engine's
own CFG + sampler update: DDIM with diffusers' DDIMScheduler arithmetic, flow-matching Euler for Wan). The
starting noise of video k is ``torch.randn`` from a CPU generator seeded ``seed + k``, so a seed gives the same
video on any device and batch size (up to float rounding). Outputs in ``--output``, per prompt: ``NNN_<prompt>.mp4``, ``.gif`` and a
PNG grid of the frames; ``samples.json`` records the settings, seeds and files. With several ``--lora-scale``
strengths (``0.25,0.5,1``) every strength generates from the same noise: per prompt an mp4 and a GIF per strength
(``_scale0.5``) and one grid with a labelled row per strength.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tqdm import tqdm

from engine import media
from engine.builtin import build_model
from engine.chain import generate
from engine.cli import HelpFormatter, add_model_arguments, check_common, read_prompt_options, slug
from engine.errors import UserError, cli_entry
from engine.lora import check_lora_folder, load_lora, set_lora_scale
from engine.runtime import autocast, resolve_device


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=HelpFormatter)
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
    elif len(args.lora_scale) > 1:
        raise UserError("--lora-scale with several strengths needs --lora FOLDER (the adapter to scale)")
    if args.fps <= 0:
        raise UserError(f"--fps {args.fps} must be positive")
    device = resolve_device(args.device)
    model = build_model(args.model, seed=0, device=device)
    model.latent_shape(*size)  # the VAE factor and frame-count checks, before any work
    scales = args.lora_scale if args.lora else [None]
    if args.lora:
        load_lora(model.denoiser, args.lora, scales[0])
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    records = []
    # the bar counts video-steps: a batch of n videos advances it by n per DDIM step
    with tqdm(total=len(prompts) * len(scales) * args.ddim_steps, desc="sampling", unit="step",
              dynamic_ncols=True) as bar:
        for start in range(0, len(prompts), args.batch_size):
            batch = prompts[start:start + args.batch_size]
            seeds = [args.seed + start + i for i in range(len(batch))]
            videos = []  # per scale, the batch's videos: every scale starts from the same noise
            for scale in scales:
                if scale is not None:
                    set_lora_scale(model.denoiser, scale)
                with autocast(device, args.precision):
                    latents = generate(model, batch, seeds, size, args.ddim_steps, args.guidance, args.eta, bar.update)
                    videos.append([model.decode_video(latent) for latent in latents])
            for i, (prompt, seed) in enumerate(zip(batch, seeds)):
                stem, files = f"{start + i:03d}_{slug(prompt)}", []
                for scale, per_scale in zip(scales, videos):
                    name = stem if len(scales) == 1 else f"{stem}_scale{scale:g}"
                    files += [media.write_mp4(per_scale[i], out / f"{name}.mp4", args.fps),
                              media.write_gif(per_scale[i], out / f"{name}.gif", args.fps)]
                labels = [f"scale {scale:g}" for scale in scales] if len(scales) > 1 else None
                files.append(media.write_grid([per_scale[i] for per_scale in videos], out / f"{stem}.png", labels))
                records.append({"prompt": prompt, "seed": seed, "files": [f.name for f in files]})
    summary = {"model": args.model, "lora": args.lora, "lora_scale": args.lora_scale if args.lora else None,
               "ddim_steps": args.ddim_steps, "guidance": args.guidance, "eta": args.eta,
               "num_frames": size[0], "height": size[1], "width": size[2], "videos": records}
    (out / "samples.json").write_text(json.dumps(summary, indent=2))
    print(f"{len(records)} videos in {out}")
    return summary


if __name__ == "__main__":
    main()
