"""``python -m engine.train ... --dry-run``: will this run fit? One training step of the configuration, counted on the
meta device before any weight is read, and the plan it would run with.

The run's own code takes the step (``Trainer.loss_step``, backward, the optimizer step) on the model built from its
configs alone (``load_architecture``; a built-in preset is moved to the meta device) and the reward's architecture
(``reward_architecture``), under the run's memory policy: the chain-memory planner measures its units and plans
exactly as it would on the device. Counted, exactly and on any machine (``engine.counting``):

- device peak: the weights as the run stores them, the trainable weights' AdamW state, and the highest the
  step's own tensors (activations, what is saved for backward, gradients, every op's output) reach;
- host: what the plan spills to host memory at its highest;
- TFLOP per step, and the same step with every saved tensor kept (no recompute), for the recompute overhead;
- bytes saved for backward on the device (autograd's saved tensors, as ``SavedTensorMeter`` counts them).

What is modelled rather than run: bf16 autocast on CUDA runs the step in bf16 (autocast keeps a few ops, such as
norms and softmax, in fp32, so activations are slightly underestimated there); attention takes the fused kernel's
memory (output and log-sum-exp kept, ``fused_attention_on_meta``); an op's internal workspace is not seen; the fused
Triton kernels are counted as their PyTorch references. ``--world-size N`` forecasts one of N processes: LoRA
runs the whole model on its share of the batch; full fine-tuning shards weights, gradients and optimizer state
N ways (one block gathered at a time); with ``--context-parallel`` the N processes split each clip's tokens
instead (``engine.context_parallel``, run under a fake process group of N ranks: its collectives move nothing, and
every tensor has the shape it has on rank 0) and shard the frozen weights, counted as FSDP holds them (FSDP runs
no step on meta tensors: the count takes the model whole and the weights' bytes are the shards').
"""

from __future__ import annotations

import dataclasses
import io
import time
from contextlib import contextmanager, nullcontext, redirect_stdout

import torch
import torch.distributed as dist

from csrc import STAT_NAMES
from engine.builtin import build_model, builtin
from engine.config import TrainConfig
from engine.context_parallel import sharded_blocks
from engine.counting import FlopCount, LiveBytes, ModulePath, NoGradReuse, fused_attention_on_meta
from engine.distributed import World
from engine.errors import UserError
from engine.memory import DEFAULT_RATES, SavedTensorMeter, denoiser_blocks
from engine.models import VideoDiffusion
from engine.models.loading import load_architecture
from engine.rewards.registry import reward_architecture
from engine.runtime import autocast_dtype, frozen_dtype, quiet_casts
from engine.train.sources import setup_draws

GB = 1e9


@dataclasses.dataclass
class Forecast:
    """One step of a configuration, counted (bytes, FLOPs); see the module docstring for what each counts."""

    model: str
    target: str                  # the device the run is forecast for ("cuda" or "cpu")
    compute_dtype: str           # what the step runs in there (bf16 autocast, or fp32)
    world_size: int
    context_parallel: bool
    batch_per_process: int
    clip: tuple[int, int, int]   # frames, height, width
    steps_run: int
    grad_steps: int
    weights: dict[str, int]      # component -> bytes on the device, as the run stores them
    trainable_params: int
    optimizer_bytes: int         # AdamW's two moments of the trainable weights (this process's shard)
    step_peak: int               # the step's own tensors at their highest (activations, gradients, outputs)
    peak_at: str                 # the innermost module running when they were, in forward or backward
    saved_bytes: int             # saved for backward on the device
    host_peak: int               # spilled to host memory at the highest
    tflop: float
    tflop_without_recompute: float
    plan: str                    # the chain-memory plan's table (or what the memory policy does)
    seconds: float

    @property
    def device_peak(self) -> int:
        return sum(self.weights.values()) + self.optimizer_bytes + self.step_peak

    def summary(self) -> dict:
        """The figures in GB and TFLOP (the dry run's JSON line and the benchmark's record)."""
        return {"model": self.model, "target": self.target, "compute_dtype": self.compute_dtype,
                "world_size": self.world_size, "context_parallel": self.context_parallel, "device_peak_gb": self.device_peak / GB,
                "weights_gb": {k: v / GB for k, v in self.weights.items()}, "optimizer_gb": self.optimizer_bytes / GB,
                "step_peak_gb": self.step_peak / GB, "peak_at": self.peak_at, "saved_gb": self.saved_bytes / GB, "host_gb": self.host_peak / GB,
                "tflops": self.tflop, "tflops_without_recompute": self.tflop_without_recompute,
                "trainable_params": self.trainable_params}

    def render(self) -> str:
        frames, height, width = self.clip
        ratio = self.tflop / self.tflop_without_recompute if self.tflop_without_recompute else float("nan")
        weights = ", ".join(f"{k} {v / GB:.2f}" for k, v in self.weights.items())
        lines = [
            f"dry run: {self.model}, {frames} frames of {height} x {width}, {self.steps_run} steps run, gradient "
            f"through {self.grad_steps}, batch {self.batch_per_process} per process"
            + (f" ({self.world_size} processes{', each clip split across them' if self.context_parallel else ''})"
               if self.world_size > 1 else "")
            + f"; forecast for {self.target} in {self.compute_dtype}",
            f"  device peak      {self.device_peak / GB:8.2f} GB",
            f"    weights        {sum(self.weights.values()) / GB:8.2f} GB  ({weights})",
            f"    AdamW state    {self.optimizer_bytes / GB:8.2f} GB  ({self.trainable_params:,} trainable parameters)",
            f"    step           {self.step_peak / GB:8.2f} GB  at its highest, in {self.peak_at} (of which saved "
            f"for backward on the device: {self.saved_bytes / GB:.2f} GB)",
            f"  host memory      {self.host_peak / GB:8.2f} GB  spilled by the plan at its highest",
            f"  compute          {self.tflop:8.2f} TFLOP per step, {ratio:.2f}x the "
            f"{self.tflop_without_recompute:.2f} of the same step with nothing recomputed",
            "  plan:", *("    " + line for line in self.plan.splitlines()),
            f"(counted on the meta device in {self.seconds:.0f} s"
            + ("; the built-in model's weights read, the run's none)" if builtin(self.model) else "; no weight read)"),
        ]
        return "\n".join(lines)


def forecast(config: TrainConfig, world_size: int = 1) -> Forecast:
    """Count one step of ``config`` for one of ``world_size`` processes (splitting each clip's tokens with
    ``--context-parallel``, else the batch); see the module docstring."""
    started = time.perf_counter()
    context_parallel = config.context_parallel
    if world_size < 1 or (config.batch_size % world_size and not context_parallel):
        raise UserError(f"--batch-size {config.batch_size} (the global batch) must be divisible by --world-size "
                        f"{world_size}")
    if context_parallel and world_size == 1:
        raise UserError("--dry-run --context-parallel needs --world-size N: the processes that split each clip")
    shares = 1 if context_parallel else world_size
    target = "cpu" if config.device == "cpu" else "cuda"
    compute = autocast_dtype(config.precision, torch.device(target)) or torch.float32
    with quiet_casts(), _process_group(world_size if context_parallel else 1):
        counted = _counted_step(config, world_size, shares, target, compute)
        with redirect_stdout(io.StringIO()):  # the same model and reward again: their lines were printed once
            kept = dataclasses.replace(config, checkpoint="none", decode_recompute=False)  # every saved tensor kept
            plain = _counted_step(kept, world_size, shares, target, compute, flops_only=True)
    frames, height, width = config.num_frames, config.height, config.width
    return Forecast(config.model, target, str(compute).removeprefix("torch."), world_size, context_parallel,
                    config.batch_size // shares, (frames, height, width), counted["steps_run"],
                    counted["grad_steps"], counted["weights"], counted["trainable_params"], counted["optimizer_bytes"],
                    counted["step_peak"], counted["peak_at"], counted["saved"], counted["host"], counted["flops"] / 1e12,
                    plain["flops"] / 1e12, counted["plan"], time.perf_counter() - started)


def architecture(spec: str) -> VideoDiffusion:
    """The model a ``--model`` value names, on the meta device, without reading its weights where it can."""
    if builtin(spec) is not None:  # the built-in presets are small: built as usual, then moved
        return build_model(spec, 0, "cpu").to("meta")
    return load_architecture(spec)


def _stored_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's parameters and buffers as loaded (before the step's dtype is applied)."""
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def _sharded_bytes(denoiser: torch.nn.Module, world_size: int) -> int:
    """A process's denoiser weights (before LoRA is added: all frozen) when FSDP shards them per block
    (``sharded_blocks``): its share of the blocks', two blocks gathered whole beside it (the one running and the
    next, which FSDP prefetches), and the rest (embeddings, head) whole, gathered for every call and its backward."""
    blocks = [sum(p.numel() * p.element_size() for p in block.parameters()) for block in sharded_blocks(denoiser)]
    return sum(blocks) // world_size + 2 * max(blocks) + _stored_bytes(denoiser) - sum(blocks)  # buffers: whole


@contextmanager
def _process_group(size: int):
    """A fake process group of ``size`` ranks (this one rank 0) for the count's collectives; none for 1."""
    if size == 1:
        yield
        return
    if dist.is_initialized():
        raise UserError("--dry-run --context-parallel counts in a process of its own: run it without torchrun")
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=size)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _counted_step(config: TrainConfig, world_size: int, shares: int, target: str, compute: torch.dtype,
                  flops_only: bool = False) -> dict:
    """One step of the run's code on the meta device, counted: the trainer holds the meta model, the reward's
    architecture and the run's memory policy, and takes its step; the batch is split in ``shares`` (the tokens of
    each clip, under a process group of ``world_size`` ranks, when it is not)."""
    from engine.train.recipe import Trainer

    cfg = dataclasses.replace(config, batch_size=config.batch_size // shares)
    trainer = Trainer(cfg)
    trainer.world = trainer.data_world = World()  # one process counted; the others are shares of batch or tokens
    trainer.device, trainer.amp_dtype = torch.device("meta"), None
    trainer.frozen = frozen_dtype(cfg.frozen_dtype, cfg.precision, torch.device(target))
    model, reward = architecture(cfg.model), reward_architecture(cfg.reward)
    trainer._setup_model(model, reward)  # the frozen weights in the dtype the run holds them in
    weights = {"denoiser": _stored_bytes(model.denoiser), "vae": _stored_bytes(model.vae),
               "text encoder": _stored_bytes(model.text_encoder), "reward": _stored_bytes(reward)}
    if cfg.text_encoder == "cached":  # the encoder waits in host memory; the embeddings are a few MB
        weights["text encoder"] = 0
    if cfg.context_parallel:  # the frozen weights sharded across the processes (engine.context_parallel)
        weights["denoiser"] = _sharded_bytes(model.denoiser, world_size)
    if compute != torch.float32:  # autocast, modelled: the step computes in ``compute``
        for module in (model.denoiser, model.vae, model.text_encoder, reward):
            module.to(compute)
    setup_draws(trainer)
    trainer.uncond = _text_embeddings(model, 1, compute)
    trainer._check_steps()
    trainer._setup_step()
    if trainer.memory is not None:  # the planner weighs recompute against copies at the target's rates, not meta's
        rates = DEFAULT_RATES[target]
        trainer.memory.rates = rates if trainer.memory.rates.host_bytes_per_s > 0 else rates._replace(host_bytes_per_s=0.0)
    trainable = sum(p.numel() for p in trainer.trainable)
    if cfg.finetune == "lora":
        weights["LoRA"] = 4 * trainable  # fp32, as the run keeps them
    elif world_size > 1:  # FSDP: a shard of every weight, one block gathered at a time
        largest = max(sum(p.numel() for p in block.parameters()) * 4 for block in denoiser_blocks(model.denoiser))
        weights["denoiser"] = weights["denoiser"] // world_size + largest

    latents = torch.randn(cfg.batch_size, *trainer.latent_shape, device="meta", dtype=compute)
    prompts = ["a red ball moving left"] * cfg.batch_size
    context = _text_embeddings(model, cfg.batch_size, compute)

    phase = ["forward"]

    def step(saving=nullcontext()):
        phase[0] = "forward"
        with saving:  # what the forward saves for backward; the meter holds what it counts until it exits
            loss, _ = trainer.loss_step(latents, prompts, context)
        phase[0] = "backward"
        loss.backward()

    with fused_attention_on_meta(), NoGradReuse(model.denoiser):  # each step in a FlopCount: the kernels' reference
        if trainer.memory is not None and not flops_only:
            with FlopCount():  # the planner measures its units on the first step, as it would on the device
                step()
            trainer.optimizer.zero_grad(set_to_none=True)
            trainer.memory.store.reset_peaks()
        saved = SavedTensorMeter(model.denoiser, model.vae, model.text_encoder, reward)
        modules = ModulePath(denoiser=model.denoiser, vae=model.vae, reward=reward)
        where = lambda: (f"{modules.current()} ({phase[0]})" if modules.current() else  # noqa: E731
                         "autograd's backward" if phase[0] == "backward" else "the forward, between modules")
        with modules, FlopCount() as flops, LiveBytes("meta", where=where) as live:
            step(saved if not flops_only else nullcontext())
    # gradients of trainable weights held in ``compute`` during the counted step are fp32 in the run
    grad_correction = trainable * (4 - torch.tensor([], dtype=compute).element_size()) if cfg.finetune == "full" else 0
    shards = world_size if cfg.finetune == "full" else 1
    memory = trainer.memory
    host = dict(zip(STAT_NAMES, memory.store.stats()))["peak_host_bytes"] if memory is not None else 0
    return {"weights": weights, "trainable_params": trainable, "optimizer_bytes": 2 * 4 * trainable // shards,
            "step_peak": live.peak + grad_correction // shards, "peak_at": live.peak_at or "", "saved": saved.bytes if not flops_only else 0,
            "host": host, "flops": flops.total, "steps_run": trainer.chain.steps_run,
            "grad_steps": trainer.chain.grad_steps, "plan": _plan_text(cfg, memory)}


def _text_embeddings(model: VideoDiffusion, count: int, dtype: torch.dtype) -> torch.Tensor:
    """``count`` prompts' embeddings in the shape the model's text encoder gives them, [count, L, D] (L: the tokens the
    pipeline pads to, D: the encoder's width); their values change no count. The encoder itself runs before the
    step, without gradient, and is not counted."""
    length = getattr(model, "text_length", None) or model.tokenizer.model_max_length
    config = model.text_encoder.config
    width = getattr(config, "d_model", None) or config.hidden_size
    return torch.zeros(count, length, width, device="meta", dtype=dtype)


def _plan_text(cfg: TrainConfig, memory) -> str:
    if memory is None:
        return {"blocks": "every denoiser block recomputed in backward (--checkpoint blocks)",
                "none": "every saved tensor kept (--checkpoint none)"}[cfg.checkpoint]
    summary = memory.plan.summary() if memory.plan is not None else {}
    head = (f"chain-memory planner, budget {cfg.memory_budget}: " +
            ", ".join(f"{name} {count}" for name, count in summary.get("counts", {}).items()))
    return head + "\n" + memory.table()
