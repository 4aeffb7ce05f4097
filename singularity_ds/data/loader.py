"""Samplers, collation and the mixed image+video loader.

- :class:`SeededSampler`: a DistributedSampler whose order and per-item seeds depend only on
  (seed, epoch): every rank gets the same number of items, and a resumed run replays the same batches.
- :class:`MetaLoader`: the original's MetaLoader -- one loader per media type with its own batch
  size; each step draws a media type from an order fixed once per epoch. The original shuffles on
  rank 0 and broadcasts; here every rank computes the same order from (seed, epoch), so no
  communication is needed and all ranks agree by construction.
"""
import math
import random
from typing import Dict, Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, Sampler

from .text import tokenize
from .worker_errors import Loader


# The seeds of the data order, derived from the config's ``seed``: every rank computes them alike, so all
# agree without communicating, and a resumed run replays the same order. (The sampler's permutation uses
# ``seed + epoch``, as torch's DistributedSampler.)
def epoch_seed(seed: int, epoch: int) -> int:
    """Seed of an epoch's order of batches (media type per step) and of shards."""
    return seed * 1_000_003 + epoch


def item_seed(seed: int, epoch: int, position: int) -> int:
    """Seed of one item's draws (frames, crop, flip, caption), from its position in the epoch."""
    return (seed * 1_000_003 + epoch * 7_919 + position) % (2 ** 31)


class SeededSampler(Sampler):
    """Yields ``(index, item_seed)`` for this rank; pads (or drops) so all ranks get equal counts."""

    def __init__(self, n: int, rank: int = 0, world: int = 1, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = False):
        self.n, self.rank, self.world, self.shuffle, self.seed = n, rank, world, shuffle, seed
        self.drop_last, self.epoch, self.skip = drop_last, 0, 0
        self.per_rank = n // world if drop_last else math.ceil(n / world)

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def __len__(self):
        return self.per_rank

    def __iter__(self):
        # the order of the whole epoch, then this rank's share, starting after `skip` used items
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        total = self.per_rank * self.world
        order = (order * math.ceil(total / max(len(order), 1)))[:total]  # pad by wrapping around
        skip, self.skip = self.skip, 0  # items already used (resume); consumed by this iteration only
        for pos in range(self.rank + skip * self.world, total, self.world):
            yield order[pos], item_seed(self.seed, self.epoch, pos)


def _failures(batch):
    return [f for item in batch for f in item.get("failures", [])]


class CaptionCollate:
    """Stack media, tokenise captions (max_txt_l of the media type): the training batch."""

    def __init__(self, tokenizer, max_len: int):
        self.tokenizer, self.max_len = tokenizer, max_len

    def __call__(self, batch):
        ids, mask = tokenize(self.tokenizer, [b["caption"] for b in batch], self.max_len)
        return dict(media=stack_media([b["media"] for b in batch]), input_ids=ids, attention_mask=mask,
                    idx=torch.tensor([b["idx"] for b in batch]), captions=[b["caption"] for b in batch],
                    paths=[b["path"] for b in batch], failures=_failures(batch))


class QACollate:
    """``collate_qa`` + tokenised questions (max_q_len) and answers "answer [SEP]" (max_a_len)."""

    def __init__(self, tokenizer, max_q_len: int, max_a_len: int):
        self.tokenizer, self.max_q_len, self.max_a_len = tokenizer, max_q_len, max_a_len

    def __call__(self, batch):
        out = collate_qa(batch)
        out["question_ids"], out["question_mask"] = tokenize(self.tokenizer, out["questions"], self.max_q_len)
        out["answer_ids"], out["answer_mask"] = tokenize(self.tokenizer, out["answers"], self.max_a_len)
        return out


def stack_media(items):
    """Pixels stack into (B, T, C, H, W); clip plans (batched DALI decoding) stay a list."""
    return torch.stack(items) if isinstance(items[0], torch.Tensor) else list(items)


def collate_qa(batch):
    out = dict(media=stack_media([b["media"] for b in batch]), questions=[b["question"] for b in batch],
               paths=[b["path"] for b in batch], failures=_failures(batch))
    if "answers" in batch[0]:
        out["answers"] = [a for b in batch for a in b["answers"]]
        out["weights"] = torch.tensor([w for b in batch for w in b["weights"]])
        out["num_answers"] = [len(b["answers"]) for b in batch]
    else:
        out["question_ids"] = [b["question_id"] for b in batch]
    return out


def make_loader(dataset, batch_size, collate_fn, rank=0, world=1, shuffle=True, seed=0, drop_last=True,
                num_workers=0):
    """A DataLoader whose workers' user errors are raised whole in the main process
    (:mod:`.worker_errors`)."""
    if isinstance(dataset, IterableDataset):  # a shard stream splits itself over ranks and workers
        # workers restart each epoch: they receive the stream's epoch and resume position when started
        return Loader(dataset, batch_size=batch_size, collate_fn=collate_fn, num_workers=num_workers,
                      drop_last=True, persistent_workers=False)
    sampler = SeededSampler(len(dataset), rank, world, shuffle, seed, drop_last)
    return Loader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate_fn,
                  num_workers=num_workers, drop_last=drop_last, persistent_workers=num_workers > 0,
                  pin_memory=False)


class MetaLoader:
    """Iterate several loaders (one per media type), a media type per step, same order on all ranks."""

    def __init__(self, loaders: Dict[str, DataLoader], seed: int = 0, finish=None):
        """``finish(batch) -> batch`` runs in the main process on every batch (batched GPU decoding)."""
        self.loaders, self.seed, self.epoch, self.finish = dict(loaders), seed, 0, finish

    @staticmethod
    def _positioned(loader):
        """What holds a loader's epoch and resume position: its sampler, or the stream itself."""
        return loader.dataset if isinstance(loader.dataset, IterableDataset) else loader.sampler

    def set_epoch(self, epoch: int):
        self.epoch = epoch
        for loader in self.loaders.values():
            self._positioned(loader).set_epoch(epoch)

    def order(self):
        names = sorted(self.loaders)
        order = [name for name in names for _ in range(len(self.loaders[name]))]
        random.Random(epoch_seed(self.seed, self.epoch)).shuffle(order)
        return order

    def __len__(self):
        return sum(len(loader) for loader in self.loaders.values())

    def __iter__(self) -> Iterator:
        return self.iterate(0)

    def iterate(self, start: int = 0) -> Iterator:
        """Batches from position ``start`` of this epoch's order, without loading the skipped ones."""
        order = self.order()
        iters = {}
        for name, loader in self.loaders.items():
            # read when iteration starts
            self._positioned(loader).skip = order[:start].count(name) * loader.batch_size
            iters[name] = iter(loader)
        for name in order[start:]:
            batch = next(iters[name])
            yield name, self.finish(batch) if self.finish is not None else batch
