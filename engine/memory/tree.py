"""Arguments with their tensors taken out, to be put back later: what a recompute holds instead of the call's
arguments, so that it keeps no reference to the activations it lets autograd save its own way."""

from __future__ import annotations

from typing import Callable

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten


class TensorSlots:
    """A structure with some of its tensors taken out (``split``), rebuilt around tensors put in their places."""

    def __init__(self, spec, slots: list[int], others: list):
        self.spec, self.slots, self.others = spec, slots, others

    @classmethod
    def split(cls, tree, taken: Callable[[torch.Tensor], bool] = lambda t: True
              ) -> tuple["TensorSlots", list[torch.Tensor]]:
        """The structure without the tensors ``taken`` picks (all by default), and those tensors in order."""
        leaves, spec = tree_flatten(tree)
        slots = [i for i, t in enumerate(leaves) if isinstance(t, torch.Tensor) and taken(t)]
        others = list(leaves)
        for i in slots:
            others[i] = None
        return cls(spec, slots, others), [leaves[i] for i in slots]

    def rebuilt(self, tensors):
        filled = list(self.others)
        for i, t in zip(self.slots, tensors):
            filled[i] = t
        return tree_unflatten(filled, self.spec)
