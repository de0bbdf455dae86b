"""Source videos for the edit: a video-text folder (PyAV) or prompts for the base model to generate (the built-in
models' own clips come from engine.builtin), the held-out split, and the resumable batch sampler. Each source is
a prompt plus a way to get its frames."""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from engine.errors import UserError

def read_prompts(path: str | Path) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"prompts file {p} does not exist; pass --prompts a text file with one prompt per line")
    prompts = [line.strip() for line in read_utf8(p).splitlines() if line.strip()]
    if not prompts:
        raise UserError(f"prompts file {p} is empty; write one prompt per line")
    return prompts


def read_utf8(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text; save it as UTF-8 (e.g. iconv -t UTF-8)") from None


def read_captions(folder: str | Path) -> list[tuple[Path, str]]:
    """(video path, caption) pairs from ``captions.csv`` (columns video, caption) or ``captions.jsonl``."""
    root = Path(folder)
    if not root.is_dir():
        raise UserError(f"video folder {root} does not exist; pass --videos a folder with videos and captions.csv")
    csv_path, jsonl_path = root / "captions.csv", root / "captions.jsonl"
    if csv_path.is_file():
        reader = csv.DictReader(io.StringIO(read_utf8(csv_path), newline=""))
        if not reader.fieldnames or not {"video", "caption"} <= set(reader.fieldnames):
            raise UserError(f"{csv_path} needs a header with columns video,caption")
        rows = [(r["video"], r["caption"]) for r in reader]
    elif jsonl_path.is_file():
        try:
            lines = filter(str.strip, read_utf8(jsonl_path).splitlines())
            rows = [(d["video"], d["caption"]) for d in map(json.loads, lines)]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise UserError(f"{jsonl_path} must hold one {{\"video\": ..., \"caption\": ...}} object per line "
                            f"({err})") from None
    else:
        raise UserError(f"video folder {root} has no captions.csv or captions.jsonl; add one mapping each video to its caption")
    pairs = [(root / v, c.strip()) for v, c in rows if c and c.strip()]
    if not pairs:
        raise UserError(f"the captions file in {root} lists no captioned videos")
    missing = [str(v) for v, _ in pairs if not v.is_file()]
    if missing:
        raise UserError(f"{len(missing)} videos listed in {root} are missing (e.g. {missing[0]}); fix the captions file")
    return pairs


def resize_center_crop(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[F, 3, H, W] floats -> [F, 3, height, width]: scale to cover, then crop the centre."""
    h, w = frames.shape[-2:]
    scale = max(height / h, width / w)
    new_h, new_w = max(height, math.ceil(h * scale)), max(width, math.ceil(w * scale))
    frames = F.interpolate(frames, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=scale < 1)
    top, left = (new_h - height) // 2, (new_w - width) // 2
    return frames[..., top:top + height, left:left + width]


def read_video(path: str | Path, num_frames: int, fps: float, height: int, width: int) -> torch.Tensor:
    """F frames at ``fps`` from the start of the clip, resized and centre-cropped, in [-1, 1]: [F, 3, H, W].

    Clips shorter than F / fps repeat their last frame."""
    import av

    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            decoded = [(float(fr.time or 0.0), fr.to_ndarray(format="rgb24")) for fr in container.decode(stream)]
    except (av.error.FFmpegError, IndexError, OSError) as err:
        raise UserError(f"video {path} cannot be decoded ({err}); re-encode it (e.g. H.264 mp4) or remove it") from None
    if not decoded:
        raise UserError(f"video {path} holds no frames; remove it from the captions file")
    times = torch.tensor([t for t, _ in decoded])
    picks = []
    for k in range(num_frames):
        at_or_before = (times <= k / fps + 1e-6).nonzero()
        picks.append(int(at_or_before[-1]) if len(at_or_before) else 0)
    frames = torch.stack([torch.from_numpy(decoded[i][1]) for i in picks]).permute(0, 3, 1, 2).float() / 255
    return resize_center_crop(frames, height, width) * 2 - 1


def probe_video(path: str | Path) -> float:
    """Fail at start-up, not hours into a run: open the file and decode its first frame. Returns the clip's length
    in seconds as ``read_video`` sees it (the last frame's time plus its duration), read from the packets without
    decoding them."""
    import av

    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            next(container.decode(stream))
            container.seek(0)
            times = sorted((p.pts, p.duration or 0) for p in container.demux(stream) if p.pts is not None)
            time_base = stream.time_base  # PyAV 18 refuses a stream's attributes once its container is closed
    except (av.error.FFmpegError, IndexError, OSError, StopIteration) as err:
        raise UserError(f"video {path} cannot be decoded ({err or 'no frames'}); re-encode it (e.g. H.264 mp4) or remove it from the captions file") from None
    if not times:
        return 0.0
    last, duration = times[-1]
    if not duration and len(times) > 1:
        duration = (last - times[0][0]) / (len(times) - 1)
    return float((last + duration) * time_base)


def check_lengths(lengths: dict[Path, float], num_frames: int, fps: float) -> None:
    """Say once how many clips are shorter than the ``num_frames`` at ``fps`` a run reads (``read_video`` repeats
    their last frame), and refuse a folder where none is long enough."""
    needed = (num_frames - 1) / fps
    short = [path for path, length in lengths.items() if length <= needed + 1e-6]  # no frame at the last time read
    if not short:
        return
    what = f"shorter than {num_frames} frames at {fps:g} fps ({num_frames / fps:g} s)"
    if len(short) == len(lengths):
        raise UserError(f"every clip in the folder is {what}; lower --num-frames or --fps, or add longer clips")
    print(f"note: {len(short)} of {len(lengths)} clips are {what}; they are padded by repeating their last frame "
          f"(e.g. {short[0].name})")


@dataclass
class Source:
    """A prompt and, for real or synthetic clips, a loader of its frames [F, 3, H, W] in [-1, 1]; world clips
    carry their rendering parameters, from which the gold metrics are measured."""

    prompt: str
    frames: Callable[[], torch.Tensor] | None = None  # None: the base model generates it from the prompt
    clip: "Clip | None" = None  # engine.world.Clip


def build_sources(prompts: str | None, videos: str | None, num_frames: int, fps: float, height: int,
                  width: int) -> list[Source]:
    """The sources a run names: a video-text folder or a prompts file (a built-in model brings its own:
    engine.builtin)."""
    if videos:
        pairs = read_captions(videos)
        check_lengths({path: probe_video(path) for path, _ in pairs}, num_frames, fps)
        return [Source(caption, lambda p=path: read_video(p, num_frames, fps, height, width)) for path, caption in pairs]
    if prompts:
        return [Source(p) for p in read_prompts(prompts)]
    raise UserError("no source videos: pass --videos FOLDER or --prompts FILE (the built-in models bring their own)")


def split_held_out(sources: list[Source], held_out: int) -> tuple[list[Source], list[Source]]:
    """The last ``held_out`` sources are kept for evaluation and samples; at least one stays for training."""
    held_out = min(held_out, len(sources) - 1)
    if held_out <= 0:
        return sources, []
    return sources[:-held_out], sources[-held_out:]


class BatchSampler:
    """Endless shuffled global batches of source indices; each epoch is a fresh permutation.

    Its state (generator and the rest of the current epoch) goes into checkpoints, so a resumed run sees
    exactly the batches an uninterrupted run would."""

    def __init__(self, count: int, batch_size: int, seed: int):
        self.count, self.batch_size = count, batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.pending: list[int] = []

    def __iter__(self):
        return self

    def __next__(self) -> list[int]:
        while len(self.pending) < self.batch_size:
            self.pending += torch.randperm(self.count, generator=self.generator).tolist()
        batch, self.pending = self.pending[:self.batch_size], self.pending[self.batch_size:]
        return batch

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "pending": list(self.pending)}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.pending = list(state["pending"])
