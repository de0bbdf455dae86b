"""Fused kernels for the engine. Each op: Triton kernel, PyTorch reference, autograd Function, dispatch."""

from kernels.reference import cfg_ddim_step_ref

cfg_ddim_step = cfg_ddim_step_ref

__all__ = ["cfg_ddim_step", "cfg_ddim_step_ref"]
