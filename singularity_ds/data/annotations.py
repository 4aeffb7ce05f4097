"""Annotation files in the original's formats, validated once and kept in a compact shared store.

A corpus is declared as the original's ``[anno_json, media_dir]`` (images) or
``[anno_json, media_dir, video]``; a combination is a list of them. Each file is a JSON list of dicts:

- captions (pretraining / retrieval): ``{"image"|"video": path or [paths], "caption": str or [str]}``
  (video corpora may name the path ``image``, as the original's README says, or ``video``, as its
  loader reads);
- QA: ``{"image"|"video", "question", "answer": str or [str], "question_id", ...}``;
- MC: ``{"video", "caption": [options], "answer": int}``.

Every entry is checked as it is read, so a bad file is refused before any work starts, in one line
naming the file, the entry and the key: a file with no entries, a missing key, a value of the wrong
type, a list that is empty or holds anything but strings (captions, options, answers, media paths).

Media paths are relative to the corpus's media folder (absolute paths inside it are fine). A path
that leaves the folder -- absolute elsewhere, or climbing out with ``..`` -- is refused (the original
joins it silently, so a stray prefix or one ``..`` too many reads another tree's files) unless
``media_outside_dir`` is set: corpora whose annotations hold absolute paths to media spread over
several disks set it, and such paths are then read as written (the media folder still prefixes the
relative ones). The check is on the paths as written, not on where symlinks lead: a media folder
made of symlinks to other disks is inside.

Entries are stored JSON-encoded in one numpy byte buffer plus an offset array, so DataLoader workers
share them copy-on-write instead of each holding (and refcount-touching) millions of Python dicts.
"""
import json
import os
import zlib
from array import array
from typing import Iterable, Iterator, List, Sequence

import numpy as np
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ..config import config_error_line
from ..errors import AnnotationError, ConfigError

MEDIA_TYPES = ("image", "video")

# required keys and their accepted types, per kind of annotation
SCHEMAS = {
    "caption": {"caption": (str, list)},
    "qa_train": {"question": (str,), "answer": (str, list)},
    "qa_eval": {"question": (str,), "question_id": (str, int)},
    "mc": {"caption": (list,), "answer": (int,)},
}



class AnnotationStore:
    """An immutable list of dicts held as one uint8 buffer + int64 offsets (fork/worker friendly).

    Entries are JSON-encoded and zlib-compressed in blocks of ``BLOCK``: reading one decompresses
    its block (~10 us), and the last block read is kept. Entries of annotation files are stored as
    the file has them, with the index of their corpus; ``media`` (the path joined with the corpus's
    media folder) is added when an entry is read, so the store holds each path once."""

    BLOCK = 64

    def __init__(self, entries: Iterable[dict] = (), corpora: Sequence[tuple] = ()):
        """``entries``: dicts, or ``(corpus index, dict)`` pairs when ``corpora`` lists
        ``(media_dir, media_type)`` per corpus. Built incrementally: the entries may be a generator."""
        self._corpora = list(corpora)
        buffer, offsets, ids, block, n = bytearray(), array("q", [0]), array("H"), [], 0
        for entry in entries:
            if self._corpora:
                corpus, entry = entry
                ids.append(corpus)
            block.append(json.dumps(entry, separators=(",", ":")).encode())  # never a raw newline
            n += 1
            if len(block) == self.BLOCK:
                buffer += zlib.compress(b"\n".join(block), 1)
                offsets.append(len(buffer))
                block = []
        if block:
            buffer += zlib.compress(b"\n".join(block), 1)
            offsets.append(len(buffer))
        self._n, self._cached = n, (-1, None)
        self._buffer = np.frombuffer(buffer, dtype=np.uint8) if buffer else np.zeros(0, np.uint8)
        self._offsets = np.frombuffer(offsets, dtype=np.int64)
        self._ids = np.frombuffer(ids, dtype=np.uint16) if self._corpora else None

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i: int) -> dict:
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        i %= len(self)
        b, j = divmod(i, self.BLOCK)
        cached = self._cached
        if cached[0] != b:
            raw = self._buffer[self._offsets[b]:self._offsets[b + 1]].tobytes()
            cached = self._cached = (b, zlib.decompress(raw).split(b"\n"))
        entry = json.loads(cached[1][j])
        if self._ids is not None:
            media_dir, media_type = self._corpora[self._ids[i]]
            media = entry[media_field(entry, media_type)]
            entry["media"] = ([os.path.join(media_dir, m) for m in media] if isinstance(media, list)
                              else os.path.join(media_dir, media))
        return entry

    def __iter__(self) -> Iterator[dict]:
        return (self[i] for i in range(len(self)))

    def corpus_lengths(self) -> List[int]:
        """Entries per corpus, in the order of ``corpora``."""
        if self._ids is None:
            return [len(self)]
        return np.bincount(self._ids, minlength=len(self._corpora)).tolist()

    @property
    def nbytes(self) -> int:
        return self._buffer.nbytes + self._offsets.nbytes + (self._ids.nbytes if self._ids is not None else 0)


def corpus_specs(train_file, key: str = "train_file") -> List[tuple]:
    """``[anno, dir]`` / ``[anno, dir, video]`` or a list of them -> [(anno, dir, media_type)]."""
    if train_file is None:
        raise AnnotationError(f"config key {key!r} is not set")
    try:  # resolves the interpolations (an unset ${oc.env:SL_DATA_DIR}: one line naming the key)
        items = OmegaConf.to_container(train_file, resolve=True) if OmegaConf.is_config(train_file) \
            else list(train_file)
    except OmegaConfBaseException as e:
        raise ConfigError(config_error_line(e, key)) from None
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
            raise AnnotationError(f"config key {key!r}: third element must be 'video' or 'image', "
                                  f"got {media_type!r}")
        specs.append((spec[0], spec[1], media_type))
    return specs


def media_field(entry: dict, media_type: str):
    """The key holding an entry's media path: ``video`` (video corpora that have it), else ``image``;
    None if neither."""
    if media_type == "video" and "video" in entry:
        return "video"
    return "image" if "image" in entry else None


def _check_type(value, types, path, i, key):
    if not isinstance(value, types) or isinstance(value, bool):
        names = " or ".join("list" if t is list else t.__name__ for t in types)
        raise AnnotationError(f"{path}: entry {i}: key {key!r} must be {names}, got {type(value).__name__}")
    if isinstance(value, list):
        bad = next((v for v in value if not isinstance(v, str)), None) if value else "empty"
        if bad is not None:
            got = "an empty list" if not value else f"a list holding {type(bad).__name__} {bad!r}"
            raise AnnotationError(f"{path}: entry {i}: key {key!r} must be a non-empty list of strings, "
                                  f"got {got}")


def _leaves(media: str, media_dir: str) -> bool:
    """Whether ``media`` joined with ``media_dir`` (as :class:`AnnotationStore` joins them) is outside it."""
    if os.path.isabs(media):
        folder = os.path.abspath(media_dir)
        return os.path.commonpath([folder, os.path.normpath(media)]) != folder
    return os.path.normpath(media).split(os.sep)[0] == ".."


def _check_media(media, path, i, key, media_dir):
    """Media paths are non-empty; with ``media_dir`` given, they stay inside it (see the module's doc)."""
    for m in media if isinstance(media, list) else [media]:
        if not m:
            raise AnnotationError(f"{path}: entry {i}: key {key!r}: empty media path")
        if media_dir is not None and _leaves(m, media_dir):
            raise AnnotationError(f"{path}: entry {i}: key {key!r}: media path {m!r} is outside the media "
                                  f"folder {media_dir!r}; make it relative to that folder, or set "
                                  f"media_outside_dir=True to read such paths as written")


JSON_FALLBACK_BYTES = 256 * 2 ** 20  # below this, a file ijson rejects is re-read by the json module


def _skip_bom(f):
    """Position ``f`` at its start, past a UTF-8 byte-order mark if it has one."""
    f.seek(0)
    if f.read(3) != b"\xef\xbb\xbf":
        f.seek(0)


def _first_byte(f) -> bytes:
    """The first byte after whitespace and a UTF-8 byte-order mark."""
    _skip_bom(f)
    while True:
        chunk = f.read(65536)
        if not chunk:
            return b""
        stripped = chunk.lstrip()
        if stripped:
            return stripped[:1]


def _entries(path: str):
    """The entries of a JSON list, parsed one at a time (ijson): a 10M-entry file never exists as
    Python objects all at once. Errors name the file (and, for bad JSON, the line and column)."""
    import ijson
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise AnnotationError(f"{path}: annotation file not found") from None
    with f:
        first = _first_byte(f)
        if first != b"[":
            entries = _json_module(path, f)
            kind = "object" if first == b"{" else "a JSON value"
            if not isinstance(entries, list):
                raise AnnotationError(f"{path}: expected a JSON list of entries, got {kind}")
            yield from entries
            return
        _skip_bom(f)
        done = 0
        try:
            for entry in ijson.items(f, "item", use_float=True):
                yield entry
                done += 1
        except ijson.JSONError as e:
            # the json module accepts a little more (NaN, Infinity) and reports lines and columns
            entries = _json_module(path, f, str(e).splitlines()[0] if str(e) else "")
            yield from entries[done:]


def _json_module(path, f, ijson_error: str = ""):
    """Parse with the json module (small files only: it builds every entry at once)."""
    size = os.fstat(f.fileno()).st_size
    if size > JSON_FALLBACK_BYTES:
        raise AnnotationError(f"{path}: invalid JSON ({ijson_error or 'not a JSON list'})")
    f.seek(0)
    try:
        return json.loads(f.read().decode("utf-8-sig"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        where = (f" at line {e.lineno} column {e.colno}: {e.msg}" if isinstance(e, json.JSONDecodeError)
                 else f": {e}")
        raise AnnotationError(f"{path}: invalid JSON{where}") from None


def iter_annotations(path: str, media_type: str, kind: str = "caption", media_dir: str = None):
    """Validated entries of one annotation file, as the file has them (streamed). With ``media_dir``,
    media paths must stay inside it."""
    schema = SCHEMAS[kind]
    i = -1
    for i, entry in enumerate(_entries(path)):
        if not isinstance(entry, dict):
            raise AnnotationError(f"{path}: entry {i}: expected an object, got {type(entry).__name__}")
        key = media_field(entry, media_type)
        if key is None:
            want = "'video' (or 'image')" if media_type == "video" else "'image'"
            raise AnnotationError(f"{path}: entry {i}: missing key {want}")
        _check_type(entry[key], (str, list), path, i, key)
        _check_media(entry[key], path, i, key, media_dir)
        for k, types in schema.items():
            if k not in entry:
                raise AnnotationError(f"{path}: entry {i}: missing key {k!r}")
            _check_type(entry[k], types, path, i, k)
        yield entry
    if i < 0:
        raise AnnotationError(f"{path}: no entries (an empty list); a corpus needs at least one")


def read_annotations(path: str, media_dir: str, media_type: str, kind: str = "caption",
                     media_outside_dir: bool = False) -> List[dict]:
    """Read and validate one annotation file; media paths are joined with ``media_dir`` into ``media``."""
    return list(load_corpus([(path, media_dir, media_type)], kind, media_outside_dir))


def load_corpus(specs: Sequence[tuple], kind: str = "caption",
                media_outside_dir: bool = False) -> AnnotationStore:
    """The corpora's validated entries in one :class:`AnnotationStore`, parsed and stored one entry
    at a time (host memory ~ the compact store, not the files' Python objects). Media paths must stay
    inside their corpus's media folder unless ``media_outside_dir`` (the config key)."""
    corpora = [(media_dir, media_type) for _, media_dir, media_type in specs]
    return AnnotationStore(((corpus, entry) for corpus, (anno, media_dir, media_type) in enumerate(specs)
                            for entry in iter_annotations(anno, media_type, kind,
                                                          None if media_outside_dir else media_dir)), corpora)
