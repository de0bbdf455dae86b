"""Swap the fused kernels into a diffusers UNet3DConditionModel that carries peft LoRA (``engine.lora.add_lora``).

    handle = accelerate(unet, backend="auto")   # LoRA projections + temporal attention through kernels/
    ...
    handle.revert()                             # or revert(unet): the original forwards and processors

Liger-style patching, per module and reversible:
- each peft ``lora.Linear`` gets an instance ``forward`` (method rebinding) that calls ``kernels.lora_linear`` with
  the layer's own parameters, so parameter names and the state dict are untouched and peft's save/load work
  unchanged. Whenever the fused path does not apply (adapters disabled or merged, several active adapters,
  dropout in training, DoRA, a LoRA bias, ``adapter_names`` batches) peft's own forward runs.
- each temporal attention (``temp_attentions`` and ``transformer_in``: attn1 and attn2 there both attend over
  frames) gets a processor that computes what diffusers' AttnProcessor2_0 computes, with the attention itself
  through ``kernels.temporal_attention`` reading q, k, v through strides instead of permute copies.
- the CFG + DDIM step already goes through ``kernels.cfg_ddim_step``; ``backend`` sets what all three ops run.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from types import MethodType

import torch
from torch import nn

import kernels

logger = logging.getLogger(__name__)

TEMPORAL_ATTENTIONS = ("temp_attentions", "transformer_in")


# -- LoRA projections ---------------------------------------------------------------------------------------------
def _fusable_adapter(layer) -> str | None:
    """The one adapter the fused kernel computes exactly like peft for this call, or None."""
    if layer.disable_adapters or layer.merged or getattr(layer, "fan_in_fan_out", False):
        return None
    if not isinstance(layer.base_layer, nn.Linear):
        return None
    active = [name for name in layer.active_adapters if name in layer.lora_A]
    if len(active) != 1:
        return None
    name = active[0]
    if name in getattr(layer, "lora_variant", {}) or getattr(layer, "use_dora", {}).get(name, False):
        return None
    if layer.lora_B[name].bias is not None:
        return None
    dropout = layer.lora_dropout[name]
    if isinstance(dropout, nn.Identity) or (isinstance(dropout, nn.Dropout) and (dropout.p == 0 or not dropout.training)):
        return name
    return None


def _fused_lora_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """peft's ``lora.Linear.forward`` with the single-adapter case through ``kernels.lora_linear``.

    A module-level function bound with MethodType (not a closure), so ``copy.deepcopy`` of a patched UNet
    rebinds it to the copy."""
    name = None if (args or kwargs) else _fusable_adapter(self)
    if name is None:
        return type(self).forward(self, x, *args, **kwargs)
    base = self.base_layer
    return kernels.lora_linear(x, base.weight, base.bias, self.lora_A[name].weight, self.lora_B[name].weight,
                               self.scaling[name])


def _is_patched_lora(module: nn.Module) -> bool:
    forward = module.__dict__.get("forward")
    return isinstance(forward, MethodType) and forward.__func__ is _fused_lora_forward


def _lora_linears(unet: nn.Module) -> list[nn.Module]:
    try:
        from peft.tuners.lora.layer import Linear as LoraLinear
    except ImportError:
        return []
    return [m for m in unet.modules() if isinstance(m, LoraLinear)]


# -- temporal attention -------------------------------------------------------------------------------------------
class FusedTemporalAttnProcessor:
    """AttnProcessor2_0 for self-attention over frames, the attention through ``kernels.temporal_attention``.

    diffusers' TransformerTemporalModel hands its blocks hidden states [batch * h * w, frames, channels]. The
    projections stay [B, F, heads * D]; the kernel reads them as [B, heads, F, D] views and writes its output in
    [B, F, heads, D] memory order, so neither side pays a permute copy. Calls this processor does not cover
    (an encoder state, a mask, 4-D input, extra arguments) run the original processor.
    """

    def __init__(self, original):
        self.original = original

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args, **kwargs):
        if encoder_hidden_states is not None or attention_mask is not None or hidden_states.ndim != 3 or args or kwargs:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        residual = hidden_states
        batch, frames, _ = hidden_states.shape
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        head_dim = key.shape[-1] // attn.heads
        q, k, v = (t.unflatten(-1, (attn.heads, head_dim)).transpose(1, 2) for t in (query, key, value))
        # SDPA's default scale 1/sqrt(head_dim): AttnProcessor2_0 does not pass attn.scale either.
        out = kernels.temporal_attention(q, k, v)
        out = out.transpose(1, 2).reshape(batch, frames, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))  # linear, then dropout
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def _unsupported_attention(attn) -> str | None:
    """Why the fused processor would not compute what this attention's processor computes, or None."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    if type(attn.processor) is not AttnProcessor2_0:
        return f"processor {type(attn.processor).__name__} (only AttnProcessor2_0 is replaced)"
    for part in ("spatial_norm", "group_norm", "norm_q", "norm_k"):
        if getattr(attn, part, None) is not None:
            return f"attention with {part}"
    if attn.is_cross_attention:
        return "cross-attention"
    return None


def _temporal_attentions(unet: nn.Module) -> list[nn.Module]:
    from diffusers.models.attention_processor import Attention

    return [m for name, m in unet.named_modules()
            if isinstance(m, Attention) and any(part in name for part in TEMPORAL_ATTENTIONS)]


# -- public API ---------------------------------------------------------------------------------------------------
@dataclass
class AccelerateHandle:
    """What ``accelerate`` changed: ``revert()`` undoes it, the backend included."""

    unet: nn.Module = field(repr=False)
    lora_layers: int
    attention_processors: int
    previous_backend: kernels.Backend | None

    def revert(self) -> None:
        revert(self.unet)
        if self.previous_backend is not None:
            kernels.set_backend(self.previous_backend)


def accelerate(unet: nn.Module, lora: bool = True, temporal_attention: bool = True,
               backend: str | None = None) -> AccelerateHandle:
    """Route ``unet``'s LoRA projections (``lora``) and temporal attentions (``temporal_attention``) through the
    fused kernels; ``backend`` ("auto", "fused", "reference"), when given, is set process-wide for every op
    (CFG + DDIM included). Raises ValueError on a UNet that is already accelerated."""
    if any(_is_patched_lora(m) or isinstance(getattr(m, "processor", None), FusedTemporalAttnProcessor)
           for m in unet.modules()):
        raise ValueError("this UNet is already accelerated; call revert(unet) first")
    previous = kernels.set_backend(backend) if backend is not None else None
    skipped: Counter[str] = Counter()
    lora_layers = 0
    if lora:
        for layer in _lora_linears(unet):
            if "forward" in layer.__dict__:  # someone else's instance forward: do not stack on it
                skipped["LoRA linear that already has an instance forward"] += 1
                continue
            layer.forward = MethodType(_fused_lora_forward, layer)
            lora_layers += 1
    processors = 0
    if temporal_attention:
        for attn in _temporal_attentions(unet):
            reason = _unsupported_attention(attn)
            if reason is not None:
                skipped[f"temporal {reason}"] += 1
                continue
            attn.set_processor(FusedTemporalAttnProcessor(attn.processor))
            processors += 1
    if processors and hasattr(type(unet), "set_default_attn_processor"):
        unet.set_default_attn_processor = MethodType(_set_default_attn_processor, unet)
    for reason, count in skipped.items():
        logger.warning("accelerate: left %d x %s unchanged", count, reason)
    if temporal_attention and not _temporal_attentions(unet):
        logger.info("accelerate: %s has no separate temporal attention (its attention is over all frames at once): "
                    "the temporal-attention kernel does not apply", type(unet).__name__)
    logger.info("accelerate: %d LoRA linears, %d temporal attention processors; backend %s",
                lora_layers, processors, kernels.get_backend().value)
    return AccelerateHandle(unet, lora_layers, processors, previous)


def _set_default_attn_processor(unet: nn.Module) -> None:
    """diffusers' ``set_default_attn_processor`` on an accelerated UNet: it accepts only processor classes it
    knows, so the fused temporal processors give back the originals first (as diffusers asks, every attention
    then runs its default processor; the fused LoRA linears stay)."""
    _restore_processors(unet)
    type(unet).set_default_attn_processor(unet)


def _restore_processors(unet: nn.Module) -> None:
    for module in unet.modules():
        processor = getattr(module, "processor", None)
        if isinstance(processor, FusedTemporalAttnProcessor):
            module.set_processor(processor.original)


def revert(unet: nn.Module) -> None:
    """Restore every forward and processor ``accelerate`` replaced (the backend is restored by the handle)."""
    unet.__dict__.pop("set_default_attn_processor", None)
    _restore_processors(unet)
    for module in unet.modules():
        if _is_patched_lora(module):
            del module.forward


# -- attention backend --------------------------------------------------------------------------------------------
def use_attention(model, backend: str) -> str:
    """Make ``model``'s denoiser attend with ``backend`` and return the one it runs: "sdpa" (as built) or
    "xformers" (its memory-efficient attention, through diffusers: the attention dispatcher of the video
    transformers, the xformers processors of the UNet3D) where xformers imports and its ops run here. Otherwise one
    line says why, and SDPA runs. The fused temporal-attention kernel then leaves xformers' processors in place."""
    if backend == "sdpa":
        return "sdpa"
    from engine.models import CausalVideoDiffusion

    try:
        import xformers.ops  # noqa: F401
    except Exception as err:
        return _sdpa(f"xformers does not import ({type(err).__name__}: {err}); its wheels pin their own torch, so "
                     f"install one built for torch {torch.__version__.split('+')[0]} with pip install --no-deps")
    try:
        if isinstance(model, CausalVideoDiffusion):
            model.denoiser.set_attention_backend("xformers")
        else:
            model.denoiser.enable_xformers_memory_efficient_attention()
    except Exception as err:  # its ops not loading beside this torch, or no GPU
        return _sdpa((str(err).strip().splitlines() or [type(err).__name__])[0])
    return "xformers"


def _sdpa(reason: str) -> str:
    print(f"--attention xformers: not used: {reason}; attention runs on SDPA")
    return "sdpa"

