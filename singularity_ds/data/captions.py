"""The caption and the ITC ``idx`` of a caption-training item (pretraining, retrieval training): one rule
for annotation files (:class:`~.datasets.CaptionDataset`) and tar shards (:class:`~.shards.ShardStream`),
so a corpus has the same positives whichever way it is read.

Items that share an ``idx`` are positives of each other in ITC (soft targets) and never each other's ITM
negatives. As the original's retrieval training (``match_ids``), they are the items of one media (its
basename: the several captions of one video), or, with ``has_multi_vision_gt`` (one text with several
ground-truth videos, as SSV2), the items with the same caption text. The original's pretraining datasets
number each entry instead, which makes two captions of one image negatives of each other; the same
media rule is used here for both.

The original numbers the keys in the order one dataset meets them, a table over the whole corpus. A
shard stream only ever sees its worker's part of the corpus, so ``idx`` is a stable hash of the key
instead: the same key gives the same ``idx`` in every worker, rank, epoch and source. Only equality of
``idx`` is ever used (the loss's soft targets, ITM's negative sampling), so the positives are the
table's; two keys collide with probability ~n^2 / 2^57 (under 1e-3 for 10M distinct keys).
"""
import hashlib
import os
import random

from .text import pre_text


def draw_caption(caption, paragraph: bool, seed: int) -> str:
    """An entry's caption for one draw: a paragraph's sentences joined (``is_paragraph_retrieval``), one
    of several captions picked from the item's seed (the original's ``random.choice``), or the caption."""
    if isinstance(caption, list):
        return " ".join(caption) if paragraph else random.Random(seed).choice(caption)
    return caption


def match_idx(caption: str, media: str, multi_vision_gt: bool) -> int:
    """ITC's ``idx``: a 56-bit hash of the media's basename, or of the raw caption with
    ``has_multi_vision_gt`` (as the original, the text before :func:`~.text.pre_text`)."""
    key = caption if multi_vision_gt else os.path.basename(media)
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=7).digest(), "little")


def caption_and_idx(caption, media: str, seed: int, multi_vision_gt: bool, paragraph: bool):
    """-> (the item's pre-processed caption, its ``idx``) from an entry's ``caption`` field and media path."""
    text = draw_caption(caption, paragraph, seed)
    return pre_text(text), match_idx(text, media, multi_vision_gt)
