"""Shared fixtures: the tiny model is built once per session (a few seconds) and copied where mutated."""

import copy
import os

# Triton reads this when first imported (diffusers imports it): set it before anything does, so the kernel
# tests run the Triton interpreter on the CPU whatever order the test files are collected in.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="session")
def _tiny_model_session():
    from engine.models import tiny_model

    return tiny_model(seed=0)


@pytest.fixture
def tiny(_tiny_model_session):
    """A fresh deep copy of the tiny model, safe to modify (LoRA, checkpointing, ...)."""
    return copy.deepcopy(_tiny_model_session)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _default_kernel_backend():
    """The trainer sets the kernels' backend process-wide; every test starts from and returns to "auto"."""
    import kernels

    kernels.set_backend("auto")
    yield
    kernels.set_backend("auto")
