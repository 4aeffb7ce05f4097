"""URL lists as the corpora ship them: CSV, TSV, JSON lines or parquet (``.gz`` for the text ones).

The format comes from the extension (``.csv``, ``.tsv``/``.tab``, ``.jsonl``/``.json``, ``.parquet``).
Columns, unless ``--url-col`` / ``--caption-col`` / ``--id-col`` name them:

- a CSV/TSV file has a header when its first row holds a known URL column name (below); WebVid's
  ``contentUrl,name,videoid`` is read as url, caption, id;
- without a header (CC3M's ``caption<TAB>url``) the URL column is the first whose first value looks
  like a URL (``scheme://``), the caption the first other column; columns are then named by their
  position (``--url-col 1``);
- JSON lines and parquet use the same names as a header (LAION/CC12M parquet: ``URL``, ``TEXT``).

The id (used for the media name in the sample's JSON) defaults to the row number. Rows are yielded one
at a time: a 10M-row list is never held in memory (parquet is read one row group at a time).
"""
import csv
import gzip
import io
import json
import os
import re
from typing import Iterator, NamedTuple, Optional

from ...errors import AnnotationError

URL_NAMES = ("contentUrl", "url", "URL", "image_url", "video_url", "link")
CAPTION_NAMES = ("name", "caption", "TEXT", "text", "title", "description")
ID_NAMES = ("videoid", "video_id", "image_id", "id", "key")
LOOKS_LIKE_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


class Row(NamedTuple):
    row: int          # position in the list (0-based, header excluded): the sample key
    url: str
    caption: str
    id: str


def list_format(path: str) -> str:
    name = path[:-3] if path.endswith(".gz") else path
    ext = os.path.splitext(name)[1].lower()
    formats = {".csv": "csv", ".tsv": "tsv", ".tab": "tsv", ".jsonl": "jsonl", ".json": "jsonl",
               ".ndjson": "jsonl", ".parquet": "parquet"}
    if ext not in formats:
        raise AnnotationError(f"{path}: unknown URL list format {ext or '(no extension)'!r}; expected "
                              f".csv, .tsv, .jsonl or .parquet (optionally .gz)")
    return formats[ext]


def _open_text(path: str):
    if path.endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline="")
    return open(path, encoding="utf-8-sig", newline="")


def _pick(columns, asked, names, what, path, required=True):
    """The column for ``what``: ``asked`` (a name, or a position for headerless lists), else the first
    of ``names`` present."""
    if asked is not None:
        if asked in columns:
            return asked
        if str(asked).isdigit() and int(asked) < len(columns):
            return columns[int(asked)]
        raise AnnotationError(f"{path}: no column {asked!r} for the {what} "
                              f"(columns: {', '.join(map(str, columns))})")
    for name in names:
        if name in columns:
            return name
    if required:
        raise AnnotationError(f"{path}: no {what} column (looked for {', '.join(names)}; columns: "
                              f"{', '.join(map(str, columns))}); name it with --{what}-col")
    return None


def _rows_of(records, columns, path, url_col, caption_col, id_col, headerless) -> Iterator[Row]:
    """``records``: dicts by column name. Picks the columns from the first record when headerless."""
    url_key = cap_key = id_key = None
    for i, rec in enumerate(records):
        if url_key is None:
            if headerless and url_col is None:  # the first column holding a URL
                url_col = next((c for c in columns if LOOKS_LIKE_URL.match(str(rec.get(c) or ""))), None)
                if url_col is None:
                    raise AnnotationError(f"{path}: row 0 has no value that looks like a URL and no known "
                                          f"header ({', '.join(URL_NAMES)}); name the column with --url-col")
            url_key = _pick(columns, url_col, URL_NAMES, "url", path)
            if headerless and caption_col is None:
                caption_col = next((c for c in columns if c != url_key), None)
            cap_key = _pick(columns, caption_col, CAPTION_NAMES, "caption", path)
            id_key = _pick(columns, id_col, ID_NAMES, "id", path, required=False)
        url, caption = rec.get(url_key), rec.get(cap_key)
        ident = rec.get(id_key) if id_key is not None else None
        yield Row(i, "" if url is None else str(url).strip(), "" if caption is None else str(caption),
                  str(i) if ident in (None, "") else str(ident))


def _text_rows(path, fmt, url_col, caption_col, id_col):
    try:
        yield from _text_rows_unchecked(path, fmt, url_col, caption_col, id_col)
    except (csv.Error, UnicodeDecodeError, EOFError, OSError) as e:  # a broken line, encoding, .gz
        raise AnnotationError(f"{path}: unreadable {fmt.upper()} ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''})") from None


def _text_rows_unchecked(path, fmt, url_col, caption_col, id_col):
    with _open_text(path) as f:
        reader = csv.reader(f, delimiter="\t" if fmt == "tsv" else ",",
                            quoting=csv.QUOTE_NONE if fmt == "tsv" else csv.QUOTE_MINIMAL)
        first = next(reader, None)
        if first is None:
            return
        named = {str(c) for c in (url_col, caption_col, id_col) if c is not None and not str(c).isdigit()}
        header = any(c in URL_NAMES for c in first) or (named and named <= set(first))
        columns = first if header else [str(k) for k in range(len(first))]

        def records():
            if not header:
                yield dict(zip(columns, first))
            for values in reader:
                if values:
                    yield dict(zip(columns, values))
        yield from _rows_of(records(), columns, path, url_col, caption_col, id_col, headerless=not header)


def _jsonl_rows(path, url_col, caption_col, id_col):
    def records():
        with _open_text(path) as f:
            for n, line in enumerate(f):
                if line.strip():
                    try:
                        rec = json.loads(line)
                    except ValueError as e:
                        raise AnnotationError(f"{path}: line {n + 1}: not JSON ({e})") from None
                    if not isinstance(rec, dict):
                        raise AnnotationError(f"{path}: line {n + 1}: expected a JSON object per line")
                    yield rec
    recs = records()
    first = next(recs, None)
    if first is None:
        return

    def again():
        yield first
        yield from recs
    yield from _rows_of(again(), list(first), path, url_col, caption_col, id_col, headerless=False)


def _parquet_rows(path, url_col, caption_col, id_col):
    import pyarrow.parquet as pq
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow's errors: one line
        raise AnnotationError(f"{path}: not a parquet file ({type(e).__name__}: {e})") from None
    columns = pf.schema_arrow.names
    keep = [c for c in (_pick(columns, url_col, URL_NAMES, "url", path),
                        _pick(columns, caption_col, CAPTION_NAMES, "caption", path),
                        _pick(columns, id_col, ID_NAMES, "id", path, required=False)) if c is not None]

    def records():
        import pyarrow as pa
        try:
            for batch in pf.iter_batches(columns=keep, batch_size=65536):
                yield from batch.to_pylist()
        except (pa.ArrowException, OSError) as e:  # a damaged file: one line
            raise AnnotationError(f"{path}: unreadable parquet ({type(e).__name__}: {e})") from None
    yield from _rows_of(records(), columns, path, url_col, caption_col, id_col, headerless=False)


def read_url_list(path: str, url_col: Optional[str] = None, caption_col: Optional[str] = None,
                  id_col: Optional[str] = None) -> Iterator[Row]:
    """The rows of a URL list, one at a time (see the module doc for formats and column defaults)."""
    if not os.path.isfile(path):
        raise AnnotationError(f"{path}: URL list not found")
    fmt = list_format(path)
    if fmt == "parquet":
        return _parquet_rows(path, url_col, caption_col, id_col)
    if fmt == "jsonl":
        return _jsonl_rows(path, url_col, caption_col, id_col)
    return _text_rows(path, fmt, url_col, caption_col, id_col)
