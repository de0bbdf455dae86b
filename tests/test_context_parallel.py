"""Context parallelism (engine/context_parallel.py, ``--context-parallel``): two gloo processes splitting one clip's
tokens, each holding half of the frozen weights (FSDP), give the LoRA gradient of one process, through the editing
chain with the chain-memory planner, the causal decoder and the reward, and the trainer's two-process run trains
one process's LoRA; what has no plan, or no process group, is refused with the fix.

Run as a script under torchrun (``python -m torch.distributed.run --nproc_per_node 2 tests/test_context_parallel.py
OUT``), each process writes what it measured to OUT/rank<N>.json."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from engine.context_parallel import ContextParallel, supports_context_parallel
from engine.errors import UserError
from engine.models import tiny_model

ROOT = Path(__file__).resolve().parents[1]


def lora_gradient(split: bool) -> dict[str, torch.Tensor]:
    """One step's LoRA gradient on tiny Wan: edit (K = 2 of 4 steps, the planner at its least budget), decode the
    SegVR frames, colourfulness with TAR; with ``split`` the clip's tokens are split across the processes."""
    from engine.chain import EditChain
    from engine.distributed import ShardedGenerator, World
    from engine.lora import add_lora
    from engine.memory import ChainMemory
    from engine.rewards import ColorfulnessReward
    from engine.video_reward import SegmentalReward, reward_loss

    model = tiny_model(seed=0, family="wan")
    torch.manual_seed(1)
    lora = add_lora(model.denoiser, 4)
    for p in lora:
        torch.nn.init.normal_(p, std=0.05)  # B is zero at the start: a gradient that reaches A needs it non-zero
    parallel = ContextParallel(model.denoiser) if split else None
    if split:  # each process holds its half of every frozen weight; LoRA stays whole
        frozen = [p for p in model.denoiser.parameters() if not p.requires_grad]
        assert sum(p.to_local().numel() for p in frozen) <= 0.6 * sum(p.numel() for p in frozen)
        assert not any(hasattr(p, "to_local") for p in model.denoiser.parameters() if p.requires_grad)
    memory = ChainMemory(model.denoiser, 2, budget=1)  # below the least: every unit spilled and recomputed
    chain = EditChain(model, ddim_steps=4, tau=1.0, grad_steps=2, memory=memory)
    latents = torch.randn(1, *model.latent_shape(9, 32, 32), generator=torch.Generator().manual_seed(2))
    prompts = ["a red ball moving left"]
    draws = ShardedGenerator(torch.Generator().manual_seed(3), World())
    edited = chain.edit(latents, model.encode_prompts(prompts), model.encode_prompts([""]), draws)
    rewards, _ = SegmentalReward(ColorfulnessReward(), 2)(model, edited, prompts, generator=draws)
    reward_loss(rewards).backward()
    if parallel is not None:
        parallel.reduce_gradients(lora)
    memory.revert()
    return {name: p.grad for name, p in model.denoiser.named_parameters() if p.requires_grad}


def worker(out: Path) -> None:
    dist.init_process_group("gloo")
    one, split = lora_gradient(False), lora_gradient(True)
    assert one.keys() == split.keys()
    error = max(((split[k] - one[k]).abs().max() / one[k].abs().max().clamp_min(1e-12)).item() for k in one)
    scale = max(g.abs().max().item() for g in one.values())
    (out / f"rank{dist.get_rank()}.json").write_text(json.dumps({"relative_error": error, "largest": scale}))
    dist.destroy_process_group()


@pytest.mark.heavy(1)
def test_two_processes_splitting_the_clip_give_one_process_gradient(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                             "29531", str(Path(__file__)), str(tmp_path)], capture_output=True, text=True,
                            timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    for rank in range(2):
        measured = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert measured["largest"] > 0
        assert measured["relative_error"] < 1e-4, measured


@pytest.mark.heavy(2)
def test_trainer_with_two_processes_splitting_each_clip_trains_one_process_lora(tmp_path):
    """python -m engine.train --context-parallel under torchrun (2 processes, each on the whole batch of tiny Wan
    clips and half of their tokens): after two steps, with a held-out evaluation between them, the LoRA of the
    same run in one process."""
    from safetensors.torch import load_file

    from engine.train import main as train

    folder = tiny_model(seed=0, family="wan").save(tmp_path / "wan")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle moving left\na blue square moving up\na green ball moving right\n")
    args = ["--model", str(folder), "--reward", "colorfulness", "--prompts", str(prompts), "--ddim-steps", "4",
            "--sample-steps", "2", "--num-frames", "9", "--height", "32", "--width", "32", "--num-held-out", "1",
            "--segments", "2", "--grad-steps", "2", "--lr", "1e-2", "--steps", "2", "--eval-every", "1",
            "--no-tensorboard", "--no-grad-path", "off"]
    train([*args, "--output", str(tmp_path / "one")])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                             "29532", "-m", "engine.train", *args, "--context-parallel", "--output", str(tmp_path / "two")],
                            capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = (load_file(str(tmp_path / run / "lora" / "adapter_model.safetensors")) for run in ("one", "two"))
    assert one.keys() == two.keys()
    assert any(v.abs().sum() > 0 for k, v in one.items() if "lora_B" in k)
    for key in one:  # the gradients agree to ~1e-5 of their scale (above); Adam's division by each element's own
        # running magnitude makes an element with a gradient near 0 move by a step its rounding decides
        torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-3 * one[key].abs().max().item())


def test_refused_without_a_process_group_or_a_plan(tmp_path):
    wan, cogvideox = tiny_model(family="wan").denoiser, tiny_model(family="cogvideox").denoiser
    assert supports_context_parallel(wan) and not supports_context_parallel(cogvideox)
    with pytest.raises(UserError, match="launch with torchrun"):
        ContextParallel(wan)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        with pytest.raises(UserError, match="CogVideoXTransformer3DModel has no context-parallel plan"):
            ContextParallel(cogvideox)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
