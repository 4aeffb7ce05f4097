"""What ``singularity-ds embed`` reads: a folder of videos and images (recursively), an annotation file
(the original's JSON; captions kept), or a tar-shard corpus (``index.json`` of ``make-shards``, or a
folder or glob of tars as img2dataset / video2dataset write them), the forms training reads.

Every source becomes a list of :class:`Item` in a fixed order (sorted paths; the annotation file's
order; the shards' order), and :class:`MediaItems` reads them through the evaluation's
:class:`~singularity_ds.data.media.MediaSource` (the evaluation transform and frame sampling), as the
evaluation's :class:`~singularity_ds.eval.broken.Reading` expects a dataset to: ``dataset[i]`` gives
``media`` or raises :class:`MediaError`, which the reading lists instead of stopping."""
import json
import os
import tarfile
from dataclasses import dataclass
from typing import List

from ..data.annotations import iter_annotations, media_field
from ..data.builders import media_source
from ..data.readers import (
    IMAGE_EXTENSIONS,
    MemoryFile,
    get_frame_indices,
    load_image,
    probe_frames,
    read_frames,
)
from ..data.shards import INDEX, is_shard_source, media_member, read_index, sample_caption, shard_list
from ..errors import AnnotationError

VIDEO_EXTENSIONS = {".mp4", ".m4v", ".mkv", ".webm", ".mov", ".avi", ".flv", ".wmv", ".mpg", ".mpeg", ".gif",
                    ".ts", ".3gp"}


@dataclass
class Item:
    path: str          # relative to the source's media root (shards: "<shard>#<key>")
    media_type: str    # video | image
    caption: str = ""  # the annotation's captions, " | "-joined (several entries may share one media)
    shard: str = ""    # a shard sample: its tar file, and where its media bytes lie in it
    offset: int = 0
    size: int = 0


@dataclass
class Source:
    kind: str          # folder | annotations | shards
    root: str          # the media root: items' paths are relative to it; `serve` serves only below it
    items: List[Item]


def _folder(path: str) -> Source:
    items = []
    for folder, dirs, files in os.walk(path, followlinks=False):
        dirs.sort()
        for name in sorted(files):
            ext = os.path.splitext(name)[1].lower()
            kind = "video" if ext in VIDEO_EXTENSIONS else "image" if ext in IMAGE_EXTENSIONS else None
            if kind:
                items.append(Item(os.path.relpath(os.path.join(folder, name), path), kind))
    if not items:
        raise AnnotationError(f"{path}: no videos or images in this folder (looked for "
                              f"{', '.join(sorted(VIDEO_EXTENSIONS | IMAGE_EXTENSIONS))})")
    return Source("folder", os.path.abspath(path), items)


def _annotations(path: str, media_dir: str) -> Source:
    media_dir = os.path.abspath(media_dir or os.path.dirname(path))
    captions = {}  # (media, type) -> its captions in the file's order (a media in several entries: one item)
    # read as a video corpus: an entry's `video` key, else its `image` key (media_field), decides its type
    for entry in iter_annotations(path, "video", kind="caption", media_dir=media_dir):
        field = media_field(entry, "video")
        caps = entry["caption"] if isinstance(entry["caption"], list) else [entry["caption"]]
        for m in (entry[field] if isinstance(entry[field], list) else [entry[field]]):
            captions.setdefault((os.path.normpath(m), field), []).extend(caps)
    return Source("annotations", media_dir, [Item(m, kind, " | ".join(dict.fromkeys(c)))
                                             for (m, kind), c in captions.items()])


def _shards(path: str) -> Source:
    """A shard corpus (an index, or a glob / folder of tars as img2dataset and video2dataset write them):
    each sample's media member is located in its (local) tar, so any rank reads any sample directly,
    without streaming the shard. Without an index, a sample's media type is its member's extension's."""
    index_file = os.path.join(path, INDEX) if os.path.isfile(os.path.join(path, INDEX)) else path
    media_type = None
    if index_file.endswith(".json"):
        media_type = read_index(index_file).get("media_type", "video")
    listed = shard_list(index_file)
    base = (os.path.dirname(os.path.abspath(index_file)) if index_file.endswith(".json")
            else os.path.commonpath([os.path.dirname(os.path.abspath(u)) for u, _ in listed]))
    items = []
    for url, _ in listed:
        if ":" in url and not os.path.exists(url):
            raise AnnotationError(f"{url}: embed reads local shards only (copy them to a disk first)")
        samples = {}
        with tarfile.open(url) as tar:
            for m in tar:
                if not m.isreg():
                    continue
                key, _, ext = os.path.basename(m.name).partition(".")
                key = os.path.join(os.path.dirname(m.name), key)
                samples.setdefault(key, {})[ext.lower()] = m
        for key, members in samples.items():
            ext = media_member(members)
            if ext is None:
                continue
            media, cap = members[ext], ""
            if "json" in members or "txt" in members:
                with tarfile.open(url) as tar:
                    meta = json.load(tar.extractfile(members["json"])) if "json" in members else {}
                    try:
                        cap = sample_caption(meta, {k: tar.extractfile(m).read() for k, m in members.items()
                                                    if k == "txt"})
                    except KeyError:
                        cap = ""
            caption = " | ".join(cap) if isinstance(cap, list) else str(cap)
            kind = media_type or ("image" if "." + ext in IMAGE_EXTENSIONS else "video")
            items.append(Item(f"{os.path.relpath(url, base)}#{key}", kind, caption, shard=url,
                              offset=media.offset_data, size=media.size))
    if not items:
        raise AnnotationError(f"{index_file}: the shards hold no samples")
    return Source("shards", base, items)


def open_source(source: str, media_dir: str = None) -> Source:
    """SOURCE of ``embed`` -> its items: a shard index (``index.json``, or a folder holding one), an
    annotation file (``.json``; media below ``media_dir``, default the file's folder), or a folder.
    Images come before videos (a batch holds one media type), each in the source's order."""
    found = _open(source, media_dir)
    found.items.sort(key=lambda it: it.media_type)  # stable: the order within a type stays
    return found


def _open(source: str, media_dir: str = None) -> Source:
    if is_shard_source(source) and not source.startswith("pipe:"):  # index, folder or glob of tars
        return _shards(source)
    if not os.path.exists(source):
        raise AnnotationError(f"{source}: no such file or folder")
    if os.path.isdir(source):
        return _folder(source)
    if source.endswith(".json"):
        return _annotations(source, media_dir)
    raise AnnotationError(f"{source}: expected a folder of videos/images, an annotation .json, a shard "
                          f"{INDEX}, or a folder or glob of .tar shards")


class MediaItems:
    """The items of a :class:`Source` as an evaluation reads a dataset (see the module doc), plus what
    the index records per item: duration, frames used, and a middle-frame thumbnail (uint8 C, H, W)."""

    skip_broken = True  # embedding lists broken media; it never stops for them

    def __init__(self, source: Source, config):
        self.source, self.items = source, source.items
        self.media = {t: media_source(config, t, train=False) for t in ("video", "image")}
        self.num_frames = config.video_input.num_frames_test
        self.sample_type = config.video_input.sample_type_test

    def __len__(self):
        return len(self.items)

    def path(self, i) -> str:
        item = self.items[i]
        if item.shard:
            with open(item.shard, "rb") as f:
                f.seek(item.offset)
                return MemoryFile(item.path, f.read(item.size))
        return os.path.join(self.source.root, item.path)

    def __getitem__(self, i):
        item, path = self.items[i], self.path(i)
        source = self.media[item.media_type]
        pixels = source(path, 0)  # the evaluation's sampling is deterministic (middle / uniform)
        if item.media_type == "image":
            raw, duration, frames = load_image(path), 0.0, 1
        else:
            count, fps = probe_frames(path, source.reader)
            indices = get_frame_indices(self.num_frames, count, self.sample_type, fps)
            raw = read_frames(path, 1, "middle", source.reader)[0]
            duration, frames = count / fps, len(set(indices))
        return dict(media=pixels, failures=[], duration=duration, frames=frames, thumb=raw[0], index=i)


