"""What the generating commands (``engine.sample``, ``engine.evaluate``, ``engine.export``) share on the command
line: the model options, their checks before any model loads, the output folder's check, and prompt reading."""

from __future__ import annotations

import argparse
import math
import re
from pathlib import Path

from engine.builtin import builtin
from engine.data import read_prompts
from engine.errors import UserError
from engine.models import model_family


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each option's default after its help, unless there is none to show (None, a flag's False) or the help says it
    in words (a default that depends on the model)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False or "(default:" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def lora_scales(text: str) -> list[float]:
    """``--lora-scale``: one strength or a comma-separated list of distinct finite strengths."""
    try:
        scales = [float(part) for part in text.split(",")]
    except ValueError:
        raise UserError(f"--lora-scale {text} is not a number or a comma-separated list of numbers "
                        "(e.g. 0.5 or 0.25,0.5,1)") from None
    if not all(math.isfinite(s) for s in scales) or len(set(scales)) != len(scales):
        raise UserError(f"--lora-scale {text}: the strengths must be finite and distinct (e.g. 0.25,0.5,1)")
    return scales


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Options every generating command shares (sample, evaluate)."""
    parser.add_argument("--model", default="world",
                        help="diffusers text-to-video folder, 'world' (the built-in model) or 'tiny' (random, for tests)")
    parser.add_argument("--lora-scale", default="1",
                        help="LoRA strength (0 = base model, 1 = as trained), or a comma-separated list to compare "
                             "strengths, e.g. 0.25,0.5,1")
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


def check_model(spec: str, what: str = "a diffusers text-to-video folder") -> None:
    """A built-in name or an existing folder (the folder's contents are checked when it loads)."""
    if builtin(spec) is None and not Path(spec).is_dir():
        raise UserError(f"--model {spec} is not a folder; pass {what}, 'world' or 'tiny'")


def check_output_folder(output: str | Path) -> Path:
    """An output folder that is not a file (it is created when the command writes)."""
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise UserError(f"--output {output} is a file; pass a folder")
    return output


def check_common(args: argparse.Namespace) -> tuple[int, int, int]:
    """Validate the shared options before any model loads (``--lora-scale`` becomes its list of strengths);
    returns (frames, height, width)."""
    args.lora_scale = lora_scales(args.lora_scale)
    if args.guidance < 1.0:
        raise UserError(f"--guidance {args.guidance} must be at least 1 (1 = no guidance)")
    if args.eta < 0:
        raise UserError(f"--eta {args.eta} must be non-negative")
    check_model(args.model)
    preset = builtin(args.model)
    default = preset.size if preset else model_family(Path(args.model)).default_size
    size = tuple(v if v is not None else d for v, d in zip((args.num_frames, args.height, args.width), default))
    if size[1] % 8 or size[2] % 8:
        raise UserError(f"--height/--width {size[1]}x{size[2]} must be multiples of 8")
    check_output_folder(args.output)
    return size


def read_prompt_options(prompts: list[str] | None, prompts_file: str | None) -> list[str]:
    found = list(prompts or [])
    if prompts_file:
        found += read_prompts(prompts_file)
    found = [p.strip() for p in found if p.strip()]
    if not found:
        raise UserError("no prompts: pass --prompt TEXT (repeatable) or --prompts FILE (one per line)")
    return found


def slug(text: str, length: int = 40) -> str:
    """A file-name stem from a prompt."""
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:length].rstrip("_") or "prompt"
