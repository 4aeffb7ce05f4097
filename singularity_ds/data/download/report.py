"""What became of every URL: ``OUT_DIR/report.parquet`` (one row per URL of the list) and the summary
table printed at the end of a run.

Statuses: ``ok``; from the transfer ``http_404`` (any ``http_<code>`` of a 4xx), ``http_5xx`` and
``http_429`` (after the retries), ``timeout``, ``connection_error``, ``truncated`` (a body shorter than
its Content-Length), ``dns_error``, ``ssl_error``, ``too_large`` (over ``--max-size``, or frames over
8K), ``bad_scheme`` (not http/https, also as a redirect target), ``bad_url``, ``no_caption``; from
decoding ``not_media`` (HTML or other non-media served, whatever the Content-Type said), ``too_long`` /
``too_short`` (``--max-duration`` / ``--min-duration``), ``decode_error`` (the decoder failed,
crashed or hung).
"""
import glob
import json
import os
from collections import Counter

FIELDS = (("row", "int64"), ("url", "string"), ("id", "string"), ("status", "string"),
          ("error", "string"), ("http", "int32"), ("attempts", "int32"), ("bytes", "int64"),
          ("duration", "float64"), ("shard", "string"), ("seconds", "float64"),
          ("decode_cpu", "float64"))


def status_files(out_dir: str):
    return sorted(glob.glob(os.path.join(out_dir, "status", "chunk-*.json")))


def write_report(out_dir: str, paths) -> str:
    """``report.parquet`` from the completed chunks' status files (one row group each, read one at a
    time)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    schema = pa.schema([(name, getattr(pa, kind)()) for name, kind in FIELDS])
    path = os.path.join(out_dir, "report.parquet")
    tmp = path + ".part"
    with pq.ParquetWriter(tmp, schema) as writer:
        for status in paths:
            writer.write_table(pa.Table.from_pylist(load_chunk(status)["results"], schema=schema))
    os.replace(tmp, path)
    return path


def read_report(path: str) -> list:
    """The report's rows as dicts (tests, corpus tools)."""
    import pyarrow.parquet as pq
    return pq.read_table(path).to_pylist()


def summary_table(chunks, run, seconds: float) -> str:
    """Counts per status over the whole list so far (``chunks``: ``{"counts", "fetched", "shards"}``
    each), bytes, and this run's rate (``run``: this run's status counts)."""
    counts = sum((c["counts"] for c in chunks), Counter())
    fetched = sum(c["fetched"] for c in chunks)
    stored = sum(s["bytes"] for c in chunks for s in c["shards"])
    shards = sum(len(c["shards"]) for c in chunks)
    total = sum(counts.values())
    order = sorted(counts, key=lambda s: (s != "ok", -counts[s], s))
    lines = [f"{'status':<18}{'urls':>10}{'%':>8}"]
    lines += [f"{s:<18}{counts[s]:>10}{100 * counts[s] / max(total, 1):>8.1f}" for s in order]
    lines.append(f"{'total':<18}{total:>10}")
    lines.append(f"downloaded {fetched / 1e6:.1f} MB, wrote {stored / 1e6:.1f} MB in {shards} shard(s); "
                 f"this run: {sum(run.values())} URLs in {seconds:.1f} s, "
                 f"{run['ok'] / max(seconds, 1e-9):.2f} ok samples/s")
    return "\n".join(lines)


def load_chunk(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None
