"""Unreadable media and empty sets at evaluation: one rule for retrieval, multiple choice and QA.

Every evaluator reads its whole set (each rank its shard) through :class:`Reading`, which collects each
broken item's ``(path, reason)`` whatever the dataset's ``skip_broken``; the failures of all ranks are
then gathered and :func:`settle` applies the rule, on every rank alike (no rank may stop while the
others wait in a collective):

- without ``skip_broken_media_eval`` (the dataset's ``skip_broken``): one line naming the first few
  broken files and their count, and saying which key skips them; once a rank has seen a broken item it
  only reads on (to count), it encodes nothing more;
- with it: the broken items are left out as if the annotation file did not list them, counted, and
  their paths returned for the results (``skipped_media``); a set with nothing readable is an error.

What "left out" means per kind (the metrics equal those of the set with the broken media deleted
from its annotation file):

- retrieval: a broken video leaves the v2t queries and every t2v candidate list; a text whose every
  ground-truth video is broken leaves the t2v queries and every v2t candidate list (one video with
  several captions: its captions go with it; one caption with several videos: the caption stays while
  one of its videos is readable, and is scored against those only);
- multiple choice: the question of a broken video is dropped (accuracy over the rest);
- QA: every question about a broken video is dropped.

An evaluation set without entries (an annotation file holding ``[]``) is refused by
:func:`check_not_empty` before any model work.
"""
import logging
from typing import List, Tuple

import numpy as np

from ..dist import all_gather
from ..errors import AnnotationError, MediaError
from .metrics import as_list

logger = logging.getLogger(__name__)

SHOWN = 3  # broken paths named in an error line; the rest are counted


class Reading:
    """This rank's items of ``dataset`` (``indices``), read in order: iterating gives the readable ones as
    batches of ``(index, item)``, ``batch_size`` each -- the batches of the set without its broken items --
    and collects the broken ones' ``(path, reason)``; :meth:`settle` then applies the rule to all ranks'."""

    def __init__(self, dataset, indices, batch_size: int = 1):
        self.dataset, self.indices, self.batch_size = dataset, indices, batch_size
        self.failures = []

    def _read(self, index):
        try:
            return self.dataset[index]
        except MediaError as e:  # the dataset raises when skip_broken is off; the rule is decided below
            return dict(media=None, failures=[(e.path, e.reason)])

    def __iter__(self):
        pending = []
        for i in self.indices:
            item = self._read(i)
            if item["media"] is None:
                self.failures += item["failures"]
            else:
                pending.append((i, item))
            if self.failures and not self.dataset.skip_broken:
                pending.clear()  # the evaluation will stop: only count the broken files from here on
            elif len(pending) == self.batch_size:
                yield pending
                pending = []
        if pending:
            yield pending

    def settle(self, label: str, items: str = "media") -> list:
        """Gather every rank's failures and apply the rule (:func:`settle`): the skipped paths, or raise."""
        failures = [f for part in all_gather(self.failures) for f in part]
        return settle(failures, len(self.dataset), label, self.dataset.skip_broken, items)


def check_not_empty(dataset, label: str) -> None:
    """Refuse a set with no entries (retrieval: no media or no texts) before any model work."""
    # retrieval sets hold their texts apart from the media; MC / QA sets have one list
    if len(dataset) == 0 or len(getattr(dataset, "text", dataset)) == 0:
        raise AnnotationError(f"{label}: no entries to evaluate (the annotation list is empty); fill it or "
                              "leave this set out of test_types")


def settle(failures: List[Tuple[str, str]], total: int, label: str, skip: bool, items: str = "media") -> list:
    """Apply the rule to the gathered ``failures`` ([(path, reason)] of ``total`` ``items``) of one set
    -> the distinct broken paths, in order, when they may be skipped; raises :class:`MediaError`
    otherwise (not skipping, or nothing readable)."""
    if not failures:
        return []
    paths = list(dict.fromkeys(p for p, _ in failures))
    shown = ", ".join(paths[:SHOWN]) + (f" and {len(paths) - SHOWN} more" if len(paths) > SHOWN else "")
    if len(paths) < len(failures):  # QA: several questions about one video
        shown = f"{len(paths)} media files: {shown}"
    count = f"{len(failures)} of the {total} {items} of {label} could not be read ({shown})"
    first, reason = failures[0]
    if not skip:
        raise MediaError(first, f"{reason}; {count}; set skip_broken_media_eval=True to evaluate "
                                "without them")
    if len(failures) == total:
        raise MediaError(first, f"{reason}; {count}: nothing left to evaluate")
    logger.warning("%s; left out of the evaluation", count)
    return paths


def texts_with_media(txt2img: dict, readable: np.ndarray) -> np.ndarray:
    """The texts (indices, ascending) with at least one readable ground-truth media."""
    ok = set(readable.tolist())
    return np.array([t for t in range(len(txt2img)) if any(v in ok for v in as_list(txt2img[t]))],
                    dtype=np.int64)


def surviving_ground_truth(txt2img: dict, img2txt: dict, text_index: np.ndarray, media_index: np.ndarray):
    """``txt2img`` / ``img2txt`` renumbered over the kept texts and media (both ascending), with the
    dropped ones taken out of every ground-truth list; the types (int or list) stay as they were."""
    if len(text_index) == len(txt2img) and len(media_index) == len(img2txt):
        return txt2img, img2txt
    new_t = {int(t): j for j, t in enumerate(text_index)}
    new_v = {int(v): j for j, v in enumerate(media_index)}

    def renumber(gt, new):
        if isinstance(gt, list):
            return [new[g] for g in gt if g in new]
        return new[gt]

    return ({new_t[t]: renumber(txt2img[t], new_v) for t in new_t},
            {new_v[v]: renumber(img2txt[v], new_t) for v in new_v})
