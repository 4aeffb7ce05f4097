"""Tar-shard corpora in the WebDataset format: ``make-shards`` writes them; :class:`ShardStream`
streams them for training.

A sample is the media file's bytes (``<key>.mp4``, ``<key>.jpg`` ...) and ``<key>.json``. The JSON is
the annotation entry as the source file has it (caption / question / answer, media path relative to
MEDIA_DIR); the key is the entry's position in that file. ``index.json`` beside the shards lists
each shard with its sample count and size, the media type, and the SHA-256 of the source annotation
file. A config names a shard corpus where it would name a JSON file:
``train_file: [[path/to/index.json, null, video]]``. The index's shard URLs are relative to it, or
absolute, or anything webdataset opens: ``pipe:aws s3 cp s3://bucket/shard-000000.tar -`` streams
from an object store through a command, with no networking code here.

Streaming (one epoch, ``world`` ranks x ``W`` workers each):
- the shard order is shuffled from (seed, epoch), the same on every rank; the concatenated samples
  are cut into ``world`` equal contiguous ranges of ``N = total // world``; each rank uses the
  first ``B * batch_size`` samples of its range (``B = N // batch_size`` whole batches). Every rank
  therefore has the same number of batches and no sample is decoded twice. The tail (under one batch
  per rank, plus ``total % world``) waits for another epoch's order;
- a rank's range is split into contiguous per-worker parts of whole batches, in the order the
  DataLoader takes batches from its workers (round robin);
- each worker shuffles its samples in a buffer (``shard_shuffle_buffer``) before decoding. Frame
  sampling and transforms use the file loader's code, seeded by the sample's position in the epoch,
  and the caption and ITC ``idx`` its rule (:mod:`.captions`);
- a sample whose media does not decode (or a shard that ends early) is skipped and counted as a
  broken media. Its slot is filled with the next good sample, so the batch counts stay equal;
- resume: the samples of the batches already trained on are read again but not decoded, so a resumed
  run sees the same batches as an uninterrupted one (except near broken samples).
"""
import bisect
import contextlib
import glob
import hashlib
import itertools
import json
import logging
import os
import random
import re

import torch
from torch.utils.data import IterableDataset

from ..errors import AnnotationError, MediaError, describe
from .annotations import load_corpus, media_field
from .captions import caption_and_idx
from .loader import epoch_seed, item_seed
from .media import MediaSource
from .readers import MemoryFile
from .worker_errors import items_or_error

logger = logging.getLogger(__name__)

INDEX = "index.json"
UNITS = {"": 1, "B": 1, "KB": 10 ** 3, "MB": 10 ** 6, "GB": 10 ** 9, "KIB": 2 ** 10,
         "MIB": 2 ** 20, "GIB": 2 ** 30}


def parse_size(text) -> int:
    """``1GB`` / ``500MB`` / ``2GiB`` / ``1000000`` -> bytes."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).upper() not in UNITS:
        raise ValueError(f"shard size {text!r}: expected a number with an optional unit "
                         f"(KB, MB, GB, MiB, GiB)")
    return int(float(m.group(1)) * UNITS[m.group(2).upper()])


def is_shard_source(path) -> bool:
    """A corpus given as a shard index (file, or folder holding one), a pattern of .tar files, or a folder
    of .tar files without an index (what img2dataset and video2dataset write)."""
    path = str(path)
    return (path.endswith(INDEX) or re.search(r"\.tar($|[*?\[{}])", path) is not None
            or path.startswith("pipe:") or os.path.isfile(os.path.join(path, INDEX))
            or tar_folder(path) is not None)


def tar_folder(path: str):
    """A folder without ``index.json`` that holds .tar files -> the glob of them; else None."""
    if (os.path.isdir(path) and not os.path.isfile(os.path.join(path, INDEX))
            and glob.glob(os.path.join(glob.escape(path), "*.tar"))):
        return os.path.join(glob.escape(path), "*.tar")
    return None


# members of a sample that describe it rather than hold its media: ours (KEY.json, KEY.txt) and the field's
# (img2dataset / video2dataset: KEY.txt caption, KEY.json metadata; webdataset's KEY.cls label)
TEXT_MEMBERS = ("json", "txt", "cls")


def media_member(exts):
    """The extension of a sample's media among ``exts`` (a sample's keys, in tar order): the first that is
    neither text nor metadata (nor webdataset's ``__key__`` / ``__url__``); None when it has none."""
    return next((e for e in exts if not e.startswith("__") and e not in TEXT_MEMBERS), None)


def unreadable_tar(path: str, e: BaseException) -> AnnotationError:
    """The one line for a tar that cannot be read (damaged, cut short, not a tar)."""
    return AnnotationError(f"{path}: not a readable tar ({describe(e)}); write it again (make-shards, or the "
                           f"tool that made it) or leave it out of the pattern")


def shard_media_type(source: str) -> str:
    """The media type of a corpus of tars without an index that declares it (img2dataset's, video2dataset's):
    its first sample's media member's (an image ending: image, else video)."""
    import tarfile

    from .readers import IMAGE_EXTENSIONS
    url = shard_list(source)[0][0]
    try:
        with tarfile.open(url) as tar:
            for m in tar:
                ext = os.path.basename(m.name).partition(".")[2].lower()
                if m.isreg() and media_member([ext]):
                    return "image" if "." + ext in IMAGE_EXTENSIONS else "video"
    except (tarfile.TarError, OSError) as e:
        raise unreadable_tar(url, e) from None
    return "video"


def sample_caption(meta: dict, sample: dict):
    """A sample's caption: KEY.json's ``caption`` (a string or list, as in an annotation file), else the
    KEY.txt the field's tools write."""
    if meta.get("caption") is not None:  # the field's tools write "caption": null when no column had one
        return meta["caption"]
    if "txt" in sample:
        return sample["txt"].decode("utf-8", errors="replace")
    raise KeyError("caption (no 'caption' in its .json and no .txt)")


def make_shards(anno: str, media_dir: str, out_dir: str, shard_size="1GB", media_type: str = "video",
                kind: str = "caption", overwrite: bool = False, progress: bool = True,
                media_outside_dir: bool = False) -> dict:
    """Write the corpus ``anno`` + ``media_dir`` as tar shards and ``index.json`` in ``out_dir`` (media
    paths outside ``media_dir`` are refused unless ``media_outside_dir``, as in training).

    Entries whose media file is missing are left out and listed in the index (``skipped``). Each shard is
    written under a temporary name and renamed when complete; the index is written last."""
    from tqdm import tqdm
    limit = parse_size(shard_size)
    index_path = os.path.join(out_dir, INDEX)
    if os.path.exists(index_path) and not overwrite:
        raise AnnotationError(f"{index_path}: a shard corpus is already there; "
                              f"pass --overwrite to replace it")
    # validated, streamed into the compact store
    entries = load_corpus([(anno, media_dir, media_type)], kind, media_outside_dir)
    os.makedirs(out_dir, exist_ok=True)
    # --overwrite: no stale shard stays for a glob
    for old in glob.glob(os.path.join(out_dir, "shard-*.tar")):
        os.remove(old)
    skipped, writer = [], ShardWriter(out_dir, limit)
    for i, entry in enumerate(tqdm(entries, desc="make-shards", unit="sample", disable=not progress)):
        media = entry.pop("media")
        if isinstance(media, list):
            raise AnnotationError(f"{anno}: entry {i}: several media files in one entry; "
                                  f"a shard sample holds one")
        if not os.path.isfile(media):
            skipped.append(dict(idx=i, file=media, reason="no such file"))
            continue
        ext = os.path.splitext(media)[1].lstrip(".").lower() or "bin"
        with open(media, "rb") as f:
            writer.write(f"{i:09d}", ext, f.read(), entry)
    return write_index(out_dir, writer.close(), media_type, kind, anno, skipped)


class ShardWriter:
    """Samples into tar shards of about ``limit`` bytes (a shard ends once it reaches it). Each shard is
    written under a temporary name (``.NAME.tmp``) and renamed when complete, so a shard file that
    exists is whole. ``name(n)`` names the n-th shard."""

    def __init__(self, out_dir: str, limit: int, name=lambda n: f"shard-{n:06d}.tar"):
        self.out_dir, self.limit, self.name = out_dir, limit, name
        self.shards, self.writer, self.current = [], None, None

    def write(self, key: str, ext: str, data: bytes, meta: dict) -> None:
        """One sample: the media bytes as ``key.ext``, ``meta`` as ``key.json`` and its caption as
        ``key.txt`` (what img2dataset / OpenCLIP pipelines read; several captions one a line)."""
        import webdataset as wds
        if self.writer is None:
            url = self.name(len(self.shards))
            self.current = dict(url=url, tmp=os.path.join(self.out_dir, f".{url}.tmp"), samples=0)
            self.writer = wds.TarWriter(self.current["tmp"])
        sample = {"__key__": key, ext: data, "json": json.dumps(meta).encode()}
        caption = meta.get("caption")
        if caption is not None:
            text = "\n".join(map(str, caption)) if isinstance(caption, list) else str(caption)
            sample["txt"] = text.encode()
        self.writer.write(sample)
        self.current["samples"] += 1
        if self.writer.tarstream.fileobj.tell() >= self.limit:
            self._finish()

    @property
    def next_url(self) -> str:
        """The shard the next :meth:`write` goes to."""
        return self.current["url"] if self.writer is not None else self.name(len(self.shards))

    def _finish(self):
        self.writer.close()
        path = os.path.join(self.out_dir, self.current["url"])
        os.replace(self.current["tmp"], path)
        self.shards.append(dict(url=self.current["url"], samples=self.current["samples"],
                                bytes=os.path.getsize(path)))
        self.writer = None

    def close(self) -> list:
        """Finish the open shard; -> ``[{"url", "samples", "bytes"}]`` of every shard written."""
        if self.writer is not None:
            self._finish()
        return self.shards


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(2 ** 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_index(out_dir: str, shards: list, media_type: str, kind: str, anno: str, skipped: list,
                anno_sha256: str = None, **extra) -> dict:
    """``out_dir/index.json``: the shards (``ShardWriter.close()``'s list) and their source file."""
    from ..fileio import write_json
    index = dict(format="webdataset", version=1, media_type=media_type, kind=kind,
                 annotation=os.path.abspath(anno), annotation_sha256=anno_sha256 or file_sha256(anno),
                 samples=sum(s["samples"] for s in shards), shards=shards, skipped=skipped, **extra)
    write_json(index, os.path.join(out_dir, INDEX))
    return index


def draw_shards(shards, weights, samples: int, seed: int):
    """The epoch's shard sequence ``[(url, samples)]`` holding exactly ``samples`` samples: shards drawn with
    replacement from ``random.Random(seed)``, each with probability proportional to its weight (its
    corpus's), the last one cut. Shards without samples or weight are never drawn."""
    pool = [(s, w) for s, w in zip(shards, weights) if w > 0 and s[1] > 0]
    if samples > 0 and not pool:
        raise AnnotationError("config key 'train_corpus_weights': no shard with samples has a weight above 0")
    cum = list(itertools.accumulate(w for _, w in pool))
    mass, last = cum[-1] if cum else 0.0, len(cum) - 1
    rng, order, total = random.Random(seed), [], 0
    while total < samples:  # random.choices(pool, cum_weights=cum) without its per-call overhead
        (url, n), _ = pool[bisect.bisect(cum, rng.random() * mass, 0, last)]
        n = min(n, samples - total)
        order.append((url, n))
        total += n
    return order


def _count_samples(path: str) -> int:
    """Samples in a local tar, grouped as :func:`read_shard` groups them (headers only, no data read)."""
    import tarfile

    from webdataset.tariterators import base_plus_ext
    count, last = 0, None
    try:
        with tarfile.open(path) as tar:
            for m in tar:
                key = base_plus_ext(m.name)[0] if m.isreg() else None
                if key is not None and key != last:
                    count, last = count + 1, key
    except (tarfile.TarError, OSError, EOFError) as e:
        raise unreadable_tar(path, e) from None
    return count


def read_index(path: str) -> dict:
    """A shard corpus's ``index.json``; missing, cut short or overwritten: the one line naming it."""
    try:
        with open(path) as f:
            index = json.load(f)
    except FileNotFoundError:
        raise AnnotationError(f"{path}: shard index not found") from None
    except (OSError, ValueError) as e:  # json's decode errors, UnicodeDecodeError: ValueErrors
        raise AnnotationError(f"{path}: not a shard index ({describe(e)}); write it again with "
                              f"make-shards") from None
    if not isinstance(index, dict):
        raise AnnotationError(f"{path}: not a shard index (a JSON {type(index).__name__}, not an object); "
                              f"write it again with make-shards")
    return index


def shard_list(source: str, media_type: str = None):
    """-> [(url, samples)] of a shard corpus: its index (file or folder), or a local glob / brace
    pattern of .tar files or a folder of them (counted by reading their headers). An index of another
    media type is refused."""
    path = str(source)
    if os.path.isdir(path):
        path = tar_folder(path) or os.path.join(path, INDEX)
    if path.endswith(".json"):
        index = read_index(path)
        try:
            base = os.path.dirname(os.path.abspath(path))
            shards = [(s["url"] if ":" in s["url"] or os.path.isabs(s["url"])
                       else os.path.join(base, s["url"]), int(s["samples"])) for s in index["shards"]]
        except (ValueError, KeyError, TypeError) as e:
            raise AnnotationError(f"{path}: not a shard index ({type(e).__name__}: {e}); write it again "
                                  f"with make-shards") from None
        if media_type and index.get("media_type", media_type) != media_type:
            raise AnnotationError(f"{path}: a shard corpus of {index['media_type']} samples, "
                                  f"declared as {media_type}")
        return shards
    if path.startswith("pipe:") or "://" in path:
        raise AnnotationError(f"{path}: remote shards need an index.json listing them "
                              f"with their sample counts")
    from braceexpand import braceexpand
    files = sorted(f for pattern in braceexpand(path) for f in glob.glob(pattern))
    if not files:
        raise AnnotationError(f"{path}: no shard matches")
    return [(f, tool_stats(f).get("successes") or _count_samples(f)) for f in files]


def tool_stats(tar: str) -> dict:
    """The ``NNNNN_stats.json`` img2dataset / video2dataset write beside ``NNNNN.tar`` (``successes``: the
    samples in the tar, ``count``: the URLs tried), or {} where there is none or it is unreadable (the
    tar's headers are counted then)."""
    path = os.path.splitext(tar)[0] + "_stats.json"
    try:
        with open(path) as f:
            stats = json.load(f)
    except (OSError, ValueError):
        return {}
    ok = isinstance(stats, dict) and isinstance(stats.get("successes"), int) and stats["successes"] >= 0
    return stats if ok else {}


def tool_failures(tar: str) -> list:
    """The URLs the field's tool could not turn into a sample of ``tar``: ``url (status: error)`` for each
    row of its ``NNNNN.parquet`` whose status is not ``success``; [] without one."""
    path = os.path.splitext(tar)[0] + ".parquet"
    if not os.path.isfile(path):
        return []
    import pyarrow.parquet as pq
    try:
        rows = pq.read_table(path, columns=["url", "status", "error_message"]).to_pylist()
    except (OSError, ValueError, KeyError) as e:  # not the tool's parquet: nothing to add
        logger.warning("%s: not read (%s)", path, describe(e))
        return []
    return [f"{r['url']} ({r['status']}: {r['error_message'] or ''})".replace(": )", ")")
            for r in rows if r["status"] != "success"]


def read_shard(url: str):
    """The samples of one shard, in order: dicts ``{"__key__": key, "__url__": url, ext: bytes, ...}``."""
    import webdataset as wds
    from webdataset.tariterators import base_plus_ext, tar_file_iterator
    stream, finished = wds.gopen(url), False
    try:
        sample = None
        for f in tar_file_iterator(stream):
            key, ext = base_plus_ext(f["fname"])
            if key is None:
                continue
            if sample is not None and sample["__key__"] != key:
                yield sample
                sample = None
            sample = sample or {"__key__": key, "__url__": url}
            sample[ext.lower()] = f["data"]
        if sample is not None:
            yield sample
        finished = True
    finally:
        proc = getattr(stream, "proc", None)  # a pipe: URL's command
        if not finished and proc is not None and proc.poll() is None:
            proc.kill()  # stopped mid-shard (the rest belongs to another worker): don't wait for the writer
        try:
            stream.close()
        except Exception as e:  # the killed command's exit status
            if finished:
                raise
            logger.debug("shard %s: closing the stream after an early stop: %s", url, e)


class ShardStream(IterableDataset):
    """Caption items (media, caption, idx, path, failures) streamed from tar shards; see the module doc."""

    def __init__(self, shards, source: MediaSource, batch_size: int, rank: int = 0, world: int = 1,
                 seed: int = 0, shuffle: bool = True, buffer: int = 500, has_multi_vision_gt=False,
                 is_paragraph_retrieval=False, weights=None, samples: int = None):
        """``weights`` (one per shard) and ``samples`` (per epoch, over all ranks): each epoch's shard order
        is drawn with replacement (:func:`draw_shards`, see :mod:`.mixing`) instead of shuffled."""
        self.shards, self.source, self.batch_size = list(shards), source, batch_size
        self.rank, self.world, self.seed = rank, world, seed
        self.shuffle, self.buffer = shuffle, max(1, buffer)
        self.multi_vision_gt, self.paragraph = has_multi_vision_gt, is_paragraph_retrieval
        self.weights, self.samples = (list(weights) if weights is not None else None), samples
        self.epoch, self.skip, self._drawn = 0, 0, (None, None)
        total = sum(n for _, n in self.shards) if samples is None else samples
        self.per_rank = total // world
        self.batches = self.per_rank // batch_size
        if self.batches == 0:
            share = " (its media type's share of samples_per_epoch)" if samples is not None else ""
            raise AnnotationError(f"shard corpus {self.shards[0][0] if self.shards else '(empty)'}...: "
                                  f"{self.per_rank} samples per rank{share}, fewer than one batch of "
                                  f"{batch_size}")

    @property
    def media_type(self):
        return self.source.media_type

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def __len__(self):
        return self.batches * self.batch_size

    def worker_range(self, worker: int, workers: int):
        """Global positions [start, stop) of this rank's worker in the epoch's sample order."""
        counts = [self.batches // workers + (w < self.batches % workers) for w in range(workers)]
        start = self.rank * self.per_rank + self.batch_size * sum(counts[:worker])
        return start, start + self.batch_size * counts[worker]

    def _order(self):
        if self.weights is not None:  # drawn once per epoch and process (every worker asks several times)
            if self._drawn[0] != self.epoch:
                self._drawn = (self.epoch, draw_shards(self.shards, self.weights, self.samples,
                                                       epoch_seed(self.seed, self.epoch)))
            return self._drawn[1]
        order = list(self.shards)
        if self.shuffle:
            random.Random(epoch_seed(self.seed, self.epoch)).shuffle(order)
        return order

    def _raw(self, start: int, stop: int):
        """(position, sample) for positions [start, stop), reading only the shards that hold them."""
        offset = 0
        for url, count in self._order():
            end = min(stop, offset + count)  # never more than the index counts: positions stay unique
            if end > start:
                pos = offset
                try:
                    with contextlib.closing(read_shard(url)) as samples:
                        for sample in samples:
                            if pos >= end:
                                break
                            if pos >= start:
                                yield pos, sample
                            pos += 1
                except Exception as e:  # a truncated or unreadable shard: its missing slots are filled
                    logger.warning("shard %s: read error after %d samples (%s)", url, pos - offset, e)
                if pos < end:
                    logger.warning("shard %s: %d samples where the index says %d", url, pos - offset, count)
            offset += count
            if offset >= stop:
                return

    def _urls(self, start: int, stop: int):
        """The shards holding positions [start, stop) this epoch."""
        urls, offset = [], 0
        for url, count in self._order():
            if offset + count > start and offset < stop:
                urls.append(url)
            offset += count
        return urls

    def _shuffled(self, raw, rng):
        if not self.shuffle:
            yield from raw
            return
        pool = []
        for item in raw:
            if len(pool) < self.buffer:
                pool.append(item)
                continue
            j = rng.randrange(len(pool))
            pool[j], item = item, pool[j]
            yield item
        rng.shuffle(pool)
        yield from pool

    def _item(self, pos: int, sample: dict) -> dict:
        seed = item_seed(self.seed, self.epoch, pos)
        meta = json.loads(sample["json"]) if "json" in sample else {}
        ext = media_member(sample)
        if ext is None:
            raise KeyError("media (the sample has only text members)")
        field = media_field(meta, self.media_type)
        name = str(meta[field]) if field else sample["__key__"]  # the annotation's media path, as in the file
        path = f"{name} (shard sample {sample['__key__']})"
        media = self.source(MemoryFile(path, sample[ext]), seed)
        caption, idx = caption_and_idx(sample_caption(meta, sample), name, seed, self.multi_vision_gt,
                                       self.paragraph)
        return dict(media=media, caption=caption, idx=idx, path=path, failures=[])

    def __iter__(self):
        return items_or_error(self._items(), self.batch_size)  # in a worker, an error arrives whole

    def _items(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        # resume after `done` batches: the loader restarts its round robin at worker 0, so this worker
        # continues the part of the worker whose batch came next
        done = self.skip // self.batch_size
        worker = (worker + done) % workers
        start, stop = self.worker_range(worker, workers)
        skip = self.batch_size * (done // workers + (worker < done % workers))
        self.skip = 0
        rng = random.Random(item_seed(self.seed, self.epoch, start))
        failures, last, produced = [], None, 0
        for n, (pos, sample) in enumerate(self._shuffled(self._raw(start, stop), rng)):
            if n < skip:  # trained on before the resume: read, not decoded
                continue
            try:
                item = self._item(pos, sample)
            except (MediaError, KeyError, ValueError, StopIteration) as e:
                reason = e.reason if isinstance(e, MediaError) else f"bad sample ({type(e).__name__}: {e})"
                failures.append((f"{sample.get('__url__')}#{sample.get('__key__')}", reason))
                logger.warning("broken shard sample %s (%s); its slot takes the next good sample",
                               *failures[-1])
                continue
            for _ in range(len(failures) + 1):  # this slot, and those of the broken samples before it
                yield dict(item, failures=failures)
                failures, produced = [], produced + 1
            last = item
        missing = stop - start - skip - produced  # broken samples at the end, or a shard that ended early
        if missing > 0:
            if last is None:  # nothing to fill the slots with: stop, naming the shards
                urls = self._urls(start, stop)
                raise MediaError(", ".join(urls), f"no sample of this worker's part "
                                                  f"({stop - start - skip} samples) could be read and "
                                                  f"decoded")
            where = ", ".join(self._urls(start, stop))
            failures += [(where, "shard ended early")] * (missing - len(failures))
            for _ in range(missing):
                yield dict(last, failures=failures)
                failures = []
