"""Where the project's shipped assets live (``engine/assets/``): the one place the presets, the rewards and the
command that trains the built-in assets (``engine.world.build``) read their paths from.

Nothing here imports the rest of the engine, so any layer may import it.
"""

from pathlib import Path

ASSETS = Path(__file__).parent / "assets"
MODEL_DIR = ASSETS / "world-t2v"  # the built-in text-to-video model, in the diffusers pipeline layout
REWARD_FILE = ASSETS / "world-hps.pt"  # the built-in preference reward, in the HPS_v2 checkpoint format
MOTION_REWARD_FILE = ASSETS / "world-motion.safetensors"  # the built-in video reward (engine.rewards.motion)
REWARD_ARCH = "WorldCLIP-XS"  # the reward's open_clip architecture
OPEN_CLIP_CONFIGS = ASSETS  # open_clip configs shipped with the engine (WorldCLIP-XS.json)
