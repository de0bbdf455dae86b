"""The method study's report, from its records alone (``bench.study``): the verdict on each claim of the paper,
per question the gains at equal compute and their curves against cumulative TFLOP, and
``bench/world/results/summary.json``. No model runs: it takes seconds.

Every gain is paired: a fine-tuned run's clip against the base model's clip of the same initial noise (from
noise), or against the same run's edit of the same held-out clip before training (edits); two variants are
compared clip by clip on the seeds both have. Means are over fine-tuning seeds with a 95% interval from the
hierarchical bootstrap (seeds, then clips). Only current records count (``bench.study.staleness``); stale ones are
named."""

from __future__ import annotations

import json
from pathlib import Path

from bench.report import markdown_table
from bench.study import (ROOT, RESULTS, assets_digest, evaluation_pairs, record_identity, record_path, run_config,
                         staleness)
from bench.study_plan import CLAIMS, DEFAULT, VARIANTS, Plan
from engine.stats import hierarchical_bootstrap

PLOTS = Path(__file__).parent / "world"
SECTION = "world: method study"
METRICS = {"quality": ("quality (dB)", 2), "reward": ("reward", 4), "colour_acc": ("colour right", 3),
           "shape_acc": ("shape right", 3), "direction_acc": ("direction right", 3), "jitter": ("jitter (px)", 2)}


def load_records(folder: Path, plan: Plan, assets: str, root: Path = ROOT,
                 config=run_config) -> tuple[dict | None, dict[str, dict[int, dict]], list[str]]:
    """(the base record, {variant: {seed: record}}, stale record names): the records current for ``assets``, the
    code under ``root`` and the training configuration ``config(options, seed)`` resolves today."""
    def current(variant, seed):
        path = record_path(folder, variant, seed)
        if not path.exists():
            return None
        record = json.loads(path.read_text())
        settings = config(list(variant.options), seed) if variant else None
        why = staleness(record, record_identity(variant, seed, plan, assets, settings), root)
        if why:
            stale.append(f"{path.name} ({why})")
            return None
        return record

    stale: list[str] = []
    base = current(None, None)
    runs = {v.name: {s: r for s in range(plan.seeds) if (r := current(v, s)) is not None} for v in VARIANTS}
    return base, runs, stale


def _noise_gains(base: dict, records: dict[int, dict], point: int, metric: str) -> list[list[float]]:
    return [[row[metric] - b[metric] for b, row in zip(base["noise"], r["evals"][point]["noise"])] for r in records.values()]


def _edit_gains(records: dict[int, dict], point: int, metric: str) -> list[list[float]]:
    return [[row[metric] - b[metric] for b, row in zip(r["evals"][0]["edits"], r["evals"][point]["edits"])]
            for r in records.values()]


def curve(base: dict, records: dict[int, dict]) -> list[dict]:
    """Per evaluation point: cumulative TFLOP and every metric's paired gain from noise over the base model."""
    points = range(1, len(next(iter(records.values()))["evals"]))
    return [{"step": next(iter(records.values()))["evals"][k]["step"],
             "tflop": next(iter(records.values()))["evals"][k]["tflop"],
             **{m: hierarchical_bootstrap(_noise_gains(base, records, k, m)).as_dict() for m in METRICS}} for k in points]


def budget_point(record: dict, variant) -> int:
    """The evaluation at one default job's compute: the last for most variants, the first for longer ones."""
    one_budget = record["steps"] * record["tflop_per_step"] / variant.budget
    return min(range(1, len(record["evals"])), key=lambda k: abs(record["evals"][k]["tflop"] - one_budget))


def claim_effect(claim, base: dict, runs: dict[str, dict[int, dict]]) -> dict | None:
    """``better`` minus ``worse`` in gold quality from noise at one budget, on the seeds both have."""
    better, worse = runs[claim.better], runs[claim.worse]
    seeds = sorted(set(better) & set(worse))
    if not seeds:
        return None
    variants = {v.name: v for v in VARIANTS}

    def at_budget(name, record):
        return record["evals"][budget_point(record, variants[name])]["noise"]

    differences = [[x["quality"] - y["quality"] for x, y in zip(at_budget(claim.better, better[s]), at_budget(claim.worse, worse[s]))]
                   for s in seeds]
    interval = hierarchical_bootstrap(differences)
    verdict = "reproduced" if interval.low > 0 else "not reproduced" if interval.high < 0 else "inconclusive"
    return {"claim": claim.text, "seeds": len(seeds), "quality_db": interval.as_dict(), "verdict": verdict}


def summarise(base: dict | None, runs: dict[str, dict[int, dict]], plan: Plan) -> dict:
    summary = {"plan": {"seeds": plan.seeds, "clips": len(evaluation_pairs(plan)), "default_steps": plan.default_steps},
               "variants": {}, "claims": []}
    if base is None:
        return summary
    for variant in VARIANTS:
        records = runs[variant.name]
        if not records:
            continue
        first = next(iter(records.values()))
        point = budget_point(first, variant)
        points = curve(base, records)
        summary["variants"][variant.name] = {
            "label": variant.label, "question": variant.question, "seeds": sorted(records),
            "steps": first["steps"], "tflop_per_step": first["tflop_per_step"], "curve": points,
            "at_budget": points[point - 1],
            "edits_at_budget": {m: hierarchical_bootstrap(_edit_gains(records, point, m)).as_dict()
                                for m in ("reward", "quality")}}
    summary["claims"] = [effect for claim in CLAIMS if (effect := claim_effect(claim, base, runs)) is not None]
    return summary


def _format(interval: dict, digits: int) -> str:
    low, high = interval["ci95"]
    return f"{interval['mean']:+.{digits}f} [{low:+.{digits}f}, {high:+.{digits}f}]"


def render(summary: dict, stale: list[str]) -> tuple[str, dict[str, list[str]]]:
    """The RESULTS.md section and, per question, the variants its plot shows."""
    plan, variants = summary["plan"], summary["variants"]
    lines = [f"`python -m bench.world_study --part study` runs the records (`bench/world/results/`, one per variant "
             f"and seed); `python -m bench.world_study --report` writes this section from them. Every variant is the "
             f"default job with one option changed, trained to the compute of the default job ({plan['default_steps']} "
             f"steps; steps = that TFLOP / the variant's own TFLOP per step), scored from noise on the effect set's "
             f"in-domain captions ({plan['clips']} clips, the same noise as the base model) at evenly spaced points. "
             f"Gains: mean over fine-tuning seeds [95% interval, hierarchical bootstrap over seeds, then clips]; "
             f"plan: {plan['seeds']} seeds a variant."]
    if not variants:
        lines.append("No current record yet.")
    rows = [[c["claim"], str(c["seeds"]), _format(c["quality_db"], 2), c["verdict"]] for c in summary["claims"]]
    if rows:
        lines.append("**The paper's claims** (gold quality from noise, the first variant minus the second, at equal "
                     "compute)\n\n" + markdown_table(["claim", "seeds", "effect (dB)", "verdict"], rows))
    questions: dict[str, list[str]] = {}
    for name, v in variants.items():
        questions.setdefault(v["question"], []).append(name)
    for question, names in questions.items():
        shown = names if question == DEFAULT.question else ["default", *names] if "default" in variants else names
        table = []
        for name in shown:
            v = variants[name]
            at = v["at_budget"]
            table.append([v["label"], f"{v['tflop_per_step'] * 1e3:.2f}", str(v["steps"]),
                          f"{len(v['seeds'])}/{plan['seeds']}",
                          *[_format(at[m], d) for m, (_, d) in METRICS.items()],
                          _format(v["edits_at_budget"]["quality"], 2)])
        lines.append(f"**{question}** (gains over the base model at the default job's compute)\n\n" + markdown_table(
            ["variant", "GFLOP / step", "steps", "seeds", *[f"Δ {label}" for label, _ in METRICS.values()],
             "Δ quality of edits (dB)"], table) + f"\n\n![{question}: gains against compute](world/study_{_slug(question)}.png)")
        questions[question] = shown
    if stale:
        lines.append("Stale records (not counted; `--part study` runs them again): " + ", ".join(sorted(stale)))
    return "\n\n".join(lines), questions


def _slug(question: str) -> str:
    return question.lower().replace(" ", "-")


def plot(summary: dict, question: str, names: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), dpi=110)
    for ax, metric in zip(axes, ("quality", "reward")):
        for i, name in enumerate(names):
            points = summary["variants"][name]["curve"]
            x = [0.0] + [p["tflop"] for p in points]
            mean = [0.0] + [p[metric]["mean"] for p in points]
            low = [0.0] + [p[metric]["ci95"][0] for p in points]
            high = [0.0] + [p[metric]["ci95"][1] for p in points]
            ax.plot(x, mean, "o-", color=f"C{i}", ms=3, label=summary["variants"][name]["label"])
            ax.fill_between(x, low, high, color=f"C{i}", alpha=0.15)
        ax.axhline(0, color="black", lw=0.8)
        ax.set_xlabel("cumulative training TFLOP")
        ax.set_ylabel(f"gain in {METRICS[metric][0]}")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{question}: paired gain from noise over the base model, 95% bands", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)


def report(plan: Plan = Plan(), folder: Path = RESULTS, results_md: Path = Path(__file__).parent / "RESULTS.md",
           plots: Path = PLOTS, check: bool = False, assets: str | None = None, root: Path = ROOT,
           config=run_config) -> list[str]:
    """Writes (or with ``check``, compares against) the RESULTS.md section, ``summary.json`` and the plots, from
    the records current for ``assets``, the code under ``root`` and ``config`` (default: the shipped assets, this
    code, today's configuration); returns the files that differ (``check``: the plots only by their presence,
    their pixels depend on the fonts) or were written."""
    from bench.report import update_section

    base, runs, stale = load_records(folder, plan, assets or assets_digest(), root, config)
    summary = summarise(base, runs, plan)
    body, questions = render(summary, stale)
    summary_text = json.dumps(summary, indent=1) + "\n"
    targets = {folder / "summary.json": summary_text}
    if check:
        differ = [str(p) for p, text in targets.items() if not p.exists() or p.read_text() != text]
        current = results_md.read_text() if results_md.exists() else ""
        if f"## {SECTION}\n\n{body.strip()}\n" not in current:
            differ.append(str(results_md))
        differ += [str(p) for q in questions if not (p := plots / f"study_{_slug(q)}.png").exists()]
        return differ
    folder.mkdir(parents=True, exist_ok=True)
    for path, text in targets.items():
        path.write_text(text)
    update_section(results_md, SECTION, body)
    for question, names in questions.items():
        plot(summary, question, names, plots / f"study_{_slug(question)}.png")
    return [str(p) for p in targets] + [str(results_md)]
