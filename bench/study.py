"""The method study on the built-in world model: variants of the default job, each fine-tuned over several seeds
to the same compute, evaluated on the way, one JSON record per (variant, seed) in ``bench/world/results/``.

A variant runs to ``budget`` times the default job's training FLOPs (``--steps`` chosen from its own FLOPs per
step, counted with ``torch.utils.flop_counter`` on one step), so that every curve is read at equal compute. At
``evaluations`` evenly spaced points of that budget the run is paused and scored twice: from noise (the effect
set's in-domain captions and seeds, the same initial noise for every variant and for the base model, whose
scores form the ``base`` record), and as edits of the run's held-out clips. Each clip's reward (the built-in
reward on the SegVR evaluation frames, the same scorer for every variant) and gold metrics are kept, so any
comparison is paired clip by clip and seed by seed.

A record's key covers all that decides its numbers: the variant's options and budget, the seed, the evaluation
plan, the shipped assets' bytes and ``code_version()``, a digest of the engine's training, chain, reward and world
code read as syntax trees (comments and docstrings do not count). A record whose key no longer matches is stale:
the runner names what changed and runs it again.
"""

from __future__ import annotations

import ast
import hashlib
import json
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from bench.study_plan import DEFAULT, VARIANTS, Plan, Variant


ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).parent / "world" / "results"
# What decides a record's numbers besides its options and the assets: training, the chain, the reward, the gold
# metrics and the evaluation sets (the asset builders are covered by the assets' bytes).
CODE = ("engine/train", "engine/chain.py", "engine/schedule.py", "engine/video_reward.py", "engine/lora.py",
        "engine/rewards/__init__.py", "engine/rewards/base.py", "engine/rewards/clip.py", "engine/rewards/hpsv2.py",
        "engine/rewards/registry.py", "engine/models", "engine/config.py", "engine/builtin.py", "engine/data.py",
        "engine/regularize.py", "engine/world/gold.py", "engine/world/figures.py", "engine/world/scene.py",
        "engine/world/rendering.py", "bench/study.py")


# ---------------------------------------------------------------------------------- keys
def _syntax(source: str) -> str:
    """The module's syntax tree without docstrings: what it computes, not how it is explained."""
    tree = ast.parse(source)
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body
                and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]
    return ast.dump(tree)


def code_version(root: Path = ROOT) -> str:
    digest = hashlib.sha256()
    for entry in CODE:
        path = root / entry
        for file in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
            digest.update(str(file.relative_to(root)).encode())
            digest.update(_syntax(file.read_text()).encode())
    return digest.hexdigest()[:16]


def assets_digest() -> str:
    from engine.assets import ASSETS

    digest = hashlib.sha256()
    for path in sorted(p for p in ASSETS.rglob("*") if p.is_file()):
        digest.update(path.read_bytes())
    return digest.hexdigest()


def record_identity(variant: Variant | None, seed: int | None, plan: Plan, assets: str, code: str) -> dict:
    """Everything a record's numbers depend on (``variant`` None: the base model's record)."""
    run = {k: v for k, v in asdict(variant).items() if k not in ("question", "label")} if variant else None  # not its words
    evaluation = {k: v for k, v in asdict(plan).items() if k != "seeds"}  # how many seeds there are is not this run's
    identity = {"variant": run, "seed": seed, "plan": evaluation, "assets": assets, "code": code}
    return json.loads(json.dumps(identity))  # as a record stores it (tuples become lists)


def record_key(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def record_path(folder: Path, variant: Variant | None, seed: int | None) -> Path:
    return folder / ("base.json" if variant is None else f"{variant.name}-seed{seed}.json")


def staleness(record: dict, identity: dict) -> str | None:
    """None when ``record`` was made with ``identity``; else what differs (options, plan, assets, code)."""
    if record.get("key") == record_key(identity):
        return None
    changed = [name for name in ("variant", "seed", "plan", "assets", "code") if record["identity"].get(name) != identity[name]]
    return ", ".join(changed) or "key"


# ---------------------------------------------------------------------------------- runs
def evaluation_pairs(plan: Plan):
    """(clip, noise seed) pairs every record is scored on from noise: the effect set's in-domain captions."""
    from engine.world.scene import evaluation_set

    return evaluation_set("effect", plan.samples_per_caption)[:plan.clips]


def scorer():
    """The reward every record is scored with: the built-in reward on the SegVR evaluation frames, whatever the
    variant trained with."""
    from engine.rewards import build_reward
    from engine.video_reward import SegmentalReward

    return SegmentalReward(build_reward("hpsv2:world"))


def _trainer(options: list[str], seed: int, steps: int, folder: Path):
    from engine.config import resolve_config
    from engine.train import Trainer

    return Trainer(resolve_config(["--model", "world", "--seed", str(seed), "--output", str(folder), "--overwrite",
                                   "--no-tensorboard", "--log-every", "1", "--steps", str(steps), *options])).setup()


def step_tflop(options: list[str]) -> float:
    """Training TFLOP of one step of the default job with ``options`` (edit, decode, reward, backward); with
    ``--grad-steps rand`` its expectation: each gradient step adds the same work, so the mean of K 1 and K all."""
    from torch.utils.flop_counter import FlopCounterMode

    if "rand" in options:
        at = options.index("rand")
        return sum(step_tflop([*options[:at], k, *options[at + 1:]]) for k in ("1", "all")) / 2
    with tempfile.TemporaryDirectory() as folder:
        trainer = _trainer(options, 0, 1, Path(folder))
        latents, prompts, context = trainer.batch(trainer.train_sources, list(range(trainer.config.batch_size)))
        with FlopCounterMode(display=False) as counter:
            loss, _ = trainer.loss_step(latents, prompts, context)
            loss.backward()
    return counter.get_total_flops() / 1e12


def eval_steps(total: int, evaluations: int) -> list[int]:
    return sorted({max(1, round(total * k / evaluations)) for k in range(1, evaluations + 1)})


def run_variant(variant: Variant, seed: int, plan: Plan, budget_tflop: float, tflop: float) -> dict:
    """Fine-tunes ``variant`` with ``seed`` to its budget, pausing at each evaluation point to score the run from
    noise and as edits; returns the record's measured part."""
    from engine.world.figures import from_noise

    total = max(1, round(budget_tflop * variant.budget / tflop))
    pairs, score = evaluation_pairs(plan), scorer()
    with tempfile.TemporaryDirectory() as folder:
        trainer = _trainer(list(variant.options), seed, total, Path(folder))
        evals = [{"step": 0, "tflop": 0.0, "edits": trainer.held_out.edit_rows()[0]}]
        for step in eval_steps(total, variant.evaluations):
            trainer.config.steps = step  # the learning rate is constant after warm-up: a pause changes nothing
            trainer.train()
            print(f"study: {variant.name} seed {seed}: step {step}/{total}, scoring {len(pairs)} clips from noise",
                  flush=True)
            evals.append({"step": step, "tflop": step * tflop, "noise": from_noise(trainer.model, pairs, scorer=score)[0],
                          "edits": trainer.held_out.edit_rows()[0]})
        train_log, wall = [], 0.0
        for r in trainer.records:
            if r["kind"] in ("train", "skipped"):
                wall += r["s_per_step"]
                train_log.append({"step": r["step"], "reward": r["reward"], "tflop": r["step"] * tflop, "wall_s": wall})
    return {"steps": total, "tflop_per_step": tflop, "train": train_log, "evals": evals}


def run_study(plan: Plan, variants=VARIANTS, folder: Path = RESULTS) -> None:
    """Every (variant, seed) of ``plan`` without a current record, each written as soon as it is done: a study
    stopped anywhere continues where it stopped."""
    from engine.builtin import build_model
    from engine.world.figures import from_noise

    folder.mkdir(parents=True, exist_ok=True)
    assets, code = assets_digest(), code_version()
    tflops: dict[tuple[str, ...], float] = {}

    def load(variant, seed):
        identity = record_identity(variant, seed, plan, assets, code)
        path = record_path(folder, variant, seed)
        if path.exists():
            why = staleness(json.loads(path.read_text()), identity)
            if why is None:
                return identity, path, True
            print(f"study: {path.name} is stale ({why} changed): running it again", flush=True)
        return identity, path, False

    def write(path, identity, measured):
        record = {"key": record_key(identity), "identity": identity,
                  "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), **measured}
        path.with_suffix(".partial").write_text(json.dumps(record) + "\n")
        path.with_suffix(".partial").replace(path)

    identity, path, current = load(None, None)
    if not current:
        rows = from_noise(build_model("world"), evaluation_pairs(plan), scorer=scorer())[0]
        write(path, identity, {"noise": rows})
    budget = None
    for variant in variants:
        for seed in range(plan.seeds):
            identity, path, current = load(variant, seed)
            if current:
                continue
            for options in (tuple(DEFAULT.options), variant.options):
                if options not in tflops:
                    tflops[options] = step_tflop(list(options))
            budget = tflops[tuple(DEFAULT.options)] * plan.default_steps
            started = time.perf_counter()
            measured = run_variant(variant, seed, plan, budget, tflops[variant.options])
            write(path, identity, measured | {"run_s": time.perf_counter() - started})
            print(f"study: wrote {path.name} ({time.perf_counter() - started:.0f} s)", flush=True)
