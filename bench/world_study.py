"""The method's effect on the built-in world model: Table 1 and the method study, in miniature.

    python -m bench.world_study                          # Table 1 (5 fine-tuning seeds) and the study
    python -m bench.world_study --part table1 --seeds 5
    python -m bench.world_study --part study --only default,tau-1.0   # the study's missing records (bench.study)
    python -m bench.world_study --part verify [--only ...]  # records stale by code: one seed per variant run again
    python -m bench.world_study --report [--check]       # the study's sections from its records alone

Every fine-tune is the default job (``python -m engine.train`` = the world preset) with one option changed.
Table 1 is a paired design: the base model and every fine-tune generate from the same noise through the full DDIM
chain on the effect sets (``engine.world.scene.effect_sets``: captions never fine-tuned on, seeds fixed before
any asset was trained), each clip rewarded with the built-in reward and measured with the world's gold metrics
(from pixels, never from the reward model); gains carry 95% intervals from the hierarchical bootstrap
(``engine.stats``). The study (``bench.study``) compares the paper's variants at equal compute from a cache of
records, one per variant and seed, and its report (``bench.study_report``) is written from the records alone.

Writes the sections "world: Table 1" and "world: method study" of bench/RESULTS.md, plots in bench/world/.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import tempfile
from pathlib import Path
from typing import NamedTuple

import torch
from tqdm import tqdm

from bench.report import markdown_table, measured_line, update_section
from engine import train

RESULTS = Path(__file__).parent / "RESULTS.md"
PLOTS = Path(__file__).parent / "world"
METRICS = {"reward": ("reward", 4), "motion_reward": ("motion reward", 4), "quality": ("quality (dB)", 2),
           "colour_acc": ("colour right", 3), "shape_acc": ("shape right", 3), "motion": ("speed (px/frame)", 2),
           "jitter": ("jitter (px)", 2), "direction_acc": ("direction right", 3)}
# The built-in video reward, which the default job mixes into what it trains on: Table 1 scores every clip with it
# too, beside the image reward that scores every model (``bench.study.scorer``).
MOTION_REWARD = "motion:world"


class RecipeOption(NamedTuple):
    flags: list[str]  # on the command line
    title: str        # in the section's title
    suffix: str       # in the figures' names
    trains: bool      # a training option (else it applies at scoring)


def recipe_options(args: argparse.Namespace) -> list[RecipeOption]:
    """The options that set a Table 1 apart from the default job's: one table, so the command, the section and the
    figures always name the same recipe. The order is the titles' (committed section names depend on it)."""
    reward_name = re.sub(r"[^A-Za-z0-9.@]+", "-", args.reward or "").strip("-")
    scale = f"{args.lora_scale:g}"
    table = [(args.grad_steps, RecipeOption(["--grad-steps", args.grad_steps], f"K {args.grad_steps}",
                                            f"_K{args.grad_steps}", True)),
             (args.steps, RecipeOption(["--steps", str(args.steps)], f"{args.steps} steps", f"_steps{args.steps}",
                                       True)),
             (args.lora_scale != 1.0, RecipeOption(["--lora-scale", scale], f"LoRA strength {scale}", f"_scale{scale}",
                                                   False)),
             (args.reward, RecipeOption(["--reward", args.reward], f"reward {args.reward}", f"_reward-{reward_name}",
                                        True))]
    return [option for given, option in table if given]


def fine_tune(folder: Path, seed: int, options: list[str]) -> Path:
    """The default job with ``options``; returns its LoRA folder (a run already finished there is reused)."""
    if not (folder / "lora" / "adapter_config.json").is_file():
        train.main(["--model", "world", "--seed", str(seed), "--output", str(folder), "--overwrite",
                    "--no-tensorboard", *options])
    return folder / "lora"


def score_model(lora: Path | None, sets: dict[str, list], scale: float = 1.0) -> dict[str, list[dict[str, float]]]:
    """Per set, every clip's reward, motion reward and gold metrics, generated from the set's noise seeds by the
    world model (with ``lora`` loaded at strength ``scale``): the same noise for every model, so clip i of two models
    forms a pair. The motion reward sees the frames it declares, at the clips' frame rate, as in training."""
    from bench.study import scorer
    from engine.builtin import build_model
    from engine.lora import load_lora, set_lora_scale
    from engine.rewards import build_reward
    from engine.video_reward import SegmentalReward
    from engine.world.figures import from_noise

    model, motion = build_model("world"), build_reward(MOTION_REWARD)
    if lora is not None:
        load_lora(model.denoiser, lora)
        set_lora_scale(model.denoiser, scale)
    scores = {}
    for name, pairs in sets.items():
        rows, videos = from_noise(model, pairs, scorer=scorer())
        clips = torch.stack(videos)
        with torch.no_grad():
            motions = motion(clips[:, motion.frame_indices(clips.shape[1], SegmentalReward.fps)],
                             [clip.caption for clip, _ in pairs])
        scores[name] = [row | {"motion_reward": score} for row, score in zip(rows, motions.tolist())]
    return scores


def assets_offset() -> int:
    """A noise-seed offset drawn from the shipped assets' bytes: fixed once they are final, unknowable before."""
    from bench.study import assets_digest

    return int(assets_digest()[:6], 16) * 10


def paired_table(base: dict, tuned: dict[int, dict]) -> tuple[list[list[str]], dict]:
    """Rows (set, metric, base, fine-tuned, gain [95% CI]) and their figures, from per-clip rows aligned by noise."""
    from engine.stats import hierarchical_bootstrap, paired_gains

    rows, summary = [], {}
    for name in base:
        for metric, (label, digits) in METRICS.items():
            gain = hierarchical_bootstrap([paired_gains(base[name], tuned[s][name], metric) for s in tuned])
            before = statistics.fmean(r[metric] for r in base[name])
            summary.setdefault(name, {})[metric] = {"base": before, "gain": gain.as_dict()}
            rows.append([name.replace("_", " "), label, f"{before:.{digits}f}", f"{before + gain.mean:.{digits}f}",
                         gain.format(digits)])
    return rows, summary


def table1(seeds: int, samples: int, work: Path, recipe: list[str], scale: float = 1.0, suffix: str = "") -> str:
    """Base and fine-tuned models (the default job with the training options ``recipe``) from the same noise on
    the effect sets and on the fresh sets (seeds drawn from the final assets); per metric, the paired gain's mean
    over fine-tuning seeds with its 95% interval from the hierarchical bootstrap (seeds, then clips). ``suffix``
    names the figures of a recipe other than the default job's (``table1{suffix}.json``), so that they stand
    beside its Table 1."""
    from engine.world.scene import effect_sets

    loras = {s: fine_tune(work / f"table1{suffix}-seed{s}", s, recipe) for s in range(seeds)}
    sections, figures = [], {"seeds": seeds, "lora_scale": scale}
    for group, offset in (("effect", 0), ("fresh", assets_offset())):
        sets = effect_sets(samples, group, offset)
        base_and_loras = tqdm([None, *loras.values()], unit="model",
                              desc=f"Table 1, {group} set: the base model and {seeds} fine-tunes")
        base, *tuned = [score_model(lora, sets, scale) for lora in base_and_loras]
        rows, summary = paired_table(base, dict(zip(loras, tuned)))
        figures[group] = {"clips_per_set": {n: len(p) for n, p in sets.items()}, "seed_offset": offset, "sets": summary}
        plot_table1(summary, PLOTS / f"table1{suffix}_{group}.png")
        sections.append(f"**{group} set** ({len(sets['in_domain'])} clips a prompt set{', noise seeds offset by ' + str(offset) + ' (drawn from the assets)' if offset else ''})\n\n"
                        + markdown_table(["prompt set", "metric", "base", "fine-tuned", "gain [95% CI]"], rows)
                        + f"\n\n![gains, {group} set](world/table1{suffix}_{group}.png)")
    (PLOTS / f"table1{suffix}.json").write_text(json.dumps(figures, indent=2) + "\n")
    return describe_table1(seeds, recipe, scale) + "\n\n" + "\n\n".join(sections)


def describe_table1(seeds: int, recipe: list[str], scale: float) -> str:
    """What a Table 1 measured: the fine-tunes' recipe as it resolved, and how its gains are read."""
    from engine.builtin import BUILTINS
    from engine.config import resolve_config

    config, scoring = resolve_config(["--model", "world", *recipe]), BUILTINS["world"].reward
    strength = "" if scale == 1.0 else f", the LoRA applied at strength {scale:g} (`--lora-scale`)"
    job = f"the default job with `{' '.join(recipe)}`" if recipe else "the default job"
    scored = ("" if config.reward == scoring else f"; the reward rows are the world model's scoring reward "
              f"`{scoring}`, as for every model whatever it trained on (`bench.study.scorer`)")
    return (f"{seeds} fine-tuning seeds ({job}: tau {config.tau}, K {config.grad_steps}, {config.steps} steps, reward "
            f"`{config.reward}`{strength}; `--seed 0..{seeds - 1}`), each scored on the same initial noise as the base "
            "model; gain = mean over seeds of the per-clip paired gain, [95% interval] from the hierarchical bootstrap "
            f"(seeds, then clips within a seed){scored}; the motion reward rows score every clip with the built-in "
            f"video reward `{MOTION_REWARD}` alone.")


def plot_table1(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = ("reward", "motion_reward", "quality", "colour_acc", "shape_acc", "jitter", "direction_acc")
    fig, axes = plt.subplots(1, len(shown), figsize=(19, 3.2), dpi=120)
    for ax, metric in zip(axes, shown):
        for i, (name, metrics) in enumerate(summary.items()):
            gain = metrics[metric]["gain"]
            low, high = gain["ci95"]
            ax.bar(i, gain["mean"], 0.6, color=f"C{i}", yerr=[[gain["mean"] - low], [high - gain["mean"]]], capsize=4)
        ax.axhline(0, color="black", lw=0.8)
        ax.set_xticks(range(len(summary)), [n.replace("_", "\n") for n in summary], fontsize=8)
        ax.set_title(f"gain in {METRICS[metric][0]}", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    PLOTS.mkdir(exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("all", "table1", "study", "verify"), default="all",
                        help="verify: for each variant whose records are stale only by code, run one seed again and, "
                             "where it gives the same numbers, stamp them with the current code (bench.study.verify_study)")
    parser.add_argument("--seeds", type=int, default=5, help="fine-tuning seeds per model")
    parser.add_argument("--samples-per-prompt", type=int, default=2, help="sampling seeds per prompt")
    parser.add_argument("--steps", type=int, help="Table 1: the fine-tunes' --steps (default: the default job's)")
    parser.add_argument("--grad-steps", help="Table 1: the fine-tunes' --grad-steps (default: the default job's)")
    parser.add_argument("--reward", help="Table 1: the fine-tunes' --reward (default: the default job's)")
    parser.add_argument("--lora-scale", type=float, default=1.0, help="Table 1: score the fine-tunes with their LoRA "
                        "at this strength (as `engine.sample --lora-scale`)")
    parser.add_argument("--work", help="keep the fine-tunes here and reuse the finished ones (default: a temporary folder)")
    parser.add_argument("--only", help="study: these variants only, comma-separated, run in that order (default: every one)")
    parser.add_argument("--report", action="store_true", help="write the study's sections from its records, running nothing")
    parser.add_argument("--check", action="store_true", help="with --report: exit 1 when the committed files differ from "
                        "what the records give")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.report:
        from bench.study_report import report

        changed = report(check=args.check)
        if args.check and changed:
            raise SystemExit(f"the study's committed report differs from its records: {', '.join(changed)}; run "
                             "python -m bench.world_study --report and commit the result")
        print("study report " + ("matches its records" if args.check else f"written: {', '.join(changed)}"))
        return
    options = recipe_options(args)
    torch.set_num_threads(torch.get_num_threads())
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work) if args.work else Path(tmp)
        if args.part in ("all", "table1"):
            # a recipe other than the default job's gets a section and figures of its own, beside Table 1
            recipe = [flag for option in options if option.trains for flag in option.flags]
            titles = ", ".join(option.title for option in options)
            body = table1(args.seeds, args.samples_per_prompt, work, recipe, args.lora_scale,
                          "".join(option.suffix for option in options))
            command = " ".join(["python -m bench.world_study --part table1 --seeds", str(args.seeds),
                                "--samples-per-prompt", str(args.samples_per_prompt),
                                *(flag for option in options for flag in option.flags)])
            update_section(RESULTS, "world: Table 1" + (f" ({titles})" if titles else ""),
                           f"{measured_line()}\n\n`{command}`\n\n{body}")
        if args.part in ("all", "study", "verify"):
            from bench.study import run_study, verify_study
            from bench.study_plan import VARIANTS, Plan
            from bench.study_report import report

            named = {v.name: v for v in VARIANTS}
            only = args.only.split(",") if args.only else list(named)
            unknown = set(only) - set(named)
            if unknown:
                raise SystemExit(f"--only: unknown variant(s) {', '.join(sorted(unknown))}; use some of "
                                 f"{', '.join(named)}")
            plan = Plan(seeds=args.seeds, samples_per_caption=args.samples_per_prompt)
            if args.part == "verify":
                print("\n".join(f"study: verify {line}" for line in verify_study(plan, [named[n] for n in only])))
            else:
                run_study(plan, [named[n] for n in only])
            report(plan)
    print(f"written to {RESULTS}")


if __name__ == "__main__":
    main()
