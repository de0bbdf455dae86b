"""The video-transformer families (Wan 2.1, CogVideoX) on tiny random models built and saved here: loading by
model_index.json, the denoiser call and latent layout against the stock diffusers pipeline, decoding the SegVR
frames of a causal VAE, LoRA and the chain memory over transformer blocks, and the command line (fine-tune,
resume, export, bad folders)."""

import json
import shutil
import sys

import pytest
import torch

from engine.chain import EditChain
from engine.errors import UserError
from engine.lora import WEIGHTS_NAME as WEIGHTS
from engine.models import CogVideoXVideo, WanVideo, load_model, tiny_model

FAMILIES = {"wan": WanVideo, "cogvideox": CogVideoXVideo}
SIZE = dict(num_frames=9, height=32, width=32)  # 4k + 1 frames for the causal VAEs: 3 latent frames


@pytest.fixture(scope="module", params=list(FAMILIES))
def saved(request, tmp_path_factory):
    """(family, folder) of a tiny random model of that family, saved in the diffusers pipeline layout."""
    folder = tmp_path_factory.mktemp(request.param)
    tiny_model(seed=0, family=request.param).save(folder)
    return request.param, folder


@pytest.fixture
def model(saved):
    return load_model(saved[1])


def test_family_is_read_from_model_index_and_the_stock_pipeline_loads_the_folder(saved, model):
    import diffusers

    family, folder = saved
    assert type(model) is FAMILIES[family]
    pipe = getattr(diffusers, model.pipeline_class).from_pretrained(str(folder))
    assert type(pipe.transformer).__name__ == type(model.denoiser).__name__
    prompts = ["a red circle moving left", ""]
    with torch.no_grad():
        expected, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False,
                                         max_sequence_length=model.text_length)
    assert torch.equal(model.encode_prompts(prompts), expected)


def test_sampling_through_the_chain_equals_the_stock_pipeline(model):
    """The chain's denoiser calls (both CFG halves in one batch, the family's latent layout and timestep) and
    sampler updates give the pipeline's own latents, with the chain's scheduler (Wan: flow-matching Euler over its
    UniPC solver's sigmas and timesteps)."""
    steps, guidance = 4, 3.0
    chain = EditChain(model, steps, tau=1.0, grad_steps=1, guidance=guidance, offset_noise=0.0)
    shape = (1, *model.latent_shape(**SIZE))
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    prompt = "a blue square moving up"
    with torch.no_grad():
        ours = chain.denoise(x, model.encode_prompts([prompt]), model.encode_prompts([""]))
    pipe = model.pipeline()
    pipe.scheduler = chain.schedule
    pipe.scheduler.set_timesteps = lambda *args, **kwargs: None  # keep the chain's grid (Wan: its UniPC solver's)
    if isinstance(model, WanVideo):  # the noise levels and timesteps the model's own sampler visits
        solver = type(model.scheduler).from_config(model.scheduler.config)
        solver.set_timesteps(steps)
        assert chain.sigmas == solver.sigmas.tolist() and chain.timesteps == solver.timesteps.float().tolist()
    layout = (lambda t: t.transpose(1, 2)) if isinstance(model, CogVideoXVideo) else (lambda t: t)
    theirs = pipe(prompt=prompt, negative_prompt="", num_inference_steps=steps, guidance_scale=guidance,
                  latents=layout(x.clone()), output_type="latent", max_sequence_length=model.text_length,
                  **SIZE).frames
    torch.testing.assert_close(ours, layout(theirs), rtol=1e-4, atol=1e-5)


def test_segvr_frames_of_a_causal_vae_equal_decoding_the_whole_clip_and_picking(model):
    latents = torch.randn(2, *model.latent_shape(**SIZE)[:1], 3, 4, 4)
    with torch.no_grad():
        whole = model.decode_prefix(latents, latents.shape[2])
        for indices in ([[0, 4], [2, 8]], [[0, 1], [1, 0]], [[0, 0], [0, 0]], [[4, 5], [3, 2]]):
            indices = torch.tensor(indices)
            picked = torch.stack([whole[b, indices[b]] for b in range(2)]).flatten(0, 1)
            assert torch.equal(model.decode_frames(latents, indices), picked)
    # frames 0-4 need latents 0-1 only: Wan decodes 2 of 3, CogVideoX 3 (it decodes latent frames in odd groups)
    assert model.decoded_prefix(2, 3) == (2 if isinstance(model, WanVideo) else 3)
    assert whole.shape[1] == SIZE["num_frames"]


def test_context_without_gradient_decodes_the_same_frames_and_grades_only_the_chosen_latents(model):
    """--decode-context no-grad (the default): the same frame values; the reward's gradient reaches the latent frames
    that hold a chosen frame and no other. grad: the gradient of decoding the whole clip and picking."""
    latents = torch.randn(1, model.latent_shape(**SIZE)[0], 5, 4, 4)  # 17 frames
    indices = torch.tensor([[9, 11]])  # both in latent frame 3; latent frames 0-2 are their causal context
    weights = torch.randn(2, 3, 32, 32)

    def gradient(decode):
        z = latents.clone().requires_grad_(True)
        (decode(z) * weights).sum().backward()
        return z.grad

    whole = gradient(lambda z: model.decode_prefix(z, 5)[0, [9, 11]])
    for context_gradient in (True, False):
        model.context_gradient = context_gradient
        with torch.no_grad():
            torch.testing.assert_close(model.decode_frames(latents, indices),
                                       model.decode_prefix(latents, 5)[0, [9, 11]], rtol=0, atol=0)
        ours = gradient(lambda z: model.decode_frames(z, indices))
        if context_gradient:
            torch.testing.assert_close(ours, whole, rtol=1e-4, atol=1e-6)
        else:
            assert ours[:, :, 3].abs().sum() > 0 and ours[:, :, :3].abs().sum() == 0
            assert whole[:, :, :3].abs().sum() > 0  # the context does matter to the exact gradient


def test_decoder_recompute_gives_the_same_frames_and_gradients_and_saves_less(model):
    """decode_recompute: each chunk decoded with gradient keeps its input and the causal cache it read and runs
    again in backward. The frames and the latents' gradient equal the plain decode's (fp32, 1e-5 relative), with
    the context decoded with gradient and without, and far fewer bytes are saved for backward."""
    latents = torch.randn(1, model.latent_shape(**SIZE)[0], 5, 4, 4)  # 17 frames
    indices = torch.tensor([[3, 9, 16]])  # latent frames 1, 3 and 4
    weights = torch.randn(3, 3, 32, 32)

    def run(recompute: bool):
        model.decode_recompute, saved = recompute, []
        z = latents.clone().requires_grad_(True)
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel() * t.element_size()) or t,
                                                      lambda t: t):
            frames = model.decode_frames(z, indices)
        (frames * weights).sum().backward()
        return frames.detach(), z.grad, sum(saved)

    for context_gradient in (False, True):
        model.context_gradient = context_gradient
        plain, recomputed = run(False), run(True)
        torch.testing.assert_close(recomputed[0], plain[0], rtol=0, atol=0)
        torch.testing.assert_close(recomputed[1], plain[1], rtol=1e-5, atol=1e-7)
        assert plain[1].abs().sum() > 0 and recomputed[2] < plain[2] / 4


def _recomputed_decode_backward(model, context_gradient: bool):
    """A function that decodes SegVR frames of fixed latents with the decoder recomputed in backward and returns
    (the peak bytes its backward holds, the latents' gradient)."""
    from engine.counting import LiveBytes

    latents = torch.randn(1, model.latent_shape(**SIZE)[0], 5, 8, 8)
    model.decode_recompute, model.context_gradient = True, context_gradient

    def backward():
        z = latents.clone().requires_grad_(True)
        frames = model.decode_frames(z, torch.tensor([[3, 9, 16]]))
        with LiveBytes("cpu") as live:
            frames.sum().backward()
        return live.peak, z.grad

    return backward


def test_decoder_recompute_copies_the_causal_caches_gradients_out_of_their_convolutions_gradients(model, monkeypatch):
    """--decode-context grad: a causal cache's gradient is a slice of its convolution's input gradient; left a view,
    it would keep that whole gradient alive until the chunk before runs its backward. Copied out (``_OwnGradient``), backward through
    the recomputed decode peaks lower, with the same gradient."""
    import engine.models.causal as causal

    backward = _recomputed_decode_backward(model, context_gradient=True)  # the caches carry the context's gradient
    copied = backward()
    monkeypatch.setattr(causal, "_own_gradients", lambda cache: cache)
    views = backward()
    torch.testing.assert_close(copied[1], views[1], rtol=1e-5, atol=1e-7)  # the same sums, in another order
    assert copied[0] < 0.9 * views[0]


def test_decoder_recompute_drops_what_its_layers_leave_for_the_next_chunk(model, monkeypatch):
    """When backward recomputes a chunk, the cache each layer leaves for the next chunk (which has run) is let go
    as the layer returns (``ChunkRun.left``), not held until the chunk's recomputation ends; the gradient is the
    same."""
    import weakref

    import engine.models.causal as causal
    from torch.utils._pytree import tree_leaves

    left, alive, checkpointed = [], [], causal.ChunkRun.checkpointed

    def recording(self, function, *args, **kwargs):
        if self.passes == 2:
            alive.append(sum(ref() is not None for ref in left))
        out = checkpointed(self, function, *args, **kwargs)
        if self.passes == 2 and isinstance(out, tuple):  # a layer that leaves a cache: (frames, cache)
            left.extend(weakref.ref(t) for t in tree_leaves(out[1]) if isinstance(t, torch.Tensor))
        return out

    def gradient():
        z = torch.randn(1, model.latent_shape(**SIZE)[0], 5, 4, 4, generator=torch.Generator().manual_seed(0))
        z.requires_grad_(True)
        model.decode_frames(z, torch.tensor([[3, 9, 16]])).sum().backward()
        return z.grad

    model.decode_recompute, model.context_gradient = True, False
    monkeypatch.setattr(causal.ChunkRun, "checkpointed", recording)
    dropped = gradient()
    assert left and max(alive) == 0, alive
    left.clear(), alive.clear()
    monkeypatch.setattr(causal.ChunkRun, "left", lambda self, cache: cache)
    torch.testing.assert_close(gradient(), dropped, rtol=0, atol=0)
    assert max(alive) > 0  # without it, the decoder holds them to the chunk's end


def test_cogvideox_decoder_recompute_recomputes_each_norm_and_convolution_of_a_block_in_its_backward(saved, model,
                                                                                                    monkeypatch):
    """CogVideoX: within a recomputed residual block, each norm and convolution is checkpointed on its own, so the
    block's backward holds their inputs and one part's activations, not the whole block's: a lower peak, the same
    gradient."""
    if saved[0] != "cogvideox":
        pytest.skip("CogVideoX's decoder blocks")
    import engine.models.cogvideox as cogvideox

    backward = _recomputed_decode_backward(model, context_gradient=False)
    by_parts = backward()
    monkeypatch.setattr(cogvideox, "checkpoint_tensors", lambda function, *args, **kwargs: function(*args, **kwargs))
    whole = backward()
    torch.testing.assert_close(by_parts[1], whole[1], rtol=1e-5, atol=1e-7)
    assert by_parts[0] < 0.9 * whole[0], (by_parts[0], whole[0])


def test_decoder_recompute_lets_go_of_each_layers_inputs_once_its_backward_has_run(model, monkeypatch):
    """In backward, a recomputed layer's inputs (and the causal cache it read) are dropped once the layer has run
    again for its own backward, not held until the chunk's backward ends: when a layer runs for its backward, the
    layers after it, whose backward has run, hold nothing."""
    import engine.models.causal as causal

    calls, held_after, from_box = {}, [], causal._from_box

    def recording_from_box(function, box, run):
        if run.passes == 2:  # backward: the chunk run again, then each layer again for its own backward
            calls[id(box)] = calls.get(id(box), 0) + 1
            if calls[id(box)] == 2:
                i = next(i for i, b in enumerate(run.boxes) if b is box)
                held_after.append(sum(b.inputs is not None for b in run.boxes[i + 1:]))
        return from_box(function, box, run)

    monkeypatch.setattr(causal, "_from_box", recording_from_box)
    for context_gradient in (False, True):
        model.decode_recompute, model.context_gradient = True, context_gradient
        z = torch.randn(1, model.latent_shape(**SIZE)[0], 5, 8, 8, requires_grad=True)
        model.decode_frames(z, torch.tensor([[3, 9, 16]])).sum().backward()
        assert len(held_after) > 2 and set(held_after) == {0}, held_after
        held_after.clear()


def test_decoder_recompute_saves_a_kept_cache_through_the_saved_tensor_hooks(model, monkeypatch):
    """A recomputed chunk that reads the cache of a chunk decoded with gradient keeps that cache for backward,
    with the context's gradient or without. Every tensor of it is saved through the saved-tensor hooks around the
    decode (where ``ChainMemory.region`` spills to the host), not held beside them by the checkpoint."""
    import engine.models.causal as causal
    from torch.utils._pytree import tree_leaves

    latents = torch.randn(1, model.latent_shape(**SIZE)[0], 5, 4, 4)  # latent frames 1, 3 and 4 graded below
    kept, packed, recompute = [], set(), causal.CausalVideoDiffusion._recomputed_chunk

    def recording(self, run, x, chunks, chunk, cache, initial, keep):
        if keep:
            kept.extend(t for t in tree_leaves(cache) if isinstance(t, torch.Tensor))
        return recompute(self, run, x, chunks, chunk, cache, initial, keep)

    def pack(t):
        packed.add(t.untyped_storage()._cdata)
        return t

    monkeypatch.setattr(causal.CausalVideoDiffusion, "_recomputed_chunk", recording)
    for context_gradient in (False, True):
        model.decode_recompute, model.context_gradient = True, context_gradient
        z = latents.clone().requires_grad_(True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            frames = model.decode_frames(z, torch.tensor([[3, 9, 16]]))
        frames.sum().backward()
        assert kept and all(t.untyped_storage()._cdata in packed for t in kept)
        kept.clear()


def test_decoder_recompute_asks_the_hooks_again_for_a_stored_cache_instead_of_holding_it(model, monkeypatch):
    """--decode-context no-grad: where backward recomputes a chunk whose cache was saved through the hooks, each
    layer's box holds a ``ChunkRun.Stored`` in place of that cache's tensors; when a layer runs again for its own
    backward, no box of the chunk holds a tensor the hooks gave back, and the layer asks the hooks again. The
    frames and the gradient are those of the plain decode under the same hooks."""
    import engine.models.causal as causal
    from torch.utils._pytree import tree_leaves
    from torch.utils.weak import WeakIdKeyDictionary

    given, unpacks, held, stored = WeakIdKeyDictionary(), [0], [], []
    calls, from_box = {}, causal._from_box

    def pack(t):
        return (t.clone(),)  # a copy elsewhere, as a spill to the host is

    def unpack(packed):
        unpacks[0] += 1
        tensor = packed[0].clone()
        given[tensor] = True
        return tensor

    def recording_from_box(function, box, run):
        if run.passes == 2 and run.packed:
            calls[id(box)] = calls.get(id(box), 0) + 1
            if calls[id(box)] == 2:  # the layer's own recomputation
                leaves = [t for b in run.boxes if b.inputs is not None for t in tree_leaves(b.inputs)]
                held.append(sum(isinstance(t, torch.Tensor) and t in given for t in leaves))
                stored.append(sum(isinstance(t, causal.ChunkRun.Stored) for t in tree_leaves(box.inputs)))
        return from_box(function, box, run)

    monkeypatch.setattr(causal, "_from_box", recording_from_box)
    latents = torch.randn(1, model.latent_shape(**SIZE)[0], 5, 4, 4)
    weights = torch.randn(3, 3, 32, 32)
    results = []
    for recompute in (False, True):
        model.decode_recompute, model.context_gradient = recompute, False
        z = latents.clone().requires_grad_(True)
        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            frames = model.decode_frames(z, torch.tensor([[3, 9, 16]]))  # latent frames 1, 3 and 4: 4 reads 3's cache
        (frames * weights).sum().backward()
        results.append((frames.detach(), z.grad))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=0, atol=0)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-5, atol=1e-7)
    assert held and set(held) == {0}, held
    assert sum(stored) > 0  # the layers that read the cache asked for it again


def test_context_without_gradient_passes_none_from_a_chosen_frame_to_the_chunk_before(model):
    """--decode-context no-grad: a chosen frame's gradient reaches the latent frames of its own chunk only, also
    where the chunk before it holds a chosen frame and so decodes with gradient (its cache then carries none);
    grad: the exact gradient, which does reach it."""
    latents = torch.randn(1, model.latent_shape(**SIZE)[0], 5, 4, 4)  # 17 frames
    indices = torch.tensor([[5, 9]])  # latent frames 2 and 3, in chunks one after the other (Wan, CogVideoX)
    weights = torch.zeros(2, 3, 32, 32)
    weights[1].normal_()  # the gradient of frame 9 alone
    earlier = [k for k in range(3) if any(2 in c and k in c for c in model.chunks(5))]  # latent frame 2's chunk
    for recompute in (False, True):
        for context_gradient in (False, True):
            model.decode_recompute, model.context_gradient = recompute, context_gradient
            z = latents.clone().requires_grad_(True)
            (model.decode_frames(z, indices) * weights).sum().backward()
            reached = z.grad[:, :, earlier].abs().sum()
            assert (reached > 0) if context_gradient else (reached == 0), (recompute, context_gradient)
            assert z.grad[:, :, 3].abs().sum() > 0


def test_clip_round_trip_and_frame_count_errors(model):
    frames = torch.rand(1, SIZE["num_frames"], 3, 32, 32) * 2 - 1
    latents = model.encode_video(frames)
    assert latents.shape == (1, *model.latent_shape(**SIZE))
    assert model.decode_video(latents[0]).shape == (SIZE["num_frames"], 3, 32, 32)
    with pytest.raises(UserError, match="--num-frames 8: .* 4k \\+ 1 frames; use e.g. 9"):
        model.latent_shape(8, 32, 32)


def test_lora_on_attention_projections_and_chain_memory_over_blocks(model):
    """peft LoRA lands on every attention's q/k/v/out; the chain-memory planner's units are the transformer's
    blocks (plus the modules around them that hold weights), and a planned K=2 edit under a tight budget gives
    plain autograd's LoRA gradients."""
    from engine.memory import ChainMemory, denoiser_blocks, denoiser_units
    from engine.lora import add_lora, lora_layers

    params = add_lora(model.denoiser, rank=2)
    attentions = [m for m in model.denoiser.modules() if hasattr(m, "to_q") and hasattr(m, "to_out")]
    assert len(lora_layers(model.denoiser)) == 4 * len(attentions) and params
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.1)
    units = denoiser_units(model.denoiser)
    expected = (["patch_embedding", "condition_embedder", "blocks.0", "blocks.1", "proj_out"]
                if isinstance(model, WanVideo) else
                ["patch_embed", "time_embedding", "transformer_blocks.0", "transformer_blocks.1", "norm_final",
                 "norm_out", "proj_out"])
    assert [n for n, _ in units] == expected
    assert [m for n, m in units if "blocks." in n] == denoiser_blocks(model.denoiser)
    assert denoiser_units(model.denoiser, "blocks") == units

    chain = EditChain(model, 4, tau=1.0, grad_steps=2, guidance=2.0)
    latents = torch.randn(1, *model.latent_shape(**SIZE), generator=torch.Generator().manual_seed(1))
    context, uncond = model.encode_prompts(["a green cross"]), model.encode_prompts([""])

    def gradients(chain):
        for p in params:
            p.grad = None
        x = chain.denoise(latents, context, uncond)
        x.square().mean().backward()
        return [p.grad.clone() for p in params]

    plain = gradients(chain)
    memory = ChainMemory(model.denoiser, 2, "64KiB")
    try:
        planned = gradients(chain.replace(memory=memory))
        planned_again = gradients(chain.replace(memory=memory))  # the first iteration measures; the second runs the plan
    finally:
        memory.revert()
    assert memory.counters["measured_steps"] >= 1
    assert sum(n for decision, n in memory.counters["calls"].items() if decision != "keep") > 0, memory.counters
    for a, b, c in zip(plain, planned, planned_again):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(c, a, rtol=1e-5, atol=1e-7)


def test_unsupported_pipeline_and_broken_folders(saved, tmp_path):
    _, folder = saved
    other = tmp_path / "sd"
    shutil.copytree(folder, other)
    index = json.loads((other / "model_index.json").read_text())
    (other / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(UserError, match="StableDiffusionPipeline; supported pipelines are TextToVideoSDPipeline, "
                                        "WanPipeline, CogVideoXPipeline"):
        load_model(other)
    (other / "model_index.json").write_text(json.dumps({k: v for k, v in index.items() if k != "_class_name"}))
    with pytest.raises(UserError, match="does not name its pipeline"):
        load_model(other)
    if index["_class_name"] == "WanPipeline":  # Wan 2.2 A14B: a second expert for the low-noise steps
        (other / "model_index.json").write_text(json.dumps({**index, "transformer_2": index["transformer"]}))
        with pytest.raises(UserError, match="two-expert WanPipeline"):
            load_model(other)
    else:  # CogVideoX 1.5: patches over time too
        (other / "model_index.json").write_text(json.dumps(index))
        config = json.loads((other / "transformer" / "config.json").read_text())
        (other / "transformer" / "config.json").write_text(json.dumps({**config, "patch_size_t": 2}))
        with pytest.raises(UserError, match="CogVideoX 1.5"):
            load_model(other)
    (other / "model_index.json").write_text(json.dumps(index))
    shutil.rmtree(other / "transformer")
    with pytest.raises(UserError, match="lacks transformer/"):
        load_model(other)


def cli(folder, prompts, out, *extra):
    return ["--model", str(folder), "--reward", "colorfulness", "--prompts", str(prompts), "--output", str(out), "--ddim-steps", "4",
            "--sample-steps", "2", "--num-frames", "9", "--height", "32", "--width", "32", "--num-held-out", "1",
            "--segments", "2", "--grad-steps", "all", "--lr", "1e-2", *extra]


def test_cli_fine_tunes_resumes_and_exports_for_the_stock_pipeline(saved, tmp_path):
    """Through the command line: two fine-tuning steps; one step then --resume to two gives the same LoRA bit for
    bit; the export's merged folder loads in the stock pipeline and its peft adapter, applied with the README's
    calls, predicts what the fine-tuned model predicts. Wan: the --original file (the original checkpoint's key
    names), loaded by diffusers' own load_lora_weights, predicts and samples as the engine's LoRA at the exported
    strength; CogVideoX: --original is refused and writes nothing."""
    import diffusers
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    import yaml
    from PIL import Image
    from safetensors.torch import load_file

    from engine.export import main as export
    from engine.lora import load_lora, set_lora_scale
    from engine.train import main as train

    _, folder = saved
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle moving left\na blue square moving up\na green cross moving right\n")
    train(cli(folder, prompts, tmp_path / "run", "--steps", "2"))
    train(cli(folder, prompts, tmp_path / "split", "--steps", "1"))
    train(["--resume", str(tmp_path / "split"), "--steps", "2"])
    lora = {run: load_file(str(tmp_path / run / "lora" / "adapter_model.safetensors")) for run in ("run", "split")}
    assert lora["run"].keys() == lora["split"].keys()
    assert all(torch.equal(lora["run"][k], lora["split"][k]) for k in lora["run"])
    assert any(v.abs().sum() > 0 for k, v in lora["run"].items() if "lora_B" in k)
    assert (tmp_path / "run" / "samples" / "before_after.png").stat().st_size > 0
    held_out = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["num_held_out"]
    played = Image.open(tmp_path / "run" / "samples" / "before_after.gif")  # a row per prompt: before, after
    assert played.n_frames == SIZE["num_frames"] and played.size == (8 + 6 * len("00") + 2 * (128 + 4), 16 + held_out * 128)

    export(["--model", str(folder), "--lora", str(tmp_path / "run" / "lora"), "--output", str(tmp_path / "export")])
    tuned = load_model(folder)
    load_lora(tuned.denoiser, tmp_path / "run" / "lora")
    pipeline = getattr(diffusers, tuned.pipeline_class)
    merged = pipeline.from_pretrained(str(tmp_path / "export" / "merged"))
    stock = pipeline.from_pretrained(str(folder))
    readme = (tmp_path / "export" / "peft" / "README.md").read_text()
    assert "inject_adapter_in_model(config, pipe.transformer)" in readme and tuned.pipeline_class in readme
    inject_adapter_in_model(LoraConfig.from_pretrained(str(tmp_path / "export" / "peft")), stock.transformer)
    set_peft_model_state_dict(stock.transformer, load_file(str(tmp_path / "export" / "peft" / WEIGHTS)))
    x = torch.randn(2, *tuned.latent_shape(**SIZE))
    context = tuned.encode_prompts(["a red circle moving left", ""])
    with torch.no_grad():
        expected = tuned.predict(tuned.denoiser, x, 500, context)
        assert torch.equal(tuned.predict(stock.transformer, x, 500, context), expected)
        torch.testing.assert_close(tuned.predict(merged.transformer, x, 500, context), expected, rtol=1e-4, atol=1e-5)
        base = tuned.predict(load_model(folder).denoiser, x, 500, context)
    assert (base - expected).abs().max() > 1e-4  # the LoRA changed the model: the equalities above mean something

    # Wan: the LoRA in the original checkpoint's names, read by diffusers' own loader of non-diffusers Wan LoRAs
    original = ["--model", str(folder), "--lora", str(tmp_path / "run" / "lora"), "--output", str(tmp_path / "export"),
                "--original", "--lora-scale", "0.5"]
    if not isinstance(tuned, WanVideo):
        with pytest.raises(SystemExit) as exit_info:
            export(original)
        assert exit_info.value.code == 2 and not (tmp_path / "export" / "original").exists()
        return
    export(original)
    written = load_file(str(tmp_path / "export" / "original" / "wan_lora.safetensors"))
    assert "diffusion_model.blocks.0.self_attn.q.lora_down.weight" in written
    assert "diffusion_model.blocks.0.cross_attn.o.alpha" in written
    assert not any("attn1" in k or "to_q" in k for k in written)
    loaded = pipeline.from_pretrained(str(folder))
    loaded.load_lora_weights(str(tmp_path / "export" / "original" / "wan_lora.safetensors"))
    set_lora_scale(tuned.denoiser, 0.5)
    with torch.no_grad():
        half = tuned.predict(tuned.denoiser, x, 500, context)
        torch.testing.assert_close(tuned.predict(loaded.transformer, x, 500, context), half, rtol=0, atol=1e-5)
    assert (half - expected).abs().max() > 1e-4 and (half - base).abs().max() > 1e-4
    # the whole stock pipeline, two steps from the same noise: as the engine's LoRA at that strength
    shape, prompt = (1, *tuned.latent_shape(**SIZE)), context[:1]
    frames = [pipe(prompt_embeds=prompt, negative_prompt_embeds=context[1:], num_inference_steps=2,
                   latents=torch.randn(shape, generator=torch.Generator().manual_seed(0)), output_type="latent",
                   num_frames=SIZE["num_frames"], height=SIZE["height"], width=SIZE["width"]).frames
              for pipe in (loaded, pipeline.from_pretrained(str(folder), transformer=tuned.denoiser))]
    torch.testing.assert_close(frames[0], frames[1], rtol=0, atol=1e-5)


def test_cli_decoder_recompute_trains_the_same_lora(saved, tmp_path):
    """--decode-recompute: two steps give the LoRA of two steps without it (the decoder's recompute is exact); a
    model whose VAE decodes frame by frame refuses it."""
    from safetensors.torch import load_file

    from engine.train import main as train

    _, folder = saved
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle moving left\na blue square moving up\n")
    for run, extra in (("kept", ()), ("recomputed", ("--decode-recompute",))):
        train(cli(folder, prompts, tmp_path / run, "--steps", "2", "--no-tensorboard", *extra))
    lora = {run: load_file(str(tmp_path / run / "lora" / "adapter_model.safetensors")) for run in ("kept", "recomputed")}
    for key, value in lora["kept"].items():  # the same gradients summed in another order, through AdamW's division
        torch.testing.assert_close(lora["recomputed"][key], value, rtol=1e-5, atol=1e-6)
    assert any(v.abs().sum() > 0 for k, v in lora["kept"].items() if "lora_B" in k)
    with pytest.raises(SystemExit) as exit_info:
        train(["--model", "tiny", "--decode-recompute", "--steps", "1", "--output", str(tmp_path / "tiny")])
    assert exit_info.value.code == 2 and not (tmp_path / "tiny").exists()


def test_cli_cached_text_encoder_trains_the_same_lora(saved, tmp_path):
    """--text-encoder cached through the family's own encode_prompt: the LoRA of the live encoder's run."""
    from safetensors.torch import load_file

    from engine.train import main as train

    _, folder = saved
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle moving left\na blue square moving up\n")
    for run in ("live", "cached"):
        train(cli(folder, prompts, tmp_path / run, "--steps", "2", "--no-tensorboard", "--text-encoder", run))
    lora = {run: load_file(str(tmp_path / run / "lora" / "adapter_model.safetensors")) for run in ("live", "cached")}
    for key, value in lora["live"].items():
        torch.testing.assert_close(lora["cached"][key], value, rtol=1e-5, atol=1e-7)


def test_wan_module_names_map_to_the_original_checkpoint():
    from engine.models.wan import original_module_name

    expected = {"blocks.3.attn1.to_q": "blocks.3.self_attn.q", "blocks.12.attn1.to_out.0": "blocks.12.self_attn.o",
                "blocks.0.attn2.to_v": "blocks.0.cross_attn.v", "blocks.1.attn2.add_k_proj": "blocks.1.cross_attn.k_img",
                "blocks.2.ffn.net.0.proj": "blocks.2.ffn.0", "blocks.2.ffn.net.2": "blocks.2.ffn.2",
                "proj_out": "head.head", "condition_embedder.time_proj": "time_projection.1",
                "condition_embedder.text_embedder.linear_2": "text_embedding.2",
                "condition_embedder.time_embedder.linear_1": "time_embedding.0",
                "patch_embedding": None, "blocks.0.norm2": None, "blocks.0.attn1.to_qk": None}
    assert {name: original_module_name(name) for name in expected} == expected


def test_cli_names_the_frame_count_a_causal_vae_needs(saved, tmp_path, capsys):
    from engine.train import main as train

    _, folder = saved
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\n")
    args = cli(folder, prompts, tmp_path / "run", "--steps", "1")
    args[args.index("--num-frames") + 1] = "8"
    with pytest.raises(SystemExit) as exit_info:
        train(args)
    assert exit_info.value.code != 0
    assert "--num-frames 8" in capsys.readouterr().err and not (tmp_path / "run").exists()


def test_segvr_and_tar_count_the_clip_frames_of_a_causal_vae(model):
    """SegVR splits the 9 decoded frames (not the 3 latent frames) into segments; TAR centres on frame 4."""
    from engine.rewards import ColorfulnessReward
    from engine.video_reward import SegmentalReward, tar_weights

    reward = ColorfulnessReward()
    latents = torch.randn(1, model.latent_shape(**SIZE)[0], 3, 4, 4)
    with torch.no_grad():
        video_reward, scores = SegmentalReward(reward, segments=3)(model, latents, ["a red circle"], train=False)
        frames = model.decode_prefix(latents, 3)[0, [0, 3, 6]]
        expected = reward(frames, ["a red circle"] * 3)
    torch.testing.assert_close(scores[0], expected)
    torch.testing.assert_close(video_reward[0], (tar_weights(torch.tensor([0, 3, 6]), 9, 1.0) * expected).mean())


def test_fused_lora_kernel_swapped_into_the_transformer_predicts_as_peft(model, monkeypatch):
    """engine.accelerate routes every LoRA projection of the transformer through the fused kernel (Triton's
    interpreter here): the same prediction and LoRA gradients as peft; the temporal-attention kernel has nothing
    to replace in a transformer; revert restores the peft forwards."""
    from engine.acceleration import accelerate
    from engine.lora import add_lora, lora_layers

    params = add_lora(model.denoiser, rank=2)
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.1)
    x = torch.randn(2, *model.latent_shape(**SIZE), generator=torch.Generator().manual_seed(2))
    context = model.encode_prompts(["a red circle", ""])

    def run():
        out = model.predict(model.denoiser, x, 500, context)
        return out, torch.autograd.grad(out.square().mean(), params)

    expected, expected_grads = run()
    lora_kernel = sys.modules["kernels.lora_linear"]  # the module (kernels.lora_linear is also its function)
    launches = []
    launcher = lora_kernel.lora_gemm
    monkeypatch.setattr(lora_kernel, "lora_gemm", lambda *a, **k: launches.append(1) or launcher(*a, **k))
    handle = accelerate(model.denoiser, backend="fused")
    try:
        assert handle.lora_layers == len(lora_layers(model.denoiser)) and handle.attention_processors == 0
        out, grads = run()
    finally:
        handle.revert()
    assert len(launches) > handle.lora_layers  # every projection's forward ran the kernel, and backward too
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    for a, b in zip(grads, expected_grads):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-6)
    assert all("forward" not in vars(layer) for layer in lora_layers(model.denoiser))


def test_sample_and_evaluate_commands_run_the_family(saved, tmp_path):
    """engine.sample writes 9-frame videos of the family's folder; engine.evaluate scores them with SegVR frames
    of the decoded clip; the default size of a folder is its family's (Wan 81 x 480 x 832, CogVideoX 49 x 480 x 720)."""
    from engine.evaluate import main as evaluate
    from engine.cli import check_common
    from engine.sample import main as sample

    _, folder = saved
    small = ["--ddim-steps", "2", "--num-frames", "9", "--height", "32", "--width", "32"]
    summary = sample(["--model", str(folder), "--prompt", "a red circle", "--output", str(tmp_path / "s"), *small])
    assert len(summary["videos"]) == 1 and (tmp_path / "s" / "000_a_red_circle.gif").stat().st_size > 0
    (tmp_path / "p.txt").write_text("a red circle\na blue square\n")
    report = evaluate(["--model", str(folder), "--reward", "colorfulness", "--prompt-set", f"shapes={tmp_path / 'p.txt'}",
                       "--segments", "3", "--output", str(tmp_path / "e"), *small])
    assert 0 < report["results"]["base"]["shapes"]["mean"] < 1
    args = type("Args", (), dict(guidance=3.0, eta=0.0, model=str(folder), num_frames=None, height=None, width=None,
                                 output=str(tmp_path / "x"), lora_scale="1"))
    assert check_common(args) == load_model(folder).default_size
