"""Singularity's training losses (ITC, ITM with hard negatives, MLM) and frame ensembles.

Each function matches the original's arithmetic and, where it draws random numbers, the original's
order of RNG calls, so a seeded CPU run reproduces the original's sampled negatives and masks.
"""
import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..config.schema import ENSEMBLES


def same_idx(idx_rows: torch.Tensor, idx_cols: torch.Tensor) -> torch.Tensor:
    """(R, C) bool: True where row and column share an ``idx`` (i.e. are positives)."""
    return idx_rows.view(-1, 1) == idx_cols.view(1, -1)


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient for this rank's slice (all_reduce, so it
    works on gloo too). Call it once per step for all features: autograd may run the backward of
    several gathers in a different order on each rank, which would pair the wrong collectives."""

    @staticmethod
    def forward(ctx, x):
        out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(out, x.contiguous())
        return torch.cat(out, dim=0)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        n = grad.shape[0] // dist.get_world_size()
        return grad[dist.get_rank() * n:(dist.get_rank() + 1) * n]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """All-gather along dim 0 (equal sizes per rank), keeping the gradient path to every rank's input."""
    return x if _world() == 1 else _GatherWithGrad.apply(x)


def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    if _world() == 1:
        return x
    out = [torch.empty_like(x) for _ in range(_world())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out, dim=0)


def gather_features(image_feat: torch.Tensor, text_feat: torch.Tensor):
    """Global-batch (image (M, T, d), text (M, d)) features in ONE differentiable collective."""
    t, d = image_feat.shape[1:]
    both = gather_with_grad(torch.cat([image_feat.flatten(1), text_feat], dim=1))
    return both[:, : t * d].view(-1, t, d), both[:, t * d:]


def similarity(image_feat: torch.Tensor, text_feat: torch.Tensor, t=1.0) -> torch.Tensor:
    """Mean over frames of per-frame cosine similarity / t: (M, T, d) x (N, d) -> (M, N)."""
    return torch.einsum("mld,nd->mln", image_feat, text_feat).mean(1) / t


def soft_cross_entropy(logits: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against row-normalised multi-positive targets, averaged over rows."""
    logits = logits.float()  # the softmax over the batch in fp32 also under bf16/fp16 training
    targets = positives.to(logits.dtype)
    targets = targets / targets.sum(1, keepdim=True)
    return -(F.log_softmax(logits, dim=1) * targets).sum(1).mean()


def itc_loss(sim_i2t: torch.Tensor, sim_t2i: torch.Tensor, idx: torch.Tensor,
             idx_all: torch.Tensor = None) -> torch.Tensor:
    """Contrastive loss with soft targets from ``idx`` (several captions of a video are positives).

    Local-batch form (the original): sim_i2t (N, N), sim_t2i = sim_i2t.T. Gathered form: rows are this
    rank's items, columns the global batch with ``idx_all``.
    """
    idx_all = idx if idx_all is None else idx_all
    with torch.no_grad():
        pos = same_idx(idx, idx_all)
    return (soft_cross_entropy(sim_i2t, pos) + soft_cross_entropy(sim_t2i, pos)) / 2


@torch.no_grad()
def sample_negatives(sim_i2t: torch.Tensor, sim_t2i: torch.Tensor, idx: torch.Tensor, hard: bool = True):
    """One negative video per text and one negative text per video (the original's ITM sampling).

    hard: draw from softmax(sim + 1e-4) with positives zeroed (``torch.multinomial``);
    otherwise uniformly among non-positives. Returns (img_neg_indices, txt_neg_indices), each (N,).
    """
    pos = same_idx(idx, idx)
    if (~pos).sum(1).eq(0).any():
        raise ValueError("ITM needs a negative for every item, but a batch row shares its idx with "
                         "every other item; use a larger batch or more distinct videos per batch")
    if hard:
        w_i2t = F.softmax(sim_i2t + 1e-4, dim=1).masked_fill_(pos, 0)
        w_t2i = F.softmax(sim_t2i + 1e-4, dim=1).masked_fill_(pos, 0)
        img_neg = torch.multinomial(w_t2i, 1).squeeze(1)
        txt_neg = torch.multinomial(w_i2t, 1).squeeze(1)
    else:
        img_neg, txt_neg = (_random_non_positive(pos) for _ in range(2))
    return img_neg, txt_neg


def _random_non_positive(pos: torch.Tensor) -> torch.Tensor:
    score = pos.float() * -10000 + torch.randn(pos.shape, device=pos.device)
    return score.argmax(1)


def itm_loss(logits: torch.Tensor) -> torch.Tensor:
    """logits (3N, 2) ordered [positives, text+neg video, neg text+video]: labels 1 then 0."""
    n = logits.shape[0] // 3
    labels = torch.zeros(3 * n, dtype=torch.long, device=logits.device)
    labels[:n] = 1
    return F.cross_entropy(logits.float(), labels)


def mask_tokens(input_ids: torch.Tensor, vocab_size: int, mlm_prob: float,
                pad_id: int = 0, cls_id: int = 101, mask_id: int = 103):
    """BERT masking as the original: ``mlm_prob`` of tokens (never pad/[CLS]; [SEP] can be) are
    predicted; of those 80% -> [MASK], 10% -> random id, 10% unchanged. Returns (ids, labels)."""
    ids, labels = input_ids.clone(), input_ids.clone()
    shape = ids.shape
    masked = torch.bernoulli(torch.full(shape, mlm_prob)).bool().to(ids.device)
    masked &= (ids != pad_id) & (ids != cls_id)
    labels[~masked] = -100
    replaced = torch.bernoulli(torch.full(shape, 0.8)).bool().to(ids.device) & masked
    ids[replaced] = mask_id
    rand = torch.bernoulli(torch.full(shape, 0.5)).bool().to(ids.device) & masked & ~replaced
    words = torch.randint(vocab_size, shape, dtype=torch.long).to(ids.device)
    ids[rand] = words[rand]
    return ids, labels


def mlm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                           labels.reshape(-1), ignore_index=-100)


def ensemble_frames(frame_logits: torch.Tensor, how: str, dim: int = 1) -> torch.Tensor:
    """Late fusion of per-frame ITM logits: mean / max / lse (logsumexp) over ``dim``."""
    if how == "mean":
        return frame_logits.mean(dim)
    if how == "max":
        return frame_logits.max(dim).values
    if how == "lse":
        return torch.logsumexp(frame_logits, dim=dim)
    raise ValueError(f"unknown frame ensemble {how!r}; expected one of {ENSEMBLES}")
