"""Reward fine-tuning of text-to-video diffusion models with human feedback (the InstructVideo method).

``import engine`` gives the pieces for use with your own diffusers model, imported on first use:

    import engine
    model = engine.load_model("/weights/text-to-video-ms-1.7b")      # or engine.build_model("world")
    engine.add_lora(model.denoiser, rank=4)
    handle = engine.accelerate(model.denoiser)                          # fused Triton kernels (CUDA)
    chain = engine.EditChain(model, ddim_steps=20, tau=0.6, grad_steps=1)
"""

from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "accelerate": "engine.acceleration", "revert": "engine.acceleration",
    "load_model": "engine.models", "build_model": "engine.builtin", "tiny_model": "engine.models",
    "VideoDiffusion": "engine.models", "gold_metrics": "engine.world",
    "EditChain": "engine.chain",
    "SegmentalReward": "engine.video_reward", "reward_loss": "engine.video_reward",
    "build_reward": "engine.rewards", "register_reward": "engine.rewards", "Reward": "engine.rewards",
    "add_lora": "engine.lora", "save_lora": "engine.lora", "load_lora": "engine.lora",
    "Trainer": "engine.train", "TrainConfig": "engine.config",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
