"""Chain memory: activation memory for the gradient steps of the chain.

Two policies:

- ``checkpoint_blocks(unet)``, the original one: ``UNet3DConditionModel.enable_gradient_checkpointing()`` raises
  in diffusers, so the engine wraps the UNet's down, mid and up blocks itself: with gradient enabled each block
  keeps only its inputs and recomputes its activations in backward (non-reentrant ``torch.utils.checkpoint``,
  RNG state preserved). Without gradient (the no-grad steps of the chain) the blocks run unchanged.

- ``ChainMemory(unet, grad_steps, budget)``: a bounded amount of device memory for gradient through K steps,
  whatever K is. Every (gradient step, UNet unit) item gets one of four decisions from the planner in
  ``csrc`` (C++ extension, or its Python twin):

      keep               plain autograd: the unit's saved tensors stay on the device
      offload            its saved tensors go to the host store in forward, come back (prefetched) in backward
      recompute          they are dropped; the unit's inputs stay and its forward reruns in backward
      recompute_offload  dropped, and the inputs go to the host store too: nothing of the unit stays

  The plan minimises the modelled extra time (recompute FLOPs, copies not hidden behind compute) subject to
  ``resident bytes + one unit rematerialised + prefetch in flight <= budget``. The latents x_t between steps are
  never touched (the chain keeps them; they are tiny). Recompute is exact: the CPU and CUDA RNG states and the
  autocast state are captured per unit call and restored for the rerun, so dropout (or any random op inside a
  unit) draws the same numbers and gradients equal plain autograd's bit for bit.

      memory = ChainMemory(model.denoiser, grad_steps=K, budget="8GiB")     # or "auto"
      chain = EditChain(model, ddim_steps=20, tau=0.6, grad_steps=K, memory=memory)
      with memory.region(model.vae, reward):                            # decode + reward: same budget
          rewards = ...
      memory.revert()

  The reward side (decoding the SegVR frames, the reward model) saves activations too, as many as the chain's
  plan at full size. ``region()`` puts them under the same budget: measured on the first call (spilled while
  counted), then kept on the device when they fit beside the plan's device bytes and spilled to the host store
  otherwise; the "auto" budget keeps them, as before. Spilling them adds copies, never FLOPs.

How the per-unit numbers are obtained: they are *measured*, not guessed. The first two gradient steps of the
first iteration (one when K=1) run every unit in the least-memory mode (``recompute_offload``; ``recompute`` when
spilling is off or for the K=1 "auto" budget) while recording, per unit call, the bytes autograd saves (unique
storages, parameters excluded), the bytes of its inputs and its forward FLOPs (``FlopCounterMode``). Two steps,
because the first differs from the rest: its latent does not require grad, so conv_in, for one, saves nothing
there. The plan for all K steps is then solved once and reused for as long as the UNet's input shapes, dtypes and
autocast state stay the same (a change triggers a new measurement); in the measuring iteration the steps after
the measured ones already follow it. The same measurement runs on the meta device (bench/bench_memory.py).

The "auto" budget keeps today's behaviour when K=1: every unit recomputed with its inputs kept, which is what
``checkpoint_blocks`` does (at unit granularity, so the same recompute FLOPs and a smaller transient). For K > 1,
"auto" is that same K=1 footprint (or the least feasible one if larger), so memory does not grow with K.

The files, bottom to top (each imports only those above it):

- ``units.py``: the units planned for (``denoiser_blocks``, ``denoiser_units``), storage identity and size,
  ``SavedTensorMeter``, the measured costs (``UnitCost``, ``ChainProfile``);
- ``budget.py``: ``parse_budget``, ``DEFAULT_RATES`` and the plan of a profile under a budget;
- ``recompute.py``: ``checkpoint_blocks`` and the exact recompute of one unit call (held inputs, RNG and autocast
  state), the handle of a spilled tensor;
- ``manager.py``: ``ChainMemory``, the hooks that measure, plan and run every unit call.
"""

from engine.memory.budget import DEFAULT_RATES, parse_budget
from engine.memory.manager import ChainMemory
from engine.memory.recompute import checkpoint_blocks
from engine.memory.units import ChainProfile, SavedTensorMeter, UnitCost, denoiser_blocks, denoiser_units

__all__ = ["ChainMemory", "ChainProfile", "DEFAULT_RATES", "SavedTensorMeter", "UnitCost", "checkpoint_blocks",
           "denoiser_blocks", "denoiser_units", "parse_budget"]
