"""The method study's cache and report (bench.study, bench.study_report): a record's key follows every setting,
the code and the assets; the report of a small hand-made cache gives the table worked out by hand."""

import json

import pytest

from bench.study import _syntax, code_version, record_identity, record_key, record_path, staleness
from bench.study_plan import VARIANTS, Plan, Variant
from bench.study_report import load_records, render, report, summarise

VARIANT = {v.name: v for v in VARIANTS}
ASSETS, CODE = "assets-digest", "code-version"


def test_record_key_follows_every_setting_the_assets_and_the_code():
    plan = Plan(seeds=2)
    identity = record_identity(VARIANT["tau-1.0"], 0, plan, ASSETS, CODE)
    record = {"key": record_key(identity), "identity": identity}
    assert staleness(record, identity) is None
    changed = {"variant": record_identity(VARIANT["tau-0.8"], 0, plan, ASSETS, CODE),
               "seed": record_identity(VARIANT["tau-1.0"], 1, plan, ASSETS, CODE),
               "plan": record_identity(VARIANT["tau-1.0"], 0, Plan(seeds=2, samples_per_caption=3), ASSETS, CODE),
               "assets": record_identity(VARIANT["tau-1.0"], 0, plan, "other assets", CODE),
               "code": record_identity(VARIANT["tau-1.0"], 0, plan, ASSETS, "other code")}
    for what, other in changed.items():
        assert record_key(other) != record["key"]
        assert staleness(record, other) == what
    # neither the number of seeds in the study nor a variant's wording changes a run
    assert record_identity(VARIANT["tau-1.0"], 0, Plan(seeds=5), ASSETS, CODE) == identity
    reworded = Variant("tau-1.0", "tau", "another label", VARIANT["tau-1.0"].options)
    assert record_identity(reworded, 0, plan, ASSETS, CODE) == identity


def test_code_version_reads_code_not_its_explanation():
    source = 'def f(x):\n    """Doubles."""\n    return 2 * x  # twice\n'
    assert _syntax(source) == _syntax('def f(x):\n    """Twice x, explained otherwise."""\n    return 2 * x\n')
    assert _syntax(source) != _syntax('def f(x):\n    """Doubles."""\n    return 3 * x\n')
    assert len(code_version()) == 16 and code_version() == code_version()


def _rows(values, metric_values=None):
    return [{"quality": q, "reward": 0.2, "colour_acc": 1.0, "shape_acc": 1.0, "direction_acc": 1.0, "jitter": 0.5}
            for q in values]


def _write_cache(folder, plan, gains):
    """Base clips at 30 dB; each variant's clips at 30 + its gain per seed and clip, at the end of its budget."""
    def write(variant, seed, measured):
        identity = record_identity(variant, seed, plan, ASSETS, CODE)
        record_path(folder, variant, seed).write_text(json.dumps({"key": record_key(identity), "identity": identity,
                                                                   **measured}))

    folder.mkdir()
    write(None, None, {"noise": _rows([30.0, 30.0, 30.0])})
    for name, per_seed in gains.items():
        for seed, clip_gains in enumerate(per_seed):
            evals = [{"step": 0, "tflop": 0.0, "edits": _rows([25.0, 25.0])}]
            evals += [{"step": 10 * k, "tflop": 0.1 * k, "noise": _rows([30.0 + g * k / 4 for g in clip_gains]),
                       "edits": _rows([25.0 + k / 4, 25.0 + k / 4])} for k in range(1, 5)]
            write(VARIANT[name], seed, {"steps": 40, "tflop_per_step": 0.01, "train": [], "evals": evals})


def test_report_of_a_hand_made_cache(tmp_path):
    plan = Plan(seeds=2)
    # quality gains at the budget, per seed and clip. By hand: default +1 everywhere; tau 1.0 +0.5 (editing
    # better by 0.5 in every clip: reproduced); TAR off +1.5 (worse by 0.5: not reproduced); S 1 differs from
    # the default by +1, -1, 0 in one seed and -1, +1, 0 in the other (mean 0: inconclusive).
    _write_cache(tmp_path / "results", plan, {
        "default": [[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]], "tau-1.0": [[0.5, 0.5, 0.5], [0.5, 0.5, 0.5]],
        "tar-off": [[1.5, 1.5, 1.5], [1.5, 1.5, 1.5]], "S-1": [[0.0, 2.0, 1.0], [2.0, 0.0, 1.0]]})
    base, runs, stale = load_records(tmp_path / "results", plan, ASSETS, CODE)
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
    default = summary["variants"]["default"]
    assert [p["quality"]["mean"] for p in default["curve"]] == [0.25, 0.5, 0.75, 1.0]
    assert default["edits_at_budget"]["quality"] == {"mean": 1.0, "ci95": [1.0, 1.0]}
    body, questions = render(summary, stale)
    assert ("| editing (tau 0.6) beats fine-tuning the whole chain from noise (tau 1.0, DRaFT) | 2 | "
            "+0.50 [+0.50, +0.50] | reproduced |") in body
    assert "| TAR beats uniform frame weights | 2 | -0.50 [-0.50, -0.50] | not reproduced |" in body
    assert questions == {"default job": ["default"], "tau": ["default", "tau-1.0"], "S": ["default", "S-1"],
                         "TAR": ["default", "tar-off"]}
    assert "| tau 1.0 (from noise, DRaFT) | 10.00 | 40 | 2/2 | +0.50 [+0.50, +0.50] |" in body


def test_report_check_and_stale_records(tmp_path):
    plan = Plan(seeds=1)
    _write_cache(tmp_path / "results", plan, {"default": [[1.0, 1.0, 1.0]], "tau-1.0": [[0.5, 0.5, 0.5]]})
    paths = dict(plan=plan, folder=tmp_path / "results", results_md=tmp_path / "RESULTS.md", plots=tmp_path / "plots",
                 assets=ASSETS, code=CODE)
    assert report(check=True, **paths)  # nothing written yet
    report(**paths)
    assert (tmp_path / "plots" / "study_tau.png").exists()
    assert report(check=True, **paths) == []
    summary = tmp_path / "results" / "summary.json"
    summary.write_text(summary.read_text().replace("0.5", "0.6"))
    assert report(check=True, **paths) == [str(summary)]
    # new code makes every record stale: the report names them and counts none
    assert report(check=True, **{**paths, "code": "new code"}) != []
    base, runs, stale = load_records(tmp_path / "results", plan, ASSETS, "new code")
    assert base is None and not any(runs.values())
    assert sorted(stale) == ["base.json (code)", "default-seed0.json (code)", "tau-1.0-seed0.json (code)"]


@pytest.mark.parametrize("bad", ["nonsense", "tau-1.0,nonsense"])
def test_unknown_variant_is_refused(bad):
    from bench.world_study import main

    with pytest.raises(SystemExit, match="unknown variant"):
        main(["--part", "study", "--only", bad, "--seeds", "1"])


def test_runner_writes_a_record_and_reuses_it(tmp_path, capsys):
    """Two evaluation points of a two-step budget on two clips: the record holds the per-step log and paired
    evaluations, and a second run reuses it; a changed plan makes it stale and runs it again."""
    import bench.study as study

    variant = Variant("K-1", "K", "K 1", ("--grad-steps", "1", "--num-held-out", "2"), evaluations=2)
    plan = Plan(seeds=1, default_steps=2, clips=2)
    study.run_study(plan, [variant], tmp_path)
    record = json.loads((tmp_path / "K-1-seed0.json").read_text())
    assert record["identity"]["variant"]["options"] == ["--grad-steps", "1", "--num-held-out", "2"]
    assert [e["step"] for e in record["evals"]] == [0, *study.eval_steps(record["steps"], 2)]
    assert record["evals"][-1]["step"] == record["steps"]
    assert record["steps"] > 2  # K 1 costs less per step than the default's K 6: more steps for the same compute
    assert len(record["evals"][1]["noise"]) == 2 and {"quality", "reward", "jitter"} <= set(record["evals"][1]["noise"][0])
    assert len(record["evals"][0]["edits"]) == len(record["evals"][2]["edits"]) > 0
    assert [r["step"] for r in record["train"]] == list(range(1, record["steps"] + 1))
    assert record["train"][-1]["tflop"] == pytest.approx(record["steps"] * record["tflop_per_step"])
    base = json.loads((tmp_path / "base.json").read_text())
    assert len(base["noise"]) == 2
    capsys.readouterr()
    study.run_study(plan, [variant], tmp_path)
    assert "wrote" not in capsys.readouterr().out and json.loads((tmp_path / "K-1-seed0.json").read_text()) == record
