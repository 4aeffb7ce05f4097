"""``singularity-ds corpus-stats SOURCE``: what a corpus holds and how much of it training can use.

SOURCE is a shard corpus (``index.json``, its folder, or a ``shard-*.tar`` pattern, as ``make-shards``
writes), an annotation JSON with ``--media-dir``, or an ``available_corpus`` name of a config (``webvid``,
``webvid_14m``, ...: every corpus it lists). Every media file is read as training reads it
(:func:`.checks.check_media`, the check ``doctor`` runs, in a process pool with a progress bar), and the
report gives:

- entries (for a shard corpus: its samples plus the entries ``make-shards`` left out, their file missing),
  usable entries (every media file there and decodable), missing and broken files;
- durations, frame counts and resolutions of the usable media, caption lengths in tokens of the model's
  tokenizer (``text_encoder``: what ``max_txt_l`` counts, ``[CLS]`` excluded), with histograms in a PNG;
- duplicates: entries whose media path an earlier entry has (normal for COCO's five captions per image),
  entries whose caption an earlier entry has, and media whose bytes equal another media path's;
- with ``--expected N`` (the corpus's published size), the usable count against it, so a corpus that lost
  a quarter of its links is seen before training, not after.

``OUT/corpus_stats.json`` holds the numbers, ``OUT/corpus_stats.png`` the histograms.
"""
import argparse
import contextlib
import hashlib
import json
import os
from array import array
from collections import Counter

import numpy as np
import torch

from ..errors import AnnotationError, ConfigError
from .annotations import corpus_specs, load_corpus, media_field
from .checks import check_media, media_pool, worker_source
from .media import MediaSource
from .readers import MemoryFile, probe_frames
from .shards import (
    INDEX,
    is_shard_source,
    media_member,
    read_index,
    read_shard,
    sample_caption,
    shard_list,
    shard_media_type,
    tool_failures,
)
from .text import pre_text

EXAMPLES = 20  # missing / broken files named in the summary


def _digest(text: str) -> bytes:
    return hashlib.blake2b(text.encode(), digest_size=8).digest()  # sets of 10M keys stay small


def _inspect(path, source=None) -> dict:
    """One media file's status, content hash and, when it decodes, its size and length (in a pool worker:
    through the pool's source)."""
    source = source or worker_source()
    status, line, pixels = check_media(source, path)
    info = dict(status=status, line=line)
    if status == "missing":
        return info
    if isinstance(path, MemoryFile):
        data = path.data
    else:
        with open(path, "rb") as f:
            data = f.read()
    info.update(sha=hashlib.blake2b(data, digest_size=16).hexdigest(), bytes=len(data))
    if status == "ok":
        info["height"], info["width"] = (int(v) for v in pixels.shape[-2:])  # decoded, untransformed
        if source.media_type == "video":
            frames, fps = probe_frames(path, source.reader)  # decord, else PyAV (as it was read)
            info.update(frames=int(frames), fps=float(fps), duration=frames / fps if fps else None)
    return info


class Tally:
    """Everything the report counts, filled entry by entry and media file by media file."""

    def __init__(self, tokenizer, tokenizer_name: str, max_txt_l: int):
        self.tokenizer, self.tokenizer_name, self.max_txt_l = tokenizer, tokenizer_name, max_txt_l
        self.entries = self.usable = 0
        self.media = Counter()  # status -> media files
        self.examples = {"missing": [], "broken": []}
        self.keys, self.captions, self.hashes, self.hashed_keys = set(), set(), set(), set()
        self.dup_keys = self.dup_captions = self.dup_content = 0
        # compact columns: a 10M-entry corpus stays in hundreds of MB
        self.tokens, self.frames, self.shorter = array("l"), array("l"), array("l")
        self.durations, self.fps = array("d"), array("d")
        self.sizes = Counter()  # "WxH" -> media
        self.bytes = 0
        self._pending = []

    def entry(self, key: str, caption, statuses):
        """One annotation entry: its media key (path as the file has it), caption(s), its media statuses."""
        self.entries += 1
        self.usable += all(s == "ok" for s in statuses) and bool(statuses)
        k = _digest(key)
        self.dup_keys += k in self.keys
        self.keys.add(k)
        c = _digest(json.dumps(caption))
        self.dup_captions += c in self.captions
        self.captions.add(c)
        self._pending += caption if isinstance(caption, list) else [caption]
        if len(self._pending) >= 1024:
            self.flush()

    def missing_entries(self, paths):
        """Entries left out of a shard corpus (their file was missing at make-shards)."""
        for path in paths:
            self.entries += 1
            self.media["missing"] += 1
            if len(self.examples["missing"]) < EXAMPLES:
                self.examples["missing"].append(path)

    def media_file(self, key: str, info: dict):
        status = info["status"]
        self.media[status] += 1
        if status != "ok" and len(self.examples[status]) < EXAMPLES:
            self.examples[status].append(info["line"])
        if "sha" in info:
            k = _digest(key)
            if k not in self.hashed_keys:  # one media path read twice (a sample per entry): no duplicate
                self.hashed_keys.add(k)
                self.dup_content += info["sha"] in self.hashes
                self.hashes.add(info["sha"])
            self.bytes += info["bytes"]
        if status == "ok":
            self.sizes[f"{info['width']}x{info['height']}"] += 1
            self.shorter.append(min(info["width"], info["height"]))
            if "frames" in info:
                self.frames.append(info["frames"])
                self.fps.append(info["fps"])
                if info["duration"] is not None:
                    self.durations.append(info["duration"])

    def flush(self):
        if self._pending:
            ids = self.tokenizer([pre_text(c) for c in self._pending], add_special_tokens=False).input_ids
            self.tokens.extend(len(i) for i in ids)
            self._pending = []


def _stats(values) -> dict:
    if not len(values):
        return None
    a = np.asarray(values, dtype=np.float64)
    p5, p50, p95 = np.percentile(a, [5, 50, 95])
    return dict(count=int(a.size), min=float(a.min()), p5=float(p5), median=float(p50), mean=float(a.mean()),
                p95=float(p95), max=float(a.max()))


@contextlib.contextmanager
def _mapper(source, workers: int):
    """``imap(paths)`` -> infos: in ``workers`` processes, or in this one (``workers=0``)."""
    if workers == 0:
        yield lambda paths: (_inspect(p, source) for p in paths)
        return
    with media_pool(source, workers) as pool:
        yield lambda paths: pool.imap(_inspect, paths, chunksize=4)


def _scan_files(spec, tally, workers, source, media_outside_dir, progress):
    from tqdm import tqdm
    anno, media_dir, media_type = spec
    store = load_corpus([spec], "caption", media_outside_dir)

    def media_of(entry):
        return entry["media"] if isinstance(entry["media"], list) else [entry["media"]]

    def unique_paths():  # each media file is read once, however many entries name it
        seen = set()
        for entry in store:
            for path in media_of(entry):
                if _digest(path) not in seen:
                    seen.add(_digest(path))
                    yield path

    status = {}  # path digest -> status
    total = len({_digest(p) for entry in store for p in media_of(entry)})
    with _mapper(source, workers) as imap:
        bar = tqdm(imap(unique_paths()), total=total, disable=not progress, unit="file", dynamic_ncols=True,
                   desc=f"corpus-stats {os.path.basename(anno)}")
        for path, info in zip(unique_paths(), bar):
            status[_digest(path)] = info["status"]
            tally.media_file(os.path.relpath(path, media_dir) if media_dir else path, info)
    for entry in store:
        key = entry[media_field(entry, media_type)]
        tally.entry(json.dumps(key) if isinstance(key, list) else key, entry["caption"],
                    [status[_digest(p)] for p in media_of(entry)])


def _scan_shards(spec, tally, workers, source, progress):
    from tqdm import tqdm
    path, _, media_type = spec
    shards = shard_list(path, media_type)
    index = os.path.join(path, INDEX) if os.path.isdir(path) else path
    if index.endswith(".json") and os.path.isfile(index):  # a folder of tars has none
        tally.missing_entries([s["file"] for s in read_index(index).get("skipped", [])])
    else:  # the URLs img2dataset / video2dataset could not download, from their parquet files
        tally.missing_entries([f for url, _ in shards for f in tool_failures(url)])
    bar = tqdm(total=sum(n for _, n in shards), disable=not progress, unit="sample", dynamic_ncols=True,
               desc=f"corpus-stats {os.path.basename(os.path.dirname(index))}")
    with _mapper(source, workers) as imap:
        for url, count in shards:  # a shard at a time: the pool never holds more than one in memory
            samples, error = [], None
            try:
                for sample in read_shard(url):
                    samples.append(sample)
            except Exception as e:  # a truncated shard: the samples it lost are broken
                error = f"{url}: read error after {len(samples)} samples ({type(e).__name__}: {e})"
            metas, files = [], []
            for sample in samples:
                ext = media_member(sample)
                meta = json.loads(sample.get("json", b"{}"))
                field = media_field(meta, media_type)
                name = str(meta[field]) if field else sample["__key__"]
                try:
                    caption = sample_caption(meta, sample)
                except KeyError:
                    caption = ""
                metas.append((name, caption))
                files.append(MemoryFile(f"{name} (shard sample {url}#{sample['__key__']})",
                                        sample[ext] if ext else b""))
            for (name, caption), info in zip(metas, imap(files)):
                tally.media_file(name, info)
                tally.entry(name, caption, [info["status"]])
                bar.update()
            for k in range(len(samples), count):  # the index counts more samples than the shard holds
                line = error or f"{url}: {count} samples in the index, {len(samples)} in the shard"
                tally.media_file(f"{url}#{k}", dict(status="broken", line=line))
                tally.entry(f"{url}#{k}", "", ["broken"])
                bar.update()
    bar.close()


def _plot(tally, path: str, title: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = [("duration (s)", tally.durations), ("frames", tally.frames),
              ("shorter side (px)", tally.shorter),
              (f"caption length (tokens; max_txt_l={tally.max_txt_l})", tally.tokens)]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    for ax, (name, values) in zip(axes, panels):
        ax.set_title(name, fontsize=10)
        if len(values):
            ax.hist(values, bins=min(50, max(5, len(set(values)))), color="#4c72b0")
        else:
            ax.text(0.5, 0.5, "none", ha="center", va="center", transform=ax.transAxes)
        if name.startswith("caption"):
            ax.axvline(tally.max_txt_l - 1, color="#c44e52", linestyle="--", linewidth=1)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def summarize(tally, source: str, specs, expected=None) -> dict:
    tally.flush()
    over = sum(t > tally.max_txt_l - 1 for t in tally.tokens)  # [CLS] takes one of max_txt_l
    out = dict(source=source, corpora=[dict(anno=a, media_dir=d or None, media_type=m) for a, d, m in specs],
               entries=tally.entries, usable_entries=tally.usable,
               media_files=sum(tally.media.values()), usable_media=tally.media["ok"],
               missing_media=tally.media["missing"], broken_media=tally.media["broken"],
               bytes=tally.bytes, missing_examples=tally.examples["missing"],
               broken_examples=tally.examples["broken"],
               duration_s=_stats(tally.durations), frames=_stats(tally.frames), fps=_stats(tally.fps),
               shorter_side_px=_stats(tally.shorter), resolutions=tally.sizes.most_common(10),
               caption_unit=f"{tally.tokenizer_name} tokens without [CLS]",
               caption_tokens=_stats(tally.tokens), captions=len(tally.tokens),
               captions_truncated=int(over), max_txt_l=tally.max_txt_l,
               duplicates=dict(media_paths=tally.dup_keys, captions=tally.dup_captions,
                               content=tally.dup_content),
               expected=expected)
    if expected:
        out["missing_vs_expected_pct"] = round(100 * max(0, expected - tally.usable) / expected, 2)
    return out


def _fmt(stats, unit="") -> str:
    if not stats:
        return "none"
    return (f"min {stats['min']:.4g}{unit}  median {stats['median']:.4g}{unit}  "
            f"mean {stats['mean']:.4g}{unit}  p95 {stats['p95']:.4g}{unit}  max {stats['max']:.4g}{unit}")


def report(s: dict) -> str:
    pct = 100 * s["usable_entries"] / s["entries"] if s["entries"] else 0.0
    dup = s["duplicates"]
    lines = [f"corpus-stats: {s['source']}",
             f"  entries        {s['entries']:,d}",
             f"  usable         {s['usable_entries']:,d} entries ({pct:.1f}%): media files "
             f"{s['usable_media']:,d} of {s['media_files']:,d} usable, {s['missing_media']:,d} missing, "
             f"{s['broken_media']:,d} broken ({s['bytes'] / 2 ** 20:,.1f} MiB read)",
             f"  duration       {_fmt(s['duration_s'], 's')}",
             f"  frames         {_fmt(s['frames'])}",
             f"  shorter side   {_fmt(s['shorter_side_px'], 'px')}; most common: "
             + (", ".join(f"{r} ({n:,d})" for r, n in s["resolutions"][:3]) or "none"),
             f"  caption length {_fmt(s['caption_tokens'])} ({s['caption_unit']}); "
             f"{s['captions_truncated']:,d} of {s['captions']:,d} captions truncated at "
             f"max_txt_l={s['max_txt_l']}",
             f"  duplicates     {dup['media_paths']:,d} entries name an earlier entry's media, "
             f"{dup['captions']:,d} repeat an earlier caption, {dup['content']:,d} media have the bytes of "
             f"another media file"]
    for kind in ("missing", "broken"):
        lines += [f"  {kind:<8} {line}" for line in s[f"{kind}_examples"][:5]]
    if s.get("expected"):
        text = (f"usable {s['usable_entries']:,d} of expected {s['expected']:,d} "
                f"({s['missing_vs_expected_pct']:.1f}% missing)")
        bar = "!" * len(text) if s["missing_vs_expected_pct"] > 0 else "=" * len(text)
        lines += [bar, text, bar]
    return "\n".join(lines)


def resolve_source(source: str, media_dir=None, media_type=None, configs=(), overrides=()):
    """SOURCE -> ([(anno or shard source, media_dir, media_type)], config). The config (CONFIG ... key=value,
    default ``pretrain``) gives the tokenizer, ``max_txt_l``, the reader, and the corpus names."""
    from ..config import load_config
    config = load_config(list(configs) or ["pretrain"], overrides)
    if is_shard_source(source):
        index = os.path.join(source, INDEX) if os.path.isdir(source) else source
        if media_type is None and index.endswith(".json") and os.path.isfile(index):
            media_type = read_index(index).get("media_type")
        elif media_type is None:  # tars without an index (img2dataset / video2dataset): by their members
            media_type = shard_media_type(source)
        return [(source, "", media_type or "video")], config
    if os.path.isfile(source):
        if not media_dir:
            raise AnnotationError(f"{source}: an annotation file needs --media-dir (the folder its media "
                                  f"paths are relative to)")
        if not os.path.isdir(media_dir):
            raise AnnotationError(f"--media-dir {media_dir}: no such folder (the folder {source}'s media "
                                  f"paths are relative to)")
        return [(source, media_dir, media_type or "video")], config
    if source not in config.available_corpus:
        raise ConfigError(f"{source}: not a file, a shard corpus, or an available_corpus name of the config "
                          f"(names: {', '.join(config.available_corpus)})")
    return corpus_specs(config.available_corpus[source], key=f"available_corpus.{source}"), config


def corpus_stats(source: str, media_dir=None, media_type=None, configs=(), overrides=(), expected=None,
                 out_dir="corpus_stats", workers=2, num_frames=4, progress=True) -> dict:
    """Scan the corpus, write ``out_dir/corpus_stats.json`` and ``.png``, print the report; -> the summary."""
    from ..fileio import write_json
    from .builders import per_media
    from .text import build_tokenizer
    specs, config = resolve_source(source, media_dir, media_type, configs, overrides)
    max_txt_l = max(per_media(config.max_txt_l, m) for _, _, m in specs)
    tally = Tally(build_tokenizer(config.text_encoder), config.text_encoder, int(max_txt_l))
    identity = torch.nn.Identity()  # decoded pixels as they are: their size is the media's
    for spec in specs:
        source_of = MediaSource(spec[2], identity, num_frames, "uniform", config.video_input.reader)
        if is_shard_source(spec[0]):
            _scan_shards(spec, tally, workers, source_of, progress)
        else:
            _scan_files(spec, tally, workers, source_of, config.media_outside_dir, progress)
    summary = summarize(tally, source, specs, expected)
    os.makedirs(out_dir, exist_ok=True)
    write_json(summary, os.path.join(out_dir, "corpus_stats.json"), indent=1)
    _plot(tally, os.path.join(out_dir, "corpus_stats.png"),
          f"{source}: {summary['usable_entries']:,d} usable of {summary['entries']:,d} entries")
    print(report(summary))
    print(f"wrote {os.path.join(out_dir, 'corpus_stats.json')} and corpus_stats.png")
    return summary


def main(argv) -> int:
    from ..config.args import split_run_args
    p = argparse.ArgumentParser(prog="singularity-ds corpus-stats", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="shard index.json / folder / shard-*.tar pattern, annotation JSON, or an "
                                  "available_corpus name (then CONFIG ... key=value as for train)")
    p.add_argument("--media-dir", help="the media folder of an annotation JSON")
    p.add_argument("--media-type", choices=["video", "image"], help="default: the index's, else video")
    p.add_argument("--expected", type=int, help="the corpus's published size: the usable count is compared")
    p.add_argument("--out", default="corpus_stats", help="folder of corpus_stats.json and corpus_stats.png")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="decoding processes (0: in this one)")
    p.add_argument("--num-frames", type=int, default=4, help="frames decoded per clip (spread over it)")
    args, rest = p.parse_known_args(argv)
    if args.expected is not None and args.expected <= 0:
        raise ConfigError(f"--expected {args.expected}: expected a positive number of entries")
    run = split_run_args(rest)
    corpus_stats(args.source, args.media_dir, args.media_type, run.configs, run.overrides, args.expected,
                 args.out, args.workers, args.num_frames)
    return 0
