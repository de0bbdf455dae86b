"""InstructVideo reward fine-tuning: ``python -m engine.train [--config FILE] [--flags]``.

With no arguments it fine-tunes the built-in world model with its built-in reward on the CPU in a few minutes.
On a real model:

    python -m engine.train --model /weights/text-to-video-ms-1.7b \
        --reward hpsv2:/weights/HPS_v2.1_compressed.pt --videos /data/clips --steps 20000
    torchrun --nproc_per_node 4 -m engine.train ...        # data parallel; --batch-size is the global batch
    python -m engine.train --resume runs/my-run            # continue from the last checkpoint

Each step: pick source videos, noise their latents to fraction tau of the D-step chain, run the remaining steps
with classifier-free guidance (gradient through the last K), decode the SegVR frames, score them with the reward
weighted by TAR, and update the LoRA weights. Outputs (in ``--output``): config.yaml, metrics.jsonl,
checkpoint.pt, lora/ (peft safetensors), reward_curve.png and samples/ (before/after mp4, GIF, PNG grids; the
held-out edits).

``--finetune full`` trains every denoiser weight instead (the baseline the benchmarks compare against), sharded
with FSDP under torchrun, and writes unet/ or transformer/ (diffusers layout, by the pipeline's name) in place of
lora/.

The recipe is ``engine.train.recipe`` (setup, the loop, finish), run by ``engine.train.command``; the files beside
it hold what the loop calls.
"""

from engine.train.command import main
from engine.train.recipe import Stop, Trainer

__all__ = ["Stop", "Trainer", "main"]
