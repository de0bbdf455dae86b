"""Plain-PyTorch reference implementations: the ground truth for the Triton kernels and the CPU path."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cfg_ddim_step_ref(
    x: torch.Tensor,
    eps_uncond: torch.Tensor,
    eps_cond: torch.Tensor,
    guidance: float,
    alpha_t: float,
    alpha_prev: float,
    eta: float = 0.0,
    noise: torch.Tensor | None = None,
    prediction: str = "epsilon",
) -> torch.Tensor:
    """Classifier-free guidance followed by one DDIM update, in fp32, returned in ``x.dtype``.

    Notation (DDIM paper, eq. 12; diffusers' DDIMScheduler.step), m the model output:
      m       = m_u + w (m_c - m_u)
      epsilon:       x0 = (x_t - sqrt(1 - a_t) m) / sqrt(a_t),  eps = m
      v_prediction:  x0 = sqrt(a_t) x_t - sqrt(1 - a_t) m,  eps = sqrt(a_t) m + sqrt(1 - a_t) x_t
      sigma_t = eta * sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))   (std_dev_t)
      x_prev  = sqrt(a_prev) x0 + sqrt(1 - a_prev - sigma_t^2) eps + sigma_t z
    ``alpha_*`` are cumulative products (alphas_cumprod).
    """
    xf, eu, ec = x.float(), eps_uncond.float(), eps_cond.float()
    m = eu + guidance * (ec - eu)
    a_t = torch.tensor(alpha_t, dtype=torch.float32, device=x.device)
    a_prev = torch.tensor(alpha_prev, dtype=torch.float32, device=x.device)
    beta_t, beta_prev = 1 - a_t, 1 - a_prev
    if prediction == "v_prediction":
        pred_x0 = a_t ** 0.5 * xf - beta_t ** 0.5 * m
        eps = a_t ** 0.5 * m + beta_t ** 0.5 * xf
    else:
        pred_x0 = (xf - beta_t ** 0.5 * m) / a_t ** 0.5
        eps = m
    variance = (beta_prev / beta_t) * (1 - a_t / a_prev)
    std = eta * variance ** 0.5
    x_prev = a_prev ** 0.5 * pred_x0 + (1 - a_prev - std ** 2) ** 0.5 * eps
    if eta > 0:
        if noise is None:
            raise ValueError("eta > 0 needs the noise tensor z; draw it with the chain's generator")
        x_prev = x_prev + std * noise.float()
    return x_prev.to(x.dtype)


def cfg_flow_step_ref(x: torch.Tensor, v_uncond: torch.Tensor, v_cond: torch.Tensor, guidance: float, sigma: float,
                      sigma_next: float) -> torch.Tensor:
    """Classifier-free guidance followed by one flow-matching Euler step (FlowMatchEulerDiscreteScheduler.step):
    x_next = x + (sigma_next - sigma) (v_u + w (v_c - v_u)), in fp32, returned in ``x.dtype``."""
    v = v_uncond.float() + guidance * (v_cond.float() - v_uncond.float())
    dt = torch.tensor(sigma_next, dtype=torch.float32, device=x.device) - torch.tensor(sigma, dtype=torch.float32,
                                                                                       device=x.device)
    return (x.float() + dt * v).to(x.dtype)


def lora_linear_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """``x W^T + b + s (x A^T) B^T`` exactly as peft's ``lora.Linear`` computes it (one adapter, no dropout).

    Shapes: x [..., K], weight [N, K], bias [N] or None, lora_A [r, K], lora_B [N, r]. Like peft, the low-rank
    branch runs in lora_A's dtype and the sum is returned in the base layer's output dtype.
    """
    result = F.linear(x, weight, bias)
    lora = F.linear(F.linear(x.to(lora_A.dtype), lora_A), lora_B) * scale
    return (result + lora).to(result.dtype)


def temporal_attention_ref(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None
) -> torch.Tensor:
    """``softmax(q k^T * scale) v`` over the frame axis: q, k, v [..., L, D] (any strides), scale 1/sqrt(D) by
    default. This is the call diffusers' AttnProcessor2_0 makes for temporal self-attention."""
    return F.scaled_dot_product_attention(q, k, v, scale=scale)
