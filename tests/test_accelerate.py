"""engine.accelerate: the fused kernels swapped into a tiny diffusers UNet3D with peft LoRA, compared with the
untouched model (peft + AttnProcessor2_0) on a forward, its LoRA gradients and one training step; and revert.

Kernels run in Triton's interpreter on the CPU (or on a GPU when there is one).
"""

import os

# Before anything imports triton (diffusers does): Triton picks interpreter-or-compiler at import, and reads the
# variable again at launch. It stays set for the session, so "auto" runs Triton on CPU tensors everywhere after.
os.environ.setdefault("TRITON_INTERPRET", "1")

import copy  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

import kernels  # noqa: E402
from engine.acceleration import FusedTemporalAttnProcessor, accelerate, revert  # noqa: E402
from engine.chain import EditChain  # noqa: E402
from engine.memory import checkpoint_blocks  # noqa: E402
from engine.lora import adapters_disabled, add_lora, lora_layers, lora_state_dict  # noqa: E402
from kernels import _utils  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() and not _utils.interpreter_active(),
                                reason="Triton's interpreter is off: run with TRITON_INTERPRET=1 set before triton is imported")


@pytest.fixture
def model(tiny):
    """The tiny model with LoRA whose B is trained away from zero (at zero the LoRA branch would not be tested)."""
    add_lora(tiny.denoiser, rank=4)
    for name, p in tiny.denoiser.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    return tiny


def lora_params(unet):
    return [p for n, p in unet.named_parameters() if "lora_" in n]


def unet_inputs(frames=3):
    g = torch.Generator().manual_seed(0)
    return torch.randn(1, 4, frames, 8, 8, generator=g), torch.randn(1, 77, 32, generator=g)


def forward_and_grads(unet, x, context):
    out = unet(x, 500, encoder_hidden_states=context).sample
    return out, torch.autograd.grad(out.square().mean(), lora_params(unet))


def test_patches_every_lora_linear_and_temporal_attention_and_reverts_exactly(model):
    unet = model.denoiser
    before = {name: p.processor for name, p in unet.named_modules() if hasattr(p, "processor")}
    keys = set(lora_state_dict(unet))
    handle = accelerate(unet, backend="fused")
    assert kernels.get_backend() is kernels.Backend.FUSED
    assert handle.lora_layers == len(lora_layers(unet)) == 72
    fused = {name for name, m in unet.named_modules() if isinstance(getattr(m, "processor", None), FusedTemporalAttnProcessor)}
    assert fused == {name for name in before if "temp_attentions" in name or "transformer_in" in name}
    assert handle.attention_processors == len(fused) == 10
    assert set(lora_state_dict(unet)) == keys  # parameters and their names are untouched
    with pytest.raises(ValueError, match="already accelerated"):
        accelerate(unet)

    handle.revert()
    assert kernels.get_backend() is kernels.Backend.AUTO
    assert all("forward" not in layer.__dict__ for layer in lora_layers(unet))
    assert all(m.processor is before[name] for name, m in unet.named_modules() if hasattr(m, "processor"))


def test_whole_unet_forward_and_lora_gradients_match_the_untouched_model(model, monkeypatch):
    unet = model.denoiser
    x, context = unet_inputs(frames=5)
    expected_out, expected_grads = forward_and_grads(unet, x, context)
    handle = accelerate(unet, backend="fused")
    launches = []
    allocate = _utils.empty
    monkeypatch.setattr(_utils, "empty", lambda *a, **k: launches.append(a[0]) or allocate(*a, **k))
    out, grads = forward_and_grads(unet, x, context)
    handle.revert()
    assert len(launches) >= 2 * (72 + 10)  # every LoRA linear and temporal attention ran its kernels, both ways
    torch.testing.assert_close(out, expected_out, atol=1e-5, rtol=1e-4)
    for got, expected in zip(grads, expected_grads):
        torch.testing.assert_close(got, expected, atol=1e-7, rtol=1e-4)
    reverted_out, _ = forward_and_grads(unet, x, context)
    assert torch.equal(reverted_out, expected_out)


def test_disabled_adapters_run_the_base_model(model):
    unet = model.denoiser
    x, context = unet_inputs()
    with torch.no_grad(), adapters_disabled(unet):
        expected = unet(x, 500, encoder_hidden_states=context).sample
    handle = accelerate(unet, backend="fused")
    with torch.no_grad(), adapters_disabled(unet):
        got = unet(x, 500, encoder_hidden_states=context).sample
    handle.revert()
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_one_training_step_gives_the_same_lora_gradients(model):
    """The edit chain (2 DDIM steps, CFG, gradient through the last, checkpointed UNet blocks as in training)
    with every op fused, against the reference."""
    checkpoint_blocks(model.denoiser)
    context = model.encode_prompts(["a cat"])
    uncond = model.encode_prompts([""])
    latents = torch.randn(1, 4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    chain = EditChain(model, ddim_steps=4, tau=0.5, grad_steps=1, guidance=2.0)

    def step():
        edited = chain.edit(latents, context, uncond, torch.Generator().manual_seed(2))
        return edited, torch.autograd.grad(edited.square().mean(), lora_params(model.denoiser))

    with kernels.use_backend("reference"):
        expected_out, expected_grads = step()
    handle = accelerate(model.denoiser, backend="fused")
    out, grads = step()
    handle.revert()
    torch.testing.assert_close(out, expected_out, atol=1e-5, rtol=1e-4)
    for got, expected in zip(grads, expected_grads):
        torch.testing.assert_close(got, expected, atol=1e-7, rtol=1e-4)


def test_deepcopy_of_an_accelerated_unet_is_bound_to_the_copy(model):
    handle = accelerate(model.denoiser, backend="reference")
    clone = copy.deepcopy(model.denoiser)
    handle.revert()
    layers = lora_layers(clone)
    assert all(layer.forward.__self__ is layer for layer in layers)
    revert(clone)
    assert all("forward" not in layer.__dict__ for layer in layers)


def test_unsupported_processors_are_left_alone(model):
    from diffusers.models.attention_processor import AttnProcessor

    unet = model.denoiser
    attn = unet.transformer_in.transformer_blocks[0].attn1
    attn.set_processor(AttnProcessor())
    handle = accelerate(unet, lora=False)
    assert type(attn.processor) is AttnProcessor and handle.attention_processors == 9 and handle.lora_layers == 0
    handle.revert()


def test_the_documented_spelling_works_twice_in_one_process(model):
    """``engine.accelerate`` is a function, never shadowed by a submodule of that name once that is imported."""
    import importlib.util

    import engine

    for _ in range(2):
        engine.accelerate(model.denoiser, backend="fused").revert()
    shadowed = [name for name in engine.__all__ if importlib.util.find_spec(f"engine.{name}") is not None]
    assert not shadowed, f"public names that are also submodules of engine: {shadowed}"


def test_set_default_attn_processor_works_on_an_accelerated_unet(model):
    """diffusers' own tests call it on every component (it raised ValueError on the fused temporal processors)."""
    from diffusers.models.attention_processor import AttnProcessor

    unet = model.denoiser
    x, context = unet_inputs()
    stock = copy.deepcopy(unet)
    stock.set_default_attn_processor()
    handle = accelerate(unet, backend="reference")
    unet.set_default_attn_processor()
    assert all(type(p) is AttnProcessor for p in unet.attn_processors.values())
    with torch.no_grad():
        torch.testing.assert_close(unet(x, 500, encoder_hidden_states=context).sample,
                                   stock(x, 500, encoder_hidden_states=context).sample, atol=1e-5, rtol=1e-4)
    handle.revert()
    assert "set_default_attn_processor" not in unet.__dict__
    assert all("forward" not in layer.__dict__ for layer in lora_layers(unet))


def test_attention_backends_are_compared_side_by_side_on_copies(tiny, monkeypatch, capsys):
    """bench.attention_cuda (the GPU's xformers / SDPA / fused temporal attention table), run here on the tiny model:
    a row per backend, each on a copy (the model given keeps its processors), xformers falling back to SDPA with
    its one line where it does not import, and the fused temporal attention predicting as SDPA does."""
    import sys

    from bench.attention_cuda import compare, render
    from engine.acceleration import _temporal_attentions

    monkeypatch.setitem(sys.modules, "xformers", None)  # not installed, whatever this machine has
    model = tiny
    processors = dict(model.denoiser.attn_processors)
    latents = torch.randn(1, 4, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    rows = compare(model, (latents, torch.tensor([500]), model.encode_prompts(["a red ball"])), rounds=1)
    assert [r["asked"] for r in rows] == ["sdpa", "xformers", "fused temporal attention"]
    assert rows[0]["ran"] == rows[1]["ran"] == "sdpa"
    assert "--attention xformers: not used: xformers does not import" in capsys.readouterr().out
    assert rows[1]["max_diff"] == 0.0 and rows[2]["max_diff"] < 1e-5  # SDPA's own numbers; the kernel's, close
    path = "Triton kernel" if _utils.interpreter_active() else \
        "PyTorch reference (CPU tensors run the PyTorch reference unless TRITON_INTERPRET=1 (the tests' setting))"
    assert rows[2]["ran"] == f"{len(_temporal_attentions(model.denoiser))} temporal attentions on the {path}"
    assert dict(model.denoiser.attn_processors) == processors
    assert "| fused temporal attention |" in render(rows, latents.device)

    def failing(model, backend):  # a backend that breaks: its row says why, the others stand
        if backend == "xformers":
            raise RuntimeError("no bf16 backward\nmore")
        return backend
    monkeypatch.setattr("engine.acceleration.use_attention", failing)
    rows = compare(model, (latents, torch.tensor([500]), model.encode_prompts(["a red ball"])), rounds=1)
    assert rows[1] == {"asked": "xformers", "ran": "", "error": "no bf16 backward"}
    assert rows[0]["ran"] == "sdpa" and "s_per_step" in rows[2]
    assert "| xformers |  |  |  |  | error: no bf16 backward |" in render(rows, latents.device)
