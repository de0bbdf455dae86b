"""Fused kernels for the engine. Each op: Triton kernel(s), PyTorch reference, autograd Function, dispatch.

    lora_linear(x, weight, bias, lora_A, lora_B, scale)      peft LoRA linear, one pass over x
    temporal_attention(q, k, v, scale=None)                  softmax attention over frames, any batch size
    cfg_ddim_step(x, eps_uncond, eps_cond, guidance, ...)    classifier-free guidance + DDIM update (epsilon or v)
    cfg_flow_step(x, v_uncond, v_cond, guidance, ...)        classifier-free guidance + flow-matching Euler update

Each public function runs its Triton kernel or its ``*_ref`` reference as ``use_backend`` says (see
``kernels.dispatch``). Triton itself is optional; without it every op runs its reference.
"""

from kernels.cfg_ddim import cfg_ddim_step, cfg_flow_step
from kernels.dispatch import Backend, get_backend, set_backend, use_backend
from kernels.lora_linear import lora_linear
from kernels.reference import cfg_ddim_step_ref, cfg_flow_step_ref, lora_linear_ref, temporal_attention_ref
from kernels.temporal_attention import temporal_attention

__all__ = [
    "Backend",
    "cfg_ddim_step",
    "cfg_ddim_step_ref",
    "cfg_flow_step",
    "cfg_flow_step_ref",
    "get_backend",
    "lora_linear",
    "lora_linear_ref",
    "set_backend",
    "temporal_attention",
    "temporal_attention_ref",
    "use_backend",
]
