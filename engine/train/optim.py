"""The update: AdamW with linear warm-up and the fp16 loss scaler, and one step of it (backward, average over
processes, clip, update) that skips non-finite losses and gradients without touching any state."""

from __future__ import annotations

import math

import torch

from engine import distributed as dist_utils


def make_optimizer(trainable, lr: float, weight_decay: float, warmup_steps: int, device: torch.device,
                   fp16: bool, sharded: bool):
    """(AdamW, its warm-up LambdaLR, the loss scaler: enabled for fp16; sharded, every rank must see an overflow
    in any shard, which ShardedGradScaler agrees on)."""
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=weight_decay)
    warmup = max(1, warmup_steps)
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
    if sharded:
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler as Scaler
    else:
        from torch.amp import GradScaler as Scaler
    return optimizer, lr_scheduler, Scaler(device.type, enabled=fp16)


def optimizer_step(loss: torch.Tensor, trainable, optimizer, lr_scheduler, scaler, max_grad_norm: float,
                   world, reduce=None) -> tuple[str, float]:
    """Backward, average over processes, clip, update; returns (outcome, grad norm). ``reduce(trainable)``, when
    given, combines the processes' gradients after backward (context parallelism sums them).

    outcome is "updated"; "skipped" for a non-finite loss or gradient (weights, optimizer, scheduler and
    scaler state untouched); or "overflow" when fp16 loss scaling overflowed and the scaler lowered its scale.
    """
    scaler.scale(loss).backward()  # DDP (LoRA) or FSDP (full) averages the gradients over ranks
    if reduce is not None:
        reduce(trainable)
    scaler.unscale_(optimizer)
    max_norm = max_grad_norm if max_grad_norm > 0 else math.inf
    grad_norm = dist_utils.total(torch.nn.utils.clip_grad_norm_(trainable, max_norm))
    loss_finite = math.isfinite(loss.item())
    outcome = "updated"
    if not dist_utils.all_ranks_agree(loss_finite and math.isfinite(grad_norm), world):
        outcome = "overflow" if scaler.is_enabled() and loss_finite else "skipped"
    if outcome == "updated":
        scaler.step(optimizer)
        lr_scheduler.step()
    # a skip leaves the scale as it was; update() still runs, since the scaler must be reset after unscale_()
    scaler.update(new_scale=scaler.get_scale() if outcome == "skipped" else None)
    optimizer.zero_grad(set_to_none=True)
    return outcome, grad_norm
