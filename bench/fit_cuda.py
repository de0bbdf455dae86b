"""``--dry-run``'s device peak beside the peak a real step reaches on the GPU (``torch.cuda.max_memory_allocated``).

The forecast counts one step on the meta device from the model's configs; this runs the same configuration for
real on CUDA (tiny random models of each family, saved and loaded as a user's folder would be) and measures the
peak of a training step after two warm-up steps (AdamW's state exists, the planner has measured its units), the
held-out and base-model outputs already made. Run by ``bench/gpu.sh fit``; on a machine without CUDA,
``--smoke`` runs the same code on the CPU at a smaller shape with nothing measured, so that the script cannot rot
unseen.

    python -m bench.fit_cuda --out fit_cuda.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
from pathlib import Path

import torch

from engine.config import resolve_config
from engine.models import tiny_model
from engine.train.forecast import forecast
from engine.train.recipe import Trainer

GB = 1e9
SHAPE = ["--num-frames", "33", "--height", "128", "--width", "128", "--batch-size", "1"]  # activations well above workspaces
SMOKE_SHAPE = ["--num-frames", "9", "--height", "32", "--width", "32", "--batch-size", "1"]
RUN = ["--reward", "colorfulness", "--ddim-steps", "6", "--grad-steps", "2", "--segments", "2", "--sample-steps", "2",
       "--num-held-out", "1", "--steps", "3", "--no-tensorboard"]
CASES = {  # name: (family, options)
    "unet3d plan": ("unet3d", ["--checkpoint", "plan"]),
    "wan plan + decode recompute": ("wan", ["--checkpoint", "plan", "--decode-recompute"]),
    "wan blocks": ("wan", ["--checkpoint", "blocks"]),
    "cogvideox plan + decode recompute": ("cogvideox", ["--checkpoint", "plan", "--decode-recompute"]),
}


def measured_peak(config) -> int | None:
    """The peak allocated bytes of a real training step (the third), or None on the CPU (the step still runs)."""
    cuda = config.device.startswith("cuda")
    trainer = Trainer(config).setup()
    latents = torch.randn(config.batch_size, *trainer.latent_shape, device=trainer.device)
    prompts = ["a red ball moving left"] * config.batch_size
    context = trainer.model.encode_prompts(prompts)
    for step in range(3):
        if step == 2 and cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        loss, _ = trainer.loss_step(latents, prompts, context)
        trainer.optimizer_step(loss)
        del loss
    if not cuda:
        return None
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


def compare(name: str, family: str, options: list[str], device: str, shape: list[str], work: Path) -> dict:
    folder = tiny_model(seed=0, family=family).save(work / family)
    prompts = work / "prompts.txt"
    prompts.write_text("a red ball moving left\na blue cube moving up\n")
    config = resolve_config(["--model", str(folder), "--device", device, "--output", str(work / "run"),
                             "--overwrite", "--prompts", str(prompts), *shape, *RUN, *options])
    predicted = forecast(config)
    real = measured_peak(dataclasses.replace(config, output=str(work / f"run-{family}")))
    row = {"case": name, "options": options, "forecast_gb": predicted.device_peak / GB,
           "forecast_step_gb": predicted.step_peak / GB, "peak_at": predicted.peak_at,
           "measured_gb": None if real is None else real / GB}
    if real is not None:
        row["forecast_over_measured"] = predicted.device_peak / real
    return row


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the rows here as JSON")
    parser.add_argument("--smoke", action="store_true", help="no CUDA: run the same code on the CPU, measuring nothing")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() and not args.smoke:
        raise SystemExit("bench.fit_cuda measures a CUDA peak and this machine has no GPU; --smoke runs its code on "
                         "the CPU")
    device, shape = ("cpu", SMOKE_SHAPE) if args.smoke else ("cuda", SHAPE)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, (family, options) in CASES.items():
            rows.append(compare(name, family, options, device, shape, Path(tmp)))
            row = rows[-1]
            measured = "not measured" if row["measured_gb"] is None else (
                f"measured {row['measured_gb'] * 1e3:8.1f} MB  forecast/measured {row['forecast_over_measured']:.3f}")
            print(f"{name:36s} forecast {row['forecast_gb'] * 1e3:8.1f} MB  {measured}", flush=True)
    if args.out:
        device_name = torch.cuda.get_device_name() if torch.cuda.is_available() and not args.smoke else "cpu"
        Path(args.out).write_text(json.dumps({"device": device_name, "torch": torch.__version__, "shape": shape,
                                              "run": RUN, "rows": rows}, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
