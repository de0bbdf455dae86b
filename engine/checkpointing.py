"""Activation checkpointing for the gradient steps of the chain.

``UNet3DConditionModel.enable_gradient_checkpointing()`` raises in diffusers, so the engine wraps the UNet's
down, mid and up blocks itself: with gradient enabled each block keeps only its inputs and recomputes its
activations in backward (non-reentrant ``torch.utils.checkpoint``, RNG state preserved). Without gradient
(the no-grad steps of the chain) the blocks run unchanged.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def unet_blocks(unet: nn.Module) -> list[nn.Module]:
    """The UNet's top-level blocks in call order."""
    return [*unet.down_blocks, unet.mid_block, *unet.up_blocks]


def checkpoint_blocks(unet: nn.Module) -> Callable[[], None]:
    """Recompute every top-level UNet block in backward; returns a function that reverts the change."""
    blocks = unet_blocks(unet)
    for block in blocks:
        original = block.forward

        def forward(*args, _original=original, **kwargs):
            if torch.is_grad_enabled():
                return checkpoint(_original, *args, use_reentrant=False, **kwargs)
            return _original(*args, **kwargs)

        block.forward = forward  # an instance attribute: the state dict and the class are untouched

    def revert():
        for block in blocks:
            del block.forward

    return revert
