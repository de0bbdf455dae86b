"""Shared fixtures: the tiny model is built once per session (a few seconds) and copied where mutated."""

import copy
import os

# Triton reads this when first imported (diffusers imports it): set it before anything does, so the kernel
# tests run the Triton interpreter on the CPU whatever order the test files are collected in.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    """Tests marked ``heavy(minutes)`` run first, longest first: with two workers (``-n 2``, .ci/run) the long
    ones then start at once and share the workers, instead of one long test starting last and running alone."""
    def minutes(item):
        marker = item.get_closest_marker("heavy")
        return marker.args[0] if marker else 0

    items.sort(key=minutes, reverse=True)  # stable: otherwise the collection order


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


@pytest.fixture
def poisoned_outputs():
    """Kernel outputs start as NaN (see kernels._utils.poison_outputs); used by kernel_support.KERNEL_TEST."""
    from kernels import _utils

    with _utils.poison_outputs():
        yield


@pytest.fixture(scope="session")
def lora_folder(tmp_path_factory, _tiny_model_session):
    """A saved peft LoRA checkpoint for the tiny UNet whose B matrices are non-zero, i.e. it changes the videos."""
    from engine.lora import add_lora, save_lora

    unet = copy.deepcopy(_tiny_model_session.denoiser)
    add_lora(unet, rank=4)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=generator))
    return save_lora(unet, tmp_path_factory.mktemp("lora") / "lora", rank=4, alpha=None)
