"""Evaluation: two-stage retrieval (ITC top-k, ITM re-rank) and the original's recall metrics."""
from .retrieval import evaluate, itm_eval
from .tensors import evaluate_tensors

__all__ = ["evaluate", "evaluate_tensors", "itm_eval"]
