"""The method's effect on the built-in world model: Table 1 and the paper's ablations, in miniature.

    python -m bench.world_study                          # Table 1 (5 fine-tuning seeds) and the ablations
    python -m bench.world_study --part table1 --seeds 5
    python -m bench.world_study --part ablations --seeds 1

Every fine-tune is the default job (``python -m engine.train`` = the world preset) with one option changed.
Table 1 is a paired design: the base model and every fine-tune generate from the same noise through the full DDIM
chain on the effect sets (``engine.world.scene.effect_sets``: captions never fine-tuned on, seeds fixed before
any asset was trained), each clip rewarded with the built-in reward and measured with the world's gold metrics
(from pixels, never from the reward model); gains carry 95% intervals from the hierarchical bootstrap
(``engine.stats``). The ablations are still mean ± std over fine-tuning seeds (engine.evaluate's sets). FLOPs
per training step are counted with ``torch.utils.flop_counter`` on one step.

Writes the sections "world: Table 1" and "world: ablations" of bench/RESULTS.md, plots in bench/world/.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import tempfile
from pathlib import Path

import torch

from bench.report import markdown_table, measured_line, update_section
from engine import evaluate, train
from engine.config import resolve_config

RESULTS = Path(__file__).parent / "RESULTS.md"
PLOTS = Path(__file__).parent / "world"
METRICS = {"reward": ("reward", 4), "quality": ("quality (dB)", 2), "colour_acc": ("colour right", 3),
           "shape_acc": ("shape right", 3), "motion": ("speed (px/frame)", 2), "jitter": ("jitter (px)", 2),
           "direction_acc": ("direction right", 3)}
# The paper's ablations, each one option of the default job changed (tau = 0.6, S = 4, TAR on, K = 6).
STEPS: list[str] = []  # --steps N for every fine-tune, when given
ABLATIONS = {
    "tau": [("tau 0.2 (K = 4: all it runs)", ["--tau", "0.2", "--grad-steps", "all"]), ("tau 0.4", ["--tau", "0.4"]),
            ("tau 0.6 (default)", []), ("tau 0.8", ["--tau", "0.8"]), ("tau 1.0", ["--tau", "1.0"])],
    "segments": [("S 1", ["--segments", "1"]), ("S 2", ["--segments", "2"]), ("S 4 (default)", [])],
    "tar": [("TAR on (default)", []), ("TAR off", ["--no-tar"])],
    "grad_steps": [("K 1", ["--grad-steps", "1"]), ("K 6 (default)", []), ("K all", ["--grad-steps", "all"])],
}


def fine_tune(folder: Path, seed: int, options: list[str]) -> Path:
    """The default job with ``options``; returns its LoRA folder (a run already finished there is reused)."""
    if not (folder / "lora" / "adapter_config.json").is_file():
        train.main(["--model", "world", "--seed", str(seed), "--output", str(folder), "--overwrite",
                    "--no-tensorboard", *STEPS, *options])
    return folder / "lora"


def step_flops(options: list[str], folder: Path) -> float:
    """FLOPs of one training step (edit, decode, reward, backward) of the default job with ``options``."""
    from torch.utils.flop_counter import FlopCounterMode

    trainer = train.Trainer(resolve_config(["--model", "world", "--output", str(folder), "--overwrite",
                                            "--no-tensorboard", *options])).setup()
    latents, prompts, context = trainer.batch(trainer.train_sources, list(range(trainer.config.batch_size)))
    with FlopCounterMode(display=False) as counter:
        loss, _ = trainer.loss_step(latents, prompts, context)
        loss.backward()
    return float(counter.get_total_flops())


def score(loras: dict[str, Path], folder: Path, samples: int) -> dict:
    """engine.evaluate on the world's prompt sets: per model and set, every video's reward and gold metrics."""
    argv = ["--model", "world", "--samples-per-prompt", str(samples), "--batch-size", "8", "--output", str(folder)]
    for label, lora in loras.items():
        argv += ["--lora", f"{label}={lora}"]
    return evaluate.main(argv)


def set_means(report: dict, label: str, name: str) -> dict[str, list[float]]:
    """Per sampling seed, the set's mean of each metric (for the base model's spread)."""
    videos = [v for v in report["videos"][label] if v["set"] == name]
    by_seed: dict[int, list[dict]] = {}
    for k, v in enumerate(videos):
        by_seed.setdefault(k % report["settings"]["samples_per_prompt"], []).append(v)
    return {m: [statistics.fmean(v[m] for v in vs) for vs in by_seed.values()] for m in METRICS}


def mean_std(values: list[float], digits: int) -> str:
    """Mean ± population std; a single value is printed alone (a spread of one run is not a spread)."""
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.fmean(values):.{digits}f} ± {statistics.pstdev(values):.{digits}f}"


def score_model(lora: Path | None, sets: dict[str, list]) -> dict[str, list[dict[str, float]]]:
    """Per set, every clip's reward and gold metrics, generated from the set's noise seeds by the world model
    (with ``lora`` loaded): the same noise for every model, so clip i of two models forms a pair."""
    from engine.builtin import build_model
    from engine.lora import load_lora
    from engine.rewards import build_reward
    from engine.video_reward import SegmentalReward
    from engine.world.figures import from_noise

    model = build_model("world")
    if lora is not None:
        load_lora(model.denoiser, lora)
    scorer = SegmentalReward(build_reward("hpsv2:world"))
    return {name: from_noise(model, pairs, scorer=scorer)[0] for name, pairs in sets.items()}


def assets_offset() -> int:
    """A noise-seed offset drawn from the shipped assets' bytes: fixed once they are final, unknowable before."""
    from engine.assets import ASSETS

    digest = hashlib.sha256()
    for path in sorted(p for p in ASSETS.rglob("*") if p.is_file()):
        digest.update(path.read_bytes())
    return int(digest.hexdigest()[:6], 16) * 10


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


def table1(seeds: int, samples: int, work: Path) -> str:
    """Base and fine-tuned models from the same noise on the effect sets and on the fresh sets (seeds drawn from
    the final assets); per metric, the paired gain's mean over fine-tuning seeds with its 95% interval from the
    hierarchical bootstrap (seeds, then clips)."""
    from engine.world.scene import effect_sets

    loras = {s: fine_tune(work / f"table1-seed{s}", s, []) for s in range(seeds)}
    sections, figures = [], {"seeds": seeds}
    for group, offset in (("effect", 0), ("fresh", assets_offset())):
        sets = effect_sets(samples, group, offset)
        base = score_model(None, sets)
        rows, summary = paired_table(base, {s: score_model(lora, sets) for s, lora in loras.items()})
        figures[group] = {"clips_per_set": {n: len(p) for n, p in sets.items()}, "seed_offset": offset, "sets": summary}
        plot_table1(summary, PLOTS / f"table1_{group}.png")
        sections.append(f"**{group} set** ({len(sets['in_domain'])} clips a prompt set{', noise seeds offset by ' + str(offset) + ' (drawn from the assets)' if offset else ''})\n\n"
                        + markdown_table(["prompt set", "metric", "base", "fine-tuned", "gain [95% CI]"], rows)
                        + f"\n\n![gains, {group} set](world/table1_{group}.png)")
    (PLOTS / "table1.json").write_text(json.dumps(figures, indent=2) + "\n")
    return (f"{seeds} fine-tuning seeds (the default job, `--seed 0..{seeds - 1}`), each scored on the same initial "
            "noise as the base model; gain = mean over seeds of the per-clip paired gain, [95% interval] from the "
            "hierarchical bootstrap (seeds, then clips within a seed).\n\n" + "\n\n".join(sections))


def plot_table1(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = ("reward", "quality", "colour_acc", "shape_acc", "direction_acc")
    fig, axes = plt.subplots(1, len(shown), figsize=(14, 3.2), dpi=120)
    for ax, metric in zip(axes, shown):
        for i, (name, metrics) in enumerate(summary.items()):
            gain = metrics[metric]["gain"]
            low, high = gain["ci95"]
            ax.bar(i, gain["mean"], 0.6, color=f"C{i}", yerr=[[gain["mean"] - low], [high - gain["mean"]]], capsize=4)
        ax.axhline(0, color="black", lw=0.8)
        ax.set_xticks(range(len(summary)), [n.replace("_", " ") for n in summary], fontsize=8)
        ax.set_title(f"gain in {METRICS[metric][0]}", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    PLOTS.mkdir(exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def ablations(seeds: int, samples: int, work: Path) -> str:
    variants = {label: options for group in ABLATIONS.values() for label, options in group}
    runs = {tuple(options): "default" if not options else "".join(options).replace("--", "_").strip("_")
            for options in variants.values()}  # the default job is run once for all four groups
    loras, flops = {}, {}
    for options, key in runs.items():
        flops[key] = step_flops(list(options), work / f"flops-{key}")
        for s in range(seeds):
            loras[f"{key}-s{s}"] = fine_tune(work / f"ablation-{key}-s{s}", s, list(options))
    report = score(loras, work / "ablations-eval", samples)
    base_by_sample = set_means(report, "base", "in_domain")
    base = {m: statistics.fmean(base_by_sample[m]) for m in METRICS}
    gains = {key: {m: [statistics.fmean(set_means(report, f"{key}-s{s}", "in_domain")[m]) - base[m]
                       for s in range(seeds)] for m in METRICS} for key in runs.values()}
    sections = []
    for group, members in ABLATIONS.items():
        rows = [[label, f"{flops[runs[tuple(options)]] / 1e9:.2f}"] +
                [mean_std(gains[runs[tuple(options)]][m], d) for m, (_, d) in METRICS.items()]
                for label, options in members]
        sections.append(f"**{group}** (gain over the base model on the in-domain prompts, mean ± std over "
                        f"{seeds} fine-tuning seed(s))\n\n" + markdown_table(
                            ["variant", "GFLOP / step"] + [f"Δ {label}" for label, _ in METRICS.values()], rows))
    plot_tau({label: gains[runs[tuple(options)]] for label, options in ABLATIONS["tau"]},
             {label: flops[runs[tuple(options)]] for label, options in ABLATIONS["tau"]})
    noise = ", ".join(f"{METRICS[m][0]} {mean_std(base_by_sample[m], METRICS[m][1])}" for m in ("reward", "quality"))
    sections.append(f"Base model on the same prompts, spread over sampling seeds: {noise}; gains smaller than that "
                    "spread are evaluation noise.")
    return "\n\n".join(sections)


def plot_tau(gains: dict, flops: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [label for label, _ in ABLATIONS["tau"]]
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2), dpi=120)
    for ax, metric in zip(axes, ("reward", "quality")):
        x = [flops[label] / 1e9 for label in labels]
        y = [statistics.fmean(gains[label][metric]) for label in labels]
        ax.plot(x, y, "o-")
        for xi, yi, label in zip(x, y, labels):
            ax.annotate(label.split(" (")[0], (xi, yi), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel("GFLOP per training step")
        ax.set_ylabel(f"gain in {METRICS[metric][0]}")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    PLOTS.mkdir(exist_ok=True)
    fig.savefig(PLOTS / "ablation_tau.png")
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("all", "table1", "ablations"), default="all")
    parser.add_argument("--seeds", type=int, default=5, help="fine-tuning seeds per model")
    parser.add_argument("--samples-per-prompt", type=int, default=2, help="sampling seeds per prompt")
    parser.add_argument("--steps", type=int, help="fine-tuning steps of every run (default: the default job's)")
    parser.add_argument("--work", help="keep the fine-tunes here and reuse the finished ones (default: a temporary folder)")
    args = parser.parse_args(argv)
    STEPS[:] = ["--steps", str(args.steps)] if args.steps else []
    torch.set_num_threads(torch.get_num_threads())
    command = (f"python -m bench.world_study --part {{}} --seeds {args.seeds} --samples-per-prompt "
               f"{args.samples_per_prompt}" + (f" --steps {args.steps}" if args.steps else ""))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work) if args.work else Path(tmp)
        if args.part in ("all", "table1"):
            body = table1(args.seeds, args.samples_per_prompt, work)
            update_section(RESULTS, "world: Table 1", f"{measured_line()}\n\n`{command.format('table1')}`\n\n{body}")
        if args.part in ("all", "ablations"):
            body = ablations(args.seeds, args.samples_per_prompt, work)
            update_section(RESULTS, "world: ablations", f"{measured_line()}\n\n`{command.format('ablations')}`\n\n"
                           f"{body}\n\n![tau against cost](world/ablation_tau.png)")
    print(f"written to {RESULTS}")


if __name__ == "__main__":
    main()
