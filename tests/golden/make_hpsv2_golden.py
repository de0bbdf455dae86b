"""Writes tests/golden/hpsv2.safetensors with HPSv2's own code (the hpsv2 package, 1.2.0): its validation
transform (``create_model_and_transforms(..., light_augmentation=True)``) and its score
(``image_features @ text_features.T``, each normalised) on the built-in reward checkpoint, for frames of the
aspect ratios of real video models. tests/test_reward_parity.py compares the engine's ``hpsv2:`` against them.

    pip install --no-deps --target build/test-deps hpsv2==1.2.0
    python tests/golden/make_hpsv2_golden.py build/test-deps

The package's wheel lacks open_clip's BPE vocabulary: it is copied from the installed open_clip. Importing
``hpsv2`` itself needs packages it does not declare (clint); only its ``src.open_clip`` fork is used, so the parent
package is entered without running its ``__init__``."""

import shutil
import sys
import types
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

HERE = Path(__file__).parent
# (height, width): square; 48x80 (the issue's); ModelScope/zeroscope 320x576, Wan 480x832, CogVideoX 480x720 at 1/10
SIZES = [(32, 32), (48, 80), (32, 58), (48, 83), (48, 72), (80, 48)]
UPSCALED = 112  # the same transform at a size the frames are enlarged to (the reward's own, 32, shrinks them)
PROMPTS = ["a red circle moving left on a white background", "a blue square moving up on a black background"]


def images() -> dict[str, torch.Tensor]:
    """Smooth random frames (uint8) of each size, seeded: what the test feeds both implementations."""
    g = torch.Generator().manual_seed(0)
    out = {}
    for h, w in SIZES:
        base = torch.rand(2, 3, h // 4 + 1, w // 4 + 1, generator=g)
        frames = torch.nn.functional.interpolate(base, size=(h, w), mode="bilinear", align_corners=False)
        out[f"images_{h}x{w}"] = (frames * 255).round().to(torch.uint8)
    return out


def hpsv2_fork(root: str):
    sys.path.insert(0, root)
    package = types.ModuleType("hpsv2")
    package.__path__ = [str(Path(root) / "hpsv2")]
    sys.modules["hpsv2"] = package
    vocab = Path(root) / "hpsv2/src/open_clip/bpe_simple_vocab_16e6.txt.gz"
    if not vocab.exists():
        import open_clip

        shutil.copy(Path(open_clip.__file__).parent / vocab.name, vocab)
    from hpsv2.src import open_clip as fork

    return fork


def main(root: str) -> None:
    fork = hpsv2_fork(root)
    engine_assets = Path(__file__).resolve().parents[2] / "engine" / "assets"
    fork.add_model_config(str(engine_assets / "WorldCLIP-XS.json"))
    model, _, preprocess_val = fork.create_model_and_transforms(  # hpsv2.img_score's arguments, but fp32 on the CPU
        "WorldCLIP-XS", None, precision="fp32", device="cpu", jit=False, force_quick_gelu=False, force_custom_text=False,
        force_patch_dropout=False, force_image_size=None, pretrained_image=False, image_mean=None, image_std=None,
        light_augmentation=True, aug_cfg={}, output_dict=True, with_score_predictor=False, with_region_predictor=False)
    state = torch.load(engine_assets / "world-hps.pt", map_location="cpu", weights_only=True)["state_dict"]
    model.load_state_dict({k: v.float() for k, v in state.items()})
    model.eval()
    tokenizer = fork.get_tokenizer("WorldCLIP-XS")
    golden = {}
    for name, frames in images().items():
        pixels = torch.stack([preprocess_val(Image.fromarray(f.permute(1, 2, 0).numpy())) for f in frames])
        with torch.no_grad():  # as hpsv2.img_score.score does it
            outputs = model(pixels, tokenizer(PROMPTS))
            scores = torch.diagonal(outputs["image_features"] @ outputs["text_features"].T)
        golden[name] = frames
        upscale = fork.image_transform(UPSCALED, is_train=False, resize_longest_max=True)  # its validation transform
        golden[name.replace("images", f"pixels{UPSCALED}")] = upscale(Image.fromarray(frames[0].permute(1, 2, 0).numpy())).half()
        golden[name.replace("images", "pixels")] = pixels.float().contiguous()
        golden[name.replace("images", "scores")] = scores.float().contiguous()
    save_file(golden, str(HERE / "hpsv2.safetensors"), metadata={"hpsv2": "1.2.0", "prompts": "\n".join(PROMPTS)})
    print(f"wrote {HERE / 'hpsv2.safetensors'}: {', '.join(golden)}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "build/test-deps")
