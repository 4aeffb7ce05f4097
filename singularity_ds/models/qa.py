"""Question answering, as the original's ``model_vqa``: the question is encoded by the whole text tower
with the video (fusion layers cross-attend to the frame tokens), and a causal answer decoder (a BERT
LM-head model with one layer per fusion layer, each cross-attending to the question states) scores
answers from a closed list.

Ranking (the original's ``rank_answer``, inherited from ALBEF): one decoder step from ``[CLS]`` gives
every answer's first-token probability at once; the top ``k`` answers are re-scored by their whole
sequence; score = log p(first token) - summed token NLL (the first token counted twice, a quirk kept
for fidelity); softmax over the k; sorted. So a list of thousands of answers costs one decoder step plus
``k`` teacher-forced passes per question, never one pass per answer.

Late frame ensembles (mean / max / lse, single-frame models only, as the original): per-frame question
states; the first-stage vocabulary probabilities are pooled over frames and soft-maxed AGAIN (an
original quirk, kept), per-frame candidate log-likelihoods are pooled over frames, then soft-maxed.
"""
import torch
import torch.nn.functional as F

from .arch import decoder_config
from .attention import MASK_VALUE, padding_bias
from .bert import TextEncoder
from .singularity import Singularity, init_weights


def causal_bias(mask: torch.Tensor, dtype) -> torch.Tensor:
    """(N, L) 1/0 mask -> additive (N, 1, L, L): causal AND padding, ``(1 - causal * mask) * -10000``
    as the original's decoder mask."""
    n, length = mask.shape
    causal = torch.tril(torch.ones(length, length, device=mask.device, dtype=dtype))
    return (1.0 - causal[None, None] * mask[:, None, None, :].to(dtype)) * MASK_VALUE


def pool_frames(x: torch.Tensor, how: str, dim: int = 0) -> torch.Tensor:
    if how == "mean":
        return x.mean(dim)
    if how == "max":
        return x.max(dim)[0]
    if how == "lse":
        return torch.logsumexp(x, dim=dim)
    raise ValueError(f"unknown frame ensemble {how!r}; expected mean, max or lse")


class SingularityQA(Singularity):
    def __init__(self, config):
        super().__init__(config, mlm_head=False, retrieval_heads=False)
        self.text_decoder = TextEncoder(decoder_config(self.text_encoder.config, self.config), mlm_head=True)
        init_weights(self.text_decoder, self.text_decoder.config.initializer_range)
        self.set_attention_impl(self.config.attention_impl)  # the decoder's layers too

    # ------------------------------------------------------------------ encoder side
    def encode_question(self, image_embeds, q_ids, q_mask):
        """mode='multi_modal': all text layers, the fusion ones attending to ``image_embeds`` (B, L, D)."""
        bert = self.text_encoder
        return bert.run(bert.bert.embeddings(q_ids), q_mask, 0, None, context=image_embeds)

    def question_states(self, image, q_ids, q_mask, ensemble: str = "concat"):
        """concat: (B, Lq, D) over all frames' tokens; late ensembles: (B, T, Lq, D), one per frame."""
        if ensemble == "concat":
            return self.encode_question(self.encode_image(image)[0], q_ids, q_mask)
        frames = self.encode_frames(image)[0]
        return torch.stack([self.encode_question(frames[:, f], q_ids, q_mask)
                            for f in range(frames.shape[1])], 1)

    # ------------------------------------------------------------------ decoder side
    def decoder_logits(self, ids, mask, q_states, q_mask):
        """Teacher-forced vocabulary logits (N, La, V); causal self-attention, cross to the question."""
        dec = self.text_decoder
        x = dec.bert.embeddings(ids)
        bias = causal_bias(mask, x.dtype)
        hidden = dec.bert.encoder(x, bias, q_states, padding_bias(q_mask, x.dtype))
        return dec.mlm_logits(hidden)

    def answer_nll(self, ids, mask, q_states, q_mask):
        """Summed NLL of each answer's tokens after ``[CLS]`` (its ``[SEP]`` included, pads not): (N,)."""
        logits = self.decoder_logits(ids, mask, q_states, q_mask)
        labels = ids.masked_fill(ids == self.text_decoder.config.pad_token_id, -100)
        nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1),
                              reduction="none", ignore_index=-100)
        return nll.view(ids.shape[0], -1).sum(1)

    def first_token_probs(self, q_states, q_mask, bos_id: int) -> torch.Tensor:
        """Softmax over the vocabulary of the first answer token: (B, V)."""
        start = torch.full((q_states.shape[0], 1), bos_id, dtype=torch.long, device=q_states.device)
        ones = torch.ones_like(start)
        return F.softmax(self.decoder_logits(start, ones, q_states, q_mask)[:, 0].float(), dim=1)

    def qa_loss(self, image, q_ids, q_mask, a_ids, a_mask, weights, num_answers):
        """sum_b sum_answers(b) weight * summed NLL, / B (the original's training loss)."""
        states = self.question_states(image, q_ids, q_mask)
        counts = torch.as_tensor(num_answers, device=states.device)
        nll = self.answer_nll(a_ids, a_mask, states.repeat_interleave(counts, 0),
                              q_mask.repeat_interleave(counts, 0))
        return (weights.to(nll.dtype) * nll).sum() / image.shape[0]

    forward = qa_loss

    # ------------------------------------------------------------------ ranking over an answer list
    def _candidates(self, first_scores, a_ids, k):
        """Top-k answers by first-token score: (scores (B, k), answer indices (B, k))."""
        return first_scores.index_select(1, a_ids[:, 1]).topk(k, dim=1)

    def _candidate_nll(self, q_states, q_mask, a_ids, a_mask, top_ids):
        b, k = top_ids.shape
        flat = top_ids.reshape(-1)
        nll = self.answer_nll(a_ids[flat], a_mask[flat], q_states.repeat_interleave(k, 0),
                              q_mask.repeat_interleave(k, 0))
        return nll.view(b, k)

    @staticmethod
    def _final(log_prob_sum, top_ids):
        probs, order = F.softmax(log_prob_sum, dim=1).topk(log_prob_sum.shape[1], dim=1)
        return top_ids.gather(1, order), probs

    def rank_answer(self, q_states, q_mask, a_ids, a_mask, k: int):
        """-> (topk_ids (B, k) answer indices, topk_probs (B, k)), best first."""
        k = min(k, a_ids.shape[0])
        first, top_ids = self._candidates(self.first_token_probs(q_states,
                                                                 q_mask, int(a_ids[0, 0])), a_ids, k)
        log_prob_sum = torch.log(first) - self._candidate_nll(q_states, q_mask, a_ids, a_mask, top_ids)
        return self._final(log_prob_sum, top_ids)

    def rank_answer_ensemble(self, late_states, q_mask, a_ids, a_mask, k: int, how: str):
        """Late fusion over frames; ``late_states`` (B, T, Lq, D) from :meth:`question_states`."""
        k = min(k, a_ids.shape[0])
        t = late_states.shape[1]
        bos = int(a_ids[0, 0])
        probs = torch.stack([self.first_token_probs(late_states[:, f], q_mask, bos) for f in range(t)])
        pooled = F.softmax(pool_frames(probs, how), dim=1)  # the original's second softmax
        first, top_ids = self._candidates(pooled, a_ids, k)
        per_frame = torch.stack([torch.log(first) - self._candidate_nll(late_states[:, f],
                                                                        q_mask, a_ids, a_mask, top_ids)
                                 for f in range(t)], 1)  # (B, T, k)
        return self._final(pool_frames(per_frame, how, dim=1), top_ids)

    @torch.no_grad()
    def predict(self, image, q_ids, q_mask, a_ids, a_mask, k: int, ensemble: str = "concat"):
        """Ranked answer indices and probabilities for a batch of questions (one video each)."""
        states = self.question_states(image, q_ids, q_mask, ensemble)
        if ensemble == "concat":
            return self.rank_answer(states, q_mask, a_ids, a_mask, k)
        return self.rank_answer_ensemble(states, q_mask, a_ids, a_mask, k, ensemble)
