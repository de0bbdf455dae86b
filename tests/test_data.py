"""Source data: prompts files, video-text folders decoded with PyAV, and their errors."""

import json

import pytest
import torch

from engine.data import BatchSampler, build_sources, read_captions, read_prompts, read_video, split_held_out
from engine.errors import UserError
from engine.media import write_mp4


def ramp_video(path, count=24, fps=24, size=(48, 64)):
    """Solid frames whose brightness encodes the frame number."""
    frames = torch.stack([torch.full((3, *size), i / count) for i in range(count)])
    write_mp4(frames, path, fps)
    return frames


def test_read_video_samples_frames_at_fps_and_crops(tmp_path):
    ramp_video(tmp_path / "a.mp4")
    frames = read_video(tmp_path / "a.mp4", num_frames=6, fps=8, height=32, width=32)
    assert frames.shape == (6, 3, 32, 32)
    brightness = (frames.mean(dim=(1, 2, 3)) + 1) / 2
    expected = torch.tensor([3 * k / 24 for k in range(6)])  # 8 fps from 24 fps: every third frame
    assert torch.allclose(brightness, expected, atol=0.02)


def test_short_video_repeats_its_last_frame(tmp_path):
    ramp_video(tmp_path / "a.mp4", count=4, fps=8)
    frames = read_video(tmp_path / "a.mp4", num_frames=6, fps=8, height=16, width=16)
    assert torch.allclose(frames[3], frames[5])


def test_short_clips_are_named_once_and_none_long_enough_is_refused(tmp_path, capsys):
    ramp_video(tmp_path / "long.mp4", count=24, fps=24)
    ramp_video(tmp_path / "short.mp4", count=4, fps=8)  # 0.5 s: 8 frames at 8 fps need 0.875 s
    (tmp_path / "captions.csv").write_text("video,caption\nlong.mp4,a\nshort.mp4,b\n")
    assert len(build_sources(None, str(tmp_path), num_frames=8, fps=8, height=16, width=16)) == 2
    assert "note: 1 of 2 clips are shorter than 8 frames at 8 fps" in capsys.readouterr().out
    build_sources(None, str(tmp_path), num_frames=4, fps=8, height=16, width=16)
    assert capsys.readouterr().out == ""  # 4 frames at 8 fps: both are long enough
    with pytest.raises(UserError, match="every clip in the folder is shorter than 30 frames"):
        build_sources(None, str(tmp_path), num_frames=30, fps=8, height=16, width=16)


def test_unreadable_video_is_a_clear_error(tmp_path):
    (tmp_path / "bad.mp4").write_bytes(b"\x00" * 100)
    with pytest.raises(UserError, match="cannot be decoded"):
        read_video(tmp_path / "bad.mp4", 4, 8, 16, 16)


def test_captions_csv_and_jsonl(tmp_path):
    ramp_video(tmp_path / "a.mp4", count=12)  # 0.5 s at 24 fps: long enough for 4 frames at 8 fps
    (tmp_path / "captions.csv").write_text('video,caption\na.mp4,"a ramp, slowly"\n')
    assert read_captions(tmp_path) == [(tmp_path / "a.mp4", "a ramp, slowly")]
    (tmp_path / "captions.csv").unlink()
    (tmp_path / "captions.jsonl").write_text(json.dumps({"video": "a.mp4", "caption": "ramp"}) + "\n")
    sources = build_sources(None, str(tmp_path), num_frames=4, fps=8, height=16, width=16)
    assert sources[0].prompt == "ramp" and sources[0].frames().shape == (4, 3, 16, 16)


@pytest.mark.parametrize("content, message", [
    (None, "no captions.csv"),
    ("video,text\na.mp4,x\n", "header with columns video,caption"),
    ("video,caption\nmissing.mp4,x\n", "are missing"),
])
def test_caption_errors(tmp_path, content, message):
    if content is not None:
        (tmp_path / "captions.csv").write_text(content)
    with pytest.raises(UserError, match=message):
        read_captions(tmp_path)


def test_prompts_file(tmp_path):
    (tmp_path / "p.txt").write_text("a cat\n\n  a dog  \n")
    assert read_prompts(tmp_path / "p.txt") == ["a cat", "a dog"]
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(UserError, match="is empty"):
        read_prompts(tmp_path / "empty.txt")
    with pytest.raises(UserError, match="does not exist"):
        read_prompts(tmp_path / "none.txt")


def test_held_out_split_and_batches():
    train, held = split_held_out(list(range(5)), 2)
    assert train == [0, 1, 2] and held == [3, 4]
    assert split_held_out([0], 3) == ([0], [])
    sampler = BatchSampler(5, 2, seed=0)
    seen = [i for _ in range(5) for i in next(sampler)]
    assert sorted(seen) == sorted(list(range(5)) * 2)
    state = sampler.state_dict()
    ahead = [next(sampler) for _ in range(4)]
    sampler.load_state_dict(state)
    assert [next(sampler) for _ in range(4)] == ahead
