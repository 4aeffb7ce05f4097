"""Retrieval metrics as the original's ``itm_eval``, from dense score matrices or from top-k lists.

``txt_r1/5/10``: video-to-text recall; ``img_r1/5/10``: text-to-video; ``*_r_mean`` and ``r_mean``
their means. With several ground truths a query counts at the rank of its best-ranked one.
"""
import os

import numpy as np

from ..fileio import write_json


def as_list(g):
    return list(g) if isinstance(g, (list, tuple)) else [g]


def _summary(txt_ranks: np.ndarray, img_ranks: np.ndarray) -> dict:
    def recall(r, k):
        return 100.0 * float((r < k).sum()) / len(r)

    res = {"txt_r1": recall(txt_ranks, 1), "txt_r5": recall(txt_ranks, 5), "txt_r10": recall(txt_ranks, 10),
           "img_r1": recall(img_ranks, 1), "img_r5": recall(img_ranks, 5), "img_r10": recall(img_ranks, 10)}
    res["txt_r_mean"] = (res["txt_r1"] + res["txt_r5"] + res["txt_r10"]) / 3
    res["img_r_mean"] = (res["img_r1"] + res["img_r5"] + res["img_r10"]) / 3
    res["r_mean"] = (res["txt_r_mean"] + res["img_r_mean"]) / 2
    return {k: round(v, 2) for k, v in res.items()}


def itm_eval(scores_i2t: np.ndarray, scores_t2i: np.ndarray, txt2img: dict, img2txt: dict) -> dict:
    """The original: per row, argsort descending; rank of the best-ranked ground truth."""
    def ranks(scores, gts):
        out = np.zeros(scores.shape[0])
        for i, row in enumerate(scores):
            order = np.argsort(row)[::-1]
            out[i] = min(np.where(order == g)[0][0] for g in as_list(gts[i]))
        return out

    return _summary(ranks(scores_i2t, img2txt), ranks(scores_t2i, txt2img))


def topk_ranks(candidates: np.ndarray, scores: np.ndarray, gts: dict) -> np.ndarray:
    """Rank of the best ground truth within each row's candidates sorted by score (descending);
    ``inf`` when none is among them. Equals the dense rank whenever the ground truth is a candidate."""
    out = np.full(candidates.shape[0], np.inf)
    order = np.argsort(-scores, axis=1, kind="stable")
    ranked = np.take_along_axis(candidates, order, axis=1)
    for i, row in enumerate(ranked):
        hit = np.flatnonzero(np.isin(row, as_list(gts[i])))
        if hit.size:
            out[i] = hit[0]
    return out


def topk_eval(i2t_cand, i2t_scores, t2i_cand, t2i_scores, txt2img: dict, img2txt: dict) -> dict:
    """:func:`itm_eval` from candidate lists (the top-k of each query) instead of dense matrices:
    the same numbers whenever each list holds at least 10 candidates (R@10 looks no deeper)."""
    return _summary(topk_ranks(i2t_cand, i2t_scores, img2txt), topk_ranks(t2i_cand, t2i_scores, txt2img))


def recall_table(rows, splits, head: str = "model") -> str:
    """The recall table the demo and ``eval ret`` print: a line per ``(name, frames, {split: metrics})``,
    per split text->video and video->text R@1/5/10 (``img_r*`` / ``txt_r*``, as the original names them)."""
    cols = [c for split in splits for c in ((f"{split} t2v R@1/5/10", split, "img"),
                                           ("v2t R@1/5/10", split, "txt"))]
    width = max([len(head)] + [len(r[0]) for r in rows])
    line = f"{head:<{width}s}{'frames':>7s} | " + " | ".join(f"{c[0]:>{max(17, len(c[0]))}s}" for c in cols)
    lines = [line, "-" * len(line)]
    for name, frames, res in rows:
        cells = [" ".join(f"{res[split][f'{d}_r{k}']:5.1f}" for k in (1, 5, 10)) for _, split, d in cols]
        lines.append(f"{name:<{width}s}{frames:>7d} | " + " | ".join(
            f"{cell:>{max(17, len(c[0]))}s}" for cell, c in zip(cells, cols)))
    return "\n".join(lines)


def save_results(results: dict, folder: str, name: str = "eval", title: str = None) -> str:
    """``<folder>/<name>.json`` and a recall@K bar chart ``<folder>/<name>.png`` (``title``: the model and
    its frames, above the legend; each panel names its split and its counts)."""
    path = write_json(results, os.path.join(folder, name + ".json"))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    splits = list(results)
    fig, axes = plt.subplots(1, len(splits), figsize=(max(6.0, 4.5 * len(splits)), 3.9), squeeze=False)
    for ax, split in zip(axes[0], splits):
        for kind, offset, label in (("itm", -0.2, "ITM re-ranked"), ("itc", 0.2, "ITC only")):
            r = results[split][kind]
            values = [r[f"{d}_r{k}"] for d in ("img", "txt") for k in (1, 5, 10)]
            ax.bar(np.arange(6) + offset, values, width=0.4, label=label)
        ax.set_xticks(np.arange(6), [f"{d} R@{k}" for d in ("t2v", "v2t") for k in (1, 5, 10)], fontsize=8)
        ax.set_ylim(0, 100)
        counts = results[split]
        ax.set_title(split + (f" ({counts['media']} media, {counts['texts']} texts)" if "media" in counts
                              else ""), fontsize=9)
    axes[0][0].set_ylabel("recall (%)")
    # above the panels, never over a bar (a recall near 100 reaches the top of the axes)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper right", ncol=2, fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=9, x=0.01, ha="left")
    fig.tight_layout(rect=(0, 0, 1, 0.9))
    fig.savefig(os.path.join(folder, name + ".png"), dpi=100)
    plt.close(fig)
    return path
