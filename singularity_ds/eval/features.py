"""Evaluation features, extracted once and sharded across ranks.

Each rank encodes a contiguous 1/world of the texts and of the media. The small normalised
projections (ITC) are gathered to every rank. The token features that ITM needs are large (ActivityNet
with 32 frames: ~48 GB in fp16), so they live where they fit:

- ``device``: on the accelerator, gathered to every rank (the original's behaviour; small sets);
- ``cpu``: in host memory (pinned on CUDA), gathered to every rank;
- ``disk``: each rank streams its shard into ``<feature_dir>/<name>.<rank>.bin`` as it encodes, and every
  rank memory-maps all shards afterwards (``feature_dir`` must be shared between nodes).

Rows come back through :meth:`TokenStore.rows`, on the device, whatever the backing.
"""
import json
import os
from dataclasses import dataclass, field
from typing import List

import numpy as np
import torch

from ..data.text import tokenize
from ..dist import all_gather, barrier, rank_world
from ..fileio import write_json
from .broken import Reading, check_not_empty, texts_with_media


def shard_range(n: int, rank: int, world: int) -> range:
    return range(n * rank // world, n * (rank + 1) // world)


class TokenStore:
    """Row-indexed (rows, *shape) features over one or more shards (tensors or memory maps)."""

    def __init__(self, shards: List[torch.Tensor], device):
        self.shards = [s for s in shards if s.shape[0]]
        self.starts = np.cumsum([0] + [s.shape[0] for s in self.shards])
        self.device = device

    def __len__(self):
        return int(self.starts[-1])

    @property
    def shape(self):
        return (len(self),) + tuple(self.shards[0].shape[1:])

    def rows(self, index) -> torch.Tensor:
        """Rows ``index`` (ints) stacked on the device."""
        index = np.asarray(index, dtype=np.int64).reshape(-1)
        if len(self.shards) == 1:  # one gather instead of a row at a time
            only = self.shards[0]
            return only[torch.from_numpy(index).to(only.device)].to(self.device, non_blocking=True)
        shard = np.searchsorted(self.starts, index, side="right") - 1
        parts = [self.shards[s][int(i - self.starts[s])] for s, i in zip(shard, index)]
        return torch.stack(parts).to(self.device, non_blocking=True)

    @property
    def nbytes(self) -> int:
        return sum(s.numel() * s.element_size() for s in self.shards)


class ShardWriter:
    """Streams one rank's rows to ``<dir>/<name>.<rank>.bin`` (raw bytes of any dtype, bf16 included)."""

    def __init__(self, folder: str, name: str, rank: int):
        os.makedirs(folder, exist_ok=True)
        self.path = os.path.join(folder, f"{name}.{rank}.bin")
        self.file = open(self.path + ".part", "wb")
        self.rows, self.shape, self.dtype = 0, None, None

    def write(self, x: torch.Tensor):
        x = x.detach().cpu().contiguous()
        self.shape, self.dtype = tuple(x.shape[1:]), x.dtype
        self.rows += x.shape[0]
        self.file.write(x.view(torch.uint8).numpy().tobytes() if x.numel() else b"")

    def close(self):
        self.file.close()
        os.replace(self.path + ".part", self.path)
        write_json(dict(rows=self.rows, shape=self.shape, dtype=str(self.dtype).replace("torch.", "")),
                   self.path + ".json", indent=None)


def open_shards(folder: str, name: str, world: int) -> List[torch.Tensor]:
    shards = []
    for r in range(world):
        path = os.path.join(folder, f"{name}.{r}.bin")
        with open(path + ".json") as f:
            meta = json.load(f)
        if meta["rows"] == 0:
            continue
        dtype = getattr(torch, meta["dtype"])
        row_bytes = int(np.prod(meta["shape"])) * torch.empty((), dtype=dtype).element_size()
        raw = np.memmap(path, dtype=np.uint8, mode="c", shape=(meta["rows"], row_bytes))
        shards.append(torch.from_numpy(raw).view(dtype).view(meta["rows"], *meta["shape"]))
    return shards


class _Sink:
    """Collects one rank's rows of one feature: in memory, or streamed to a shard file."""

    def __init__(self, store: str, folder: str, name: str, rank: int):
        self.writer = ShardWriter(folder, name, rank) if store == "disk" else None
        self.parts, self.name, self.folder = [], name, folder
        self.offload = store != "device"

    def add(self, x: torch.Tensor):
        if self.writer is not None:
            self.writer.write(x)
        else:
            self.parts.append(x.cpu() if self.offload else x)

    def finish(self, device, world: int) -> TokenStore:
        if self.writer is not None:
            self.writer.close()
            barrier()
            return TokenStore(open_shards(self.folder, self.name, world), device)
        local = torch.cat(self.parts) if self.parts else None
        if world == 1:
            shards = [local]
        else:  # every rank gets every shard (via host memory)
            shards = [s for s in all_gather(None if local is None else local.cpu()) if s is not None]
            shards = [s if self.offload else s.to(device) for s in shards]
        if self.offload and torch.cuda.is_available():
            shards = [s.pin_memory() for s in shards]
        return TokenStore(shards, device)


@dataclass
class Features:
    text_tokens: TokenStore    # (N_text, L, D) states of the text-only layers
    text_mask: torch.Tensor    # (N_text, L) on the device
    text_feat: torch.Tensor    # (N_text, d) normalised text projections, on the device
    video_tokens: TokenStore   # (N_media, clips, Lv, D): clips = 1 (concat) or T (late ensembles)
    video_feat: torch.Tensor   # (N_media, T, d) normalised per-frame projections, on the device
    # which of the dataset's texts / media the rows are (all, unless broken media were skipped)
    text_index: np.ndarray = None
    media_index: np.ndarray = None
    skipped_media: list = field(default_factory=list)  # paths of the broken media left out


@torch.no_grad()
def encode_texts(model, tokenizer, texts: List[str], max_txt_l: int):
    """-> (token states of the text-only layers (n, L, D), mask (n, L), normalised ITC projections
    (n, d) float32), on the model's device: evaluation's texts and a search query alike."""
    return encode_text_ids(model, *tokenize(tokenizer, texts, max_txt_l))


def encode_text_ids(model, ids, mask):
    """:func:`encode_texts` for token ids the caller holds (``evaluate_tensors``)."""
    device = next(model.parameters()).device
    ids, mask = ids.to(device), mask.to(device)
    embeds, pooled = model.encode_text(ids, mask)
    return embeds, mask, model.project_text(pooled).float()


@torch.no_grad()
def encode_media(model, reading: Reading, ensemble: str = "concat", add_tokens=None):
    """Encode the readable media of ``reading`` (a :class:`Reading` over this rank's items), batch by
    batch -> (indices read, (n, T, d) normalised per-frame ITC projections, float32 on the host).

    The fusion encoder's inputs go to ``add_tokens`` per batch, (batch, clips, Lv, D): clips = 1 for
    ``concat`` (all frames' tokens, temporal modelling included), T for the late ensembles. The
    evaluation's extraction and ``singularity-ds embed`` both encode through here."""
    model.eval()
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    feats, readable = [], []
    for batch in reading:
        readable += [i for i, _ in batch]
        media = torch.stack([item["media"] for _, item in batch]).to(device, dtype)
        if ensemble == "concat":
            tokens, pooled = model.encode_image(media)
            tokens = tokens.unsqueeze(1)
        else:
            tokens, pooled = model.encode_frames(media)
        if add_tokens is not None:
            add_tokens(tokens)
        feats.append(model.project_image(pooled).float().cpu())
    return readable, (torch.cat(feats) if feats else torch.zeros(0))


@torch.no_grad()
def extract(model, dataset, tokenizer, max_txt_l: int, ensemble: str = "concat", batch_size: int = 32,
            store: str = "device", feature_dir: str = None, text_batch: int = 256,
            name: str = "evaluation set", text_inputs=None) -> Features:
    """Encode ``dataset``'s media, then its texts, this rank's shard of each, and gather the results.
    ``text_inputs(indices) -> (input_ids, attention_mask)`` of those texts; by default ``dataset.text``
    tokenised with ``tokenizer`` (``max_txt_l``); callers holding token ids pass their rows instead.

    The media come first: which of them are readable decides which texts are evaluated (broken media
    follow :mod:`.broken`; ``name`` labels the set in its errors). The readable media are encoded in
    batches of ``batch_size`` as they come, so the batches are those of the set without the broken ones."""
    if store not in ("device", "cpu", "disk"):
        raise ValueError(f"feature store {store!r}: expected device, cpu or disk")
    if store == "disk" and not feature_dir:
        raise ValueError("the disk feature store needs a feature_dir")
    check_not_empty(dataset, name)
    model.eval()
    device = next(model.parameters()).device
    rank, world = rank_world()

    video_sink = _Sink(store, feature_dir, "video_tokens", rank)
    reading = Reading(dataset, shard_range(len(dataset), rank, world), batch_size)
    readable, video_feats = encode_media(model, reading, ensemble, video_sink.add)
    skipped = reading.settle(name)
    readable = np.concatenate(all_gather(np.asarray(readable, dtype=np.int64)))  # ranks hold ascending runs
    texts = texts_with_media(dataset.txt2img, readable) if skipped else np.arange(len(dataset.text))

    text_sink = _Sink(store, feature_dir, "text_tokens", rank)
    masks, text_feats = [], []
    mine = shard_range(len(texts), rank, world)
    if text_inputs is None:
        def text_inputs(chunk):
            return tokenize(tokenizer, [dataset.text[t] for t in chunk], max_txt_l)
    for i in range(mine.start, mine.stop, text_batch):
        embeds, mask, feat = encode_text_ids(model, *text_inputs(texts[i:min(i + text_batch, mine.stop)]))
        text_sink.add(embeds)
        masks.append(mask.cpu())
        text_feats.append(feat.cpu())

    def gathered(parts):
        local = torch.cat(parts) if len(parts) else None
        return torch.cat([p for p in all_gather(local) if p is not None]).to(device)

    return Features(text_tokens=text_sink.finish(device, world), text_mask=gathered(masks),
                    text_feat=gathered(text_feats), video_tokens=video_sink.finish(device, world),
                    video_feat=gathered([video_feats] if len(video_feats) else []), text_index=texts,
                    media_index=readable, skipped_media=skipped)
