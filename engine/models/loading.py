"""Loading a model from a diffusers folder: the family its model_index.json names, then each component."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from engine.errors import UserError
from engine.models.base import VideoDiffusion
from engine.models.cogvideox import CogVideoXVideo
from engine.models.wan import WanVideo


FAMILIES: dict[str, type[VideoDiffusion]] = {cls.pipeline_class: cls for cls in (VideoDiffusion, WanVideo, CogVideoXVideo)}


def model_family(root: Path) -> type[VideoDiffusion]:
    """The family named by the folder's model_index.json (a folder without one is read as UNet3D)."""
    index = root / "model_index.json"
    if not index.is_file():
        return VideoDiffusion
    try:
        named = json.loads(index.read_text())
        pipeline = named.get("_class_name")
    except (json.JSONDecodeError, AttributeError):
        raise UserError(f"{index} is not valid JSON; re-save the pipeline (pipe.save_pretrained)") from None
    if pipeline is None:
        raise UserError(f"{index} does not name its pipeline (no _class_name); re-save it (pipe.save_pretrained)")
    if pipeline not in FAMILIES:
        raise UserError(f"{root} holds a {pipeline}; supported pipelines are {', '.join(FAMILIES)}")
    if (named.get("transformer_2") or [None, None])[-1]:
        raise UserError(f"{root} is a two-expert {pipeline} (transformer_2: Wan 2.2 A14B); only single-transformer "
                        "Wan folders (Wan 2.1) are supported")
    return FAMILIES[pipeline]


def _component_loaders(family: type[VideoDiffusion], root: Path) -> dict:
    """Component name -> loader, from model_index.json's (library, class) pairs where it names them."""
    import diffusers
    import transformers

    defaults = {
        VideoDiffusion: {"unet": "UNet3DConditionModel", "vae": "AutoencoderKL", "text_encoder": "CLIPTextModel",
                         "tokenizer": "CLIPTokenizer", "scheduler": "DDIMScheduler"},
        WanVideo: {"transformer": "WanTransformer3DModel", "vae": "AutoencoderKLWan",
                   "text_encoder": "UMT5EncoderModel", "tokenizer": "AutoTokenizer",
                   "scheduler": "FlowMatchEulerDiscreteScheduler"},
        CogVideoXVideo: {"transformer": "CogVideoXTransformer3DModel", "vae": "AutoencoderKLCogVideoX",
                         "text_encoder": "T5EncoderModel", "tokenizer": "AutoTokenizer",
                         "scheduler": "CogVideoXDDIMScheduler"},
    }[family]
    index = root / "model_index.json"
    named = json.loads(index.read_text()) if index.is_file() else {}
    loaders = {}
    for component, default in defaults.items():
        library = transformers if component in ("text_encoder", "tokenizer") else diffusers
        entry = named.get(component)
        if isinstance(entry, list) and len(entry) == 2 and entry[1]:
            library = {"diffusers": diffusers, "transformers": transformers}.get(entry[0])
            default = entry[1]
        cls = getattr(library, default, None)
        if cls is None:
            raise UserError(f"{root}/model_index.json names {component} class {entry}, which neither diffusers nor "
                            "transformers provides; re-save the pipeline")
        loaders[component] = cls.from_pretrained
    return loaders


def load_model(path: str | Path, device: str | torch.device = "cpu") -> VideoDiffusion:
    """Load every component from a diffusers text-to-video folder; one clear error for anything missing."""
    from transformers.utils import logging as hf_logging

    root = Path(path)
    if not root.exists():
        raise UserError(f"model folder {root} does not exist; pass --model a diffusers text-to-video folder "
                        "(e.g. text-to-video-ms-1.7b, Wan2.1-T2V-1.3B-Diffusers, CogVideoX-2b), 'world' or 'tiny'")
    if not root.is_dir():
        raise UserError(f"--model {root} is a file; pass the folder that holds model_index.json and the "
                        "component folders")
    family = model_family(root)
    loaders = _component_loaders(family, root)
    missing = [c for c in loaders if not (root / c).is_dir()]
    if missing:
        raise UserError(f"model folder {root} lacks {', '.join(m + '/' for m in missing)}; a "
                        f"{family.pipeline_class} folder needs {' '.join(c + '/' for c in loaders)}")
    try:
        denoiser_config = json.loads((root / family.denoiser_name / "config.json").read_text())
    except (OSError, ValueError):
        denoiser_config = {}  # unreadable: loading the component below says so
    family.check_denoiser(denoiser_config, str(root))
    parts = {}
    bar_was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # transformers' per-file "Loading weights" bar: noise before every run's own
    try:
        for name, load in loaders.items():
            try:
                parts["denoiser" if name == family.denoiser_name else name] = load(str(root / name))
            except Exception as err:  # diffusers/transformers raise many types; the user needs the component and reason
                reason = str(err).splitlines()[0] if str(err) else type(err).__name__
                raise UserError(f"cannot load {name}/ from {root} ({reason}); re-download or re-save that "
                                "component") from None
    finally:
        if bar_was_on:
            hf_logging.enable_progress_bar()
    return family(**parts, name=root.name).to(device)


def load_architecture(path: str | Path) -> VideoDiffusion:
    """A diffusers text-to-video folder's model on the meta device, built from its configs alone (no weight file is
    read, so a folder of config files is enough): for counting what a run of it costs (``--dry-run``). The
    tokenizer and scheduler are read as usual."""
    from transformers import AutoConfig

    root = Path(path)
    if not root.is_dir():
        raise UserError(f"model folder {root} does not exist; --dry-run needs the folder's config files "
                        "(model_index.json and each component's config.json, tokenizer and scheduler files)")
    family = model_family(root)
    parts = {}
    for name, load in _component_loaders(family, root).items():
        cls, folder = load.__self__, root / name
        try:
            if name in ("tokenizer", "scheduler"):
                part = load(str(folder))
            elif hasattr(cls, "load_config"):  # diffusers
                with torch.device("meta"):
                    part = cls.from_config(cls.load_config(str(folder)))
            else:  # transformers
                with torch.device("meta"):
                    part = cls._from_config(AutoConfig.from_pretrained(str(folder)))
        except Exception as err:  # as in load_model: the component and the reason
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise UserError(f"cannot read the configuration of {name}/ in {root} ({reason}); --dry-run needs each "
                            "component's config files") from None
        parts["denoiser" if name == family.denoiser_name else name] = part
    return family(**parts, name=root.name)
