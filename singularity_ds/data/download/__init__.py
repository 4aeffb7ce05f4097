"""``singularity-ds download``: URL lists (WebVid, CC3M, ...) to the tar shards ``train_corpus`` streams.

- :mod:`.urllist` reads CSV / TSV / JSON lines / parquet lists and picks the columns;
- :mod:`.fetch` downloads one URL under the safety rules (schemes, size cap, timeouts, retries);
- :mod:`.decode` probes and re-encodes in crash-isolated worker processes (``preprocess``'s code);
- :mod:`.run` cuts the list into resumable chunks and writes the shards with ``make-shards``' writer;
- :mod:`.report` keeps every URL's status (``report.parquet``) and prints the summary.
"""
from .run import download, main

__all__ = ["download", "main"]
