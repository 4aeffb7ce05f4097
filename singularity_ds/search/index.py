"""The search index of ``singularity-ds embed`` (:mod:`.embed` describes the folder), and
``singularity-ds search``.

    index = Index.build(model, "my_videos/", "my_index")        # or: singularity-ds embed ...
    index = Index.load("my_index")                              # the model from the index's checkpoint
    for hit in index.search("a dog catches a frisbee", k=10, rerank=32): print(hit["path"], hit["score"])
    index.like("my_videos/beach.mp4", k=5)                      # video -> video

Text queries rank by the evaluation's ITC score (the mean over frames of per-frame cosines: the stored
cosine times the row's ``itc_norm``; exact or approximate: :mod:`.vectors`);
``rerank=K`` then scores the first K with the ITM head over the stored token features, with the
evaluation's own scoring (:func:`~singularity_ds.eval.retrieval.itm_scores`), and orders them by it
(the rest follow in ITC order), exactly as the evaluation's second stage orders a text's candidates.
"""
import argparse
import functools
import json
import logging
import os
from typing import List

import numpy as np
import torch

from ..data.builders import per_media
from ..errors import CheckpointError, ConfigError, describe
from ..eval.features import TokenStore, encode_media, encode_texts, open_shards
from ..eval.retrieval import itm_scores
from .embed import BROKEN, EMBEDDINGS, ITEMS, META
from .sources import Item, MediaItems, Source
from .vectors import VectorIndex

logger = logging.getLogger(__name__)


class Index:
    """A loaded index folder: ``items`` (list of dicts, one per row), ``embeddings`` (N, d), ``meta``;
    the model (text encoder, ITM head) comes from the checkpoint the index was built with."""

    def __init__(self, path: str, model=None, device=None):
        self.path = path
        meta_file = os.path.join(path, META)
        if not os.path.isfile(meta_file):
            raise ConfigError(f"{path}: not a finished index (no {META}); run `singularity-ds embed ... "
                              f"{path}` (a rerun resumes)")
        self.meta = self._read(META, _load_meta)
        self.items = self._read(ITEMS, _load_items)
        self.embeddings = self._read(EMBEDDINGS, _load_embeddings)
        if self.embeddings.shape[0] != len(self.items) or self.meta.get("items", len(self.items)) != len(
                self.items):
            raise self.damaged(EMBEDDINGS, f"{self.embeddings.shape[0]} rows for {len(self.items)} items "
                                           f"({ITEMS}) and {self.meta.get('items')} in {META}")
        self.vectors = VectorIndex(self.embeddings, cache=os.path.join(path, "vectors.faiss"))
        self._model, self._device, self._tokens = model, device, None
        self.by_path = {it["path"]: row for row, it in enumerate(self.items)}
        self.norms = np.array([it["itc_norm"] for it in self.items], dtype=np.float32)

    def damaged(self, name: str, reason: str, file: str = None) -> ConfigError:
        """The one line for a damaged ``file`` (default: ``name``) of this folder's ``name``: the merged
        files come back from ``parts/`` by running the same ``embed`` again; a damaged part is embedded
        again once its folder is deleted."""
        where = os.path.join(self.path, name)
        fix = (f"delete {where} and run the same `singularity-ds embed` again (it embeds that part anew)"
               if name.startswith("parts") and name != "parts" else
               "run the same `singularity-ds embed` again to rebuild the index from its parts, or delete "
               f"{self.path} and embed anew")
        return ConfigError(f"{file or where}: damaged ({reason}); {fix}")

    def _read(self, name: str, load):
        """``load(file)``, a damaged or missing file raised as the one line."""
        full = os.path.join(self.path, name)
        try:
            return load(full)
        except DamagedFile as e:
            raise self.damaged(name, e.reason, e.path) from None
        except FileNotFoundError as e:
            raise self.damaged(name, "missing", e.filename) from None
        except (OSError, ValueError, KeyError, TypeError, EOFError) as e:
            # pyarrow's ArrowInvalid, np.load's bad header and json's decode errors are all ValueErrors
            raise self.damaged(name, describe(e)) from None

    @classmethod
    def load(cls, path: str, model=None, device=None) -> "Index":
        return cls(path, model, device)

    @classmethod
    def build(cls, model, source: str, out_dir: str, frames: int = 4, batch_size: int = 32,
              dtype: str = "fp16", tokens: bool = False, media_dir: str = None, part_size: int = 256,
              progress: bool = True, **overrides) -> "Index":
        """Embed ``source`` (folder, annotation file or shard index) with ``model`` into ``out_dir``
        (resumable; on every rank when distributed) and load the result. ``overrides``: model config keys
        for the media transform (dotted names, e.g. ``**{"video_input.sample_type_test": "uniform"}``)."""
        from omegaconf import OmegaConf

        from ..models import follow_model_pixels
        from .embed import build
        from .sources import open_source
        config = model.config.copy()
        for key, value in dict(overrides, **{"video_input.num_frames_test": frames}).items():
            OmegaConf.update(config, key, value, merge=True)
        follow_model_pixels(config, model)
        build(model, open_source(source, media_dir), out_dir, config, frames, batch_size, dtype, tokens,
              part_size, progress=progress)
        return cls(out_dir, model)

    # ------------------------------------------------------------------ the model, loaded when needed
    @property
    def model(self):
        if self._model is None:
            from ..models import load_model
            ckpt = self.meta.get("checkpoint")
            if not ckpt:
                raise CheckpointError(f"{self.path}: built by Index.build from a model in memory, so it "
                                      f"names no checkpoint; pass the model: Index.load(path, model=...)")
            if not os.path.exists(ckpt):
                raise CheckpointError(f"{self.path}: its checkpoint {ckpt} is gone; pass the model "
                                      f"(Index.load(path, model=...)) or restore the file")
            if "size" in self.meta and self._weights_size(ckpt) != self.meta["size"]:
                raise CheckpointError(f"{ckpt}: changed since {self.path} was built (size differs); "
                                      f"embed again")
            self._model = load_model(ckpt, **{"video_input.num_frames_test": self.meta["frames"]})
            self._model.to(self._device or torch.device("cuda" if torch.cuda.is_available() else "cpu"))
        return self._model

    @staticmethod
    def _weights_size(path):
        from .embed import checkpoint_id
        if os.path.isdir(path):
            return checkpoint_id(path)["size"]
        return os.path.getsize(path)

    @property
    def tokens(self) -> TokenStore:
        if self._tokens is None:
            parts = self.meta.get("token_parts") or []
            if not self.meta.get("tokens"):
                raise ConfigError(f"{self.path}: built without --tokens, so it cannot re-rank with ITM; "
                                  f"embed again with --tokens (or search without --rerank)")
            shards = [s for p in parts
                      for s in self._read(p["folder"], lambda folder, p=p: _load_tokens(folder, p["world"]))]
            if sum(len(s) for s in shards) != len(self.items):
                raise self.damaged("parts", f"token features for {sum(len(s) for s in shards)} items, the "
                                            f"index has {len(self.items)}")
            self._tokens = TokenStore(shards, next(self.model.parameters()).device)
        return self._tokens

    # ------------------------------------------------------------------ queries
    @functools.cached_property
    def tokenizer(self):
        """The model's tokenizer, built once (``serve`` encodes a query per request)."""
        from ..models import model_tokenizer
        return model_tokenizer(self.model, self.meta.get("checkpoint") or "the index's model")

    def encode_text(self, text: str):
        model = self.model
        return encode_texts(model, self.tokenizer, [text], per_media(model.config.max_txt_l, "video"))

    def _hits(self, rows, scores, extra=None) -> List[dict]:
        out = []
        for rank, (row, score) in enumerate(zip(rows, scores)):
            hit = dict(self.items[int(row)], rank=rank + 1, row=int(row), score=float(score))
            hit.update({k: float(v[rank]) for k, v in (extra or {}).items() if v is not None})
            out.append(hit)
        return out

    @torch.no_grad()
    def search(self, text: str, k: int = 10, rerank: int = 0) -> List[dict]:
        """Top ``k`` items for ``text``: dicts with the item's fields (path, caption, thumb, duration, ...),
        rank, row, score (ITM logit when re-ranked, else the ITC score) and ``itc`` (``itm`` when
        re-ranked)."""
        if k < 1 or rerank < 0:
            raise ConfigError(f"search: -k must be >= 1 and --rerank >= 0 (got {k}, {rerank})")
        if not text.strip():  # as the page's API (q: at least one character)
            raise ConfigError('search: the query text is empty; give words to search for, e.g. '
                              'singularity-ds search INDEX "a dog catches a frisbee"')
        if not self.items:
            return []
        embeds, mask, feat = self.encode_text(text)
        itc, rows = self.vectors.search(feat.cpu().numpy(), max(k, rerank), weights=self.norms)
        itc, rows = itc[0], rows[0]
        keep = rows >= 0  # an approximate index may return fewer than asked
        itc, rows = itc[keep], rows[keep]
        if not rerank:
            return self._hits(rows[:k], itc[:k], dict(itc=itc[:k]))
        itm = self.itm(embeds, mask, rows[:rerank])
        order = np.argsort(-itm, kind="stable")
        rows = np.concatenate([rows[:rerank][order], rows[rerank:]])[:k]
        itc = np.concatenate([itc[:rerank][order], itc[rerank:]])[:k]
        itm = np.concatenate([itm[order], np.full(max(0, len(rows) - rerank), np.nan)])[:k]
        score = np.where(np.isnan(itm), itc, itm)
        return self._hits(rows, score, dict(itc=itc, itm=itm))

    @torch.no_grad()
    def itm(self, text_embeds, text_mask, rows) -> np.ndarray:
        """ITM logits (class 1) of one text against the items ``rows``: the evaluation's scoring."""
        model = self.model
        dtype = next(model.parameters()).dtype
        videos = self.tokens.rows(rows).to(dtype)
        n = len(rows)
        return itm_scores(model, text_embeds[:1].expand(n, -1, -1), text_mask[:1].expand(n, -1), videos,
                          "concat").float().cpu().numpy()

    @torch.no_grad()
    def like(self, path: str, k: int = 10) -> List[dict]:
        """Items nearest to a video / image: one of the index (its path as listed, relative to the media
        root, or the file's own path) by its stored embedding, or any other file, encoded now."""
        row = self.row_of(path)
        if row is not None:
            query = np.asarray(self.embeddings[row], dtype=np.float32)
        else:
            query = self.encode_media_file(path)
        scores, rows = self.vectors.search(query[None], k)
        keep = rows[0] >= 0
        return self._hits(rows[0][keep], scores[0][keep])

    def row_of(self, path: str):
        if path in self.by_path:
            return self.by_path[path]
        root = self.meta["media_root"]
        full = os.path.realpath(path)
        rel = os.path.relpath(full, os.path.realpath(root))
        return self.by_path.get(rel)

    def encode_media_file(self, path: str) -> np.ndarray:
        from ..data.readers import IMAGE_EXTENSIONS
        from ..errors import MediaError
        from ..eval.broken import Reading
        from ..models import follow_model_pixels
        model = self.model
        config = model.config
        follow_model_pixels(config, model)
        kind = "image" if os.path.splitext(path)[1].lower() in IMAGE_EXTENSIONS else "video"
        items = MediaItems(Source("file", os.path.dirname(os.path.abspath(path)),
                                  [Item(os.path.basename(path), kind)]), config)
        reading = Reading(items, range(1))
        _, feats = encode_media(model, reading, "concat")
        if reading.failures:
            raise MediaError(*reading.failures[0])
        mean = feats.mean(1)[0]
        return (mean / mean.norm().clamp_min(1e-12)).numpy()

    @property
    def broken(self) -> List[dict]:
        def load(path):
            with open(path) as f:
                return [json.loads(line) for line in f if line.strip()]
        return self._read(BROKEN, load)


def _load_meta(path) -> dict:
    with open(path) as f:
        meta = json.load(f)
    if not isinstance(meta, dict) or not isinstance(meta.get("frames"), int) or "media_root" not in meta:
        raise ValueError("not the meta.json of an index (frames, media_root)")
    return meta


ITEM_COLUMNS = ("path", "media_type", "duration", "frames", "caption", "thumb", "itc_norm")


def _load_items(path) -> List[dict]:
    import pyarrow.parquet as pq
    table = pq.read_table(path)
    missing = [c for c in ITEM_COLUMNS if c not in table.column_names]
    if missing:
        raise KeyError(f"no column {', '.join(missing)}")
    return table.to_pylist()


def _load_embeddings(path) -> np.ndarray:
    emb = np.load(path, mmap_mode="r", allow_pickle=False)
    if emb.ndim != 2 or emb.dtype not in (np.float16, np.float32):
        raise ValueError(f"an array of shape {emb.shape} and dtype {emb.dtype}, not (items, dim) fp16/fp32")
    return emb


class DamagedFile(Exception):
    def __init__(self, path, reason):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


def _load_tokens(folder, world) -> List[torch.Tensor]:
    """One part's token features (:func:`~..eval.features.open_shards`), each rank's file checked first:
    its ``.json`` readable, its ``.bin`` as long as the ``.json`` says."""
    if not os.path.isdir(folder):
        raise DamagedFile(folder, "missing")
    for r in range(world):
        path = os.path.join(folder, f"video_tokens.{r}.bin")
        try:
            with open(path + ".json") as f:
                meta = json.load(f)
            itemsize = torch.empty((), dtype=getattr(torch, meta["dtype"])).element_size()
            want = int(meta["rows"]) * int(np.prod(meta["shape"])) * itemsize
        except FileNotFoundError:
            raise DamagedFile(path + ".json", "missing") from None
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise DamagedFile(path + ".json", describe(e)) from None
        size = os.path.getsize(path) if os.path.isfile(path) else None
        if size is None and want:
            raise DamagedFile(path, "missing")
        if want and size != want:
            raise DamagedFile(path, f"{size} bytes where {path}.json says {want}")
    return open_shards(folder, "video_tokens", world)


def format_table(hits: List[dict]) -> str:
    """Hits as an aligned text table."""
    rows = [("#", "score", "itc", "itm", "dur s", "path", "caption")]
    for h in hits:
        itm = h.get("itm")
        rows.append((str(h["rank"]), f"{h['score']:.3f}", f"{h.get('itc', h['score']):.3f}",
                     "" if itm is None or itm != itm else f"{itm:.3f}", f"{h['duration']:.1f}", h["path"],
                     (h["caption"] or "")[:60]))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def search_main(argv) -> int:
    p = argparse.ArgumentParser(prog="singularity-ds search",
                                description="Search an index built by `singularity-ds embed`: text -> "
                                            "videos (ITC, optionally re-ranked with ITM), or video -> videos "
                                            "(--like).")
    p.add_argument("index")
    p.add_argument("text", nargs="?")
    p.add_argument("-k", type=int, default=10, help="results to show")
    p.add_argument("--rerank", type=int, default=0, metavar="K",
                   help="re-rank the ITC top K with ITM (needs an index embedded with --tokens)")
    p.add_argument("--like", metavar="VIDEO", help="items similar to this video/image instead of a text")
    p.add_argument("--json", action="store_true", help="print the hits as JSON")
    args = p.parse_args(list(argv))
    if (args.text is None) == (args.like is None):
        raise ConfigError('search: give a text query or --like VIDEO (one of them): '
                          'singularity-ds search INDEX "a dog catches a frisbee"')
    index = Index.load(args.index)
    hits = index.like(args.like, args.k) if args.like else index.search(args.text, args.k, args.rerank)
    if args.json:
        print(json.dumps([{k: (None if isinstance(v, float) and v != v else v) for k, v in h.items()}
                          for h in hits], indent=1))
    else:
        print(format_table(hits))
    return 0
