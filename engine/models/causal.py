"""``CausalVideoDiffusion``: the layout and decoding shared by the families whose VAE compresses time causally."""

from __future__ import annotations

import functools
from contextlib import contextmanager, nullcontext

import torch
from torch.utils._pytree import tree_leaves, tree_map
from torch.utils.checkpoint import checkpoint

from engine.errors import UserError
from engine.memory.tree import TensorSlots
from engine.models.base import VideoDiffusion


class ChunkRun:
    """The inputs of the decoder layers that a recomputed chunk recomputes each on its own, by position. A layer's
    checkpoint keeps only a box: its inputs stay in the box until the layer has run (so that no graded chunk keeps
    its layers' inputs, nor through them the causal cache they read, until backward) and are put back, box by box,
    when backward recomputes the chunk, before any layer needs them; there they stay until the layer's own
    recomputation, so that backward holds the inputs of the layers it has yet to reach only.

    A causal cache the chunk read without gradient is saved through the saved-tensor hooks around the chunk
    (``store``: ``ChainMemory`` spills it to the host). Where a box takes one of its tensors, the box holds a
    ``Stored`` in its place when backward recomputes the chunk: the tensor given back for that recomputation is
    let go once the layer has run, and asked of the hooks again for the layer's own recomputation. Backward then
    holds the cache of one such layer at a time, not the chunk's."""

    class Box:
        inputs = None
        uses_left = 0  # runs of the layer still to read the inputs: 1 in the chunk's forward, 2 in backward's

    class Stored:
        """The cache's tensor at ``index``, asked for when a layer runs."""

        def __init__(self, index: int):
            self.index = index

    def __init__(self):
        self.boxes: list[ChunkRun.Box] = []
        self.passes = self.cursor = 0
        self.unpack, self.packed = None, []  # the hooks' unpack and what their pack made of each cache tensor
        self.index_of: dict[int, int] = {}   # in the chunk's forward: id of a cache tensor -> its index
        self.boxed: set[int] = set()         # indices of the cache tensors that boxes take
        self.given: dict[int, torch.Tensor] = {}  # backward: tensors given back and not yet taken by their box

    @contextmanager
    def pass_(self):
        """One run of the chunk: the first fills new boxes, the recomputation the same ones in the same order."""
        self.passes, self.cursor = self.passes + 1, 0
        yield
        self.index_of = {}  # the boxes have taken what they take: the ids may be reused from here on

    def store(self, tensors: list[torch.Tensor]) -> None:
        """Save ``tensors`` (a cache without gradient) through the saved-tensor hooks in force (none, or ones that
        belong to a checkpoint: held as they are). Unpacking again is within the hooks' contract: autograd does it
        for every access to a saved tensor."""
        pack, self.unpack = _saved_tensor_hooks() or ((lambda t: t), (lambda t: t))
        self.packed = [pack(t) for t in tensors]
        self.index_of = {id(t): i for i, t in enumerate(tensors)}

    def given_back(self) -> list:
        """Backward: every stored tensor unpacked (in the order saved, as autograd would), a ``Stored`` in place of
        each that a box takes."""
        tensors = [self.unpack(p) for p in self.packed]
        self.given = {i: tensors[i] for i in self.boxed}
        return [ChunkRun.Stored(i) if i in self.boxed else t for i, t in enumerate(tensors)]

    def resolved(self, inputs):
        """``inputs`` with each ``Stored`` replaced by its tensor: the one given back if no layer took it yet, else
        asked for again."""
        def tensor(stored: ChunkRun.Stored):
            given = self.given.pop(stored.index, None)
            return self.unpack(self.packed[stored.index]) if given is None else given

        return tree_map(lambda t: tensor(t) if isinstance(t, ChunkRun.Stored) else t, inputs)

    def box(self) -> "ChunkRun.Box":
        if self.passes == 1:
            self.boxes.append(ChunkRun.Box())
        self.cursor += 1
        return self.boxes[self.cursor - 1]

    def checkpointed(self, function, *args, **kwargs):
        """``function(*args, **kwargs)``, recomputed in backward from its inputs in a box of this chunk. In the
        chunk's forward the layer runs once; in backward's recomputation of the chunk, once more, then again for
        its own backward."""
        box = self.box()
        box.inputs, box.uses_left = (args, kwargs), 1 if self.passes == 1 else 2
        if self.passes == 1:
            self.boxed.update(self.index_of[id(t)] for t in tree_leaves(box.inputs)
                              if isinstance(t, torch.Tensor) and id(t) in self.index_of)
        return checkpoint(_from_box, function, box, self, use_reentrant=False)

    def left(self, cache):
        """What a layer leaves for the next chunk (``cache``), or None in its place when backward recomputes the
        chunk: the next chunk has run by then, and a chunk reads its own layers' caches nowhere."""
        return tree_map(lambda t: None, cache) if self.passes > 1 else cache

    @staticmethod
    @contextmanager
    def replacing(modules: list, wrap):
        """Each module's forward replaced by ``wrap(module)`` inside (an instance attribute, removed after)."""
        for module in modules:
            module.forward = wrap(module)
        try:
            yield
        finally:
            for module in modules:
                del module.forward


def checkpoint_tensors(function, *args, **kwargs):
    """``function(*args, **kwargs)`` under a checkpoint that takes every tensor among its arguments, however nested,
    as an input of its own (saved through the hooks in force), so that the checkpoint holds none of them by
    reference (a causal cache comes in a dict)."""
    arguments, tensors = TensorSlots.split((args, kwargs))

    def call(*tensors):
        args, kwargs = arguments.rebuilt(tensors)
        return function(*args, **kwargs)

    return checkpoint(call, *tensors, use_reentrant=False)


def _saved_tensor_hooks():
    """The (pack, unpack) that a tensor saved now would go through, if set by ``saved_tensors_hooks`` rather than
    by a checkpoint (whose hooks expect autograd's own saves); else None."""
    hooks = torch._C._autograd._top_saved_tensors_default_hooks(False)
    if hooks is None or getattr(hooks[0], "_checkpoint_internal", False) or "checkpoint" in hooks[0].__module__:
        return None
    return hooks


def _from_box(function, box: ChunkRun.Box, run: ChunkRun):
    if box.inputs is None:
        raise RuntimeError(f"--decode-recompute: the inputs of {getattr(function, '__qualname__', function)} were "
                           "not put back before its recomputation")
    args, kwargs = _own_gradients(run.resolved(box.inputs))  # here: their gradients copied as soon as this layer's arrive
    box.uses_left -= 1
    if box.uses_left == 0:
        box.inputs = None
    return function(*args, **kwargs)


class _OwnGradient(torch.autograd.Function):
    """The identity, whose gradient is copied into a storage of its own where it arrives as a view of a larger one.

    A causal convolution concatenates its cache in front of its input, so the gradient its cache receives is a
    slice of the gradient of the whole concatenated input (``cat``'s backward). Between chunks that slice waits
    for the chunk before to run its backward, and would keep the whole input's gradient alive until then: a
    chunk-sized tensor for every causal convolution of the decoder."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        if grad.untyped_storage().nbytes() > grad.numel() * grad.element_size():
            return grad.clone(memory_format=torch.contiguous_format)
        return grad


def _own_gradients(cache):
    """``cache`` with every tensor that carries gradient passed through ``_OwnGradient``."""
    return tree_map(lambda t: _OwnGradient.apply(t) if isinstance(t, torch.Tensor) and t.requires_grad else t, cache)


class CausalVideoDiffusion(VideoDiffusion):
    """A family whose VAE compresses time causally: latent frame 0 holds pixel frame 0, latent frame k >= 1 pixel
    frames 4k-3 .. 4k (ratio 4), so a clip has 4k + 1 frames. Pixel frames depend on earlier latents only: the
    SegVR frames need the latents up to the last chosen one, not the clip's tail. Subclasses set ``text_length``,
    the tokens of the prompt embedding."""

    @property
    def temporal_ratio(self) -> int:
        raise NotImplementedError

    def latent_frames(self, num_frames: int) -> int:
        r = self.temporal_ratio
        if num_frames % r != 1:
            raise UserError(f"--num-frames {num_frames}: {self.family_label}'s causal VAE encodes {r}k + 1 frames; "
                            f"use e.g. {num_frames - num_frames % r + 1}")
        return (num_frames - 1) // r + 1

    def pixel_frames(self, latent_frames: int) -> int:
        return 1 + self.temporal_ratio * (latent_frames - 1)

    @property
    def family_label(self) -> str:
        return self.pipeline_class.removesuffix("Pipeline")

    @torch.no_grad()
    def embed_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Text embeddings [B, L, D] by the pipeline's own ``encode_prompt`` (its padding and truncation)."""
        embeds, _ = self.prompt_pipeline.encode_prompt(list(prompts), do_classifier_free_guidance=False,
                                                       max_sequence_length=self.text_length, device=self.device)
        return embeds

    @functools.cached_property
    def prompt_pipeline(self):
        """The pipeline whose ``encode_prompt`` the prompts go through: built once (its text encoder and tokenizer
        are this model's; training calls it every step)."""
        return self.pipeline()

    def to_unit(self, z: torch.Tensor) -> torch.Tensor:
        """VAE latent -> the denoiser's scaled latent."""
        return z * self.latent_scale

    def from_unit(self, latents: torch.Tensor) -> torch.Tensor:
        return latents / self.latent_scale

    @torch.no_grad()
    def encode_video(self, frames: torch.Tensor) -> torch.Tensor:
        """Frames [B, F, 3, H, W] in [-1, 1] -> scaled latents [B, C, f, h, w] (posterior mean, whole clip)."""
        self.latent_frames(frames.shape[1])
        video = frames.transpose(1, 2).to(self.device, self.vae.dtype)
        return self.to_unit(self.vae.encode(video).latent_dist.mode()).float()

    def decoded_prefix(self, needed: int, total: int) -> int:
        """How many leading latent frames to decode so the first ``needed`` come out as in a whole-clip decode."""
        return needed

    def latent_index(self, frame: int) -> int:
        """The latent frame that holds pixel frame ``frame``."""
        return 0 if frame == 0 else (frame - 1) // self.temporal_ratio + 1

    def decode_prefix(self, latents: torch.Tensor, needed: int, graded: set[int] | None = None) -> torch.Tensor:
        """The first latents [B, C, :n, h, w] (n from ``decoded_prefix``) -> frames [B, F', 3, H, W] in [0, 1].

        ``graded``: the latent frames decoded with gradient, the others (the causal context) without; the values
        are the same either way. None: all of them."""
        n = self.decoded_prefix(needed, latents.shape[2])
        z = self.from_unit(latents[:, :, :n].to(self.vae.dtype))
        if graded is None and self.decode_recompute:
            graded = set(range(n))  # every chunk with gradient, through the loop that can recompute them
        if graded is None or not torch.is_grad_enabled() or getattr(self.vae, "use_tiling", False):
            video = self.vae.decode(z).sample
        else:
            video = self.decode_selected(z, graded)
        return (video.float() * 0.5 + 0.5).clamp(0, 1).transpose(1, 2)

    def chunks(self, n: int) -> list[range]:
        """The groups of latent frames the VAE decodes together (one call each, the causal cache between them)."""
        return [range(i, i + 1) for i in range(n)]

    def decoded_with_gradient(self, graded: set[int], n: int) -> int:
        """How many of ``n`` decoded latent frames run with gradient when ``graded`` are the chosen ones."""
        return sum(len(c) for c in self.chunks(n) if any(k in c for k in graded))

    def decode_selected(self, z: torch.Tensor, graded: set[int]) -> torch.Tensor:
        """The VAE's own decode loop over ``chunks``, each with gradient only if it holds a graded frame."""
        raise NotImplementedError

    # The decoder's activations of a chunk decoded with gradient are most of what a step saves at real size (a
    # latent frame is 4 pixel frames at full resolution through every up-block). With ``decode_recompute`` each
    # such chunk keeps only its input and runs again in backward: one more decoder forward of the graded chunks for
    # their activations. The causal cache it read (the last frames of every causal convolution's input, at every
    # resolution: a few GB a chunk at 480x832) is not kept either where the chunks before it decoded without
    # gradient: backward decodes them again, without gradient, for it. Exact (the decoder draws no random numbers).
    decode_recompute = False

    def decode_chunks(self, run, x: torch.Tensor, cache, graded: set[int]) -> list[torch.Tensor]:
        """The decode loop: ``run(x[:, :, chunk], cache, first) -> (frames, cache)`` over ``chunks`` (``first``: the
        clip's first chunk), each with gradient only if it holds a graded latent frame; ``cache``: the causal cache
        before the first chunk."""
        chunks, frames, initial = self.chunks(x.shape[2]), [], cache
        for chunk in chunks:
            with torch.set_grad_enabled(any(k in chunk for k in graded)):
                made_with_gradient = any(isinstance(t, torch.Tensor) and t.requires_grad for t in tree_leaves(cache))
                if not self.context_gradient:  # the context passes no gradient, whether or not it was chosen too
                    cache = tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, cache)
                if self.decode_recompute and torch.is_grad_enabled():
                    out, cache = self._recomputed_chunk(run, x, chunks, chunk, cache, initial, made_with_gradient)
                else:
                    out, cache = run(x[:, :, chunk.start:chunk.stop], cache, chunk.start == 0)
            frames.append(out)
        return frames

    def _recomputed_chunk(self, run, x, chunks, chunk, cache, initial, kept):
        """One chunk run again in backward. Its cache is kept for backward where ``kept`` (the chunk before decoded
        with gradient, so forward made the cache at no extra cost): as an input of the checkpoint where it carries
        gradient (``--decode-context grad``), else saved through ``ChunkRun.store``. Otherwise backward decodes
        the chunks before it again, without gradient. Inside, ``layers_recomputed`` may recompute the decoder's
        layers each on its own (``ChunkRun``)."""
        part, first = x[:, :, chunk.start:chunk.stop], chunk.start == 0
        context, held, layers = x[:, :, :chunk.start].detach(), [cache], ChunkRun()
        # a kept cache is saved as its tensors, through the saved-tensor hooks around (ChainMemory.region may spill
        # them to the host); a nested structure would be held as is
        structure, tensors = TensorSlots.split(cache)
        graded = kept and any(t.requires_grad for t in tensors)
        if kept and not graded:
            layers.store(tensors)

        def again(part, *graded_cache):
            if held[0] is not None:
                read = held[0]
            elif graded:
                read = _own_gradients(structure.rebuilt(graded_cache))
            elif kept:
                read = structure.rebuilt(layers.given_back())
            else:  # the cache this chunk read, again
                with torch.no_grad():
                    read = initial
                    for before in chunks[:chunks.index(chunk)]:
                        read = run(context[:, :, before.start:before.stop], read, before.start == 0)[1]
            with layers.pass_(), self.layers_recomputed(layers):
                return run(part, read, first)

        out = checkpoint(again, part, *(tensors if graded else []), use_reentrant=False)
        held[0] = tensors = None  # backward reads the saved cache or replays the context
        return out

    def layers_recomputed(self, layers: "ChunkRun"):
        """Inside a recomputed chunk: the family's decoder layers recomputed each on its own in backward (through
        ``layers``), or nothing more."""
        return nullcontext()

    def decode_frames(self, latents: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """The chosen frames from the shortest exact prefix; with ``context_gradient`` off (the default) only the
        latent frames that hold a chosen frame decode with gradient: the decoder's activations are saved for those
        alone, and the reward's gradient does not flow through the causal cache into earlier chunks' latents, also
        where an earlier chunk holds a chosen frame: each chosen frame's gradient reaches its own chunk only."""
        chosen = {self.latent_index(int(i)) for i in indices.flatten()}
        video = self.decode_prefix(latents, max(chosen) + 1, None if self.context_gradient else chosen)
        b, s = indices.shape
        index = indices.to(video.device).view(b, s, 1, 1, 1).expand(b, s, *video.shape[2:])
        return video.gather(1, index).flatten(0, 1)

    @torch.no_grad()
    def decode_video(self, latent: torch.Tensor, chunk: int = 8) -> torch.Tensor:
        """The whole clip in one decode (a causal VAE carries its cache through it; ``chunk`` does not apply)."""
        return self.decode_prefix(latent[None], latent.shape[1])[0].cpu()
