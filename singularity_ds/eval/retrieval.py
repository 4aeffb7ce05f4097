"""Two-stage retrieval evaluation, as the original's ``evaluation`` + ``itm_eval``.

Stage 1 (ITC): mean over frames of per-frame cosine similarity, all (video, text) pairs.
Stage 2 (ITM): for every video its top ``k_test`` texts, and for every text its top ``k_test`` videos,
are re-scored by the fusion encoder (class-1 logit); other pairs keep -100. Frame ensembles: ``concat``
fuses the text with all frames' tokens at once; ``mean`` / ``max`` / ``lse`` fuse each frame alone
(frames from ``encode_frames``, no temporal modelling) and pool the per-frame scores.
Metrics: ``txt_r1/5/10`` (video->text), ``img_r1/5/10`` (text->video), their means and ``r_mean``, for
the re-ranked scores and the ITC-only ones (``*_emb``); several ground truths count at the best rank.
"""
import logging

import numpy as np
import torch

from ..data.loader import collate_eval
from ..data.text import tokenize
from ..models.losses import ENSEMBLES, ensemble_frames

logger = logging.getLogger(__name__)


def itm_eval(scores_i2t: np.ndarray, scores_t2i: np.ndarray, txt2img: dict, img2txt: dict) -> dict:
    """Recall@K as the original: rank of the best-ranked ground truth, argsort descending."""
    def ranks(scores, gts):
        out = np.zeros(scores.shape[0])
        for i, row in enumerate(scores):
            order = np.argsort(row)[::-1]
            gt = gts[i] if isinstance(gts[i], (list, tuple)) else [gts[i]]
            out[i] = min(np.where(order == g)[0][0] for g in gt)
        return out

    def recall(r, k):
        return 100.0 * float((r < k).sum()) / len(r)

    tr, ir = ranks(scores_i2t, img2txt), ranks(scores_t2i, txt2img)
    res = {"txt_r1": recall(tr, 1), "txt_r5": recall(tr, 5), "txt_r10": recall(tr, 10),
           "img_r1": recall(ir, 1), "img_r5": recall(ir, 5), "img_r10": recall(ir, 10)}
    res["txt_r_mean"] = (res["txt_r1"] + res["txt_r5"] + res["txt_r10"]) / 3
    res["img_r_mean"] = (res["img_r1"] + res["img_r5"] + res["img_r10"]) / 3
    res["r_mean"] = (res["txt_r_mean"] + res["img_r_mean"]) / 2
    return {k: round(v, 2) for k, v in res.items()}


@torch.no_grad()
def extract(model, dataset, tokenizer, max_txt_l, ensemble="concat", batch_size=32, dtype=torch.float32):
    """Text states + masks, and video tokens (concat: (N, 1, T*Li, D); late: (N, T, Li, D)) + pooled."""
    model.eval()
    texts = dataset.text
    text_embeds, text_masks = [], []
    for i in range(0, len(texts), 256):
        ids, mask = tokenize(tokenizer, texts[i:i + 256], max_txt_l)
        text_embeds.append(model.encode_text(ids, mask)[0])
        text_masks.append(mask)
    vid_tokens, vid_pooled, order = [], [], []
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=collate_eval)
    for batch in loader:
        if batch["media"] is None:
            continue
        media = batch["media"].to(dtype)
        if ensemble == "concat":
            tokens, pooled = model.encode_image(media)
            tokens = tokens.unsqueeze(1)
        else:
            tokens, pooled = model.encode_frames(media)
        vid_tokens.append(tokens)
        vid_pooled.append(pooled)
        order.append(batch["index"])
    order = torch.cat(order)
    if len(order) != len(dataset):
        raise RuntimeError(f"{len(dataset) - len(order)} evaluation media could not be read (skipped)")
    return torch.cat(text_embeds), torch.cat(text_masks), torch.cat(vid_tokens), torch.cat(vid_pooled)


@torch.no_grad()
def itm_scores(model, text_embeds, text_mask, vid_tokens, ensemble):
    """Class-1 ITM logit for row-aligned (text, video) pairs; vid_tokens (k, clips, L, D)."""
    clip_scores = [model.itm_logits(text_embeds, text_mask, vid_tokens[:, c])[:, 1] for c in range(vid_tokens.shape[1])]
    if len(clip_scores) == 1:
        return clip_scores[0]
    return ensemble_frames(torch.stack(clip_scores, dim=1), ensemble)


@torch.no_grad()
def evaluate(model, dataset, tokenizer, max_txt_l, k_test=128, ensemble="concat", batch_size=32):
    """-> {"x": metrics of re-ranked scores, "emb": ITC-only metrics}, plus the score matrices."""
    if ensemble not in ENSEMBLES:
        raise ValueError(f"eval_frame_ensemble={ensemble!r}; expected one of {ENSEMBLES}")
    dtype = next(model.parameters()).dtype
    text_embeds, text_mask, vid_tokens, vid_pooled = extract(model, dataset, tokenizer, max_txt_l, ensemble,
                                                             batch_size, dtype)
    sim_i2t, _ = model.get_sim(vid_pooled, text_embeds[:, 0])
    n_vid, n_txt = sim_i2t.shape
    i2t = torch.full((n_vid, n_txt), -100.0)
    for v in range(n_vid):
        k = min(n_txt, k_test)
        top = sim_i2t[v].topk(k).indices
        i2t[v, top] = itm_scores(model, text_embeds[top], text_mask[top],
                                 vid_tokens[v:v + 1].expand(k, -1, -1, -1), ensemble).float()
    t2i = torch.full((n_txt, n_vid), -100.0)
    for t in range(n_txt):
        k = min(n_vid, k_test)
        top = sim_i2t[:, t].topk(k).indices
        t2i[t, top] = itm_scores(model, text_embeds[t:t + 1].expand(k, -1, -1), text_mask[t:t + 1].expand(k, -1),
                                 vid_tokens[top], ensemble).float()
    sim = sim_i2t.float()
    return dict(x=itm_eval(i2t.numpy(), t2i.numpy(), dataset.txt2img, dataset.img2txt),
                emb=itm_eval(sim.numpy(), sim.T.numpy(), dataset.txt2img, dataset.img2txt),
                scores=dict(i2t=i2t, t2i=t2i, i2t_emb=sim))
