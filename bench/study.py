"""The method study on the built-in world model: variants of the default job, each fine-tuned over several seeds
to the same compute, evaluated on the way, one JSON record per (variant, seed) in ``bench/world/results/``.

A variant runs to ``budget`` times the default job's training FLOPs (``--steps`` chosen from its own FLOPs per
step, counted with ``torch.utils.flop_counter`` on one step), so that every curve is read at equal compute. At
``evaluations`` evenly spaced points of that budget the run is paused and scored twice: from noise (the effect
set's in-domain captions and seeds, the same initial noise for every variant and for the base model, whose
scores form the ``base`` record), and as edits of the run's held-out clips. Each clip's reward (the built-in
reward on the SegVR evaluation frames, the same scorer for every variant) and gold metrics are kept, so any
comparison is paired clip by clip and seed by seed.

A record's key covers the variant's options and budget, the seed, the evaluation plan, the shipped assets'
bytes and the run's resolved training configuration; the record also keeps digests of the code the run executed (``bench.code_trace``: each function of the
engine, the kernels and this runner that ran, read as syntax trees without comments or docstrings). A record is
stale when its key no longer matches or any code it ran has changed: the runner names what and runs it again.
Code a run did not execute may change freely, so the study continues across sessions while the engine grows.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import socket
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from bench.code_trace import ROOT, CodeTrace, changed, code_digests
from bench.study_plan import ADDED_OPTIONS, CONFIG_RESOLUTION, DEFAULT, STUDY_BASE, VARIANTS, Plan, Variant


RESULTS = Path(__file__).parent / "world" / "results"
SETTINGS = "engine/config.py:<module>"  # the configuration's fields and defaults: the identity has their values


# ---------------------------------------------------------------------------------- keys
def assets_digest() -> str:
    """The digest of the shipped assets every study run reads: the built-in model, its image reward and that
    reward's architecture. Assets for other uses (the motion reward) leave the records current; a variant that
    reads one must add it here."""
    from engine.assets import ASSETS, MODEL_DIR, REWARD_FILE

    read = (lambda p: p == REWARD_FILE or MODEL_DIR in p.parents or (p.parent == ASSETS and p.suffix == ".json"))
    digest = hashlib.sha256()
    for path in sorted(p for p in ASSETS.rglob("*") if p.is_file() and read(p)):
        digest.update(path.read_bytes())
    return digest.hexdigest()


def record_identity(variant: Variant | None, seed: int | None, plan: Plan, assets: str,
                    config: dict | None = None) -> dict:
    """Everything a record's numbers depend on but the code: the variant, the seed, the evaluation plan, the
    assets and ``config``, the run's resolved training configuration (``run_config``; ``variant`` None: the base
    model's record)."""
    run = {k: v for k, v in asdict(variant).items() if k not in ("question", "label")} if variant else None  # not its words
    evaluation = {k: v for k, v in asdict(plan).items() if k != "seeds"}  # how many seeds there are is not this run's
    identity = {"variant": run, "seed": seed, "plan": evaluation, "assets": assets, "config": config}
    extra = variant_assets(variant) if variant else {}
    if extra:  # only variants that read one have the key: the other records' keys stay as they were
        identity["variant_assets"] = extra
    return json.loads(json.dumps(identity))


def variant_assets(variant: Variant) -> dict[str, str]:
    """Digests of the shipped assets beyond ``assets_digest`` that ``variant`` reads: the motion reward where its
    options name ``motion:world``."""
    from engine.assets import MOTION_REWARD_FILE

    if not any("motion:world" in option for option in variant.options):
        return {}
    return {MOTION_REWARD_FILE.name: hashlib.sha256(MOTION_REWARD_FILE.read_bytes()).hexdigest()}  # as a record stores it (tuples become lists)


def record_key(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def record_path(folder: Path, variant: Variant | None, seed: int | None) -> Path:
    return folder / ("base.json" if variant is None else f"{variant.name}-seed{seed}.json")


def _configuration_code(entry: str) -> bool:
    """Whether ``entry`` ("file:function") only defines or resolves the training configuration, which a record's
    key holds: its changes count through that configuration alone."""
    return entry == SETTINGS or entry in CONFIG_RESOLUTION


def changed_code(code: dict[str, str], root: Path = ROOT) -> list[str]:
    """The entries of a record's ``code`` whose code has changed, but for the configuration's."""
    return [entry for entry in changed(code, root) if not _configuration_code(entry)]


def staleness(record: dict, identity: dict, root: Path = ROOT) -> str | None:
    """None when ``record`` was made with ``identity`` and the code it ran under ``root`` is unchanged; else what
    differs (options, seed, plan, assets, or the code: which functions; code that only resolves the configuration
    is judged by the configuration it resolves to, ``CONFIG_RESOLUTION``)."""
    if record.get("key") != record_key(identity):
        differ = [name for name in identity if record["identity"].get(name) != identity[name]]
        return ", ".join(differ) or "key"
    code = changed_code(record["code"], root)
    if code:
        return "code: " + ", ".join(code[:3]) + (f" and {len(code) - 3} more" if len(code) > 3 else "")
    return None


# ---------------------------------------------------------------------------------- runs
def evaluation_pairs(plan: Plan):
    """(clip, noise seed) pairs every record is scored on from noise: the effect set's in-domain captions."""
    from engine.world.scene import evaluation_set

    return evaluation_set("effect", plan.samples_per_caption)[:plan.clips]


def scorer():
    """The reward every record is scored with: the world preset's scoring reward on the SegVR evaluation frames,
    whatever the variant trained with."""
    from engine.builtin import BUILTINS
    from engine.rewards import build_reward
    from engine.video_reward import SegmentalReward

    return SegmentalReward(build_reward(BUILTINS["world"].reward))


def _config(options: list[str], seed: int, steps: int, folder: Path):
    from engine.config import resolve_config

    return resolve_config(["--model", "world", "--seed", str(seed), "--output", str(folder), "--overwrite",
                           "--no-tensorboard", "--log-every", "1", *STUDY_BASE, "--steps", str(steps), *options])


def run_config(options: list[str], seed: int) -> dict:
    """The run's training configuration, every default resolved, but its steps (the budget decides them), its
    output folder and the options added since the study began at the value its runs had (``ADDED_OPTIONS``): in a
    record's identity in place of the configuration code, so that a default changed in ``engine/config.py`` makes
    stale only the runs it changes (a variant that sets it keeps its record)."""
    config = _config(options, seed, 1, Path("run")).to_dict()
    kept = {k: v for k, v in config.items()
            if k not in ("steps", "output") and not (k in ADDED_OPTIONS and ADDED_OPTIONS[k] == v)}
    return json.loads(json.dumps(kept, default=str))


def _trainer(options: list[str], seed: int, steps: int, folder: Path):
    from engine.train import Trainer

    return Trainer(_config(options, seed, steps, folder)).setup()


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


@functools.cache
def counted_step_tflop(options: tuple[str, ...]) -> tuple[float, frozenset]:
    """``step_tflop(options)`` and the code counting it ran, counted once a process: the count depends on the
    options and the code alone, and it costs a training step under the FLOP counter."""
    with CodeTrace() as trace:
        tflop = step_tflop(list(options))
    return tflop, frozenset(trace.seen)


def eval_steps(total: int, evaluations: int) -> list[int]:
    return sorted({max(1, round(total * k / evaluations)) for k in range(1, evaluations + 1)})


def run_variant(variant: Variant, seed: int, plan: Plan, budget_tflop: float, tflop: float, trace: CodeTrace) -> dict:
    """Fine-tunes ``variant`` with ``seed`` to its budget, pausing at each evaluation point to score the run from
    noise and as edits; returns the record's measured part. ``trace`` watches the setup and the first evaluation
    point only: the later points run the same code, and tracing costs time."""
    from engine.lora import set_lora_scale
    from engine.world.figures import from_noise

    total = max(1, round(budget_tflop * variant.budget / tflop))
    pairs, score = evaluation_pairs(plan), scorer()

    def point(step):
        trainer.config.steps = step  # the learning rate is constant after warm-up: a pause changes nothing
        trainer.train()  # scores the held-out edits at its end (and at step 0)
        print(f"study: {variant.name} seed {seed}: step {step}/{total}, scoring {len(pairs)} clips from noise",
              flush=True)
        return {"step": step, "tflop": step * tflop, "noise": from_noise(trainer.model, pairs, scorer=score)[0],
                "edits": trainer.held_out.evaluations[-1]}

    first, *later = eval_steps(total, variant.evaluations)
    with tempfile.TemporaryDirectory() as folder:
        with trace:
            trainer = _trainer(list(variant.options), seed, total, Path(folder))
            points = [point(first)]
        points += [point(step) for step in later]
        if variant.scales:  # the LoRA dialled down at inference, at the end of the budget
            points[-1]["scaled"] = {}
            for scale in variant.scales:
                set_lora_scale(trainer.model.denoiser, scale)
                points[-1]["scaled"][f"{scale:g}"] = from_noise(trainer.model, pairs, scorer=score)[0]
            set_lora_scale(trainer.model.denoiser, 1.0)
        train_log, wall = [], 0.0
        for r in trainer.records:
            if r["kind"] in ("train", "skipped"):
                wall += r["s_per_step"]
                train_log.append({"step": r["step"], "reward": r["reward"], "tflop": r["step"] * tflop, "wall_s": wall})
    evals = [{"step": 0, "tflop": 0.0, "edits": trainer.held_out.evaluations[0]}, *points]
    return {"steps": total, "tflop_per_step": tflop, "train": train_log, "evals": evals}


def _float32_digits(value):
    """``value`` with every float written to 8 significant digits: the metrics are float32 (7 to 8 digits), so
    nothing is lost, and a record takes half the bytes of Python's shortest round-trip form of a double."""
    if isinstance(value, float):
        return float(f"{value:.8g}")
    if isinstance(value, dict):
        return {k: _float32_digits(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_float32_digits(v) for v in value]
    return value


def _runner(plan: Plan, folder: Path):
    """What the study's runs share, as (load, write, measure): the records' identities and staleness, writing a
    record, and fine-tuning one (variant, seed) with each option set's FLOPs per step counted once."""
    folder.mkdir(parents=True, exist_ok=True)
    assets = assets_digest()

    def load(variant, seed) -> tuple[dict, Path, dict | None, str | None]:
        """(identity, path, the record or None, why it is stale: "missing", what changed, or None: current)."""
        config = run_config(list(variant.options), seed) if variant else None
        identity = record_identity(variant, seed, plan, assets, config)
        path = record_path(folder, variant, seed)
        if not path.exists():
            return identity, path, None, "missing"
        record = json.loads(path.read_text())
        return identity, path, record, staleness(record, identity)

    def write(path, identity, measured, ran) -> None:
        record = {"key": record_key(identity), "identity": identity,
                  "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), **measured,
                  "code": current_code(ran)}
        _write_record(path, record)

    def measure(variant, seed) -> tuple[dict, set]:
        """The record's measured part for (variant, seed) and the code it ran."""
        default_tflop, default_counted = counted_step_tflop(tuple(DEFAULT.options))
        tflop, counted = counted_step_tflop(tuple(variant.options))
        started, trace = time.perf_counter(), CodeTrace()
        measured = run_variant(variant, seed, plan, default_tflop * plan.default_steps, tflop, trace)
        measured["run_s"] = time.perf_counter() - started
        return measured, trace.seen | counted | default_counted

    return load, write, measure


def _write_record(path: Path, record: dict) -> None:
    from engine.train.run_folder import atomic_write

    atomic_write(path, (json.dumps(_float32_digits(record)) + "\n").encode(), f"the study record {path.name}")


def current_code(ran: set) -> dict[str, str]:
    return {k: v for k, v in code_digests(ran).items() if not _configuration_code(k)}


def run_study(plan: Plan, variants=VARIANTS, folder: Path = RESULTS) -> None:
    """Every (variant, seed) of ``plan`` without a current record, each written as soon as it is done: a study
    stopped anywhere continues where it stopped. Each record is claimed while it runs (``claim``), so that two
    workers given the same variants share them."""
    from engine.builtin import build_model
    from engine.world.figures import from_noise

    load, write, measure = _runner(plan, folder)
    identity, path, _, why = load(None, None)
    if why is not None and claim(path):
        with CodeTrace() as trace:
            rows = from_noise(build_model("world"), evaluation_pairs(plan), scorer=scorer())[0]
        write(path, identity, {"noise": rows}, trace.seen)
        release(path)
    for variant in variants:
        for seed in range(plan.seeds):
            identity, path, _, why = load(variant, seed)
            if why is None or not claim(path):
                continue
            if why != "missing":
                print(f"study: {path.name} is stale ({why} changed): running it again", flush=True)
            measured, ran = measure(variant, seed)
            write(path, identity, measured, ran)
            release(path)
            print(f"study: wrote {path.name} ({measured['run_s']:.0f} s)", flush=True)


def claim(path: Path) -> bool:
    """Take the record at ``path`` for this process (``<record>.claim``, created exclusively: pid, its start time,
    host), so that several workers may share one list of variants; False while another live process on this host
    holds it (it is said). A claim whose process is gone is taken over; one from another host is respected."""
    from engine.train.run_folder import _owner, _start_time

    marker, mine = path.with_suffix(".claim"), path.with_suffix(f".claim.{os.getpid()}")
    mine.write_text(json.dumps(_owner()) + "\n")
    try:
        for _ in range(2):
            try:
                os.link(mine, marker)  # the marker appears whole: no worker ever reads it half written
                return True
            except FileExistsError:
                pass
            try:
                holder = json.loads(marker.read_text())
            except (OSError, ValueError):
                holder = {}
            live = holder.get("host") != socket.gethostname() or (
                holder.get("start_time") is not None and _start_time(holder.get("pid", -1)) == holder["start_time"])
            if holder and live:
                print(f"study: {path.name} is being run by pid {holder.get('pid')} on {holder.get('host')}: "
                      "left to it", flush=True)
                return False
            marker.unlink(missing_ok=True)  # its process is gone (or the file unreadable): take it over
        return False
    finally:
        mine.unlink(missing_ok=True)


def release(path: Path) -> None:
    path.with_suffix(".claim").unlink(missing_ok=True)


def _results(record: dict) -> dict:
    """What a verification compares: everything a record measured but the wall-clock times."""
    kept = {k: record.get(k) for k in ("steps", "tflop_per_step", "evals", "train")}
    kept["train"] = [{k: v for k, v in row.items() if k != "wall_s"} for row in kept["train"] or []]
    return kept


def _first_difference(a, b, where: str = "") -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            found = _first_difference(a.get(key), b.get(key), f"{where}.{key}" if where else key)
            if found:
                return found
        return None
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return next((d for i, (x, y) in enumerate(zip(a, b)) if (d := _first_difference(x, y, f"{where}[{i}]"))),
                    None)
    return None if a == b else f"{where}: {a!r} then, {b!r} now"


def verify_study(plan: Plan, variants=VARIANTS, folder: Path = RESULTS) -> list[str]:
    """For each variant whose records are stale only because code they ran has changed: run one such seed again
    with the current code. When its results equal the record's (every number at the 8 digits records keep, wall
    times aside), the change did not change what the variant computes: the seed run again is rewritten whole,
    keeping the code its old record ran (``verified_code``), and every other such record of the variant is stamped
    with the current code where each changed function it ran is one that verification covers (run by the seed's old
    record or by its run again; a function since removed counts where the old record ran it too). A variant with
    such a verified seed already gets the stamping alone. Otherwise its records stay stale, and the first
    difference is said. Records stale for any other reason (options, plan, assets, configuration) are left to
    ``run_study``. Each record is claimed (``claim``) while it is run again or stamped, so that two workers given the
    same variants share them. Returns one line per variant."""
    (load, write, measure), lines = _runner(plan, folder), []
    for variant in variants:
        loaded = [(seed, *load(variant, seed)) for seed in range(plan.seeds)]
        stale = [(seed, identity, path, record) for seed, identity, path, record, why in loaded
                 if why is not None and why.startswith("code:")]
        if not stale:
            lines.append(f"{variant.name}: no record stale by code alone")
            continue
        verified = [(seed, record) for seed, _, _, record, why in loaded
                    if why is None and record is not None and "verified_code" in record]
        if verified:
            seed, reference = verified[0]
            others = stale
        else:
            seed, _, path, _ = stale[0]
            if not claim(path):
                lines.append(f"{variant.name}: left to the process holding its claim")
                continue
            try:
                identity, path, record, why = load(variant, seed)  # as it is now that it is claimed
                if why is None or not why.startswith("code:"):
                    lines.append(f"{variant.name}: seed {seed} was run by another process meanwhile")
                    continue
                measured, ran = measure(variant, seed)
                difference = _first_difference(_results(record), _results(_float32_digits(measured)))
                if difference:
                    lines.append(f"{variant.name}: seed {seed} computes something else now ({difference}); its "
                                 f"{len(stale)} stale record(s) stay stale for --part study to run again")
                    continue
                write(path, identity, {**measured, "verified_code": record["code"]}, ran)
            finally:
                release(path)
            reference, others = json.loads(path.read_text()), stale[1:]
        covered = set(reference["verified_code"]) | set(reference["code"])
        stamped = uncovered = 0
        for other_seed, _, other_path, _ in others:
            if not claim(other_path):
                continue
            try:
                other, why = load(variant, other_seed)[2:]  # as it is now that it is claimed
                if why is None or not why.startswith("code:"):
                    continue
                if not set(changed_code(other["code"])) <= covered:  # it ran changed code the verification did not
                    uncovered += 1
                    continue
                # what it ran that still exists, and what the seed run again ran (what replaces removed functions)
                own = {(str(ROOT / entry.rsplit(":", 1)[0]), entry.rsplit(":", 1)[1])
                       for entry in [*other["code"], *reference["code"]] if (ROOT / entry.rsplit(":", 1)[0]).exists()}
                _write_record(other_path, {**other, "code": current_code(own), "verified": f"by seed {seed} run again, "
                                           f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"})
                stamped += 1
            finally:
                release(other_path)
        lines.append(f"{variant.name}: seed {seed} run again gives the same numbers; {stamped} more record(s) now "
                     "carry the current code" + (f" ({uncovered} ran changed code it did not: --part study runs them "
                                                  "again)" if uncovered else ""))
    return lines
