"""Datasets for pretraining, retrieval (train / eval), QA and multiple choice.

Every item is drawn from a per-sample seed (given by :class:`~singularity_ds.data.loader.SeededSampler`
as ``(index, seed)``), so frame sampling, crops, flips and replacement draws depend only on
(seed, epoch, position): a resumed run sees the same batches. Broken media are retried with another
random item in training (each failure is returned with its path so the trainer counts and lists it;
a file found broken is not read again by that process, nor drawn as a replacement;
a training item also names the media it holds, ``path``, for the trainer's non-finite-loss warning);
at evaluation a broken file is an error naming it unless ``skip_broken`` is set. In a loader worker,
such an error reaches the main process whole (:mod:`.worker_errors`).

An item's ``media`` is what its source makes of the path: pixels from a :class:`MediaSource`, or a clip
plan from a :class:`ClipPlanner` (batched DALI decoding).
"""
import itertools
import logging
import random
from typing import Union

from torch.utils.data import Dataset

from ..errors import MediaError
from .annotations import AnnotationStore
from .captions import caption_and_idx
from .media import ClipPlanner, MediaSource
from .text import pre_text
from .worker_errors import catch_in_worker

logger = logging.getLogger(__name__)

Source = Union[MediaSource, ClipPlanner]


def _split(item):
    return item if isinstance(item, tuple) else (item, item)


class _MediaDataset(Dataset):
    """Shared loading with retries; subclasses define ``__len__``, ``path(i)`` and ``fields(i)``."""

    # replacement draws of one item that land on files known to be broken before it gives up: only a
    # corpus almost entirely broken gets there
    MAX_KNOWN_BROKEN_DRAWS = 1000

    def __init__(self, source: Source, num_tries: int = 3, skip_broken: bool = False):
        self.source, self.num_tries, self.skip_broken = source, max(1, num_tries), skip_broken
        self.broken = {}  # path -> reason, for the files this process found broken

    @property
    def media_type(self):
        return self.source.media_type

    def __getitems__(self, indices):
        """The items of one batch (the DataLoader fetches through this): in a loader worker, a user error
        comes back in the batch's place and is raised in the main process (:mod:`.worker_errors`)."""
        return catch_in_worker(lambda: [self[i] for i in indices])

    def load(self, index, seed, retry: bool):
        """-> (media, index actually used, failures [(path, reason)]).

        Training (``retry``): a broken item is replaced by another drawn from the item's seed, up to
        ``num_tries`` broken files for one item. A file found broken is remembered by this process (each
        loader worker remembers its own): it is not read again, and a replacement draw that lands on it
        is drawn again without using a try. The k-th draw reads with ``seed + k`` whether the draws
        before it were read or skipped, so an item comes out the same whatever the process remembers (a
        resumed run, another ``num_workers``); only the failures counted may differ."""
        rng, failures, known_draws = random.Random(seed), [], 0
        for draw in itertools.count():
            path = self.path(index)
            reason = self.broken.get(path)
            if reason is None:
                try:
                    return self.source(path, seed + draw), index, failures
                except MediaError as e:
                    reason = self.broken[path] = e.reason
                    logger.warning("broken media %s (%s)%s", path, reason,
                                   "; drawing another item" if retry else "")
            elif draw > 0:  # a replacement already known to be broken: draw another
                known_draws += 1
                if known_draws == self.MAX_KNOWN_BROKEN_DRAWS:
                    raise MediaError(", ".join(p for p, _ in failures),
                                     f"{known_draws} replacement draws for one training item landed on files "
                                     f"this loader found broken ({len(self.broken)} files so far, "
                                     f"in a corpus of {len(self)} entries): most of it cannot be read; "
                                     f"check its media folder")
                index = rng.randrange(len(self))
                continue
            failures.append((path, reason))
            if not retry:
                if self.skip_broken:
                    return None, index, failures
                raise MediaError(path, reason)
            if len(failures) == self.num_tries:
                raise MediaError(", ".join(p for p, _ in failures),
                                 f"{len(failures)} broken media in a row for one training item (last: "
                                 f"{reason}); many files of this corpus may be corrupt: check them, or raise "
                                 f"media_retries")
            index = rng.randrange(len(self))


class CaptionDataset(_MediaDataset):
    """Pretraining / retrieval training: (media, caption, idx); the caption and ``idx`` (ITC positives)
    follow :mod:`.captions`, as for a shard corpus."""

    def __init__(self, store: AnnotationStore, source: Source, num_tries=3, has_multi_vision_gt=False,
                 is_paragraph_retrieval=False):
        super().__init__(source, num_tries)
        self.store, self.paragraph = store, is_paragraph_retrieval
        self.multi_vision_gt = has_multi_vision_gt

    @staticmethod
    def _media(e):
        return e["media"] if isinstance(e["media"], str) else e["media"][0]

    def __len__(self):
        return len(self.store)

    def path(self, i):
        return self._media(self.store[i])

    def __getitem__(self, item):
        index, seed = _split(item)
        media, index, failures = self.load(index, seed, retry=True)
        entry = self.store[index]
        caption, idx = caption_and_idx(entry["caption"], self._media(entry), seed, self.multi_vision_gt,
                                       self.paragraph)
        return dict(media=media, caption=caption, idx=idx, path=self.path(index), failures=failures)


class RetrievalEvalDataset(_MediaDataset):
    """Evaluation: ``text`` (list), media list, and ground truth ``txt2img`` / ``img2txt``.

    One media with several captions (COCO/Flickr/MSRVTT): img2txt lists, txt2img ints. One caption with
    several ground-truth media (SSV2, ``has_multi_vision_gt``): txt2img lists, img2txt ints. Paragraph
    retrieval (DiDeMo, ActivityNet): each caption list is joined into one text.
    """

    def __init__(self, store: AnnotationStore, source: MediaSource, has_multi_vision_gt=False,
                 is_paragraph_retrieval=False, skip_broken=False):
        super().__init__(source, num_tries=1, skip_broken=skip_broken)
        self.text, self.media, self.txt2img, self.img2txt = [], [], {}, {}
        for e in store:
            caption = e["caption"]
            if is_paragraph_retrieval:
                caption = " ".join(caption) if isinstance(caption, list) else caption
            if has_multi_vision_gt:
                t = len(self.text)
                self.text.append(pre_text(caption))
                self.txt2img[t] = []
                for m in (e["media"] if isinstance(e["media"], list) else [e["media"]]):
                    self.txt2img[t].append(len(self.media))
                    self.img2txt[len(self.media)] = t
                    self.media.append(m)
            else:
                v = len(self.media)
                self.media.append(e["media"] if isinstance(e["media"], str) else e["media"][0])
                self.img2txt[v] = []
                for c in (caption if isinstance(caption, list) else [caption]):
                    self.img2txt[v].append(len(self.text))
                    self.txt2img[len(self.text)] = v
                    self.text.append(pre_text(c))

    def __len__(self):
        return len(self.media)

    def path(self, i):
        return self.media[i]

    def __getitem__(self, item):
        index, seed = _split(item)
        media, _, failures = self.load(index, seed, retry=False)
        return dict(media=media, index=index, failures=failures)


class QADataset(_MediaDataset):
    """Train: (media, question, answers + [SEP], weights); eval: (media, question, question_id).
    Weights are each distinct answer's share of the annotators' answers (VQA), as the original."""

    def __init__(self, store: AnnotationStore, source: Source, train=True, eos="[SEP]", num_tries=3,
                 skip_broken=False):
        super().__init__(source, num_tries, skip_broken)
        self.store, self.train, self.eos = store, train, eos

    def __len__(self):
        return len(self.store)

    def path(self, i):
        media = self.store[i]["media"]
        return media if isinstance(media, str) else media[0]

    def answers_with_weights(self, raw):
        raw = [raw] if isinstance(raw, str) else raw
        weights = {}
        for a in raw:
            weights[a] = weights.get(a, 0.0) + 1 / len(raw)
        return [f"{a} {self.eos}" for a in weights], list(weights.values())

    def __getitem__(self, item):
        index, seed = _split(item)
        media, index, failures = self.load(index, seed, retry=self.train)
        e = self.store[index]
        out = dict(media=media, question=pre_text(e["question"]), path=self.path(index), failures=failures)
        if self.train:
            out["answers"], out["weights"] = self.answers_with_weights(e["answer"])
        else:
            out["question_id"] = e["question_id"]
        return out


class MCDataset(_MediaDataset):
    """MSRVTT-MC style: a video, its candidate captions, and the index of the right one."""

    def __init__(self, store: AnnotationStore, source: MediaSource, skip_broken=False):
        super().__init__(source, num_tries=1, skip_broken=skip_broken)
        self.store = store

    def __len__(self):
        return len(self.store)

    def path(self, i):
        return self.store[i]["media"]

    def __getitem__(self, item):
        index, seed = _split(item)
        media, _, failures = self.load(index, seed, retry=False)
        e = self.store[index]
        return dict(media=media, captions=[pre_text(c) for c in e["caption"]], answer=e["answer"],
                    index=index, failures=failures)
