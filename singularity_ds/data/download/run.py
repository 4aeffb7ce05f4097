"""``singularity-ds download URL_LIST OUT_DIR``: a URL list to the tar shards ``train_corpus`` streams.

The list is cut into chunks of ``--urls-per-chunk`` consecutive rows. Threads download (``--workers``,
at most ``--per-host`` at once per host), decoder processes re-encode (``--decoders``; the code of
``preprocess``), and the main thread writes each chunk's good samples into its shards
``shard-CCCCCC-NN.tar`` (a new one past ``--shard-size``). When every URL of a chunk has a status, its
shards are renamed into place and ``status/chunk-CCCCCC.json`` records the shards and each URL's
status; ``index.json`` (the format ``make-shards`` writes) is rewritten then.

Resume: a rerun with the same list and settings skips the chunks that have a status file, deletes
what an interrupted run left of the others (temporary shards, partial downloads) and does them
again. ``report.parquet`` and the summary cover the whole list at the end of each run.
"""
import glob
import os
import shutil
import sys
import threading
import time
import urllib.parse
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from fractions import Fraction

from ...errors import AnnotationError, ConfigError
from ...fileio import write_json
from ..shards import INDEX, ShardWriter, file_sha256, parse_size, write_index
from .decode import DecodePool, Job
from .fetch import fetch
from .report import load_chunk, status_files, summary_table, write_report
from .urllist import list_format, read_url_list

SETTINGS = "download.json"
PARTIAL = ".partial"
EXT = {"video": "mp4", "image": "jpg"}


class HostSlots:
    """At most ``n`` downloads at once from one host."""

    def __init__(self, n: int):
        self.n, self.lock, self.slots = n, threading.Lock(), {}

    def __call__(self, url: str):
        try:
            host = urllib.parse.urlsplit(url).netloc.lower()
        except ValueError:
            host = ""
        with self.lock:
            return self.slots.setdefault(host, threading.BoundedSemaphore(self.n))


def _fetch_and_decode(row, opts, pool, slots, tmp_dir):
    """One URL: -> (record, sample bytes or None). Runs in a download thread."""
    start = time.time()
    src = os.path.join(tmp_dir, f"{row.row}.download")
    dst = os.path.join(tmp_dir, f"{row.row}.{EXT[opts['media_type']]}")
    record = dict(row=row.row, url=row.url, id=row.id, status="", error="", http=None, attempts=0,
                  bytes=0, duration=None, shard=None, seconds=0.0, decode_cpu=None)
    data = None
    try:
        if not row.caption.strip():
            record.update(status="no_caption", error="empty caption: nothing to train on")
            return record, None
        if not row.url:
            record.update(status="bad_url", error="empty URL")
            return record, None
        with slots(row.url):
            got = fetch(row.url, src, opts["timeout"], opts["max_bytes"], opts["retries"],
                        opts["retry_wait"], opts["allow_file"])
        record.update(status=got.status, error=got.error, http=got.http, attempts=got.attempts,
                      bytes=got.bytes)
        if got.status != "ok":
            return record, None
        decoded = pool.run(Job(opts["media_type"], src, dst, opts["size"], opts["fps"], opts["trim"],
                               opts["min_duration"], opts["max_duration"]))
        record.update(status=decoded.status, error=decoded.error, duration=decoded.duration,
                      decode_cpu=decoded.cpu)
        if decoded.status == "ok":
            with open(dst, "rb") as f:
                data = f.read()
        return record, data
    finally:
        for path in (src, dst):
            if os.path.exists(path):
                os.remove(path)
        record["seconds"] = round(time.time() - start, 3)


def _summary(chunk: dict) -> dict:
    """What a run keeps of a finished chunk (its records stay in its status file: 10M URLs would not
    fit in memory)."""
    return dict(shards=chunk["shards"], counts=Counter(r["status"] for r in chunk["results"]),
                fetched=sum(r["bytes"] or 0 for r in chunk["results"]))


def _done_chunks(out_dir: str) -> dict:
    """{chunk id: its summary} for chunks whose status file and every shard are intact; the
    leftovers of others are removed."""
    done = {}
    for path in status_files(out_dir):
        chunk = load_chunk(path)
        ok = chunk is not None and all(
            os.path.isfile(os.path.join(out_dir, s["url"]))
            and os.path.getsize(os.path.join(out_dir, s["url"])) == s["bytes"] for s in chunk["shards"])
        if ok:
            done[chunk["chunk"]] = _summary(chunk)
        else:
            os.remove(path)
    keep = {s["url"] for c in done.values() for s in c["shards"]}
    leftovers = glob.glob(os.path.join(out_dir, "shard-*.tar")) + glob.glob(os.path.join(out_dir, ".shard-*"))
    for path in leftovers:
        if os.path.basename(path) not in keep:
            os.remove(path)
    shutil.rmtree(os.path.join(out_dir, PARTIAL), ignore_errors=True)
    return done


def _check_settings(out_dir: str, settings: dict) -> None:
    path = os.path.join(out_dir, SETTINGS)
    if os.path.exists(path):
        old = load_chunk(path) or {}
        changed = [k for k in settings if old.get(k) != settings[k]]
        if changed:
            raise ConfigError(f"{out_dir}: a download with other settings is there "
                              f"({', '.join(f'{k}: {old.get(k)} -> {settings[k]}' for k in changed)}); "
                              f"resume with the same ones or use another OUT_DIR")
    else:
        write_json(settings, path)


def download(url_list: str, out_dir: str, media_type: str = "video", url_col=None, caption_col=None,
             id_col=None, fps=Fraction(2), size: int = 224, trim=None, workers: int = 16, per_host: int = 8,
             decoders: int = None, timeout: float = 30, retries: int = 3, retry_wait: float = 1.0,
             shard_size="1GB", urls_per_chunk: int = 10000, max_size="200MB", min_duration: float = 0,
             max_duration: float = 600, decode_timeout: float = 300, allow_file_urls: bool = False,
             progress: bool = True) -> dict:
    """Download ``url_list`` into shards in ``out_dir`` (see the module doc); -> the summary numbers."""
    from tqdm import tqdm
    if media_type not in EXT:
        raise ConfigError(f"--media-type must be video or image, got {media_type!r}")
    if not os.path.isfile(url_list):
        raise AnnotationError(f"{url_list}: URL list not found")
    list_format(url_list)  # an unknown extension: one line now, not after hashing the file
    try:
        limit, max_bytes = parse_size(shard_size), parse_size(max_size)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    total = sum(1 for _ in read_url_list(url_list, url_col, caption_col, id_col))  # the bar's total
    if not total:  # before anything is written: an empty corpus is no result
        raise AnnotationError(f"{url_list}: no URL rows (an empty list, or a header only); nothing to "
                              f"download")
    os.makedirs(out_dir, exist_ok=True)
    sha = file_sha256(url_list)
    settings = dict(url_list_sha256=sha, media_type=media_type, url_col=url_col, caption_col=caption_col,
                    id_col=id_col, fps=str(fps), size=size, trim=None if trim is None else str(trim),
                    min_duration=min_duration, max_duration=max_duration, urls_per_chunk=urls_per_chunk)
    _check_settings(out_dir, settings)
    done = _done_chunks(out_dir)
    tmp_dir = os.path.join(out_dir, PARTIAL)
    os.makedirs(tmp_dir, exist_ok=True)
    opts = dict(media_type=media_type, timeout=timeout, max_bytes=max_bytes, retries=retries,
                retry_wait=retry_wait, allow_file=allow_file_urls, size=size, fps=fps, trim=trim,
                min_duration=min_duration, max_duration=max_duration)

    def update_index():
        chunks = [done[c] for c in sorted(done)]
        write_index(out_dir, [s for c in chunks for s in c["shards"]], media_type, "caption", url_list, [],
                    anno_sha256=sha, report="report.parquet",
                    failed=sum(n for c in chunks for st, n in c["counts"].items() if st != "ok"))

    open_chunks, run, run_cpu, start = {}, Counter(), [0.0], time.time()  # this run's statuses, CPU s
    bar = tqdm(total=total, initial=sum(sum(c["counts"].values()) for c in done.values()), unit="url",
               desc=f"download {media_type}s", disable=not progress, smoothing=0.05)

    def finish_ready():
        for cid in [c for c, st in open_chunks.items() if st["submitted_all"] and st["pending"] == 0]:
            st = open_chunks.pop(cid)
            shards = st["writer"].close()
            record = dict(chunk=cid, rows=[st["first"], st["last"] + 1], shards=shards,
                          results=sorted(st["results"], key=lambda r: r["row"]))
            write_json(record, os.path.join(out_dir, "status", f"chunk-{cid:06d}.json"), indent=None)
            done[cid] = _summary(record)
            update_index()

    def handle(future):
        record, data = future.result()
        st = open_chunks[record["row"] // urls_per_chunk]
        if data is not None:
            record["shard"] = st["writer"].next_url
            meta = {media_type: f"{record['id']}.{EXT[media_type]}", "caption": st["captions"][record["row"]],
                    "url": record["url"]}
            st["writer"].write(f"{record['row']:09d}", EXT[media_type], data, meta)
        del st["captions"][record["row"]]
        st["results"].append(record)
        st["pending"] -= 1
        run[record["status"]] += 1
        run_cpu[0] += record["decode_cpu"] or 0
        bar.update(1)
        bar.set_postfix(ok=run["ok"], failed=sum(run.values()) - run["ok"], refresh=False)

    pool = DecodePool(decoders or os.cpu_count() or 1, decode_timeout)
    slots = HostSlots(per_host)
    inflight = set()
    executor = ThreadPoolExecutor(workers, thread_name_prefix="download")
    try:
        for row in read_url_list(url_list, url_col, caption_col, id_col):
            cid = row.row // urls_per_chunk
            if cid in done:
                continue
            if cid not in open_chunks:
                for st in open_chunks.values():  # rows come in order: earlier chunks are complete
                    st["submitted_all"] = True
                finish_ready()
                open_chunks[cid] = dict(
                    writer=ShardWriter(out_dir, limit, lambda n, c=cid: f"shard-{c:06d}-{n:02d}.tar"),
                    first=row.row, last=row.row, pending=0, results=[], captions={},
                    submitted_all=False)
            st = open_chunks[cid]
            st["last"], st["pending"] = row.row, st["pending"] + 1
            st["captions"][row.row] = row.caption
            inflight.add(executor.submit(_fetch_and_decode, row, opts, pool, slots, tmp_dir))
            while len(inflight) >= 2 * workers:
                finished, inflight = wait(inflight, return_when=FIRST_COMPLETED)
                for f in finished:
                    handle(f)
                finish_ready()
        for st in open_chunks.values():
            st["submitted_all"] = True
        while inflight:
            finished, inflight = wait(inflight, return_when=FIRST_COMPLETED)
            for f in finished:
                handle(f)
            finish_ready()
        finish_ready()
        executor.shutdown()
    except BaseException:  # Ctrl-C or a bug: no waiting for the downloads in flight
        executor.shutdown(wait=False, cancel_futures=True)
        raise
    finally:
        bar.close()
        pool.close()
    seconds = time.time() - start
    chunks = [done[c] for c in sorted(done)]
    update_index()
    report = write_report(out_dir, status_files(out_dir))
    shutil.rmtree(tmp_dir, ignore_errors=True)
    counts = sum((c["counts"] for c in chunks), Counter())
    return dict(counts=dict(counts), urls=sum(counts.values()), seconds=seconds,
                run_urls=sum(run.values()), run_ok=run["ok"], run_decode_cpu=run_cpu[0], report=report,
                index=os.path.join(out_dir, INDEX), table=summary_table(chunks, run, seconds))


def main(args) -> int:
    """The command: ``args`` as ``singularity-ds download``'s parser (cli.py) makes them."""
    if args.media_type == "video" and args.size % 2:
        raise ConfigError("--size must be even for videos (yuv420p)")
    if args.retries < 0:
        raise ConfigError("--retries must be 0 or more")
    try:
        res = download(args.url_list, args.out_dir, args.media_type, args.url_col, args.caption_col,
                       args.id_col, args.fps, args.size, args.trim, args.workers, args.per_host,
                       args.decoders, args.timeout, args.retries, args.retry_wait, args.shard_size,
                       args.urls_per_chunk, args.max_size, args.min_duration, args.max_duration,
                       args.decode_timeout, args.allow_file_urls, progress=not args.no_progress)
    except KeyboardInterrupt:  # as a kill: finished chunks stay, a rerun resumes
        print("singularity-ds: interrupted; finished chunks are kept, rerun the same command to resume",
              file=sys.stderr)
        sys.stderr.flush()
        os._exit(130)  # not waiting for the download threads in flight
    print(res["table"])
    print(f"shards: {res['index']}; every URL's status: {res['report']}")
    return 0

