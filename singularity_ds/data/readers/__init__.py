"""Media readers: what the rest of ``data`` imports to turn a file into uint8 frames.

Importing this package registers every backend (:mod:`.ffmpeg`: decord and PyAV; :mod:`.dali`: DALI
and ``auto``), so :func:`get_reader` knows every ``video_input.reader`` name. Decoding sits behind
:class:`VideoReader` (``probe`` + ``decode`` of given indices) and sampling (:mod:`.sampling`) is
shared, so every backend produces the same frames from the same indices.
"""
import random

from ...errors import MediaError
from .base import MemoryFile, VideoReader, check_file, get_reader, register_reader

# imported in registration order, the order an unknown reader's error lists them: FFmpeg's, then DALI's
from .ffmpeg import DecordReader, PyAVReader, frame_size

from .dali import DaliReader, clip_pipeline, dali_missing  # isort: skip
from .image import IMAGE_EXTENSIONS, load_image
from .sampling import SAMPLE_TYPES, get_frame_indices

__all__ = ["MemoryFile", "VideoReader", "check_file", "get_reader", "register_reader", "DecordReader",
           "PyAVReader", "frame_size", "DaliReader", "clip_pipeline", "dali_missing", "load_image",
           "IMAGE_EXTENSIONS", "SAMPLE_TYPES", "get_frame_indices", "read_frames", "probe_frames"]


def read_frames(path: str, num_frames: int, sample_type: str = "rand", reader="decord",
                rng: random.Random = None, max_num_frames: int = -1, fallback: bool = True):
    """-> (frames uint8 (T, C, H, W), indices, duration_s). ``reader``: a name or a VideoReader.

    With ``fallback``, a file decord cannot read is retried with PyAV (FFmpeg reads more containers:
    GIF, SWF, ...); a file neither can read raises one :class:`MediaError` with both reasons.
    """
    check_file(path)
    reader = get_reader(reader) if isinstance(reader, str) else reader
    try:
        return reader.read(path, num_frames, sample_type, rng, max_num_frames)
    except MediaError as first:
        if not fallback or isinstance(reader, PyAVReader):
            raise
        try:
            return PyAVReader().read(path, num_frames, sample_type, rng, max_num_frames)
        except MediaError as second:
            raise MediaError(path, f"{first.reason}; {second.reason}") from None


def probe_frames(path: str, reader="decord", fallback: bool = True):
    """-> (frame count, fps) through ``reader``, with :func:`read_frames`' rule: what decord cannot open
    is probed with PyAV (a GIF, or a JPEG named ``.mp4``, which training reads the same way)."""
    check_file(path)
    reader = get_reader(reader) if isinstance(reader, str) else reader
    try:
        return reader.probe(path)
    except MediaError as first:
        if not fallback or isinstance(reader, PyAVReader):
            raise
        try:
            return PyAVReader().probe(path)
        except MediaError as second:
            raise MediaError(path, f"{first.reason}; {second.reason}") from None
