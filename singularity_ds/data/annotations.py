"""Annotation files in the original's formats, validated once and kept in a compact shared store.

A corpus is declared as the original's ``[anno_json, media_dir]`` (images) or
``[anno_json, media_dir, video]``; a combination is a list of them. Each file is a JSON list of dicts:

- captions (pretraining / retrieval): ``{"image"|"video": path or [paths], "caption": str or [str]}``
  (video corpora may name the path ``image``, as the original's README says, or ``video``, as its
  loader reads);
- QA: ``{"image"|"video", "question", "answer": str or [str], "question_id", ...}``;
- MC: ``{"video", "caption": [options], "answer": int}``.

Entries are stored JSON-encoded in one numpy byte buffer plus an offset array, so DataLoader workers
share them copy-on-write instead of each holding (and refcount-touching) millions of Python dicts.
"""
import json
import os
from typing import Iterator, List, Sequence

import numpy as np

MEDIA_TYPES = ("image", "video")

# required keys and their accepted types, per kind of annotation
SCHEMAS = {
    "caption": {"caption": (str, list)},
    "qa_train": {"question": (str,), "answer": (str, list)},
    "qa_eval": {"question": (str,), "question_id": (str, int)},
    "mc": {"caption": (list,), "answer": (int,)},
}


class AnnotationError(ValueError):
    """Bad annotation input: the message names the file, the entry index and the key."""


class AnnotationStore:
    """An immutable list of dicts held as one uint8 buffer + int64 offsets (fork/worker friendly)."""

    def __init__(self, entries: Sequence[dict]):
        blobs = [json.dumps(e, separators=(",", ":")).encode() for e in entries]
        self._offsets = np.cumsum([0] + [len(b) for b in blobs], dtype=np.int64)
        self._buffer = np.frombuffer(b"".join(blobs), dtype=np.uint8) if blobs else np.zeros(0, np.uint8)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, i: int) -> dict:
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        i %= len(self)
        return json.loads(self._buffer[self._offsets[i]:self._offsets[i + 1]].tobytes())

    def __iter__(self) -> Iterator[dict]:
        return (self[i] for i in range(len(self)))

    @property
    def nbytes(self) -> int:
        return self._buffer.nbytes + self._offsets.nbytes


def corpus_specs(train_file, key: str = "train_file") -> List[tuple]:
    """``[anno, dir]`` / ``[anno, dir, video]`` or a list of them -> [(anno, dir, media_type)]."""
    if train_file is None:
        raise AnnotationError(f"config key {key!r} is not set")
    items = list(train_file)
    if items and isinstance(items[0], str):
        items = [items]
    specs = []
    for spec in items:
        spec = list(spec)
        if len(spec) == 3 and spec[1] is None and isinstance(spec[0], str):
            spec[1] = ""  # a shard corpus: its samples carry the media
        if len(spec) not in (2, 3) or not all(isinstance(s, str) for s in spec):
            raise AnnotationError(f"config key {key!r}: each corpus must be [anno_json, media_dir], "
                                  f"[anno_json, media_dir, video] or [shard_index, null, video], got {spec}")
        media_type = spec[2] if len(spec) == 3 else "image"
        if media_type not in MEDIA_TYPES:
            raise AnnotationError(f"config key {key!r}: third element must be 'video' or 'image', got {media_type!r}")
        specs.append((spec[0], spec[1], media_type))
    return specs


def _media_key(entry: dict, media_type: str):
    if media_type == "video" and "video" in entry:
        return "video"
    return "image" if "image" in entry else None


def _check_type(value, types, path, i, key):
    if not isinstance(value, types) or isinstance(value, bool):
        names = " or ".join("list" if t is list else t.__name__ for t in types)
        raise AnnotationError(f"{path}: entry {i}: key {key!r} must be {names}, got {type(value).__name__}")
    if isinstance(value, list) and (not value or not all(isinstance(v, (str, int)) for v in value)):
        raise AnnotationError(f"{path}: entry {i}: key {key!r} must be a non-empty list of strings")


def read_annotations(path: str, media_dir: str, media_type: str, kind: str = "caption") -> List[dict]:
    """Read and validate one annotation file; media paths are joined with ``media_dir`` into ``media``."""
    try:
        with open(path) as f:
            raw = json.load(f)
    except FileNotFoundError:
        raise AnnotationError(f"{path}: annotation file not found") from None
    except json.JSONDecodeError as e:
        raise AnnotationError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    if not isinstance(raw, list):
        raise AnnotationError(f"{path}: expected a JSON list of entries, got {type(raw).__name__}")
    schema = SCHEMAS[kind]
    out = []
    for i, entry in enumerate(raw):
        if not isinstance(entry, dict):
            raise AnnotationError(f"{path}: entry {i}: expected an object, got {type(entry).__name__}")
        key = _media_key(entry, media_type)
        if key is None:
            want = "'video' (or 'image')" if media_type == "video" else "'image'"
            raise AnnotationError(f"{path}: entry {i}: missing key {want}")
        _check_type(entry[key], (str, list), path, i, key)
        for k, types in schema.items():
            if k not in entry:
                raise AnnotationError(f"{path}: entry {i}: missing key {k!r}")
            _check_type(entry[k], types, path, i, k)
        media = entry[key]
        entry = dict(entry, media=[os.path.join(media_dir, m) for m in media] if isinstance(media, list)
                     else os.path.join(media_dir, media))
        out.append(entry)
    return out


def load_corpus(specs: Sequence[tuple], kind: str = "caption") -> AnnotationStore:
    entries = []
    for anno, media_dir, media_type in specs:
        entries += read_annotations(anno, media_dir, media_type, kind)
    return AnnotationStore(entries)
