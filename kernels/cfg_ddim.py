"""Fused classifier-free guidance + sampler update: one elementwise kernel, fp32 arithmetic, closed-form backward.

Unfused, a step is about ten PyTorch launches (CFG combine, pred_x0, direction, noise, dtype casts), each a full
pass over the latent and each with a low-precision intermediate when the denoiser runs in bf16. Fused, it reads x,
the two guidance halves (and z) once, writes x_prev once, and is one node in a captured CUDA graph.

Three updates, each in its diffusers scheduler's order of operations (``kernels.reference``), with m the guided
model output m = (1 - w) m_u + w m_c:
    DDIM, epsilon prediction (ModelScope)   x0 = (x - sqrt(1 - a_t) m) / sqrt(a_t),  x_prev = sqrt(a_prev) x0 + c_dir m
    DDIM, v-prediction (CogVideoX)          x0 = sqrt(a_t) x - sqrt(1 - a_t) m,  eps = sqrt(a_t) m + sqrt(1 - a_t) x,
                                            x_prev = sqrt(a_prev) x0 + c_dir eps
    flow-matching Euler (Wan)               x_prev = x + (sigma_next - sigma) m
(plus sigma_t z for DDIM with eta > 0; c_dir = sqrt(1 - a_prev - sigma_t^2)). Every update is affine in each tensor
input, x_prev = c_x x + c_m m + sigma_t z, so the backward is one more elementwise pass:
dx = c_x g, dm_u = (1 - w) c_m g, dm_c = w c_m g, dz = sigma_t g, with
    epsilon: c_x = sqrt(a_prev) / sqrt(a_t),                          c_m = c_dir - sqrt(a_prev) sqrt(1 - a_t) / sqrt(a_t)
    v:       c_x = sqrt(a_prev) sqrt(a_t) + c_dir sqrt(1 - a_t),      c_m = c_dir sqrt(a_t) - sqrt(a_prev) sqrt(1 - a_t)
    flow:    c_x = 1,                                                  c_m = sigma_next - sigma
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch

from kernels import _utils, dispatch
from kernels._utils import jit, tl, triton
from kernels.reference import cfg_ddim_step_ref, cfg_flow_step_ref

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
EPSILON, V_PREDICTION, FLOW = 0, 1, 2  # the kernel's PREDICTION
_DDIM_PREDICTIONS = {"epsilon": EPSILON, "v_prediction": V_PREDICTION}


# %% Compute kernels ------------------------------------------------------------------------------------------------
@jit
def _cfg_ddim_fwd_kernel(
    # pointers
    X, EPS_U, EPS_C, Z, OUT,
    # sizes
    n,
    # scalars (fp32); dt = sigma_next - sigma for FLOW, the alphas for the DDIM updates
    guidance, sqrt_beta_t, sqrt_alpha_t, sqrt_alpha_prev, c_dir, sigma, dt,
    # meta
    PREDICTION: tl.constexpr, HAS_NOISE: tl.constexpr, BLOCK: tl.constexpr,
):
    # -- block of elements; int64 so latents past 2**31 elements stay addressable
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    # -- load in any float dtype, compute in fp32 (the reference's order of operations)
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    eps_u = tl.load(EPS_U + offs, mask=mask, other=0.0).to(tl.float32)
    eps_c = tl.load(EPS_C + offs, mask=mask, other=0.0).to(tl.float32)
    m = eps_u + guidance * (eps_c - eps_u)
    if PREDICTION == 0:  # epsilon
        pred_x0 = (x - sqrt_beta_t * m) / sqrt_alpha_t
        x_prev = sqrt_alpha_prev * pred_x0 + c_dir * m
    elif PREDICTION == 1:  # v
        pred_x0 = sqrt_alpha_t * x - sqrt_beta_t * m
        pred_eps = sqrt_alpha_t * m + sqrt_beta_t * x
        x_prev = sqrt_alpha_prev * pred_x0 + c_dir * pred_eps
    else:  # flow-matching Euler
        x_prev = x + dt * m
    if HAS_NOISE:
        x_prev = x_prev + sigma * tl.load(Z + offs, mask=mask, other=0.0).to(tl.float32)
    # -- store in x's dtype
    tl.store(OUT + offs, x_prev.to(OUT.dtype.element_ty), mask=mask)


@jit
def _cfg_ddim_bwd_kernel(
    # pointers: upstream gradient, then one output per input (unused ones are never written)
    G, DX, DEPS_U, DEPS_C, DZ,
    # sizes
    n,
    # scalars (fp32): d x_prev / d input
    c_x, c_eps_u, c_eps_c, sigma,
    # meta: which gradients autograd asked for
    NEED_X: tl.constexpr, NEED_EPS_U: tl.constexpr, NEED_EPS_C: tl.constexpr, NEED_Z: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    if NEED_X:
        tl.store(DX + offs, (c_x * g).to(DX.dtype.element_ty), mask=mask)
    if NEED_EPS_U:
        tl.store(DEPS_U + offs, (c_eps_u * g).to(DEPS_U.dtype.element_ty), mask=mask)
    if NEED_EPS_C:
        tl.store(DEPS_C + offs, (c_eps_c * g).to(DEPS_C.dtype.element_ty), mask=mask)
    if NEED_Z:
        tl.store(DZ + offs, (sigma * g).to(DZ.dtype.element_ty), mask=mask)


# %% Launchers ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Coefficients:
    """The step's scalars, rounded to fp32 by the same torch expressions as the reference."""

    prediction: int
    guidance: float
    sqrt_beta_t: float = 0.0
    sqrt_alpha_t: float = 1.0
    sqrt_alpha_prev: float = 1.0
    c_dir: float = 0.0
    sigma: float = 0.0
    dt: float = 0.0

    @classmethod
    def ddim(cls, guidance: float, alpha_t: float, alpha_prev: float, eta: float, prediction: str) -> _Coefficients:
        a_t = torch.tensor(alpha_t, dtype=torch.float32)
        a_prev = torch.tensor(alpha_prev, dtype=torch.float32)
        beta_t, beta_prev = 1 - a_t, 1 - a_prev
        sigma = eta * ((beta_prev / beta_t) * (1 - a_t / a_prev)) ** 0.5
        c_dir = (1 - a_prev - sigma ** 2) ** 0.5
        guidance32 = torch.tensor(guidance, dtype=torch.float32)
        return cls(_DDIM_PREDICTIONS[prediction],
                   *(float(v) for v in (guidance32, beta_t ** 0.5, a_t ** 0.5, a_prev ** 0.5, c_dir, sigma)))

    @classmethod
    def flow(cls, guidance: float, sigma: float, sigma_next: float) -> _Coefficients:
        dt = torch.tensor(sigma_next, dtype=torch.float32) - torch.tensor(sigma, dtype=torch.float32)
        return cls(FLOW, float(torch.tensor(guidance, dtype=torch.float32)), dt=float(dt))

    def gradients(self) -> tuple[float, float, float, float]:
        """d x_prev / d (x, m_u, m_c, z), in float64 before the kernel rounds them to fp32."""
        if self.prediction == FLOW:
            c_x, c_m = 1.0, self.dt
        elif self.prediction == V_PREDICTION:
            c_x = self.sqrt_alpha_prev * self.sqrt_alpha_t + self.c_dir * self.sqrt_beta_t
            c_m = self.c_dir * self.sqrt_alpha_t - self.sqrt_alpha_prev * self.sqrt_beta_t
        else:
            c_x = self.sqrt_alpha_prev / self.sqrt_alpha_t
            c_m = self.c_dir - self.sqrt_alpha_prev * self.sqrt_beta_t / self.sqrt_alpha_t
        return c_x, (1 - self.guidance) * c_m, self.guidance * c_m, self.sigma


def _block(x: torch.Tensor) -> tuple[int, int]:
    """(BLOCK, num_warps). 1024 x 4 warps: 8 fp32 per thread, enough bytes in flight for HBM; the interpreter
    runs programs one at a time, so it gets one big block."""
    if _utils.is_interpreted(x):
        return 1 << 16, 1
    return 1024, 4


def cfg_ddim_forward(x, eps_u, eps_c, noise, coef: _Coefficients) -> torch.Tensor:
    """(1) contiguous inputs of one shape; (2) output in x's dtype; (3) one program per block."""
    x, eps_u, eps_c = x.contiguous(), eps_u.contiguous(), eps_c.contiguous()
    has_noise = noise is not None
    z = noise.contiguous() if has_noise else x
    out = _utils.empty(x.shape, x.dtype, x.device)
    n = x.numel()
    block, warps = _block(x)
    with _utils.device_context(x):
        _cfg_ddim_fwd_kernel[(triton.cdiv(n, block),)](
            x, eps_u, eps_c, z, out, n,
            coef.guidance, coef.sqrt_beta_t, coef.sqrt_alpha_t, coef.sqrt_alpha_prev, coef.c_dir, coef.sigma, coef.dt,
            PREDICTION=coef.prediction, HAS_NOISE=has_noise, BLOCK=block, num_warps=warps,
        )
    return out


def cfg_ddim_backward(grad, needs: tuple[bool, bool, bool, bool], dtypes, coef: _Coefficients):
    """Gradients for (x, eps_u, eps_c, z), each in its input's dtype; None where autograd does not need it."""
    grad = grad.contiguous()
    outs = [_utils.empty(grad.shape, dtype, grad.device) if need else None for need, dtype in zip(needs, dtypes)]
    n = grad.numel()
    block, warps = _block(grad)
    with _utils.device_context(grad):
        _cfg_ddim_bwd_kernel[(triton.cdiv(n, block),)](
            grad, *(o if o is not None else grad for o in outs), n, *coef.gradients(),
            NEED_X=needs[0], NEED_EPS_U=needs[1], NEED_EPS_C=needs[2], NEED_Z=needs[3], BLOCK=block, num_warps=warps,
        )
    return outs


# %% Autograd -------------------------------------------------------------------------------------------------------
class CfgDdimStepFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, eps_u, eps_c, noise, coef: _Coefficients):
        ctx.coef = coef
        ctx.dtypes = (x.dtype, eps_u.dtype, eps_c.dtype, noise.dtype if noise is not None else x.dtype)
        return cfg_ddim_forward(x, eps_u, eps_c, noise, coef)

    @staticmethod
    def backward(ctx, grad):
        needs = tuple(ctx.needs_input_grad[:4])
        return (*cfg_ddim_backward(grad, needs, ctx.dtypes, ctx.coef), None)


# %% Public functions -----------------------------------------------------------------------------------------------
def _unsupported(x, m_uncond, m_cond, guidance, *scalars, noise=None) -> str | None:
    tensors = [x, m_uncond, m_cond] + ([noise] if noise is not None else [])
    if any(t.shape != x.shape for t in tensors):
        return f"shapes {[tuple(t.shape) for t in tensors]} differ (broadcasting)"
    if any(t.dtype not in _DTYPES for t in tensors):
        return f"dtypes {[t.dtype for t in tensors]} (supported: fp32, fp16, bf16)"
    if not all(isinstance(s, numbers.Real) for s in (guidance, *scalars)):
        return "guidance and the schedule's scalars must be Python numbers"
    if x.numel() == 0:
        return "empty input"
    return None


def _unsupported_ddim(x, eps_uncond, eps_cond, guidance, alpha_t, alpha_prev, eta=0.0, noise=None,
                      prediction="epsilon") -> str | None:
    return _unsupported(x, eps_uncond, eps_cond, guidance, alpha_t, alpha_prev, eta, noise=noise if eta > 0 else None)


def _fused(x, eps_uncond, eps_cond, guidance, alpha_t, alpha_prev, eta=0.0, noise=None, prediction="epsilon"):
    coef = _Coefficients.ddim(guidance, alpha_t, alpha_prev, eta, prediction)
    return CfgDdimStepFunction.apply(x, eps_uncond, eps_cond, noise if eta > 0 else None, coef)


def _fused_flow(x, v_uncond, v_cond, guidance, sigma, sigma_next):
    return CfgDdimStepFunction.apply(x, v_uncond, v_cond, None, _Coefficients.flow(guidance, sigma, sigma_next))


def cfg_ddim_step(
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
    """x_prev from x_t and the two denoiser halves: CFG then one DDIM step (DDIMScheduler.step with
    ``prediction`` "epsilon" or "v_prediction"), computed in fp32 and returned in ``x.dtype``. All tensors share x's
    shape; ``alpha_*`` are alphas_cumprod values; ``noise`` (z) is required when ``eta > 0``. Dispatches between the
    Triton kernel and ``kernels.reference.cfg_ddim_step_ref`` (see ``kernels.dispatch``)."""
    if eta > 0 and noise is None:
        raise ValueError("eta > 0 needs the noise tensor z; draw it with the chain's generator")
    if prediction not in _DDIM_PREDICTIONS:
        raise ValueError(f"prediction {prediction!r} is not supported; use one of {', '.join(_DDIM_PREDICTIONS)}")
    return dispatch.run("cfg_ddim_step", _fused, cfg_ddim_step_ref, _unsupported_ddim,
                        x, eps_uncond, eps_cond, guidance, alpha_t, alpha_prev, eta, noise, prediction)


def cfg_flow_step(
    x: torch.Tensor, v_uncond: torch.Tensor, v_cond: torch.Tensor, guidance: float, sigma: float, sigma_next: float,
) -> torch.Tensor:
    """x_next = x + (sigma_next - sigma) v with v = v_u + w (v_c - v_u): CFG then one flow-matching Euler step
    (FlowMatchEulerDiscreteScheduler.step), in fp32, returned in ``x.dtype``. Dispatches between the Triton kernel
    and ``kernels.reference.cfg_flow_step_ref``."""
    return dispatch.run("cfg_flow_step", _fused_flow, cfg_flow_step_ref, _unsupported,
                        x, v_uncond, v_cond, guidance, sigma, sigma_next)
