"""diffusers' own tests of ``UNet3DConditionModel`` and ``TextToVideoSDPipeline``, run stock and with
``engine.accelerate`` applied to every UNet3D they build: each test that passes stock must pass accelerated.

    python tests/diffusers_suite.py --diffusers-repo /path/to/diffusers      # a clone (or bare git directory)

The tests come from the repository's history, not the network: ``tests/`` at ``--tests-rev`` (the UNet3D tests
and the mixins and helpers they import) and the text-to-video pipeline tests at ``--pipeline-rev``, the last
commit before upstream removed them with the deprecated pipelines. Their tokenizer (the hub's
``hf-internal-testing/tiny-random-clip``) is replaced by a local byte-level CLIP tokenizer of the same vocabulary
size, so tests that compare against values recorded with the hub's tokenizer may fail stock; only a test that
passes stock and fails accelerated fails the suite. Exit 0 when none does, 1 otherwise. diffusers' test helpers
need ``pip install parameterized requests-mock``.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import os
import subprocess
import sys
import tarfile
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS_REV = "v0.40.0"
PIPELINE_REV = "62cce3045d"  # bc55b631fd "[tests] remove tests for deprecated pipelines" is the next to touch it
UNET_TESTS = "tests/models/unets/test_models_unet_3d_condition.py"
PIPELINE_TESTS = "tests/pipelines/text_to_video_synthesis/test_text_to_video.py"
HUB_TOKENIZER = "hf-internal-testing/tiny-random-clip"

# Loaded into both pytest runs with -p: stands in for the hub tokenizer, lifts the skip that tests of today's
# common mixins apply to deprecated pipelines (these tests ran on TextToVideoSDPipeline before its deprecation),
# and with ENGINE_ACCELERATE=1 accelerates every UNet3DConditionModel right after its constructor (from_pretrained
# constructs through it too).
PLUGIN = '''
import functools
import os

import transformers
from diffusers import TextToVideoSDPipeline, UNet3DConditionModel
from diffusers.pipelines.pipeline_utils import DeprecatedPipelineMixin

TextToVideoSDPipeline.__bases__ = tuple(b for b in TextToVideoSDPipeline.__bases__ if b is not DeprecatedPipelineMixin)

_tokenizer_from_pretrained = transformers.CLIPTokenizer.from_pretrained.__func__


def _local_tokenizer(cls, name, *args, **kwargs):
    if name == {hub!r}:
        name = {local!r}
    return _tokenizer_from_pretrained(cls, name, *args, **kwargs)


transformers.CLIPTokenizer.from_pretrained = classmethod(_local_tokenizer)

if os.environ.get("ENGINE_ACCELERATE") == "1":
    import engine

    _init = UNet3DConditionModel.__init__

    @functools.wraps(_init)  # diffusers reads the config's names from the constructor's signature
    def _accelerated_init(self, *args, **kwargs):
        _init(self, *args, **kwargs)
        engine.accelerate(self)

    UNet3DConditionModel.__init__ = _accelerated_init
'''


def _git(repo: Path, *args: str, binary: bool = False):
    git_dir = repo / ".git" if (repo / ".git").exists() else repo
    return subprocess.run(["git", "--git-dir", str(git_dir), *args], check=True, capture_output=True,
                          text=not binary).stdout


def extract(repo: Path, work: Path, tests_rev: str, pipeline_rev: str) -> None:
    """``tests/`` at ``tests_rev`` into ``work``, with the pipeline tests of ``pipeline_rev`` added."""
    archive = _git(repo, "archive", "--format=tar", tests_rev, "tests", binary=True)
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(work, filter="data")
    pipeline = work / PIPELINE_TESTS
    pipeline.parent.mkdir(parents=True, exist_ok=True)
    (pipeline.parent / "__init__.py").touch()
    pipeline.write_text(_git(repo, "show", f"{pipeline_rev}:{PIPELINE_TESTS}"))


def local_tokenizer(folder: Path, vocab_size: int = 1000) -> Path:
    """A byte-level CLIP tokenizer with ids below ``vocab_size`` (the tests' text encoders have 1000 embeddings):
    the 256 byte symbols with and without the end-of-word mark, no merges, and the two special tokens."""
    from open_clip.tokenizer import bytes_to_unicode

    symbols = list(bytes_to_unicode().values())
    vocab = {s: i for i, s in enumerate(symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"])}
    assert len(vocab) <= vocab_size
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    from transformers import CLIPTokenizer

    CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77).save_pretrained(str(folder))
    return folder


def run(work: Path, accelerated: bool, keyword: str | None) -> dict[str, str]:
    """Outcome of each test (passed, failed, skipped) in one pytest run."""
    report = work / ("accelerated.xml" if accelerated else "stock.xml")
    env = {**os.environ, "ENGINE_ACCELERATE": "1" if accelerated else "0",
           "PYTHONPATH": os.pathsep.join([str(work), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "engine_suite_plugin", "-p", "no:cacheprovider",
               f"--junitxml={report}", "--rootdir", str(work), UNET_TESTS, PIPELINE_TESTS]
    if keyword:
        command += ["-k", keyword]
    print(f"{'accelerated' if accelerated else 'stock'}: {' '.join(command[1:])}", flush=True)
    subprocess.run(command, cwd=work, env=env)
    outcomes = {}
    for case in ET.parse(report).iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        outcomes[name] = ("failed" if case.find("failure") is not None or case.find("error") is not None
                          else "skipped" if case.find("skipped") is not None else "passed")
    return outcomes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--diffusers-repo", required=True, type=Path, help="a diffusers clone or bare git directory")
    parser.add_argument("--tests-rev", default=TESTS_REV)
    parser.add_argument("--pipeline-rev", default=PIPELINE_REV)
    parser.add_argument("--work", type=Path, default=ROOT / "build" / "diffusers-suite")
    parser.add_argument("-k", dest="keyword", help="pytest -k expression, to run a part")
    args = parser.parse_args(argv)
    if not args.diffusers_repo.exists():
        parser.error(f"{args.diffusers_repo} does not exist; pass --diffusers-repo a diffusers clone")
    missing = [m for m in ("parameterized", "requests_mock") if importlib.util.find_spec(m) is None]
    if missing:
        parser.error(f"diffusers' test helpers import {', '.join(missing)}; pip install parameterized requests-mock")
    extract(args.diffusers_repo, args.work, args.tests_rev, args.pipeline_rev)
    tokenizer = local_tokenizer(args.work / "tiny-clip-tokenizer")
    (args.work / "engine_suite_plugin.py").write_text(PLUGIN.format(hub=HUB_TOKENIZER, local=str(tokenizer)))
    stock, accelerated = run(args.work, False, args.keyword), run(args.work, True, args.keyword)
    broken = sorted(t for t, outcome in stock.items() if outcome == "passed" and accelerated.get(t) != "passed")
    counts = {name: {o: list(r.values()).count(o) for o in ("passed", "failed", "skipped")}
              for name, r in (("stock", stock), ("accelerated", accelerated))}
    print(f"stock: {counts['stock']}; accelerated: {counts['accelerated']}")
    for test in sorted(t for t, o in stock.items() if o == "failed"):
        print(f"fails stock too (not counted): {test}")
    for test in broken:
        print(f"passes stock, not accelerated: {test}")
    print("every test that passes stock passes accelerated" if not broken else f"{len(broken)} tests broken by engine.accelerate")
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
