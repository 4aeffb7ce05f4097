"""What a checkpoint records of its training data, and the check a resume makes against it.

A resumed run continues the interrupted epoch at its position in the data order; that order is a
function of the annotation files, so an entry added or removed in between silently sends the rest of
the epoch to other items (or past the end). Each checkpoint's client state therefore records every
training annotation file (or shard index) with its size, sha256 and entry count, and a resume over
changed files is refused with one line naming the file, unless ``resume_allow_data_change=True``.
"""
import logging
import os

from ..data import corpus_specs, is_shard_source, shard_list
from ..dist import all_gather, rank_world
from ..errors import CheckpointError
from .manifest import sha256

logger = logging.getLogger("singularity_ds.train")


def _entry_counts(config, loader) -> list:
    """Entries per ``train_file`` corpus, in its order: from the loaded annotation stores (each media
    type's corpora are one store, in config order), or the shard counts of a shard corpus."""
    specs = corpus_specs(config.train_file)
    per_type = {}
    for media_type, ld in loader.loaders.items():
        store = getattr(ld.dataset, "store", None)
        per_type[media_type] = iter(store.corpus_lengths()) if store is not None else None
    counts = []
    for path, _, media_type in specs:
        if is_shard_source(path):
            counts.append(sum(n for _, n in shard_list(path, media_type)))
        else:
            counts.append(next(per_type[media_type]))
    return counts


def data_record(config, loader) -> list:
    """``[{"file", "size", "sha256", "entries"}]`` per training corpus (rank 0 hashes, every rank gets
    its record). ``file`` is the annotation file or shard index as the config names it; a folder or
    pattern of shards has no size or hash, only its sample count."""
    record = None
    if rank_world()[0] == 0:
        record = []
        for (path, _, _), entries in zip(corpus_specs(config.train_file), _entry_counts(config, loader)):
            item = dict(file=path, entries=int(entries))
            file = os.path.join(path, "index.json") if os.path.isdir(path) else path
            if os.path.isfile(file):
                item.update(size=os.path.getsize(file), sha256=sha256(file))
            record.append(item)
    return all_gather(record)[0]


def _describe(item) -> str:
    if item is None:
        return "absent"
    digest = f", sha256 {item['sha256'][:12]}" if item.get("sha256") else ""
    return f"{item['entries']} entries{digest}"


def check_data_unchanged(saved, current, tag: str, allow: bool):
    """Refuse (:class:`CheckpointError`) to resume from ``tag`` when its recorded training data differ
    from this run's, unless ``allow`` (then warn). A checkpoint without a record is not checked."""
    if not saved:
        return
    before, now = {r["file"]: r for r in saved}, {r["file"]: r for r in current}
    files = list(before) + [f for f in now if f not in before]
    changed = [f for f in files if before.get(f) != now.get(f)]
    if not changed:
        return
    first = changed[0]
    what = (f"train_file {first} changed since checkpoint {tag} ({_describe(before.get(first))} then, "
            f"{_describe(now.get(first))} now)")
    if len(changed) > 1:
        what += f" and {len(changed) - 1} more"
    if allow:
        logger.warning("%s; resuming anyway (resume_allow_data_change=True): the interrupted epoch continues "
                       "at its position in the new data's order", what)
        return
    raise CheckpointError(f"{what}; a resumed epoch would continue at its position in a different data "
                          f"order. Resume with the files it was saved with, or pass "
                          f"resume_allow_data_change=True")
