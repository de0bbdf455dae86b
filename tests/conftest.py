"""Shared fixtures: the tiny model is built once per session (a few seconds) and copied where mutated."""

import copy

import pytest
import torch


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
