"""Two-stage retrieval evaluation: ITC ranking, then ITM re-ranking of each query's top ``k_test``.

Stage 1 (ITC): mean over frames of per-frame cosine similarity (the original's ``get_sim``).
Stage 2 (ITM): for every video its top ``k_test`` texts, and for every text its top ``k_test`` videos,
are scored by the fusion encoder (class-1 logit), which decides their final order. Frame ensembles:
``concat`` fuses the text with all frames' tokens at once; ``mean`` / ``max`` / ``lse`` fuse each frame
alone (``encode_frames``, no temporal modelling) and pool the per-frame scores.

Two paths, the same metrics:

- in memory (default, the original's algorithm): the dense (videos x texts) score matrices, every
  candidate pair fused from scratch; returns the matrices too.
- ``offload=True`` (large sets): features stay off the accelerator (:mod:`.features`); stage 1 keeps a
  streaming blockwise top-k, never the full matrix; stage 2 scores each distinct (text, video) pair once
  (pairs in both directions' top-k are shared), grouped by video so that each fusion layer's
  cross-attention keys/values of a video are computed once and reused for all its texts; the first
  fusion layer's self-attention and cross-attention queries depend on the text alone and are computed
  once per text; only that layer's cross-attention and feed-forward, and the later fusion layers, run
  per pair (the last one at [CLS] only, the one row the ITM head reads), in batches that span several
  videos (keys/values padded to the longest and masked). Videos are split across ranks; rank 0 shows a
  progress bar.

With broken media skipped (``skip_broken_media_eval``) both paths score the same readable subset
(:mod:`.broken`), so they still give the same metrics.
"""
import logging
import sys

import numpy as np
import torch

from ..config.schema import ENSEMBLES
from ..dist import all_gather, rank_world
from ..errors import ConfigError
from ..models.attention import pad_to_longest
from ..models.losses import ensemble_frames, similarity
from .broken import surviving_ground_truth
from .features import Features, extract
from .metrics import itm_eval, topk_eval

logger = logging.getLogger(__name__)

__all__ = ["evaluate", "ranked", "itm_eval", "itm_scores", "itm_scores_shared", "text_fusion_state",
           "videos_cross_kv",
           "topk_blockwise", "check_ensemble"]


def check_ensemble(model, ensemble: str, num_frames_test: int) -> None:
    """Refuse settings that would give garbage scores instead of an error.

    Late ensembles (mean / max / lse) fuse each frame alone, skipping temporal embeddings and the
    temporal encoder: the original asserts a single-frame model there, and so do we. A frame count
    above the trained one interpolates the temporal embeddings linearly (the original's behaviour)."""
    if ensemble not in ENSEMBLES:
        raise ConfigError(f"eval_frame_ensemble={ensemble!r}; expected one of {', '.join(ENSEMBLES)}")
    temporal = model.temporal_vision_encoder is not None or model.config.add_temporal_embed
    if ensemble != "concat" and temporal:
        raise ConfigError(
            f"eval_frame_ensemble={ensemble} scores each frame on its own and would bypass this checkpoint's "
            f"temporal modelling (temporal embeddings / encoder, trained on "
            f"{model.temporal_embeddings.shape[1]} frames); use eval_frame_ensemble=concat")
    trained = model.temporal_embeddings.shape[1]
    if model.config.add_temporal_embed and num_frames_test > trained:
        logger.info("temporal embeddings: %d trained frames interpolated linearly to %d test frames",
                    trained, num_frames_test)


# ---------------------------------------------------------------------- stage 2 scoring
@torch.no_grad()
def itm_scores(model, text_embeds, text_mask, vid_tokens, ensemble):
    """Class-1 ITM logit for row-aligned (text, video) pairs; vid_tokens (k, clips, L, D). Uncached."""
    clip_scores = [model.itm_logits(text_embeds,
                                    text_mask, vid_tokens[:, c])[:, 1] for c in range(vid_tokens.shape[1])]
    if len(clip_scores) == 1:
        return clip_scores[0]
    return ensemble_frames(torch.stack(clip_scores, dim=1), ensemble)


@torch.no_grad()
def text_fusion_state(model, text_embeds, text_mask):
    """The text-only part of the first fusion layer (self-attention output, cross-attention queries),
    computed once per text and reused for all its candidate videos (:meth:`TextEncoder.fusion_text_state`)."""
    return model.text_encoder.fusion_text_state(text_embeds, text_mask)


@torch.no_grad()
def videos_cross_kv(model, clips):
    """Cross-attention keys/values of several clips at once: ``clips`` (n, Lv, D) or a list of (Lv_i, D)
    whose token counts may differ (padded to the longest) -> ([each fusion layer's (k, v)], each
    (n, H, L_max, d); their padding bias (n, 1, 1, L_max), or None when nothing is padded)."""
    if torch.is_tensor(clips) and clips.dim() == 3:
        tokens, bias = clips, None
    else:
        tokens, bias = pad_to_longest(clips, clips[0].dtype)
    return model.text_encoder.cross_kv(tokens), bias


@torch.no_grad()
def itm_scores_shared(model, state, text_mask, video_kv, text_rows, video_rows, ensemble="concat", clips=1):
    """Class-1 ITM logits of the pairs (text ``text_rows[i]``, video ``video_rows[i]``): the texts' rows of
    ``state`` (:func:`text_fusion_state`) and of ``text_mask``, each video's ``clips`` consecutive rows of
    ``video_kv`` (:func:`videos_cross_kv`: one clip of all frames' tokens (concat), or one per frame (late
    ensembles, pooled)). Only the per-pair part of the fusion runs here: the first fusion layer's
    cross-attention and feed-forward, then the later fusion layers (the last at [CLS] only)."""
    kv, kv_bias = video_kv
    h, q = state
    text_rows = torch.as_tensor(text_rows, device=h.device).repeat_interleave(clips)
    kv_rows = (torch.as_tensor(video_rows, device=h.device)[:, None] * clips
               + torch.arange(clips, device=h.device)).reshape(-1).to(kv[0][0].device)
    pair_kv = [(k[kv_rows], v[kv_rows]) for k, v in kv]
    cls = model.text_encoder.fusion_cls(h[text_rows], q[text_rows], text_mask[text_rows.to(text_mask.device)],
                                        pair_kv, None if kv_bias is None else kv_bias[kv_rows])
    scores = model.itm_head(cls)[:, 1]
    if clips == 1:
        return scores
    return ensemble_frames(scores.view(-1, clips), ensemble)


# ---------------------------------------------------------------------- stage 1 streaming top-k
@torch.no_grad()
def topk_blockwise(queries: torch.Tensor, candidates: torch.Tensor, k: int, block: int = 8192):
    """Top-``k`` of ``queries @ candidates.T`` per row, (values, indices), holding one
    ``block x block`` tile of scores at a time: memory O(block^2 + rows * k), not rows x candidates."""
    k = min(k, candidates.shape[0])
    values = torch.empty(queries.shape[0], k, dtype=torch.float32)
    indices = torch.empty(queries.shape[0], k, dtype=torch.int32)  # half the memory of int64 at 1M x 128
    for i in range(0, queries.shape[0], block):
        q = queries[i:i + block]
        best_v = best_i = None
        for j in range(0, candidates.shape[0], block):
            tile = (q @ candidates[j:j + block].T).float()
            v, ix = tile.topk(min(k, tile.shape[1]), dim=1)
            ix += j
            if best_v is not None:
                v, ix = torch.cat([best_v, v], 1), torch.cat([best_i, ix], 1)
                v, sel = v.topk(k, dim=1)
                ix = ix.gather(1, sel)
            best_v, best_i = v, ix
        values[i:i + block], indices[i:i + block] = best_v.cpu(), best_i.int().cpu()
    return values, indices


# ---------------------------------------------------------------------- the two paths
def _dense(model, feats: Features, k_test, ensemble):
    text_embeds = feats.text_tokens.rows(np.arange(len(feats.text_tokens)))
    vid_tokens = feats.video_tokens.rows(np.arange(len(feats.video_tokens)))
    text_mask = feats.text_mask
    sim_i2t = similarity(feats.video_feat, feats.text_feat)
    n_vid, n_txt = sim_i2t.shape
    i2t = torch.full((n_vid, n_txt), -100.0)
    for v in range(n_vid):
        k = min(n_txt, k_test)
        top = sim_i2t[v].topk(k).indices
        i2t[v, top.cpu()] = itm_scores(model, text_embeds[top], text_mask[top],
                                       vid_tokens[v:v + 1].expand(k, -1, -1, -1), ensemble).float().cpu()
    t2i = torch.full((n_txt, n_vid), -100.0)
    for t in range(n_txt):
        k = min(n_vid, k_test)
        top = sim_i2t[:, t].topk(k).indices
        t2i[t, top.cpu()] = itm_scores(model, text_embeds[t:t + 1].expand(k, -1, -1),
                                       text_mask[t:t + 1].expand(k, -1), vid_tokens[top],
                                       ensemble).float().cpu()
    return i2t, t2i, sim_i2t.float().cpu()


def _rerank(model, feats: Features, pair_video, pair_text, ensemble, text_batch, text_block, pair_batch,
            kv_budget_mb, progress):
    """ITM scores of the pairs (``pair_video[i]``, ``pair_text[i]``), grouped by video -> (keys
    video * n_txt + text, scores).

    Texts go in blocks of ``text_block``: each text's fusion state (:func:`text_fusion_state`) is computed
    once per block (once in all for sets up to ``text_block`` texts; it takes 2x the text tokens' memory);
    the block's pairs go in batches of up to ``pair_batch`` pairs (None: 256 on CPU, 4096 on CUDA) that
    span several videos, whose cross-attention keys/values are computed once per batch and gathered per
    pair (at most ``kv_budget_mb`` of them: long videos make smaller batches)."""
    from tqdm import tqdm
    n_txt = feats.text_feat.shape[0]
    _, clips, n_tok, width = feats.video_tokens.shape
    layers = model.text_encoder.bert.encoder.layer[model.text_encoder.fusion_layer:]
    param = next(model.parameters())
    if pair_batch is None:  # CPU: a batch's activations stay in cache (2048 took 1.9x the CPU time of 256)
        pair_batch = 4096 if param.is_cuda else 256
    pair_bytes = 2 * len(layers) * clips * n_tok * width * param.element_size()
    pair_batch = max(1, min(pair_batch, kv_budget_mb * 2 ** 20 // pair_bytes))
    texts = np.unique(pair_text)
    out_keys, out_scores = [], []
    bar = tqdm(total=len(pair_text), desc="ITM re-rank", unit="pair", disable=not progress,
               dynamic_ncols=True)
    for b in range(0, len(texts), text_block):
        block_texts = texts[b:b + text_block]
        picked = np.isin(pair_text, block_texts) if len(texts) > text_block else slice(None)
        videos, local_text = pair_video[picked], np.searchsorted(block_texts, pair_text[picked])
        states = [text_fusion_state(model, feats.text_tokens.rows(chunk), feats.text_mask[chunk])
                  for chunk in np.array_split(block_texts, -(-len(block_texts) // text_batch))]
        state = tuple(torch.cat(parts) for parts in zip(*states))
        mask = feats.text_mask[torch.from_numpy(block_texts).to(feats.text_mask.device)]
        for s in range(0, len(videos), pair_batch):
            batch_videos, local_video = np.unique(videos[s:s + pair_batch], return_inverse=True)
            video_kv = videos_cross_kv(model, feats.video_tokens.rows(batch_videos).flatten(0, 1))
            scores = itm_scores_shared(model, state, mask, video_kv, local_text[s:s + pair_batch],
                                       local_video, ensemble, clips)
            out_keys.append(videos[s:s + pair_batch] * n_txt + block_texts[local_text[s:s + pair_batch]])
            out_scores.append(scores.float().cpu().numpy())
            bar.update(len(local_video))
    bar.close()
    return (np.concatenate(out_keys) if out_keys else np.zeros(0, np.int64),
            np.concatenate(out_scores) if out_scores else np.zeros(0, np.float32))


def _offload(model, feats: Features, k_test, ensemble, text_batch=256, block=8192, text_block=16384,
             pair_batch=None, kv_budget_mb=512, progress=True):
    rank, world = rank_world()
    n_txt, n_vid = feats.text_feat.shape[0], feats.video_feat.shape[0]
    video_mean = feats.video_feat.mean(1)  # mean of per-frame cosines = dot with the frame mean (linear)
    depth = max(k_test, 10)                # R@10 needs the first 10 of every list
    i2t_v, i2t_c = topk_blockwise(video_mean, feats.text_feat, depth, block)
    t2i_v, t2i_c = topk_blockwise(feats.text_feat, video_mean, depth, block)
    k_i2t, k_t2i = min(k_test, n_txt), min(k_test, n_vid)
    i2t_cand = i2t_c[:, :k_i2t].numpy().astype(np.int64)  # int64: pair keys go up to n_vid * n_txt
    t2i_cand = t2i_c[:, :k_t2i].numpy().astype(np.int64)

    # each distinct (video, text) pair once, as key video * n_txt + text, grouped by video
    keys = np.unique(np.concatenate([
        (np.arange(n_vid)[:, None] * n_txt + i2t_cand).ravel(),
        (t2i_cand * n_txt + np.arange(n_txt)[:, None]).ravel()]))
    videos, starts = np.unique(keys // n_txt, return_index=True)
    ends = np.append(starts[1:], len(keys))
    mine = np.arange(rank, len(videos), world)  # round-robin over videos
    my_keys = (np.concatenate([keys[starts[j]:ends[j]] for j in mine]) if len(mine)
               else np.zeros(0, np.int64))  # this rank's pairs, grouped by video
    local = _rerank(model, feats, my_keys // n_txt, my_keys % n_txt, ensemble, text_batch, text_block,
                    pair_batch, kv_budget_mb, progress and rank == 0)
    parts = all_gather(local)
    all_keys = np.concatenate([p[0] for p in parts])
    all_scores = np.concatenate([p[1] for p in parts])
    order = np.argsort(all_keys)
    all_keys, all_scores = all_keys[order], all_scores[order]

    def lookup(query_keys):
        return all_scores[np.searchsorted(all_keys, query_keys)]

    itm = dict(i2t=(i2t_cand, lookup(np.arange(n_vid)[:, None] * n_txt + i2t_cand)),
               t2i=(t2i_cand, lookup(t2i_cand * n_txt + np.arange(n_txt)[:, None])))
    itc = dict(i2t=(i2t_c.numpy(), i2t_v.numpy()), t2i=(t2i_c.numpy(), t2i_v.numpy()))
    stats = dict(pairs=int(len(keys)), pairs_both_directions=int(n_vid * k_i2t + n_txt * k_t2i),
                 videos_reranked=int(len(videos)))
    return itm, itc, stats


def ranked(candidates: np.ndarray, scores: np.ndarray) -> dict:
    """Each query's candidate list sorted by score, best first: {"index": (Q, k) ints, "score": (Q, k)}."""
    order = np.argsort(-scores, axis=1, kind="stable")
    return dict(index=np.take_along_axis(candidates, order, axis=1).astype(np.int64),
                score=np.take_along_axis(scores, order, axis=1).astype(np.float32))


def _dense_topk(i2t, t2i, sim, k_test):
    """The offloaded path's top-k lists from the dense matrices: ITM over each query's ``k_test`` ITC
    candidates (the only pairs the fusion encoder scored), ITC ``max(k_test, 10)`` deep."""
    def lists(matrix, k):
        top = torch.from_numpy(np.ascontiguousarray(matrix)).topk(min(k, matrix.shape[1]), dim=1)
        return ranked(top.indices.numpy(), top.values.numpy())

    depth = max(k_test, 10)
    return dict(itm=dict(i2t=lists(i2t, k_test), t2i=lists(t2i, k_test)),
                itc=dict(i2t=lists(sim, depth), t2i=lists(sim.T, depth)))


@torch.no_grad()
def evaluate(model, dataset, tokenizer, max_txt_l, k_test=128, ensemble="concat", batch_size=32,
             offload=False, feature_store=None, feature_dir=None, num_frames_test=None,
             name="evaluation set", text_inputs=None, progress=None):
    """-> {"itm": ITM re-ranked metrics, "itc": ITC-only metrics} (the original's ``x`` / ``emb``), the
    counts evaluated ("media", "texts") and left out ("skipped_media": the broken paths,
    "skipped_texts": texts with no readable ground truth), "topk" (both paths: per query, its ranked
    candidates and their scores, ``{"itm"|"itc": {"i2t"|"t2i": {"index", "score"}}}``: ITM over the
    ``k_test`` ITC candidates, ITC ``max(k_test, 10)`` deep; rows and indices count the evaluated media and
    texts), plus "scores" (the dense matrices: ITM ``i2t`` / ``t2i``, ITC ``i2t_itc``) in memory, or
    "stats" with the offloaded path. ``feature_store``: device / cpu / disk (default: device, or cpu with
    ``offload``). ``text_inputs``: see :func:`.features.extract` (:func:`.tensors.evaluate_tensors`).

    Broken media (``dataset.skip_broken``, from ``skip_broken_media_eval``) follow :mod:`.broken`: both
    paths give the metrics of the set whose annotation file lists none of them. ``name`` labels the set
    in errors (an empty set, broken media). ``progress``: the offloaded re-rank's progress bar on rank 0
    (None: when stderr is a terminal)."""
    check_ensemble(model, ensemble, num_frames_test or 1)
    store = feature_store or ("cpu" if offload else "device")
    feats = extract(model, dataset, tokenizer, max_txt_l, ensemble, batch_size, store, feature_dir, name=name,
                    text_inputs=text_inputs)
    txt2img, img2txt = surviving_ground_truth(dataset.txt2img, dataset.img2txt, feats.text_index,
                                              feats.media_index)
    counts = dict(media=len(feats.media_index), texts=len(feats.text_index),
                  skipped_media=feats.skipped_media, skipped_texts=len(dataset.text) - len(feats.text_index))
    if not offload:
        i2t, t2i, sim = _dense(model, feats, k_test, ensemble)
        return dict(itm=itm_eval(i2t.numpy(), t2i.numpy(), txt2img, img2txt),
                    itc=itm_eval(sim.numpy(), sim.T.numpy(), txt2img, img2txt), **counts,
                    topk=_dense_topk(i2t.numpy(), t2i.numpy(), sim.numpy(), k_test),
                    scores=dict(i2t=i2t, t2i=t2i, i2t_itc=sim))
    itm, itc, stats = _offload(model, feats, k_test, ensemble,
                               progress=sys.stderr.isatty() if progress is None else progress)
    topk = {kind: {d: ranked(*lists[d]) for d in ("i2t", "t2i")}
            for kind, lists in (("itm", itm), ("itc", itc))}
    return dict(itm=topk_eval(*itm["i2t"], *itm["t2i"], txt2img, img2txt),
                itc=topk_eval(*itc["i2t"], *itc["t2i"], txt2img, img2txt), **counts, topk=topk, stats=stats)
