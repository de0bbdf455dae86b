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
from bench.study_plan import BESIDE, CLAIMS, DEFAULT, STUDY_BASE, VARIANTS, Plan, image_reward_alone
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


def _differences(before: list[list[dict]], after: list[list[dict]], metric: str) -> list[list[float]]:
    """Per seed, per clip: ``metric`` in ``after`` minus the same seed's and clip's in ``before``."""
    return [[a[metric] - b[metric] for b, a in zip(rows_b, rows_a)] for rows_b, rows_a in zip(before, after)]


def _noise_gains(base: dict, records: dict[int, dict], point: int, metric: str) -> list[list[float]]:
    return _differences([base["noise"]] * len(records), [r["evals"][point]["noise"] for r in records.values()], metric)


def _edit_gains(records: dict[int, dict], point: int, metric: str) -> list[list[float]]:
    return _differences([r["evals"][0]["edits"] for r in records.values()],
                        [r["evals"][point]["edits"] for r in records.values()], metric)


def curve(base: dict, records: dict[int, dict]) -> list[dict]:
    """Per evaluation point: cumulative TFLOP and every metric's paired gain from noise over the base model."""
    points = range(1, len(next(iter(records.values()))["evals"]))
    return [{"step": next(iter(records.values()))["evals"][k]["step"],
             "tflop": next(iter(records.values()))["evals"][k]["tflop"],
             **{m: hierarchical_bootstrap(_noise_gains(base, records, k, m)).as_dict() for m in METRICS}} for k in points]


def budget_point(record: dict, variant) -> int:
    """The evaluation at one base recipe's compute: the last for most variants, the first for longer ones."""
    one_budget = record["steps"] * record["tflop_per_step"] / variant.budget
    return min(range(1, len(record["evals"])), key=lambda k: abs(record["evals"][k]["tflop"] - one_budget))


def strengths(variant) -> tuple[str, ...]:
    """``variant``'s LoRA strengths scored at one budget (a longer variant's are at its end: over-optimisation)."""
    return tuple(f"{s:g}" for s in variant.scales) if variant.budget == 1.0 else ()


def _noise_rows(record: dict, variant, strength: str | None = None) -> list[dict]:
    """Per clip from noise at one base recipe's compute; with the LoRA at ``strength`` (of ``strengths``) if given."""
    evaluation = record["evals"][-1 if strength else budget_point(record, variant)]
    return evaluation["scaled"][strength] if strength else evaluation["noise"]


def paired_difference(runs: dict[str, dict[int, dict]], better: str, worse: str, metric: str = "quality",
                      strength: str | None = None):
    """(seeds, interval) of ``better`` (its LoRA at ``strength`` if given) minus ``worse`` in a gold ``metric`` from
    noise at one base recipe's compute, clip by clip on the seeds both have; None when they share none."""
    seeds = sorted(set(runs[better]) & set(runs[worse]))
    if not seeds:
        return None
    variants = {v.name: v for v in VARIANTS}
    return seeds, hierarchical_bootstrap(_differences(
        [_noise_rows(runs[worse][s], variants[worse]) for s in seeds],
        [_noise_rows(runs[better][s], variants[better], strength) for s in seeds], metric))


def claim_effect(claim, runs: dict[str, dict[int, dict]]) -> dict | None:
    """``better`` minus ``worse`` in gold quality from noise at one budget, on the seeds both have."""
    compared = paired_difference(runs, claim.better, claim.worse)
    if compared is None:
        return None
    seeds, interval = compared
    verdict = "reproduced" if interval.low > 0 else "not reproduced" if interval.high < 0 else "inconclusive"
    return {"claim": claim.text, "seeds": len(seeds), "quality_db": interval.as_dict(), "verdict": verdict}


def recommendation(summary: dict, runs: dict[str, dict[int, dict]], plan: Plan) -> dict | None:
    """The recipe a user should use: of the variants run with every seed at the base recipe's budget, the one
    with the highest mean gold-quality gain from noise at that compute; it replaces the default job only when its
    paired difference from the base recipe is above zero (picked as the best of several, its interval is optimistic)."""
    complete = [v.name for v in VARIANTS if v.budget == 1.0 and len(runs[v.name]) == plan.seeds]
    if DEFAULT.name not in complete:
        return None
    best = max(complete, key=lambda name: summary["variants"][name]["at_budget"]["quality"]["mean"])
    if best == DEFAULT.name:
        return {"recipe": best, "candidates": len(complete), "versus_default": None, "adopt": False}
    interval = paired_difference(runs, best, DEFAULT.name)[1]
    return {"recipe": best, "candidates": len(complete), "versus_default": interval.as_dict(), "adopt": interval.low > 0}


MOTION_METRICS = ("jitter", "direction_acc", "quality")  # what a motion reward should bring beyond the image reward


def motion_gains(runs: dict[str, dict[int, dict]]) -> dict[str, dict]:
    """Each variant fine-tuned with the motion reward minus the same recipe with the image reward alone (if the
    study has it), paired on the seeds both have, at one base recipe's compute: does the motion reward bring what
    the image reward does not?"""
    gains = {}
    for variant in VARIANTS:
        motion = any("motion:" in o for o in variant.options) and runs[variant.name]
        if not motion or (twin := image_reward_alone(variant)) is None:
            continue
        against = twin.name
        compared = {m: paired_difference(runs, variant.name, against, m) for m in MOTION_METRICS}
        if all(c is not None for c in compared.values()):
            gains[variant.name] = {"against": against, "seeds": len(compared["jitter"][0]),
                                   **{m: c[1].as_dict() for m, c in compared.items()}}
            gains[variant.name]["scaled"] = {  # its LoRA dialled down, against the image reward's at full strength
                s: {m: paired_difference(runs, variant.name, against, m, s)[1].as_dict() for m in MOTION_METRICS}
                for s in strengths(variant)}
    return gains


OVERSEEN = ("quality", "reward", "direction_acc")  # the metrics the over-optimisation table shows
PATIENCE = 2  # the early-stopping guard simulated on the long runs: evaluations without a better held-out reward


def _held_out_reward(record: dict, point: int) -> float:
    rows = record["evals"][point]["edits"]
    return sum(r["reward"] for r in rows) / len(rows)


def early_stop_point(record: dict, patience: int = PATIENCE) -> int:
    """The evaluation whose weights ``--early-stop-patience`` keeps (``lora_best/``): the best held-out reward of
    the run's edits until ``patience`` evaluations in a row have not beaten it."""
    best, waited = 1, 0
    for k in range(2, len(record["evals"])):
        if _held_out_reward(record, k) > _held_out_reward(record, best):
            best, waited = k, 0
        else:
            waited += 1
            if waited == patience:
                break
    return best


def overoptimisation(base: dict, records: dict[int, dict], one_budget: int | None = None) -> dict:
    """A longer variant's runs: where the mean gold quality from noise peaks, whether it then falls while the
    reward still climbs (the last evaluation minus the peak's, paired per seed and clip), and what each guard keeps
    instead of the last weights: those early stopping on the held-out reward keeps, or the last at a smaller LoRA
    strength; each also against the weights at evaluation ``one_budget`` (the base recipe's compute), if given."""
    runs = list(records.values())
    points = curve(base, records)
    peak = 1 + max(range(len(points)), key=lambda i: points[i]["quality"]["mean"])
    guards = {"last weights": lambda r: r["evals"][-1]["noise"],
              f"early stopping (patience {PATIENCE})": lambda r: r["evals"][early_stop_point(r)]["noise"]}
    for scale in runs[0]["evals"][-1].get("scaled", {}):
        guards[f"last weights at strength {scale}"] = lambda r, s=scale: r["evals"][-1]["scaled"][s]
    bases, last, at_peak = [base["noise"]] * len(runs), [r["evals"][-1]["noise"] for r in runs], \
        [r["evals"][peak]["noise"] for r in runs]
    at_one = None if one_budget is None else [r["evals"][one_budget]["noise"] for r in runs]
    kept = {}
    for name, rows_of in guards.items():
        rows = [rows_of(r) for r in runs]
        kept[name] = {m: hierarchical_bootstrap(_differences(bases, rows, m)).as_dict() for m in OVERSEEN}
        if name != "last weights":
            kept[name]["quality_vs_last"] = hierarchical_bootstrap(_differences(last, rows, "quality")).as_dict()
        if at_one is not None:
            kept[name]["quality_vs_one_budget"] = hierarchical_bootstrap(_differences(at_one, rows, "quality")).as_dict()
    kept[f"early stopping (patience {PATIENCE})"]["steps"] = [r["evals"][early_stop_point(r)]["step"] for r in runs]
    return {"peak": {"step": points[peak - 1]["step"], "tflop": points[peak - 1]["tflop"]},
            "end_minus_peak": {m: hierarchical_bootstrap(_differences(at_peak, last, m)).as_dict()
                               for m in ("quality", "reward")},
            "guards": kept}


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
        for strength in strengths(variant):  # the same runs with their LoRA dialled down at inference
            rows = [_noise_rows(r, variant, strength) for r in records.values()]
            summary["variants"][variant.name].setdefault("scaled", {})[strength] = {
                m: hierarchical_bootstrap(_differences([base["noise"]] * len(rows), rows, m)).as_dict() for m in METRICS}
    summary["claims"] = [effect for claim in CLAIMS if (effect := claim_effect(claim, runs)) is not None]
    summary["recommendation"] = recommendation(summary, runs, plan)
    summary["motion_reward"] = motion_gains(runs)
    summary["overoptimisation"] = {
        v.name: overoptimisation(base, runs[v.name], budget_point(next(iter(runs[v.name].values())), v))
        for v in VARIANTS if v.budget > 1 and runs[v.name]}
    return summary


def _format(interval: dict, digits: int) -> str:
    low, high = interval["ci95"]
    return f"{interval['mean']:+.{digits}f} [{low:+.{digits}f}, {high:+.{digits}f}]"


def render(summary: dict, stale: list[str]) -> tuple[str, dict[str, list[str]]]:
    """The RESULTS.md section and, per question, the variants its plot shows."""
    plan, variants = summary["plan"], summary["variants"]
    lines = [f"`python -m bench.world_study --part study` runs the records (`bench/world/results/`, one per variant "
             f"and seed); `python -m bench.world_study --report` writes this section from them. Every variant is the "
             f"study's base recipe (the default job when the study began) with one option changed, trained to the "
             f"compute of the base recipe ({plan['default_steps']} steps; steps = that TFLOP / the variant's own TFLOP per step), scored from noise on the effect set's "
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
        beside = [BESIDE[name] for name in names if BESIDE.get(name) in variants]  # none in the base recipe's question
        first = ["default"] if "default" in variants else []
        shown = names if question == DEFAULT.question else list(dict.fromkeys([*first, *beside, *names]))
        table = []
        for name in shown:
            v = variants[name]
            for strength, at in [(None, v["at_budget"]), *v.get("scaled", {}).items()]:
                table.append([_at_strength(v["label"], strength),
                              f"{v['tflop_per_step'] * 1e3:.2f}", str(v["steps"]), f"{len(v['seeds'])}/{plan['seeds']}",
                              *[_format(at[m], d) for m, (_, d) in METRICS.items()],
                              "" if strength else _format(v["edits_at_budget"]["quality"], 2)])
        lines.append(f"**{question}** (gains over the base model at the base recipe's compute)\n\n" + markdown_table(
            ["variant", "GFLOP / step", "steps", "seeds", *[f"Δ {label}" for label, _ in METRICS.values()],
             "Δ quality of edits (dB)"], table) + f"\n\n![{question}: gains against compute](world/study_{_slug(question)}.png)")
        questions[question] = shown
    if summary.get("motion_reward"):
        rows = [[_at_strength(variants[name]["label"], strength),
                 variants[g["against"]]["label"], str(g["seeds"]), *[_format(at[m], METRICS[m][1]) for m in MOTION_METRICS]]
                for name, g in summary["motion_reward"].items() for strength, at in [(None, g), *g["scaled"].items()]]
        lines.append("**What the motion reward adds to the image reward** (from noise, at the base recipe's compute, "
                     "each variant minus the same recipe fine-tuned with the image reward alone at full LoRA strength; "
                     "paired on the same seeds and clips; jitter lower is better)\n\n" + markdown_table(
                         ["variant", "against", "seeds", *[f"Δ {METRICS[m][0]}" for m in MOTION_METRICS]], rows))
    if summary.get("recommendation"):
        lines.append(_render_recommendation(summary["recommendation"], variants))
    for name, over in summary.get("overoptimisation", {}).items():
        lines.append(_render_overoptimisation(over, variants[name]))
    if stale:
        by_code = ["(code:" in record and not record.startswith("base.json") for record in stale]  # verify: variants
        fix = ("`--part verify` runs one seed of each variant again and stamps the rest where it computes the same"
               if all(by_code) else "`--part study` runs them again" if not any(by_code) else
               "`--part verify` for those stale by code, `--part study` for the rest")
        lines.append(f"Stale records (not counted; {fix}): " + ", ".join(sorted(stale)))
    return "\n\n".join(lines), questions


def _render_recommendation(choice: dict, variants: dict) -> str:
    label = variants[choice["recipe"]]["label"]
    of_all = sum(1 for v in VARIANTS if v.budget == 1.0)
    so_far = "" if choice["candidates"] == of_all else f", {of_all - choice['candidates']} more still to run"
    head = (f"**The recipe a user should use** (of the {choice['candidates']} variants with every seed at the "
            f"base recipe's compute{so_far}, the highest mean gold-quality gain from noise): {label}")
    if choice["versus_default"] is None:
        return head + ": the base recipe stays the default job."
    difference = _format(choice["versus_default"], 2)
    if choice["adopt"]:
        adopted = ("the default job runs it (`engine/presets/world.yaml`)" if default_job_runs(choice["recipe"], variants)
                   else "the default job's recipe should become it")
        return head + f", {difference} dB over the base recipe (paired): {adopted}."
    return head + (f", {difference} dB over the base recipe (paired; picked as the best of several, so this "
                   "interval is optimistic): not beyond the noise, the base recipe stays the default job.")


def default_job_runs(name: str, variants: dict) -> bool:
    """Whether ``python -m engine.train`` with no options trains exactly variant ``name`` at the steps it ran."""
    from engine.config import resolve_config

    variant = next(v for v in VARIANTS if v.name == name)
    recipe = resolve_config(["--model", "world", *STUDY_BASE, "--steps", str(variants[name]["steps"]), *variant.options])
    return resolve_config(["--model", "world"]).to_dict() == recipe.to_dict()


def _render_overoptimisation(over: dict, variant: dict) -> str:
    quality, reward = over["end_minus_peak"]["quality"], over["end_minus_peak"]["reward"]
    if quality["ci95"][1] < 0:
        verdict = "the gold quality turns down " + ("while the reward still climbs" if reward["ci95"][0] > 0 else
                                                     "and the reward does not climb further")
    else:
        verdict = "no turn down of the gold quality beyond the noise"
    compared = [("quality_vs_last", "quality vs the last weights (dB)"),
                ("quality_vs_one_budget", "quality vs the weights at the base recipe's compute (dB)")]
    compared = [(key, head) for key, head in compared if any(key in row for row in over["guards"].values())]
    rows = [[name, *[_format(row[m], METRICS[m][1]) for m in OVERSEEN],
             *[_format(row[key], 2) if key in row else "" for key, _ in compared],
             ", ".join(str(s) for s in row.get("steps", []))] for name, row in over["guards"].items()]
    return (f"**over-optimisation: when the gold quality turns down, and what catches it** ({variant['label']}, "
            f"{len(variant['seeds'])} seed{'s' if len(variant['seeds']) != 1 else ''}; gains from noise over the base model)\n\nThe mean gold quality peaks at step "
            f"{over['peak']['step']} ({over['peak']['tflop']:.1f} TFLOP); the last evaluation minus the peak: quality "
            f"{_format(quality, 2)} dB, reward {_format(reward, 4)}: {verdict}. The peak is read off the same runs, "
            f"so the drop after it is an upper bound. What each guard keeps: the weights early stopping on the "
            f"held-out reward keeps (`--eval-every` at these points, `--early-stop-patience {PATIENCE}`; "
            f"`lora_best/`), or the last weights at a smaller strength (`--lora-scale`).\n\n"
            + markdown_table(["weights kept", *[f"Δ {METRICS[m][0]}" for m in OVERSEEN], *[h for _, h in compared],
                              "steps kept"], rows))


def _at_strength(label: str, strength: str | None) -> str:
    return label + (f", LoRA strength {strength}" if strength else "")


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
            x, mean, low, high = ([0.0, *v] for v in zip(*[(p["tflop"], p[metric]["mean"], *p[metric]["ci95"])
                                                            for p in points]))  # from the base model at 0
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
    targets = {folder / "summary.json": json.dumps(summary, indent=1) + "\n"}
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
