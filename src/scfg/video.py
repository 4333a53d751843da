"""Write generated clips: MP4 (H.264, through PyAV) with the parameters in the file's metadata, or an animated GIF.

PyAV is the `video` extra (`pip install "semantic-cfg[video]"`); without it an `.mp4` path raises an error naming
the fix, and `.gif` always works (Pillow). The metadata keys are those of the PNG output (docs: README "CLI"):
`parameters` (A1111-style text) and `scfg` (the full JSON), written as MP4 metadata tags (`use_metadata_tags`) or
as the GIF's comment.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from .config import SCFGError

__all__ = ["read_video_metadata", "write_video"]


def _frames_as_arrays(frames: Sequence[Image.Image | np.ndarray]) -> list[np.ndarray]:
    arrays = []
    for frame in frames:
        array = np.asarray(frame.convert("RGB") if isinstance(frame, Image.Image) else frame)
        if array.dtype != np.uint8:  # diffusers' "np" output: floats in [0, 1]
            array = (np.clip(array, 0.0, 1.0) * 255).round().astype(np.uint8)
        arrays.append(array)
    if not arrays:
        raise SCFGError("Expected at least one frame to write, but got none.")
    if len({a.shape for a in arrays}) != 1 or arrays[0].ndim != 3:
        raise SCFGError(f"Expected frames of one [H, W, 3] shape, but got {sorted({a.shape for a in arrays})}.")
    return arrays


def write_video(
    frames: Sequence[Image.Image | np.ndarray],
    path: str | Path,
    fps: int = 16,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write `frames` (PIL images or `[H, W, 3]` arrays, uint8 or floats in [0, 1]) to `path` (`.mp4` or `.gif`).

    MP4 is H.264 in yuv420p (what every player reads), so odd sizes are padded by one pixel at the bottom/right.
    """
    path = Path(path)
    arrays = _frames_as_arrays(frames)
    metadata = dict(metadata or {})
    suffix = path.suffix.lower()
    if suffix == ".gif":
        images = [Image.fromarray(a) for a in arrays]
        comment = json.dumps(metadata) if metadata else ""
        images[0].save(
            path, save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0, comment=comment
        )
        return path
    if suffix != ".mp4":
        raise SCFGError(f"Expected a video path ending in .mp4 or .gif, but got {path.name!r}.")
    try:
        import av
    except ImportError as err:
        raise SCFGError(
            'Expected PyAV to write MP4 (`pip install "semantic-cfg[video]"`), but it is not installed; or write a '
            ".gif instead."
        ) from err
    height, width = arrays[0].shape[:2]
    even_h, even_w = height + height % 2, width + width % 2  # yuv420p needs even sizes
    with av.open(str(path), "w", options={"movflags": "use_metadata_tags"}) as container:
        for key, value in metadata.items():
            container.metadata[key] = value
        stream = container.add_stream("libx264" if "libx264" in av.codecs_available else "mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = even_w, even_h, "yuv420p"
        for array in arrays:
            if (even_h, even_w) != (height, width):
                array = np.pad(array, ((0, even_h - height), (0, even_w - width), (0, 0)), mode="edge")
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(array), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def read_video_metadata(path: str | Path) -> dict[str, str]:
    """The metadata `write_video` stored: the MP4's tags, or the GIF comment's keys."""
    path = Path(path)
    if path.suffix.lower() == ".gif":
        comment = Image.open(path).info.get("comment", b"")
        text = comment.decode() if isinstance(comment, bytes) else comment
        return json.loads(text) if text else {}
    import av

    with av.open(str(path)) as container:
        return dict(container.metadata)
