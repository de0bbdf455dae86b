"""Score prompt sets for the base model and LoRA checkpoints: ``python -m engine.evaluate``.

    python -m engine.evaluate --lora runs/x/lora --samples-per-prompt 3 --output eval/   # the built-in world model
    python -m engine.evaluate --model /weights/text-to-video-ms-1.7b \\
        --lora early=runs/a/checkpoint-5000/lora --lora runs/a/lora \\
        --reward hpsv2:/weights/HPS_v2.1_compressed.pt \\
        --prompt-set in_domain=animals.txt --prompt-set new_animals=new.txt --prompt-set non_animals=other.txt \\
        --samples-per-prompt 4 --ddim-steps 20 --output eval/

The evaluation of the paper's Table 1: every model generates each prompt's videos from the same noise with the
full D-step DDIM chain, and each video is scored by SegVR in evaluation mode (the first frame of each of the S
segments, frames 0, 4, 8, 12 of 16). A video's score is the mean of its S frame rewards; with ``--tar`` the
frames are weighted as in training (TAR, exp(-lambda |g - F//2|)), which matches the trainer's held-out metric
but shrinks the numbers (the centre frame dominates), so it is off by default: Table 1's HPSv2 values
(~0.25-0.27) are plain frame means. Per (model, prompt set): mean and standard deviation over videos
(population std, ddof 0); with several samples per prompt (video k of a prompt starts from seed + k), also the
spread over seeds: the standard deviation of the set's mean across the sampling seeds, which the table shows.
With several ``--lora-scale`` strengths (``0.25,0.5,1``) each checkpoint is scored at each, from the same noise,
as rows ``LABEL @STRENGTH``: a dial for the effect at inference, judged on the world model by its gold metrics too.

Writes ``results.md`` (a Markdown table, rows = models, columns = prompt sets, mean ± std), ``results.json``
(settings, prompts, every video's score) and ``results.png`` (a bar chart with std error bars).
The built-in models have three built-in prompt sets modelled on Table 1; real models need ``--prompt-set``. For the
world model these are engine.world's splits (in-domain categories, new categories held out of fine-tuning,
captions of another template), and every video also gets the world's gold metrics, read from its pixels with the
world's renderer (caption faithfulness, quality, motion), which never look at the reward model.
"""

from __future__ import annotations

import argparse
import json
import math
from contextlib import nullcontext
from pathlib import Path

import torch
from tqdm import tqdm

from engine.builtin import builtin, build_model
from engine.chain import generate
from engine.cli import HelpFormatter, add_model_arguments, check_common, positive_int
from engine.data import read_prompts
from engine.errors import UserError, cli_entry
from engine.lora import activate_adapter, adapters_disabled, check_lora_folder, load_lora, set_lora_scale
from engine.rewards import build_reward
from engine.runtime import autocast, resolve_device
from engine.video_reward import SegmentalReward
from engine.world import gold_scores


def parse_prompt_sets(specs: list[str] | None, model: str) -> dict[str, list[str]]:
    """NAME=FILE prompt sets, or a built-in model's own three."""
    if not specs:
        preset = builtin(model)
        if preset is not None:
            return preset.prompt_sets()
        raise UserError("pass at least one --prompt-set NAME=FILE (e.g. in_domain=animals.txt); "
                        "only the built-in models have built-in prompt sets")
    sets: dict[str, list[str]] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise UserError(f"--prompt-set {spec!r} must be NAME=FILE, e.g. in_domain=animals.txt")
        if name.strip() in sets:
            raise UserError(f"--prompt-set name {name.strip()!r} is given twice; use distinct names")
        sets[name.strip()] = read_prompts(path.strip())
    return sets


def parse_checkpoints(specs: list[str] | None) -> list[tuple[str, Path]]:
    """``[LABEL=]FOLDER`` -> (label, folder); the label defaults to the folder's name (its run's for ``lora/``)."""
    checkpoints: list[tuple[str, Path]] = []
    for spec in specs or []:
        label, sep, path = spec.partition("=")
        if not sep or Path(spec).exists():
            label, path = "", spec
        folder = check_lora_folder(path)
        if not label:
            resolved = folder.resolve()
            label = f"{resolved.parent.name}/{resolved.name}" if resolved.name == "lora" else resolved.name
        if label == "base" or label in [l for l, _ in checkpoints]:
            label = f"{label}#{len(checkpoints) + 1}"
        checkpoints.append((label, folder))
    return checkpoints


def summarise(scores: list[float], seeds: list[int] | None = None) -> dict:
    """Mean and population std over videos; with ``seeds`` (one per video) and more than one seed, also the std
    of the per-seed means (``seed_std``)."""
    t = torch.tensor(scores, dtype=torch.float64)
    summary = {"mean": t.mean().item(), "std": t.std(unbiased=False).item(), "n": len(scores)}
    if seeds is not None and len(set(seeds)) > 1:
        means = torch.stack([t[torch.tensor([s == k for s in seeds])].mean() for k in sorted(set(seeds))])
        summary["seed_std"] = means.std(unbiased=False).item()
    return summary


def cell(summary: dict, digits: int = 4) -> str:
    return f"{summary['mean']:.{digits}f} ± {summary.get('seed_std', summary['std']):.{digits}f}"


def markdown_table(results: dict[str, dict[str, dict]], sets: list[str], reward: str) -> str:
    lines = [f"| model ({reward}) | " + " | ".join(sets) + " |", "|---|" + "---|" * len(sets)]
    for model, row in results.items():
        lines.append(f"| {model} | " + " | ".join(cell(row[s]) for s in sets) + " |")
    return "\n".join(lines) + "\n"


GOLD_COLUMNS = {"quality": ("quality (dB)", 2), "colour_acc": ("colour right", 3), "shape_acc": ("shape right", 3),
                "sharpness": ("sharpness", 3), "bg_noise": ("bg noise", 4), "direction_acc": ("direction right", 3),
                "motion": ("motion (px/frame)", 2), "jitter": ("jitter (px)", 2)}


def gold_tables(gold: dict[str, dict[str, dict[str, dict]]], sets: list[str]) -> str:
    """One Markdown table per prompt set: rows = models, columns = gold metrics (mean ± spread)."""
    out = []
    for name in sets:
        out.append(f"\n{name}, gold metrics (from pixels):\n")
        out.append("| model | " + " | ".join(label for label, _ in GOLD_COLUMNS.values()) + " |")
        out.append("|---|" + "---|" * len(GOLD_COLUMNS))
        for model, per_set in gold.items():
            out.append(f"| {model} | " + " | ".join(cell(per_set[name][k], d) for k, (_, d) in GOLD_COLUMNS.items()) + " |")
    return "\n".join(out) + "\n"


def bar_chart(results: dict[str, dict[str, dict]], sets: list[str], path: Path, ylabel: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    models = list(results)
    width = 0.8 / len(models)
    fig, ax = plt.subplots(figsize=(max(5, 1.8 * len(sets) + 1), 3.5), dpi=120)
    x = np.arange(len(sets))
    for i, model in enumerate(models):
        means = [results[model][s]["mean"] for s in sets]
        stds = [results[model][s].get("seed_std", results[model][s]["std"]) for s in sets]
        ax.bar(x + (i - (len(models) - 1) / 2) * width, means, width, yerr=stds, capsize=3, label=model)
    spread = {(m, s): results[m][s].get("seed_std", results[m][s]["std"]) for m in models for s in sets}
    lows = [results[m][s]["mean"] - spread[m, s] for m in models for s in sets]
    highs = [results[m][s]["mean"] + spread[m, s] for m in models for s in sets]
    if min(lows) > 0:  # rewards such as HPSv2 live in a narrow band far from 0: zoom to show the differences
        margin = 0.15 * (max(highs) - min(lows) or abs(max(highs)) or 1)
        ax.set_ylim(min(lows) - margin, max(highs) + margin)
    ax.set_xticks(x, sets)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(str(path))
    plt.close(fig)
    return path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--lora", action="append",
                        help="[LABEL=]FOLDER of a LoRA checkpoint (repeatable); the base model is always scored")
    parser.add_argument("--reward", help="reward spec NAME[:PATH][@WEIGHT],... (default: hpsv2:world for world, colorfulness for tiny)")
    parser.add_argument("--prompt-set", action="append", help="NAME=FILE, one prompt per line (repeatable)")
    parser.add_argument("--samples-per-prompt", type=positive_int, default=1, help="videos per prompt and model")
    parser.add_argument("--segments", type=positive_int, default=4, help="SegVR segments S (frames scored per video)")
    parser.add_argument("--tar", action=argparse.BooleanOptionalAction, default=False,
                        help="weight the frames by TAR as in training (off = plain mean, as Table 1)")
    parser.add_argument("--tar-lambda", type=float, default=1.0, help="TAR lambda (with --tar)")
    add_model_arguments(parser)
    return parser


def check_arguments(args: argparse.Namespace) -> tuple[tuple[int, int, int], dict[str, list[str]], list, str]:
    """Everything checked before any model loads: (size, prompt sets, checkpoints, reward spec)."""
    size = check_common(args)
    sets = parse_prompt_sets(args.prompt_set, args.model)
    checkpoints = parse_checkpoints(args.lora)
    if args.segments > size[0]:
        raise UserError(f"--segments {args.segments} must not exceed --num-frames {size[0]}")
    if args.tar_lambda < 0:
        raise UserError(f"--tar-lambda {args.tar_lambda} must be non-negative")
    if len(args.lora_scale) > 1 and not checkpoints:
        raise UserError("--lora-scale with several strengths needs --lora FOLDER (the checkpoints to scale)")
    preset = builtin(args.model)
    reward_spec = args.reward or (preset.reward if preset else None)
    if reward_spec is None:
        raise UserError("pass --reward, e.g. --reward hpsv2:/weights/HPS_v2.1_compressed.pt")
    return size, sets, checkpoints, reward_spec


def score_videos(args, model, scorer, jobs: list[tuple[str, str]], seeds: list[int], size, clips: dict,
                 bar) -> tuple[list[float], list[dict]]:
    """Every job's video generated from its seed by the active model: its reward and, for world captions, its
    gold metrics."""
    scores: list[float] = []
    metrics: list[dict] = []
    for start in range(0, len(jobs), args.batch_size):
        prompts = [p for _, p in jobs[start:start + args.batch_size]]
        with autocast(model.device, args.precision), torch.no_grad():
            latents = generate(model, prompts, seeds[start:start + len(prompts)], size, args.ddim_steps,
                               args.guidance, args.eta, bar.update)
            video_rewards, _ = scorer(model, latents, prompts, train=False)
        scores += video_rewards.float().cpu().tolist()
        if all(p in clips for p in prompts):
            metrics += gold_scores([model.decode_video(latent) for latent in latents], [clips[p] for p in prompts])
    return scores, metrics


def write_report(out: Path, args, size, sets, checkpoints, reward_spec, results, gold, per_video) -> dict:
    """results.md, results.json and the bar charts; returns the report."""
    out.mkdir(parents=True, exist_ok=True)
    reward_name = reward_spec.split(":")[0].split("@")[0] if "," not in reward_spec else "weighted reward"
    table = markdown_table(results, list(sets), reward_name) + (gold_tables(gold, list(sets)) if gold else "")
    (out / "results.md").write_text(table)
    report = {
        "settings": {"model": args.model, "reward": reward_spec, "checkpoints": {l: str(f) for l, f in checkpoints},
                     "lora_scale": args.lora_scale, "ddim_steps": args.ddim_steps, "guidance": args.guidance,
                     "eta": args.eta, "seed": args.seed, "samples_per_prompt": args.samples_per_prompt,
                     "num_frames": size[0], "height": size[1], "width": size[2], "segments": args.segments,
                     "frames_scored": "first of each segment (SegVR evaluation)", "tar": args.tar,
                     "tar_lambda": args.tar_lambda if args.tar else None, "std": "population (ddof 0) over videos",
                     "seed_std": "population std of the per-seed means (several samples per prompt)"},
        "prompt_sets": sets,
        "results": results,
        "gold": gold,
        "videos": per_video,
    }
    (out / "results.json").write_text(json.dumps(report, indent=2))
    bar_chart(results, list(sets), out / "results.png", f"{reward_name} (mean ± std)")
    if gold:
        bar_chart({label: {name: per_set[name]["quality"] for name in sets} for label, per_set in gold.items()},
                  list(sets), out / "gold_quality.png", "gold quality, dB (mean ± std)")
    print(table, end="")
    print(f"results in {out}/results.md, results.json, results.png")
    return report


@cli_entry
def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    size, sets, checkpoints, reward_spec = check_arguments(args)
    preset = builtin(args.model)
    clips = preset.clips() if preset else {}
    device = resolve_device(args.device)

    reward = build_reward(reward_spec).to(device)  # a bad reward path fails before the video model loads
    scorer = SegmentalReward(reward, args.segments, args.tar_lambda, segvr=True, tar=args.tar)
    model = build_model(args.model, seed=0, device=device)
    for i, (label, folder) in enumerate(checkpoints):
        load_lora(model.denoiser, folder, args.lora_scale[0], adapter_name=f"checkpoint{i}")

    # (set, prompt, sample) in a fixed order; video k starts from seed + k for every model: paired comparisons
    jobs = [(name, p) for name, prompts in sets.items() for p in prompts for _ in range(args.samples_per_prompt)]
    scales = args.lora_scale  # several: each checkpoint at each strength, labelled "LABEL @STRENGTH"
    models = [("base", None, None)] + [(label if len(scales) == 1 else f"{label} @{scale:g}", f"checkpoint{i}", scale)
                                       for i, (label, _) in enumerate(checkpoints) for scale in scales]
    results: dict[str, dict[str, dict]] = {}
    gold: dict[str, dict[str, dict[str, dict]]] = {}
    per_video: dict[str, list[dict]] = {}
    seeds = [args.seed + k for k in range(len(jobs))]
    sample_index = [k % args.samples_per_prompt for k in range(len(jobs))]  # which sampling seed of its prompt
    in_set = {name: [k for k, (n, _) in enumerate(jobs) if n == name] for name in sets}
    bar = tqdm(total=len(models) * len(jobs) * args.ddim_steps, desc="evaluating", unit="step", dynamic_ncols=True)
    for label, adapter, scale in models:
        if adapter is not None:
            activate_adapter(model.denoiser, adapter)
            set_lora_scale(model.denoiser, scale, adapter)
        with adapters_disabled(model.denoiser) if adapter is None and checkpoints else nullcontext():
            scores, metrics = score_videos(args, model, scorer, jobs, seeds, size, clips, bar)
        if not all(math.isfinite(s) for s in scores):
            raise UserError(f"model {label!r} produced non-finite rewards; try --precision fp32")
        results[label] = {name: summarise([scores[k] for k in ks], [sample_index[k] for k in ks])
                          for name, ks in in_set.items()}
        per_video[label] = [{"set": n, "prompt": p, "seed": seeds[k], "reward": s} | (metrics[k] if metrics else {})
                            for k, ((n, p), s) in enumerate(zip(jobs, scores))]
        if metrics:
            gold[label] = {name: {m: summarise([metrics[k][m] for k in ks], [sample_index[k] for k in ks])
                                  for m in GOLD_COLUMNS} for name, ks in in_set.items()}
    bar.close()
    return write_report(Path(args.output), args, size, sets, checkpoints, reward_spec, results, gold, per_video)


if __name__ == "__main__":
    main()
