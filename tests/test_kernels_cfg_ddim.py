"""The fused CFG + sampler step (DDIM epsilon / v, flow-matching Euler) against its reference, a float64 computation
and the diffusers schedulers' own ``step``.

Where the kernels run, and the marks these tests share: kernel_support.py.
"""

import logging

import pytest
import torch

import kernels
from kernel_support import DEVICE, KERNEL_TEST
from kernels import _utils

pytestmark = KERNEL_TEST
FLOOR = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 1e-2}  # relative error allowed whatever the reference's


def inputs(shape, dtype, eta, requires_grad=True):
    g = torch.Generator().manual_seed(len(shape) * 1000 + shape[-1])
    make = lambda: torch.randn(shape, generator=g).to(DEVICE, dtype).requires_grad_(requires_grad)  # noqa: E731
    return make(), make(), make(), (make() if eta > 0 else None)


def step_f64(x, mu, mc, guidance, a_t, a_prev, eta, z=None, prediction="epsilon"):
    """The DDIM update (DDIM eq. 12) in float64, written out independently of the reference."""
    m = mu + guidance * (mc - mu)
    if prediction == "v_prediction":  # v = sqrt(a_t) eps - sqrt(1 - a_t) x0 (Salimans & Ho), solved for x0 and eps
        x0, eps = a_t ** 0.5 * x - (1 - a_t) ** 0.5 * m, a_t ** 0.5 * m + (1 - a_t) ** 0.5 * x
    else:
        x0, eps = (x - (1 - a_t) ** 0.5 * m) / a_t ** 0.5, m
    sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)) ** 0.5
    out = a_prev ** 0.5 * x0 + (1 - a_prev - sigma ** 2) ** 0.5 * eps
    return out + sigma * z if eta > 0 else out


def flow_f64(x, vu, vc, guidance, sigma, sigma_next):
    """The flow-matching Euler update in float64."""
    return x + (sigma_next - sigma) * (vu + guidance * (vc - vu))


def run(fn, tensors, upstream, args):
    out = fn(*tensors[:3], *args, *tensors[3:] if tensors[3] is not None else ())
    wanted = [t for t in tensors if t is not None]
    return out, torch.autograd.grad(out, wanted, upstream)


def v_prediction(fn):
    return lambda *args: fn(*args, prediction="v_prediction")


# each update the kernel fuses: (fused, reference, float64, its scalars after the tensors for a given eta)
UPDATES = {
    "ddim-epsilon": (kernels.cfg_ddim_step, kernels.cfg_ddim_step_ref, step_f64, lambda eta: (3.0, 0.3, 0.55, eta)),
    "ddim-v": (v_prediction(kernels.cfg_ddim_step), v_prediction(kernels.cfg_ddim_step_ref), v_prediction(step_f64),
               lambda eta: (3.0, 0.3, 0.55, eta)),
    "flow": (kernels.cfg_flow_step, kernels.cfg_flow_step_ref, flow_f64, lambda eta: (5.0, 0.62, 0.55)),
}


@pytest.mark.parametrize("update", list(UPDATES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape, eta", [((2, 4, 5, 7, 9), 0.0), ((1, 4, 3, 5, 11), 0.7), ((3, 70001), 1.0)])
def test_forward_and_gradients_match_reference_and_float64(shape, eta, dtype, update):
    fused, reference, truth_fn, scalars = UPDATES[update]
    if update == "flow" and eta > 0:
        eta = 0.0  # flow-matching Euler has no noise term
    tensors = inputs(shape, dtype, eta)
    args = scalars(eta)
    upstream = torch.randn(shape, device=DEVICE).to(dtype)
    with kernels.use_backend("fused"):
        out, grads = run(fused, tensors, upstream, args)
    ref_out, ref_grads = run(reference, tensors, upstream, args)
    t64 = [t.detach().double().requires_grad_() if t is not None else None for t in tensors]
    true_out, true_grads = run(truth_fn, t64, upstream.double(), args)

    assert out.dtype == dtype and not out.isnan().any()
    for got, ref, truth in zip((out, *grads), (ref_out, *ref_grads), (true_out, *true_grads)):
        assert got.dtype == ref.dtype and got.shape == ref.shape
        err, ref_err = (got.double() - truth).abs().max(), (ref.double() - truth).abs().max()
        assert err <= 2 * ref_err + FLOOR[dtype] * truth.abs().max(), (err, ref_err)
    if dtype == torch.float32:  # same fp32 operations in the same order
        torch.testing.assert_close(out, ref_out, atol=1e-6, rtol=1e-6)


def test_equals_diffusers_ddim_scheduler_step():
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")
    scheduler.set_timesteps(20)
    x, eu, ec, z = inputs((2, 4, 5, 6, 7), torch.float32, 0.5, requires_grad=False)
    for t in (951, 551, 1):
        prev = t - 50
        a_t = float(scheduler.alphas_cumprod[t])
        a_prev = float(scheduler.alphas_cumprod[prev]) if prev >= 0 else float(scheduler.final_alpha_cumprod)
        expected = scheduler.step(eu + 3.0 * (ec - eu), t, x, eta=0.5, variance_noise=z).prev_sample
        with kernels.use_backend("fused"):
            got = kernels.cfg_ddim_step(x, eu, ec, 3.0, a_t, a_prev, 0.5, z)
        torch.testing.assert_close(got, expected, atol=2e-6, rtol=1e-5)


def test_equals_diffusers_ddim_scheduler_step_with_v_prediction():
    from diffusers import DDIMScheduler

    # CogVideoX-2B's scheduler settings (v-prediction, zero terminal SNR rescaled, trailing timesteps)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=True, steps_offset=0, prediction_type="v_prediction",
                              rescale_betas_zero_snr=True, timestep_spacing="trailing")
    scheduler.set_timesteps(50)
    x, vu, vc, z = inputs((2, 4, 5, 6, 7), torch.float32, 0.5, requires_grad=False)
    for t in scheduler.timesteps[[0, 25, -1]].tolist():
        prev = t - 1000 // 50
        a_t = float(scheduler.alphas_cumprod[t])
        a_prev = float(scheduler.alphas_cumprod[prev]) if prev >= 0 else float(scheduler.final_alpha_cumprod)
        expected = scheduler.step(vu + 6.0 * (vc - vu), t, x, eta=0.5, variance_noise=z).prev_sample
        with kernels.use_backend("fused"):
            got = kernels.cfg_ddim_step(x, vu, vc, 6.0, a_t, a_prev, 0.5, z, prediction="v_prediction")
        torch.testing.assert_close(got, expected, atol=2e-6, rtol=1e-5)


def test_equals_diffusers_flow_match_euler_step():
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)  # Wan 2.1's flow shift at 480p
    scheduler.set_timesteps(30)
    x, vu, vc, _ = inputs((2, 16, 3, 6, 7), torch.float32, 0.0, requires_grad=False)
    for i, t in enumerate(scheduler.timesteps):
        expected = scheduler.step(vu + 5.0 * (vc - vu), t, x).prev_sample
        with kernels.use_backend("fused"):
            got = kernels.cfg_flow_step(x, vu, vc, 5.0, float(scheduler.sigmas[i]), float(scheduler.sigmas[i + 1]))
        torch.testing.assert_close(got, expected, atol=2e-6, rtol=1e-5)


def test_unknown_prediction_type_is_an_error():
    x, eu, ec, _ = inputs((2, 3), torch.float32, 0.0, requires_grad=False)
    with pytest.raises(ValueError, match="sample"):
        kernels.cfg_ddim_step(x, eu, ec, 3.0, 0.3, 0.5, prediction="sample")


def test_only_requested_gradients_are_computed():
    x, eu, ec, _ = inputs((2, 3, 4), torch.float32, 0.0, requires_grad=False)
    eu.requires_grad_()
    with kernels.use_backend("fused"):
        out = kernels.cfg_ddim_step(x, eu, ec, 2.0, 0.4, 0.6)
    (grad,) = torch.autograd.grad(out.sum(), [eu])
    ref = torch.autograd.grad(kernels.cfg_ddim_step_ref(x, eu, ec, 2.0, 0.4, 0.6).sum(), [eu])[0]
    torch.testing.assert_close(grad, ref)


def test_eta_without_noise_is_an_error_on_every_backend():
    x, eu, ec, _ = inputs((2, 3), torch.float32, 0.0, requires_grad=False)
    for backend in ("fused", "reference"):
        with kernels.use_backend(backend), pytest.raises(ValueError, match="noise"):
            kernels.cfg_ddim_step(x, eu, ec, 3.0, 0.3, 0.5, eta=0.5)


def test_unsupported_inputs_fall_back_to_the_reference_and_log_once(caplog, monkeypatch):
    monkeypatch.setattr(_utils, "_logged", set())
    x, eu, ec, _ = inputs((2, 3, 4), torch.float32, 0.0, requires_grad=False)
    caplog.set_level(logging.WARNING, logger="kernels")
    with kernels.use_backend("fused"):
        for _ in range(3):
            got = kernels.cfg_ddim_step(x, eu[:1], ec, 3.0, 0.3, 0.5)  # broadcasting over the batch
    torch.testing.assert_close(got, kernels.cfg_ddim_step_ref(x, eu[:1], ec, 3.0, 0.3, 0.5))
    assert sum("cfg_ddim_step" in r.message and "broadcasting" in r.message for r in caplog.records) == 1


@pytest.mark.parametrize("interpret, expected", [("1", "fused"), ("0", "reference")])
def test_auto_runs_triton_on_cpu_tensors_only_under_triton_interpret(monkeypatch, interpret, expected):
    monkeypatch.setenv("TRITON_INTERPRET", interpret)
    choice = kernels.dispatch.run("op", lambda t: "fused", lambda t: "reference", lambda t: None, torch.zeros(2))
    assert choice == expected


def test_backend_switch():
    assert kernels.get_backend() is kernels.Backend.AUTO
    with kernels.use_backend("reference"):
        assert kernels.get_backend() is kernels.Backend.REFERENCE
        with kernels.use_backend("fused"):
            assert kernels.get_backend() is kernels.Backend.FUSED
        assert kernels.get_backend() is kernels.Backend.REFERENCE
    assert kernels.get_backend() is kernels.Backend.AUTO
    with pytest.raises(ValueError):
        kernels.set_backend("cudnn")
