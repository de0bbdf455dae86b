"""The method study's cache and report (bench.study, bench.study_report, bench.code_trace): a record's key follows
every setting and the assets, and a change to the code it ran makes it stale; the report of a small hand-made cache gives the table worked out by hand."""

import json
import re
import socket

import pytest

from bench.code_trace import ROOT, CodeTrace, changed, code_digests
from bench.study import current_code, record_identity, record_key, record_path, staleness
from bench.study_plan import CONFIG_RESOLUTION, VARIANTS, Plan, Variant
from bench.study_report import (_render_overoptimisation, early_stop_point, load_records, overoptimisation, render,
                                report, summarise)

VARIANT = {v.name: v for v in VARIANTS}
ASSETS = "assets-digest"
NO_CONFIG = lambda options, seed: None  # noqa: E731 (the hand-made records name no training configuration)


MODULE_V1 = '''"""A module of the fixture engine."""
SCALE = 2


def used(x):
    """Doubles."""
    return SCALE * x  # twice


def unused(x):
    return x
'''


def _fixture_code(root, source=MODULE_V1):
    (root / "engine").mkdir(parents=True, exist_ok=True)
    (root / "engine" / "fixture.py").write_text(source)


def _traced_fixture(root) -> dict[str, str]:
    """The code digests of a run that called ``engine/fixture.py``'s ``used`` (and a lambda inside nothing)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("fixture_engine", root / "engine" / "fixture.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with CodeTrace(root) as trace:
        assert module.used(3) == 6
    return code_digests(trace.seen, root)


def test_code_trace_keeps_what_ran_and_names_what_changed(tmp_path):
    _fixture_code(tmp_path)
    digests = _traced_fixture(tmp_path)
    assert sorted(digests) == ["engine/fixture.py:<module>", "engine/fixture.py:used"]
    assert changed(digests, tmp_path) == []
    edits = {  # (old, new) -> what a record that ran ``used`` must call changed
        ('"""Doubles."""', '"""Twice x, explained otherwise."""'): [],
        ("# twice", "# two times"): [],
        ("return x", "return -x"): [],  # ``unused`` never ran
        ('fixture engine."""', 'fixture engine."""\nimport os'): [],
        ("return SCALE * x", "return SCALE * x + 1"): ["engine/fixture.py:used"],
        ("SCALE = 2", "SCALE = 3"): ["engine/fixture.py:<module>"],
        ("def used(x)", "def renamed(x)"): ["engine/fixture.py:used"],
    }
    for (old, new), expected in edits.items():
        _fixture_code(tmp_path, MODULE_V1.replace(old, new))
        assert changed(digests, tmp_path) == expected, (old, new)
    (tmp_path / "engine" / "fixture.py").unlink()
    assert changed(digests, tmp_path) == sorted(digests)


def test_record_key_follows_every_setting_and_the_assets(tmp_path):
    plan = Plan(seeds=2)
    identity = record_identity(VARIANT["tau-1.0"], 0, plan, ASSETS)
    record = {"key": record_key(identity), "identity": identity, "code": {}}
    assert staleness(record, identity) is None
    changed_settings = {"variant": record_identity(VARIANT["tau-0.8"], 0, plan, ASSETS),
                        "seed": record_identity(VARIANT["tau-1.0"], 1, plan, ASSETS),
                        "plan": record_identity(VARIANT["tau-1.0"], 0, Plan(seeds=2, samples_per_caption=3), ASSETS),
                        "assets": record_identity(VARIANT["tau-1.0"], 0, plan, "other assets"),
                        "config": record_identity(VARIANT["tau-1.0"], 0, plan, ASSETS, {"tau": 1.0})}
    for what, other in changed_settings.items():
        assert record_key(other) != record["key"]
        assert staleness(record, other) == what
    # a run's configuration is its resolved values: a default spelled out is the same run
    from bench.study import run_config
    assert run_config(["--tau", "0.6"], 0) == run_config([], 0) != run_config(["--tau", "0.8"], 0)
    assert run_config([], 0) != run_config([], 1)
    # an option added since the study began is in the key only away from the value its runs had
    assert "decode_recompute" not in run_config([], 0)
    assert run_config(["--decode-recompute"], 0)["decode_recompute"] is True
    assert "text_encoder" not in run_config([], 0)
    assert run_config(["--text-encoder", "cached"], 0)["text_encoder"] == "cached"
    assert "attention" not in run_config([], 0)
    assert run_config(["--attention", "xformers"], 0)["attention"] == "xformers"
    # the study's base recipe is pinned (STUDY_BASE): the default job's recipe changing leaves its records' runs
    from engine.config import resolve_config
    assert run_config([], 0)["tau"] == 0.6 != resolve_config(["--model", "world"]).tau
    # a variant that reads an asset beyond the shared ones carries its digest; the others' keys do not change
    motion = record_identity(VARIANT["reward-motion"], 0, plan, ASSETS)
    assert set(motion["variant_assets"]) == {"world-motion.safetensors"} and "variant_assets" not in identity
    # neither the number of seeds in the study nor a variant's wording changes a run
    assert record_identity(VARIANT["tau-1.0"], 0, Plan(seeds=5), ASSETS) == identity
    reworded = Variant("tau-1.0", "tau", "another label", VARIANT["tau-1.0"].options)
    assert record_identity(reworded, 0, plan, ASSETS) == identity
    # the code it ran, changed: stale, naming the function
    _fixture_code(tmp_path)
    record["code"] = _traced_fixture(tmp_path)
    assert staleness(record, identity, tmp_path) is None
    _fixture_code(tmp_path, MODULE_V1.replace("SCALE * x", "SCALE * x * x"))
    assert staleness(record, identity, tmp_path) == "code: engine/fixture.py:used"


def test_code_that_only_resolves_the_configuration_counts_through_the_configuration():
    """A change to the code that turns options into the training configuration (parsing, --help, presets) stales a
    record only where the configuration it resolves to changes, which the key holds; a change to code the run uses
    with that configuration stales it as before. Every such entry names a function that exists."""
    plan = Plan(seeds=1)
    identity = record_identity(VARIANT["tau-1.0"], 0, plan, ASSETS)
    record = {"key": record_key(identity), "identity": identity,
              "code": {entry: "an old digest" for entry in sorted(CONFIG_RESOLUTION)}}
    assert staleness(record, identity) is None
    record["code"]["engine/config.py:TrainConfig.grad_steps_resolved"] = "an old digest"
    assert staleness(record, identity) == "code: engine/config.py:TrainConfig.grad_steps_resolved"
    ran = {(str(ROOT / entry.split(":")[0]), entry.split(":")[1]) for entry in CONFIG_RESOLUTION}
    assert set(code_digests(ran)) >= CONFIG_RESOLUTION  # each still names a function
    assert not set(current_code(ran)) & CONFIG_RESOLUTION  # and a new record does not list it


def _rows(values):
    return [{"quality": q, "reward": 0.2, "colour_acc": 1.0, "shape_acc": 1.0, "direction_acc": 1.0, "jitter": 0.5}
            for q in values]


def _write_cache(folder, plan, gains, code=None, scaled=None):
    """Base clips at 30 dB; each variant's clips at 30 + its gain per seed and clip, at the end of its budget, and
    at each LoRA strength of ``scaled[variant]`` 30 + that strength's gain; every record ran ``code``."""
    def write(variant, seed, measured):
        identity = record_identity(variant, seed, plan, ASSETS)
        record_path(folder, variant, seed).write_text(json.dumps({"key": record_key(identity), "identity": identity,
                                                                   **measured, "code": code or {}}))

    folder.mkdir()
    write(None, None, {"noise": _rows([30.0, 30.0, 30.0])})
    for name, per_seed in gains.items():
        for seed, clip_gains in enumerate(per_seed):
            evals = [{"step": 0, "tflop": 0.0, "edits": _rows([25.0, 25.0])}]
            evals += [{"step": 10 * k, "tflop": 0.1 * k, "noise": _rows([30.0 + g * k / 4 for g in clip_gains]),
                       "edits": _rows([25.0 + k / 4, 25.0 + k / 4])} for k in range(1, 5)]
            if name in (scaled or {}):
                evals[-1]["scaled"] = {s: _rows([30.0 + g for g in by_seed[seed]]) for s, by_seed in scaled[name].items()}
            write(VARIANT[name], seed, {"steps": 40, "tflop_per_step": 0.01, "train": [], "evals": evals})


def test_report_of_a_hand_made_cache(tmp_path):
    plan = Plan(seeds=2)
    # quality gains at the budget, per seed and clip. By hand: default +1 everywhere; tau 1.0 +0.5 (editing
    # better by 0.5 in every clip: reproduced); TAR off +1.5 (worse by 0.5: not reproduced); S 1 differs from
    # the default by +1, -1, 0 in one seed and -1, +1, 0 in the other (mean 0: inconclusive).
    _write_cache(tmp_path / "results", plan, {
        "default": [[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]], "tau-1.0": [[0.5, 0.5, 0.5], [0.5, 0.5, 0.5]],
        "tar-off": [[1.5, 1.5, 1.5], [1.5, 1.5, 1.5]], "S-1": [[0.0, 2.0, 1.0], [2.0, 0.0, 1.0]]})
    base, runs, stale = load_records(tmp_path / "results", plan, ASSETS, config=NO_CONFIG)
    assert stale == [] and sorted(runs["default"]) == [0, 1] and runs["tau-0.2"] == {}
    summary = summarise(base, runs, plan)
    claims = {c["claim"].split(" (")[0].split(" beats")[0]: c for c in summary["claims"]}
    assert claims["editing"]["quality_db"] == {"mean": 0.5, "ci95": [0.5, 0.5]}
    assert claims["editing"]["verdict"] == "reproduced"
    assert claims["TAR"]["quality_db"] == {"mean": -0.5, "ci95": [-0.5, -0.5]}
    assert claims["TAR"]["verdict"] == "not reproduced"
    s1 = claims["SegVR"]
    assert s1["quality_db"]["mean"] == 0.0 and s1["quality_db"]["ci95"][0] < 0 < s1["quality_db"]["ci95"][1]
    assert s1["verdict"] == "inconclusive"
    assert len(summary["claims"]) == 3  # the other claims have no records
    # the recipe to use: TAR off has the highest mean (+1.5 dB), +0.5 over the default in every clip: adopted
    assert summary["recommendation"] == {"recipe": "tar-off", "candidates": 4, "adopt": True,
                                         "versus_default": {"mean": 0.5, "ci95": [0.5, 0.5]}}
    default = summary["variants"]["default"]
    assert [p["quality"]["mean"] for p in default["curve"]] == [0.25, 0.5, 0.75, 1.0]
    assert default["edits_at_budget"]["quality"] == {"mean": 1.0, "ci95": [1.0, 1.0]}
    body, questions = render(summary, stale)
    assert ("| editing (tau 0.6) beats fine-tuning the whole chain from noise (tau 1.0, DRaFT) | 2 | "
            "+0.50 [+0.50, +0.50] | reproduced |") in body
    assert "| TAR beats uniform frame weights | 2 | -0.50 [-0.50, -0.50] | not reproduced |" in body
    at_budget = sum(v.budget == 1.0 for v in VARIANTS)  # the study's variants at one budget, 4 of them run here
    assert f"of the 4 variants with every seed at the base recipe's compute, {at_budget - 4} more still to run" in body
    assert "TAR off (uniform weights), +0.50 [+0.50, +0.50] dB over the base recipe (paired): the default job's recipe should become it" in body
    assert questions == {"base recipe": ["default"], "tau": ["default", "tau-1.0"], "S": ["default", "S-1"],
                         "TAR": ["default", "tar-off"]}
    assert "| tau 1.0 (from noise, DRaFT) | 10.00 | 40 | 2/2 | +0.50 [+0.50, +0.50] |" in body


def test_report_says_what_the_motion_reward_adds_to_the_image_reward(tmp_path):
    """The reward variants minus the same recipe with the image reward alone, paired: by hand, the mix 0.5 dB better
    in every clip than tau-1.0-K-1 and the jitter the same (the base recipe, 1 dB below the mix, is not what it is
    compared with); only variants with the motion reward are compared."""
    plan = Plan(seeds=2)
    _write_cache(tmp_path / "results", plan, {"default": [[0.5, 0.5, 0.5]] * 2, "reward-mixed": [[1.5, 1.5, 1.5]] * 2,
                                              "tau-1.0-K-1": [[1.0, 1.0, 1.0]] * 2})
    summary = summarise(*load_records(tmp_path / "results", plan, ASSETS, config=NO_CONFIG)[:2], plan)
    assert summary["motion_reward"] == {"reward-mixed": {"against": "tau-1.0-K-1", "seeds": 2, "scaled": {},
                                                         "quality": {"mean": 0.5, "ci95": [0.5, 0.5]},
                                                         "jitter": {"mean": 0.0, "ci95": [0.0, 0.0]},
                                                         "direction_acc": {"mean": 0.0, "ci95": [0.0, 0.0]}}}
    assert ("| image reward + motion reward at 0.5 (tau 1.0, K 1) | tau 1.0 and K 1 (the two best single changes "
            "together) | 2 | +0.00 [+0.00, +0.00] | +0.000 [+0.000, +0.000] | +0.50 [+0.50, +0.50] |") in render(summary, [])[0]


def test_a_variant_of_the_default_jobs_recipe_is_shown_beside_that_recipe(tmp_path):
    """lr-3e-3 is the default job's recipe (reward-mixed) at twice its learning rate: its question's table and plot
    show reward-mixed after the base recipe. It trains on the motion reward too, but it is no reward variant: the
    motion reward's comparison with the image reward alone leaves it out."""
    plan = Plan(seeds=2)
    _write_cache(tmp_path / "results", plan, {"default": [[0.5] * 3] * 2, "reward-mixed": [[1.5] * 3] * 2,
                                              "tau-1.0-K-1": [[1.0] * 3] * 2, "lr-3e-3": [[1.0] * 3] * 2},
                 scaled={"lr-3e-3": {"0.5": [[1.25] * 3] * 2}})
    summary = summarise(*load_records(tmp_path / "results", plan, ASSETS, config=NO_CONFIG)[:2], plan)
    assert set(summary["motion_reward"]) == {"reward-mixed"}
    assert render(summary, [])[1]["learning rate"] == ["default", "reward-mixed", "lr-3e-3"]


def test_report_shows_the_motion_reward_alone_dialled_down_against_base_and_image_reward(tmp_path):
    """The motion reward alone is also scored with its LoRA at 0.25 and 0.5 (``scales``): by hand, +1.25 and +1.0 dB
    over the base model in every clip, so +0.25 and 0.0 over the image reward alone at full strength (+1.0); at
    full strength it is 0.5 below. The scaled rows have no edits column: the edits were scored at full strength."""
    plan = Plan(seeds=2)
    assert VARIANT["reward-motion"].scales == (0.25, 0.5)
    _write_cache(tmp_path / "results", plan, {"reward-motion": [[0.5] * 3] * 2, "tau-1.0-K-1": [[1.0] * 3] * 2,
                                              "tau-1.0-K-1-long": [[1.0] * 3] * 2},
                 scaled={"reward-motion": {"0.25": [[1.25] * 3] * 2, "0.5": [[1.0] * 3] * 2},
                         "tau-1.0-K-1-long": {"0.25": [[2.0] * 3] * 2}})
    summary = summarise(*load_records(tmp_path / "results", plan, ASSETS, config=NO_CONFIG)[:2], plan)
    scaled = summary["variants"]["reward-motion"]["scaled"]
    assert [scaled[s]["quality"] for s in ("0.25", "0.5")] == [{"mean": 1.25, "ci95": [1.25, 1.25]},
                                                              {"mean": 1.0, "ci95": [1.0, 1.0]}]
    # a longer variant's strengths are scored at the end of its budget, not at the base recipe's: not in its row
    assert "scaled" not in summary["variants"]["tau-1.0-K-1-long"]
    assert summary["overoptimisation"]["tau-1.0-K-1-long"]["guards"]["last weights at strength 0.25"]["quality"]["mean"] == 2.0
    gains = summary["motion_reward"]["reward-motion"]
    assert gains["quality"]["mean"] == -0.5
    assert [gains["scaled"][s]["quality"]["mean"] for s in ("0.25", "0.5")] == [0.25, 0.0]
    body = render(summary, [])[0]
    assert ("| the world motion reward alone (tau 1.0, K 1), LoRA strength 0.25 | 10.00 | 40 | 2/2 | "
            "+1.25 [+1.25, +1.25] |") in body
    row = next(line for line in body.splitlines() if line.startswith("| the world motion reward alone (tau 1.0, K 1), "
                                                                      "LoRA strength 0.5 | 10"))
    assert row.endswith("| +0.00 [+0.00, +0.00] |  |")  # the jitter, and no edits
    assert ("| the world motion reward alone (tau 1.0, K 1), LoRA strength 0.25 | tau 1.0 and K 1 (the two best single "
            "changes together) | 2 | +0.00 [+0.00, +0.00] | +0.000 [+0.000, +0.000] | +0.25 [+0.25, +0.25] |") in body


def test_report_check_and_stale_records(tmp_path):
    plan = Plan(seeds=1)
    _fixture_code(tmp_path)
    _write_cache(tmp_path / "results", plan, {"default": [[1.0, 1.0, 1.0]], "tau-1.0": [[0.5, 0.5, 0.5]]},
                 _traced_fixture(tmp_path))
    paths = dict(plan=plan, folder=tmp_path / "results", results_md=tmp_path / "RESULTS.md", plots=tmp_path / "plots",
                 assets=ASSETS, root=tmp_path, config=NO_CONFIG)
    assert report(check=True, **paths)  # nothing written yet
    report(**paths)
    assert (tmp_path / "plots" / "study_tau.png").exists()
    assert report(check=True, **paths) == []
    summary = tmp_path / "results" / "summary.json"
    summary.write_text(summary.read_text().replace("0.5", "0.6"))
    assert report(check=True, **paths) == [str(summary)]
    # a change to the code the records ran makes every one stale: the report names them and counts none
    _fixture_code(tmp_path, MODULE_V1.replace("SCALE = 2", "SCALE = 4"))
    assert report(check=True, **paths) != []
    base, runs, stale = load_records(tmp_path / "results", plan, ASSETS, tmp_path, NO_CONFIG)
    assert base is None and not any(runs.values())
    why = "(code: engine/fixture.py:<module>)"
    assert sorted(stale) == [f"base.json {why}", f"default-seed0.json {why}", f"tau-1.0-seed0.json {why}"]
    report(**paths)  # the report says which part brings them back: the base record only --part study runs again
    assert ("Stale records (not counted; `--part verify` for those stale by code, `--part study` for the rest)"
            in (tmp_path / "RESULTS.md").read_text())


@pytest.mark.parametrize("bad", ["nonsense", "tau-1.0,nonsense"])
def test_unknown_variant_is_refused(bad):
    from bench.world_study import main

    with pytest.raises(SystemExit, match="unknown variant"):
        main(["--part", "study", "--only", bad, "--seeds", "1"])


@pytest.mark.heavy(1)
@pytest.mark.xdist_group("study_runner")  # one worker: the FLOP count of the base recipe is counted once
def test_runner_writes_a_record_and_reuses_it(tmp_path, capsys):
    """Two evaluation points of a two-step budget on two clips: the record holds the per-step log and paired
    evaluations, and a second run reuses it; a changed plan makes it stale and runs it again."""
    import bench.study as study

    variant = Variant("K-1", "K", "K 1", ("--grad-steps", "1", "--num-held-out", "2"), evaluations=2, scales=(0.0,))
    plan = Plan(seeds=1, default_steps=2, clips=2)
    study.run_study(plan, [variant], tmp_path)
    record = json.loads((tmp_path / "K-1-seed0.json").read_text())
    assert record["identity"]["variant"]["options"] == ["--grad-steps", "1", "--num-held-out", "2"]
    assert [e["step"] for e in record["evals"]] == [0, *study.eval_steps(record["steps"], 2)]
    assert record["evals"][-1]["step"] == record["steps"]
    assert record["steps"] > 2  # K 1 costs less per step than the default's K 6: more steps for the same compute
    assert len(record["evals"][1]["noise"]) == 2 and {"quality", "reward", "jitter"} <= set(record["evals"][1]["noise"][0])
    assert len(record["evals"][0]["edits"]) == len(record["evals"][2]["edits"]) > 0
    # at the end, the LoRA at strength 0 too: the base model's clips
    assert "scaled" not in record["evals"][1] and list(record["evals"][2]["scaled"]) == ["0"]
    assert record["evals"][2]["scaled"]["0"] == json.loads((tmp_path / "base.json").read_text())["noise"]
    assert [r["step"] for r in record["train"]] == list(range(1, record["steps"] + 1))
    assert record["train"][-1]["tflop"] == pytest.approx(record["steps"] * record["tflop_per_step"])
    assert record["identity"]["config"]["grad_steps"] == "1" and record["identity"]["config"]["num_held_out"] == 2
    # the code it ran: the runner, the training step, the FLOP count, the evaluation from noise, the gold metrics
    # (the configuration's module-level code is not among it: the identity holds the values it resolves to)
    assert not any(k.startswith("engine/config.py:<") for k in record["code"])
    assert {"bench/study.py:run_variant", "bench/study.py:step_tflop", "engine/train/recipe.py:Trainer.loss_step",
            "engine/world/figures.py:from_noise", "engine/world/gold.py:<module>"} <= set(record["code"])
    base = json.loads((tmp_path / "base.json").read_text())
    assert len(base["noise"]) == 2 and "engine/world/figures.py:from_noise" in base["code"]
    capsys.readouterr()
    study.run_study(plan, [variant], tmp_path)
    assert "wrote" not in capsys.readouterr().out and json.loads((tmp_path / "K-1-seed0.json").read_text()) == record


@pytest.mark.heavy(2)
@pytest.mark.xdist_group("study_runner")  # one worker: the FLOP count of the base recipe is counted once
def test_verify_stamps_records_whose_code_changed_but_not_their_numbers(tmp_path):
    """Records stale because code they ran changed: one seed run again with the current code; the same numbers
    stamp the variant's other such records with the current code where the changed code they ran is code that seed
    ran (a function since removed included); different numbers leave them stale, named."""
    import bench.study as study

    # a 4-step chain: what is verified is the bookkeeping, and each of the four runs costs a fifth of the sampling
    variant = Variant("K-1", "K", "K 1", ("--grad-steps", "1", "--num-held-out", "2", "--ddim-steps", "4",
                                          "--sample-steps", "4"), evaluations=1)
    plan = Plan(seeds=2, default_steps=1, clips=1)
    study.run_study(plan, [variant], tmp_path)
    paths = [tmp_path / f"K-1-seed{seed}.json" for seed in range(2)]
    made = [json.loads(p.read_text()) for p in paths]
    key = "engine/train/recipe.py:Trainer.loss_step"

    def as_if_edited(path, record, **changes):  # the function's digest as if its code had changed since
        path.write_text(json.dumps({**record, "code": {**record["code"], key: "0" * 16}, **changes}))

    gone = "engine/train/recipe.py:Trainer._since_removed"  # a function both ran that the code no longer has
    for path, record in zip(paths, made):
        as_if_edited(path, record, code={**record["code"], key: "0" * 16, gone: "1" * 16})
    assert study.verify_study(plan, [variant], tmp_path) == [
        "K-1: seed 0 run again gives the same numbers; 1 more record(s) now carry the current code"]
    stamped = [json.loads(p.read_text()) for p in paths]
    assert [r["code"] for r in stamped] == [r["code"] for r in made]
    assert stamped[1]["evals"] == made[1]["evals"] and "verified" in stamped[1] and "verified" not in stamped[0]
    assert stamped[0]["verified_code"][key] == "0" * 16 and gone in stamped[0]["verified_code"]
    # seed 0 verified already: a record stale since is stamped without running anything, unless it ran changed
    # code that seed 0 did not run
    as_if_edited(paths[1], made[1])
    assert study.verify_study(plan, [variant], tmp_path) == [
        "K-1: seed 0 run again gives the same numbers; 1 more record(s) now carry the current code"]
    assert json.loads(paths[0].read_text())["measured"] == stamped[0]["measured"]
    other = "engine/world/gold.py:never_run_by_seed_0"
    paths[1].write_text(json.dumps({**made[1], "code": {**made[1]["code"], other: "2" * 16}}))
    assert study.verify_study(plan, [variant], tmp_path) == [
        "K-1: seed 0 run again gives the same numbers; 0 more record(s) now carry the current code (1 ran changed "
        "code it did not: --part study runs them again)"]
    evals = json.loads(json.dumps(made[0]["evals"]))
    evals[1]["noise"][0]["quality"] += 1.0
    as_if_edited(paths[0], made[0], evals=evals)
    as_if_edited(paths[1], made[1])
    line, = study.verify_study(plan, [variant], tmp_path)
    assert line.startswith("K-1: seed 0 computes something else now (evals[1].noise[0].quality: ")
    assert all(json.loads(p.read_text())["code"][key] == "0" * 16 for p in paths)
    # a second worker leaves a variant whose seed a live process holds to it, running nothing
    assert study.claim(paths[0])
    assert study.verify_study(plan, [variant], tmp_path) == ["K-1: left to the process holding its claim"]
    study.release(paths[0])
    # and one whose seed was run again by another worker between loading the list and claiming it, too
    claim = study.claim

    def finished_meanwhile(path):
        path.write_text(json.dumps(made[0]))
        return claim(path)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(study, "claim", finished_meanwhile)
        assert study.verify_study(plan, [variant], tmp_path) == [
            "K-1: seed 0 was run by another process meanwhile"]
    assert not paths[0].with_suffix(".claim").exists()
    assert study.verify_study(plan, [Variant("S-1", "S", "S 1", ("--segments", "1"))], tmp_path) == [
        "S-1: no record stale by code alone"]


def test_overoptimisation_of_hand_made_long_runs():
    """Two seeds of the long variant, three clips: the gold quality rises to +1 dB at the 5th of 10 evaluations
    and falls back to 0 while the reward climbs. By hand: the peak at step 50, the end minus the peak -1 dB
    (reward +0.05): it turns down. Early stopping (patience 2) keeps seed 0's 5th evaluation (+1 dB) and seed 1's
    8th (+0.4 dB): +0.7 dB, +0.7 over the last weights and +0.3 over the weights at one budget (the 2nd
    evaluation, +0.4 dB); the last weights at strength 0.5 keep +0.5 dB, +0.1 over one budget."""
    quality = [0.2, 0.4, 0.6, 0.8, 1.0, 0.8, 0.6, 0.4, 0.2, 0.0]
    held_out = {0: [1, 2, 3, 4, 5, 4, 4.5, 3, 2, 1], 1: [1, 2, 3, 4, 5, 6, 7, 8, 7, 6]}

    def rows(q, reward):
        return [{"quality": 30.0 + q, "reward": reward, "direction_acc": 0.5, "colour_acc": 1.0, "shape_acc": 1.0,
                 "jitter": 0.5}] * 3

    def record(seed):
        evals = [{"step": 0, "tflop": 0.0, "edits": rows(0.0, 0.0)}]
        evals += [{"step": 10 * k, "tflop": 0.1 * k, "noise": rows(quality[k - 1], 0.2 + 0.01 * k),
                   "edits": rows(0.0, held_out[seed][k - 1])} for k in range(1, 11)]
        evals[-1]["scaled"] = {"0.5": rows(0.5, 0.21)}
        return {"steps": 100, "tflop_per_step": 0.01, "train": [], "evals": evals}

    runs = {0: record(0), 1: record(1)}
    assert early_stop_point(runs[0]) == 5 and early_stop_point(runs[1]) == 8
    over = overoptimisation({"noise": rows(0.0, 0.2)}, runs, one_budget=2)
    assert over["peak"] == {"step": 50, "tflop": 0.5}
    assert over["end_minus_peak"]["quality"] == {"mean": -1.0, "ci95": [-1.0, -1.0]}
    assert over["end_minus_peak"]["reward"]["mean"] == pytest.approx(0.05)
    stopped = over["guards"]["early stopping (patience 2)"]
    assert stopped["steps"] == [50, 80] and stopped["quality"]["mean"] == pytest.approx(0.7)
    assert stopped["quality_vs_last"]["mean"] == pytest.approx(0.7)
    assert stopped["quality_vs_one_budget"]["mean"] == pytest.approx(0.3)
    assert over["guards"]["last weights at strength 0.5"]["quality_vs_one_budget"]["mean"] == pytest.approx(0.1)
    assert stopped["quality"]["ci95"] == pytest.approx([0.4, 1.0])  # two seeds: the bootstrap draws 0.4 or 1.0
    assert over["guards"]["last weights at strength 0.5"]["quality"] == {"mean": 0.5, "ci95": [0.5, 0.5]}
    assert over["guards"]["last weights"]["quality"] == {"mean": 0.0, "ci95": [0.0, 0.0]}
    text = _render_overoptimisation(over, {"label": "base recipe, 10x longer", "seeds": [0, 1]})
    assert "(base recipe, 10x longer, 2 seeds;" in text
    assert "the gold quality turns down while the reward still climbs" in text
    assert "| early stopping (patience 2) | +0.70 [+0.40, +1.00] |" in text
    assert "| +0.70 [+0.40, +1.00] | +0.30 [+0.00, +0.60] | 50, 80 |" in text


def test_workers_share_a_list_through_claims(tmp_path, capsys):
    """A record being run is claimed: another live process on this host leaves it, a claim whose process is gone
    is taken over, and one from another host is respected."""
    import json
    import subprocess
    import sys

    from bench.study import claim, release

    path = tmp_path / "K-1-seed0.json"
    assert claim(path) and not claim(path)  # held by a live process (this one)
    assert "is being run by pid" in capsys.readouterr().out
    release(path)
    assert not path.with_suffix(".claim").exists()
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    path.with_suffix(".claim").write_text(json.dumps({"pid": int(gone.stdout), "start_time": 1,
                                                      "host": socket.gethostname()}))
    assert claim(path)  # its process has ended: taken over
    path.with_suffix(".claim").write_text(json.dumps({"pid": 1, "start_time": 1, "host": "elsewhere"}))
    assert not claim(path)


def test_the_default_job_is_the_recipe_the_study_chose():
    """The study chose tau 1.0 with K 1 and the motion reward mixed in at 0.5, at its base recipe's compute (35
    steps): ``python -m engine.train`` with no options trains exactly that variant, and no other one."""
    from bench.study_report import default_job_runs

    steps = {"reward-mixed": {"steps": 35}, "tau-1.0-K-1": {"steps": 37}, "reward-motion": {"steps": 36},
             "default": {"steps": 40}}
    assert default_job_runs("reward-mixed", steps)
    assert not default_job_runs("reward-mixed", {"reward-mixed": {"steps": 37}})
    assert not any(default_job_runs(name, steps) for name in ("tau-1.0-K-1", "reward-motion", "default"))


def test_table1_sections_are_named_by_their_commands():
    """Each committed Table 1 section's command, parsed again, gives that section's title and its figures' names."""
    from bench.world_study import PLOTS, RESULTS, build_parser, recipe_options

    text = RESULTS.read_text()
    sections = re.findall(r"^## (world: Table 1[^\n]*)\n\n[^\n]*\n\n`python -m bench.world_study ([^`]*)`\n\n"
                          r"(.*?)^<!--", text, re.M | re.S)
    assert len(sections) == len(re.findall(r"^## world: Table 1", text, re.M)) >= 5
    for heading, command, body in sections:
        options = recipe_options(build_parser().parse_args(command.split()))
        titles = ", ".join(option.title for option in options)
        assert heading == "world: Table 1" + (f" ({titles})" if titles else "")
        suffix = "".join(option.suffix for option in options)
        figures = {f"world/table1{suffix}_{group}.png" for group in ("effect", "fresh")}
        assert figures <= set(re.findall(r"\]\((world/[^)]+)\)", body)), heading
        assert all((PLOTS.parent / figure).is_file() for figure in figures)


def test_table1_pairs_every_fine_tune_with_the_base_model_on_both_sets(tmp_path, monkeypatch):
    """Table 1's assembly with the models stubbed: each fine-tune's clips are paired with the base model's of the
    same noise on both sets, and the gain it reports is the one the clips give."""
    import bench.world_study as world_study

    metrics = dict.fromkeys(world_study.METRICS, 0.0)
    sets = {"in_domain": [0, 1, 2], "new_categories": [0, 1, 2], "unrelated": [0, 1, 2]}
    monkeypatch.setattr(world_study, "PLOTS", tmp_path)
    monkeypatch.setattr(world_study, "assets_offset", lambda: 7)
    # the fresh set's clips are other clips (their noise offset): clip i at 30 + i + offset dB by the base model
    monkeypatch.setattr("engine.world.scene.effect_sets", lambda samples, group, offset: {
        name: [offset + i for i in clips] for name, clips in sets.items()})
    monkeypatch.setattr(world_study, "fine_tune", lambda folder, seed, options: seed + 1)  # "LoRA" = seed + 1
    # fine-tune seed s gains (s + 1) dB on the clips of even index and 3 (s + 1) dB on the others
    monkeypatch.setattr(world_study, "score_model", lambda lora, clips, scale=1.0: {
        name: [metrics | {"quality": 30.0 + c + (lora or 0) * (1 + 2 * (c % 2))} for c in clips[name]]
        for name in clips})
    text = world_study.table1(2, 1, tmp_path, ["--steps", "3", "--reward", "hpsv2:world"])
    assert text.startswith("2 fine-tuning seeds (the default job with `--steps 3 --reward hpsv2:world`: tau 1.0, K 1, "
                           "3 steps, reward `hpsv2:world`; `--seed 0..1`)")
    assert "scoring reward" not in text  # the fine-tunes trained on the reward that scores them
    effect, fresh = text.split("**fresh set**")
    # clips 0, 1, 2 gain 1, 3, 1 dB (seed 0) and 2, 6, 2 dB (seed 1): per-seed means 5/3 and 10/3
    assert "| in domain | quality (dB) | 31.00 | 33.50 | +2.50 [" in effect
    # clips 7, 8, 9 gain 3, 1, 3 dB (seed 0) and 6, 2, 6 dB (seed 1), each against the base model's same clip
    assert "noise seeds offset by 7" in fresh and "| unrelated | quality (dB) | 38.00 | 41.50 | +3.50 [" in fresh
    gain = json.loads((tmp_path / "table1.json").read_text())["fresh"]["sets"]["unrelated"]["quality"]["gain"]
    assert gain["mean"] == pytest.approx(3.5) and 1.0 <= gain["ci95"][0] < 3.5 < gain["ci95"][1] <= 6.0
    assert (tmp_path / "table1_effect.png").is_file() and (tmp_path / "table1_fresh.png").is_file()


def test_table1_scores_each_clip_with_the_motion_reward_as_training_does():
    """Table 1's motion reward of a clip generated from noise is what the trainer's reward gives the same
    generation (the motion part of a mix, on the frames it declares)."""
    import torch

    from bench.world_study import MOTION_REWARD, score_model
    from engine.builtin import build_model
    from engine.chain import generate
    from engine.rewards import build_reward
    from engine.video_reward import SegmentalReward
    from engine.world.scene import FRAMES, SIZE, effect_sets

    pairs = effect_sets(1)["in_domain"][:2]
    rows = score_model(None, {"in_domain": pairs})["in_domain"]
    model, captions = build_model("world"), [clip.caption for clip, _ in pairs]
    latents = generate(model, captions, [seed for _, seed in pairs], (FRAMES, SIZE, SIZE), ddim_steps=20, guidance=3.0)
    with torch.no_grad():
        trained = SegmentalReward(build_reward(MOTION_REWARD))(model, latents, captions, train=False)[0]
    assert [row["motion_reward"] for row in rows] == pytest.approx(trained.tolist(), rel=1e-5, abs=1e-6)
    assert len(set(trained.tolist())) == 2  # two clips, two scores
