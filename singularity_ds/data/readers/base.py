"""The reader interface and registry: what every video decoding backend implements, and how a name in
``video_input.reader`` becomes a reader.

A backend module defines a :class:`VideoReader` (``probe`` + ``decode`` of given indices) and calls
:func:`register_reader` when imported; :func:`get_reader` builds one by name. Backends look each other
up here by name (DALI probes with decord), so no backend module imports another.
"""
import io
import os
from typing import Callable, Dict, Sequence, Tuple

import torch

from ...errors import MediaError
from .sampling import get_frame_indices


class MemoryFile(str):
    """A media file already in memory (a sample read from a tar shard): the string is its name, for
    messages; readers open ``data`` instead of a path."""

    def __new__(cls, name: str, data: bytes):
        obj = super().__new__(cls, name)
        obj.data = data
        return obj

    def __reduce__(self):
        return MemoryFile, (str(self), self.data)


def decoder_input(path):
    """What a decoder opens: the path, or a file object over an in-memory file."""
    return io.BytesIO(path.data) if isinstance(path, MemoryFile) else path


def check_file(path: str):
    """Missing and empty files fail before a decoder sees them (some decoders crash on them)."""
    if isinstance(path, MemoryFile):
        if not path.data:
            raise MediaError(path, "empty file (0 bytes)")
        return
    try:
        size = os.path.getsize(path)
    except OSError:
        raise MediaError(path, "no such file") from None
    if size == 0:
        raise MediaError(path, "empty file (0 bytes)")


class VideoReader:
    """Decoding backend: ``probe(path) -> (frame count, fps)``, ``decode(path, indices)`` -> uint8
    (T, C, H, W)."""

    name = "base"

    def probe(self, path: str) -> Tuple[int, float]:
        raise NotImplementedError

    def decode(self, path: str, indices: Sequence[int]) -> torch.Tensor:
        raise NotImplementedError

    def read(self, path, num_frames, sample_type="rand", rng=None, max_num_frames=-1):
        """-> (frames uint8 (T, C, H, W), indices, duration_s)."""
        frame_count, fps = self.probe(path)
        indices = get_frame_indices(num_frames, frame_count, sample_type, fps, max_num_frames, rng)
        return self.decode(path, indices), indices, frame_count / fps


# name -> a callable returning a reader, in registration order (the order an unknown name's error lists)
_READERS: Dict[str, Callable[[], VideoReader]] = {}


def register_reader(name: str, factory: Callable[[], VideoReader]):
    """Make ``video_input.reader=<name>`` build its reader with ``factory()``."""
    if _READERS.get(name, factory) is not factory:
        raise ValueError(f"video reader {name!r} is registered twice")
    _READERS[name] = factory


def get_reader(name: str) -> VideoReader:
    """The reader registered as ``name``: ``decord`` | ``av`` | ``dali`` (an error without DALI) |
    ``auto`` (DALI when installed, per-file decord fallback; decord without DALI -- each said once in
    the log)."""
    try:
        factory = _READERS[name]
    except KeyError:
        raise ValueError(f"unknown video reader {name!r}; expected one of {list(_READERS)}") from None
    return factory()
