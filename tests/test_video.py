"""Clips on disk: MP4 through PyAV and the GIF fallback, with the generation parameters in the file."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from scfg import SCFGError
from scfg.video import read_video_metadata, write_video


def frames(n=5, h=32, w=48):
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(n)]


def test_mp4_keeps_frames_size_and_metadata(tmp_path):
    av = pytest.importorskip("av")
    meta = {"parameters": "a red cat\nSteps: 2", "scfg": json.dumps({"guidance": "scfg"})}
    path = write_video(frames(), tmp_path / "clip.mp4", fps=8, metadata=meta)
    with av.open(str(path)) as container:
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(decoded) == 5 and decoded[0].shape == (32, 48, 3)
    stored = read_video_metadata(path)
    assert stored["parameters"] == meta["parameters"] and json.loads(stored["scfg"]) == {"guidance": "scfg"}


def test_odd_sizes_and_float_frames(tmp_path):
    pytest.importorskip("av")
    floats = [f.astype(np.float32) / 255 for f in frames(3, 31, 47)]
    write_video(floats, tmp_path / "odd.mp4")
    assert (tmp_path / "odd.mp4").stat().st_size > 0


def test_gif_fallback_round_trips_frames_and_metadata(tmp_path):
    clip = frames(4)
    path = write_video([Image.fromarray(f) for f in clip], tmp_path / "clip.gif", metadata={"scfg": "{}"})
    gif = Image.open(path)
    assert gif.n_frames == 4 and gif.size == (48, 32)
    assert read_video_metadata(path) == {"scfg": "{}"}


def test_bad_inputs_are_refused(tmp_path):
    with pytest.raises(SCFGError, match=r"mp4 or \.gif"):
        write_video(frames(), tmp_path / "clip.avi")
    with pytest.raises(SCFGError, match="one \\[H, W, 3\\] shape"):
        write_video([*frames(2), frames(1, 8, 8)[0]], tmp_path / "mixed.gif")
    with pytest.raises(SCFGError, match="at least one frame"):
        write_video([], tmp_path / "empty.gif")
