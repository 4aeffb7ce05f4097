"""Datasets for pretraining, retrieval (train / eval), QA and multiple choice.

Every item is drawn from a per-sample seed (given by :class:`~singularity_ds.data.loader.SeededSampler`
as ``(index, seed)``), so frame sampling, crops, flips and replacement draws depend only on
(seed, epoch, position): a resumed run sees the same batches. Broken media are retried with another
random item in training (each failure is returned with its path so the trainer counts and logs it;
a training item also names the media it holds, ``path``, for the trainer's non-finite-loss warning);
at evaluation a broken file is an error naming it unless ``skip_broken`` is set.

An item's ``media`` is what its source makes of the path: pixels from a :class:`MediaSource`, or a clip
plan from a :class:`ClipPlanner` (batched DALI decoding).
"""
import logging
import random
from typing import Union

import torch
from torch.utils.data import Dataset

from .annotations import AnnotationStore
from .captions import caption_and_idx
from .media import ClipPlanner, MediaSource
from .text import pre_text
from ..errors import MediaError

logger = logging.getLogger(__name__)

Source = Union[MediaSource, ClipPlanner]


def _split(item):
    return item if isinstance(item, tuple) else (item, item)


class _MediaDataset(Dataset):
    """Shared loading with retries; subclasses define ``__len__``, ``path(i)`` and ``fields(i)``."""

    def __init__(self, source: Source, num_tries: int = 3, skip_broken: bool = False):
        self.source, self.num_tries, self.skip_broken = source, max(1, num_tries), skip_broken

    @property
    def media_type(self):
        return self.source.media_type

    def load(self, index, seed, retry: bool):
        """-> (media, index actually used, failures [(path, reason)])."""
        rng, failures = random.Random(seed), []
        for attempt in range(self.num_tries if retry else 1):
            path = self.path(index)
            try:
                return self.source(path, seed + attempt), index, failures
            except MediaError as e:
                failures.append((e.path, e.reason))
                logger.warning("broken media %s (%s)%s", e.path, e.reason, "; drawing another item" if retry else "")
                if not retry:
                    if self.skip_broken:
                        return None, index, failures
                    raise
                index = rng.randrange(len(self))
        raise MediaError(path, f"{len(failures)} broken media in a row (last: {failures[-1][1]}); "
                               f"many files in this corpus may be corrupt: {[p for p, _ in failures]}")


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
