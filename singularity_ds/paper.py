"""The paper's result rows (``paper.yaml`` beside this file): one :class:`Row` per downstream result, and the
original's re-encoding of each downstream media folder (``preprocess --preset``).

The YAML is data: groups of rows sharing a task, split, released archive, inference frames and metrics,
each row with the paper's numbers and where they come from. This module only reads and checks it.
"""
import fnmatch
import functools
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import yaml

from .errors import ConfigError

PAPER = os.path.join(os.path.dirname(__file__), "paper.yaml")
VARIANTS = ("1f-5m", "1f-17m", "temporal-5m", "temporal-17m")
TASKS = ("ret", "mc", "qa")


@dataclass(frozen=True)
class Split:
    name: str
    config: str          # a packaged config name (ret_msrvtt, qa_anet, ...)
    key: str             # its test_file key
    annotation: str      # the file of the released anno_downstream archive
    media: str           # a key of paper.yaml's `media`
    size: Dict[str, int]  # {"media": clips/images, "texts": captions/questions} the paper evaluated
    note: str


@dataclass(frozen=True)
class Metric:
    source: str                # "itm" (retrieval, ITM re-ranked), "accuracy", "server" (VQA)
    keys: Tuple[str, ...]      # our result keys
    names: Tuple[str, ...]     # as the paper's tables name them
    decimals: int = 1          # as the paper prints them


@dataclass(frozen=True)
class Row:
    id: str
    group: str
    variant: str               # 1f-5m | 1f-17m | temporal-5m | temporal-17m
    title: str
    task: str                  # eval kind: ret | mc | qa
    split: Split
    archive: str
    frames: int                # inference frames
    metric: Metric
    paper: Tuple[float, ...]
    source: str

    @property
    def temporal(self) -> bool:
        return self.variant.startswith("temporal")

    @property
    def corpus(self) -> str:
        return self.variant.split("-")[1]

    @property
    def zero_shot(self) -> bool:
        return self.archive == "pt"

    @property
    def model_name(self) -> str:
        return (("Singularity-temporal" if self.temporal else "Singularity") + f" {self.corpus.upper()}"
                + (", zero-shot" if self.zero_shot else ""))


@dataclass(frozen=True)
class Registry:
    rows: Dict[str, Row]
    archives: Dict[str, dict]
    media: Dict[str, dict]
    splits: Dict[str, Split]
    release: str
    annotations: dict
    sources: Dict[str, str]

    def select(self, patterns: List[str]) -> List[Row]:
        """Rows by id or shell pattern (``msrvtt-*``, ``*-temporal-17m``, ``all``); one line for a miss."""
        out = []
        for pattern in patterns:
            hits = list(self.rows) if pattern == "all" else fnmatch.filter(self.rows, pattern)
            if not hits:
                close = [r for r in self.rows if pattern.split("-")[0] in r][:6]
                raise ConfigError(f"reproduce: no paper row {pattern!r}"
                                  + (f" (close: {', '.join(close)})" if close else "")
                                  + "; `singularity-ds reproduce --list` lists them all")
            out += [self.rows[h] for h in hits if self.rows[h] not in out]
        return out

    def archive_url(self, archive: str) -> str:
        return f"{self.release}/{self.archives[archive]['file']}"


def _fail(what: str):
    raise ConfigError(f"{PAPER}: {what}")


@functools.lru_cache(maxsize=None)
def load(path: str = PAPER) -> Registry:
    """Read and check the registry: every row names a known split, archive, metric and variant, and has
    one paper number per metric."""
    with open(path) as f:
        data = yaml.safe_load(f)
    splits = {name: Split(name, s["config"], s["key"], s["annotation"], s["media"], dict(s["size"]),
                          s.get("note", "")) for name, s in data["splits"].items()}
    for s in splits.values():
        if s.media not in data["media"]:
            _fail(f"split {s.name}: media {s.media!r} is not in `media`")
    metrics = {name: Metric(m["from"], tuple(m["keys"]), tuple(m["names"]), int(m.get("decimals", 1)))
               for name, m in data["metrics"].items()}
    rows = {}
    for group, g in data["groups"].items():
        if g["task"] not in TASKS:
            _fail(f"group {group}: task {g['task']!r} is not one of {', '.join(TASKS)}")
        for what, table in (("split", splits), ("metrics", metrics), ("archive", data["archives"])):
            key = g[what]
            if key not in table:
                _fail(f"group {group}: {what} {key!r} is not defined")
        for variant, (numbers, source) in g["rows"].items():
            if variant not in VARIANTS:
                _fail(f"row {group}-{variant}: the variant is not one of {', '.join(VARIANTS)}")
            metric = metrics[g["metrics"]]
            if len(numbers) != len(metric.keys):
                _fail(f"row {group}-{variant}: {len(numbers)} numbers for the {len(metric.keys)} metrics "
                      f"{', '.join(metric.names)}")
            row_id = f"{group}-{variant}"
            rows[row_id] = Row(row_id, group, variant, g["title"], g["task"], splits[g["split"]],
                               g["archive"], int(g["frames"]), metric, tuple(float(n) for n in numbers),
                               source)
    return Registry(rows, data["archives"], data["media"], splits, data["release"].rstrip("/"),
                    data["annotations"], data["sources"])


def media_preset(name: str) -> Optional[dict]:
    """The re-encoding of one downstream media folder (``preprocess --preset NAME``), or None."""
    return load().media.get(name)
