"""Each fused kernel checks itself once per device and shape class against its reference, and falls back to the
reference, with one log line, on a compile failure or a mismatch (kernels.dispatch). Forced on here
(KERNEL_SELF_CHECK=1) so that the CPU, under Triton's interpreter, runs the same check code CUDA runs."""

import importlib
import logging

import pytest
import torch

import kernels
from kernel_support import DEVICE, KERNEL_TEST
from kernels import _utils, dispatch

lora_module = importlib.import_module("kernels.lora_linear")  # the package's name of the same name is the function

pytestmark = KERNEL_TEST


@pytest.fixture(autouse=True)
def fresh_checks(monkeypatch):
    monkeypatch.setenv("KERNEL_SELF_CHECK", "1")
    monkeypatch.setattr(dispatch, "_verdicts", {})
    monkeypatch.setattr(_utils, "_logged", set())


def inputs(rows=5, k=24, n=16, rank=4):
    g = torch.Generator().manual_seed(0)
    make = lambda *s: torch.randn(s, generator=g).to(DEVICE)  # noqa: E731
    return make(rows, k), make(n, k), make(n), make(rank, k), make(n, rank), 0.5


def test_a_kernel_that_matches_is_used_and_checked_once(monkeypatch):
    calls = []
    fused = lora_module._fused
    monkeypatch.setattr(lora_module, "_fused", lambda *a: calls.append(1) or fused(*a))
    x, w, b, a, bb, scale = inputs()
    out = kernels.lora_linear(x, w, b, a, bb, scale)
    kernels.lora_linear(torch.cat([x, x[:2]]), w, b, a, bb, scale)  # 7 rows: the class of 5 (both round up to 8)
    assert len(calls) == 3  # the check's call, then one per real call
    assert list(dispatch.self_check_results().values()) == [None]
    assert torch.allclose(out, kernels.lora_linear_ref(x, w, b, a, bb, scale), atol=1e-5)


@pytest.mark.parametrize("fault, reason", [
    ("compile", "failed to compile or launch (CompilationError: at 12:4: injected"),
    ("mismatch", "its output differs from the reference by"),
])
def test_a_kernel_that_fails_its_check_falls_back_with_one_line(monkeypatch, caplog, fault, reason):
    class CompilationError(Exception):
        pass

    calls = []

    def broken(*args):
        calls.append(1)
        if fault == "compile":
            raise CompilationError("at 12:4: injected")
        return kernels.lora_linear_ref(*args) + 1.0

    monkeypatch.setattr(lora_module, "_fused", broken)
    x, w, b, a, bb, scale = inputs()
    with caplog.at_level(logging.WARNING, logger="kernels"):
        first = kernels.lora_linear(x, w, b, a, bb, scale)
        second = kernels.lora_linear(x, w, b, a, bb, scale)
    expected = kernels.lora_linear_ref(x, w, b, a, bb, scale)
    assert torch.equal(first, expected) and torch.equal(second, expected)
    assert len(calls) == 1, "a failed check is not repeated"
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and lines[0].startswith(f"lora_linear on {DEVICE}") and reason in lines[0], lines
    assert "for shapes (('float32', (8, 32))" in lines[0]
    other_class = kernels.lora_linear(*inputs(rows=40))  # another shape class is checked on its own
    assert len(calls) == 2 and torch.equal(other_class, kernels.lora_linear_ref(*inputs(rows=40)))
