"""Evaluation: two-stage retrieval (ITC top-k, ITM re-rank) and the original's recall metrics."""
from .retrieval import evaluate, itm_eval

__all__ = ["evaluate", "itm_eval"]
