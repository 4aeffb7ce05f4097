"""Checks of a run's data before any work: each corpus's annotation file, its media folder, and a
sample of its media read exactly as training reads them.

``singularity-ds doctor`` runs everything (:func:`check_corpus` per corpus, in a process pool, with a
progress bar); training runs :func:`preflight`, the cheap part, at start-up: the annotation files are
parsed and validated by the loaders anyway, so it adds that every media folder exists and that the
first media files of each corpus are there (a wrong ``data_root`` fails in a second, not at the first
batch of a job that waited a day in the queue). ``singularity-ds corpus-stats`` reads every media file
of a corpus through the same :func:`check_media`.
"""
import multiprocessing
import os
import random
from typing import List, NamedTuple

from ..errors import AnnotationError, MediaError
from .annotations import iter_annotations, load_corpus, media_field
from .readers import MemoryFile
from .shards import is_shard_source, shard_list

PREFLIGHT_FILES = 16  # media files per corpus whose existence training checks at start-up


class CorpusReport(NamedTuple):
    name: str          # "train_file[0]", "test_file.val", ...
    anno: str
    media_type: str
    entries: int
    sampled: int       # distinct media files read (decoded) by the check
    missing: List[str]  # sampled paths that do not exist
    broken: List[str]   # sampled paths that exist but cannot be read ("path: reason")
    note: str = ""


def _paths(entry) -> list:
    media = entry["media"]
    return list(media) if isinstance(media, list) else [media]


def preflight(specs, name: str = "train_file", kind: str = "caption"):
    """Every media folder exists, and not all of the first :data:`PREFLIGHT_FILES` media of a corpus are
    missing (single missing files are broken media, replaced in training); one error naming the corpus,
    the folder or a file, and the config key to fix otherwise. Reads only the first entries."""
    for i, (anno, media_dir, media_type) in enumerate(specs):
        if is_shard_source(anno):
            continue
        if media_dir and not os.path.isdir(media_dir):
            raise AnnotationError(f"config key {name!r}: corpus {i} ({anno}): media folder {media_dir} "
                                  f"does not exist; fix the path (or data_root / SL_DATA_DIR)")
        paths = []
        for j, entry in enumerate(iter_annotations(anno, media_type, kind)):
            if j == PREFLIGHT_FILES:
                break
            media = entry[media_field(entry, media_type)]
            paths += [os.path.join(media_dir, m) for m in (media if isinstance(media, list) else [media])]
        if paths and not any(os.path.exists(p) for p in paths):
            raise AnnotationError(f"config key {name!r}: corpus {i} ({anno}): none of its first "
                                  f"{len(paths)} media files exist (e.g. {paths[0]}); "
                                  f"is the media folder {media_dir} right?")


_SOURCE = None  # the MediaSource of this pool worker


def _worker_init(source):
    # spawned, not forked: a fork of a process whose decoder and torch thread pools are running can
    # deadlock in the child; one thread each, as DataLoader workers
    global _SOURCE
    import torch
    torch.set_num_threads(1)
    _SOURCE = source


def media_pool(source, workers: int):
    """A process pool whose workers read media through ``source`` (:func:`check_media` with
    :func:`worker_source`); spawned, one torch thread each."""
    ctx = multiprocessing.get_context("spawn")
    return ctx.Pool(max(1, workers), initializer=_worker_init, initargs=(source,))


def worker_source():
    """The MediaSource of this pool worker (set by :func:`media_pool`)."""
    return _SOURCE


def check_media(source, path):
    """Read one media file (a path, or a shard sample's :class:`~.readers.MemoryFile`) exactly as training
    reads it -> ``(status, line, output)``: ``("ok", path, what source returned)``, ``("missing", path,
    None)`` or ``("broken", "path: reason", None)``."""
    if not isinstance(path, MemoryFile) and not os.path.exists(path):
        return "missing", path, None
    try:
        return "ok", path, source(path, 0)
    except MediaError as e:
        return "broken", f"{path}: {e.reason}", None
    except Exception as e:  # a decoder's own error: a broken file all the same
        return "broken", f"{path}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", None


def _read(path: str):
    status, line, _ = check_media(_SOURCE, path)
    return status, line


def check_corpus(name: str, spec: tuple, source, kind: str = "caption", fraction: float = 0.05,
                 workers: int = 2, seed: int = 0, progress: bool = True) -> CorpusReport:
    """Parse and validate the annotation file (AnnotationError: one line naming file/entry/key), then read
    ``fraction`` of its media (at least one, chosen with ``seed``) through ``source`` (a MediaSource) in
    ``workers`` processes."""
    anno, media_dir, media_type = spec
    if is_shard_source(anno):
        shards = shard_list(anno, media_type)
        absent = [url for url, _ in shards if ":" not in url and not os.path.isfile(url)]
        return CorpusReport(name, anno, media_type, sum(n for _, n in shards), 0, absent, [],
                            f"{len(shards)} shards (media inside the shards are not sampled)")
    store = load_corpus([spec], kind)
    if len(store) == 0:
        raise AnnotationError(f"{anno}: no entries (config key {name!r})")
    count = min(len(store), max(1, round(fraction * len(store))))
    picked = sorted(random.Random(seed).sample(range(len(store)), count))
    paths = list(dict.fromkeys(p for i in picked for p in _paths(store[i])))  # each media file once
    from tqdm import tqdm
    with media_pool(source, workers) as pool:
        results = list(tqdm(pool.imap(_read, paths, chunksize=4), total=len(paths), desc=f"media {name}",
                            disable=not progress, dynamic_ncols=True))
    return CorpusReport(name, anno, media_type, len(store), len(paths),
                        [p for status, p in results if status == "missing"],
                        [p for status, p in results if status == "broken"])
