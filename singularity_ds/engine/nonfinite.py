"""Optimizer steps whose loss is NaN or Inf: skipped alike on every rank, logged with the media of the
batch that produced them; a run that keeps producing them stops before it writes anything.

How a step is skipped, and why so: DeepSpeed's ZeRO stages reduce and partition gradients inside
``backward`` and at the accumulation boundary's ``step``, so every rank must run the same sequence of
both whatever its loss. The trainer therefore runs the window as usual and averages its losses over the
ranks *before* the boundary's ``step`` (the mean it logs anyway): the mean is not finite exactly when
some rank's loss is not, so every rank takes the same decision from the same numbers, without another
collective. The boundary's ``step`` then runs inside :func:`update_skipped`: DeepSpeed clears its
gradient buffers as after any step (most configurations also see the non-finite gradient norm and skip
on their own), while the client optimizer's and the LR scheduler's ``step`` do nothing, so the weights,
the optimizer moments and the learning-rate schedule stay as they were; only the data moves on.
"""
import contextlib
import logging
import math

from ..errors import NonFiniteLossError

logger = logging.getLogger("singularity_ds.train")


def _no_step(*args, **kwargs):
    return None


@contextlib.contextmanager
def update_skipped(engine):
    """``engine.step()`` inside changes no weight, no optimizer state and no learning rate."""
    targets = [obj for obj in (engine.basic_optimizer, engine.lr_scheduler) if obj is not None]
    # an instance's own `step` (torch's LR scheduler wraps its optimizer's in place) is put back after
    saved = [vars(obj).get("step") for obj in targets]
    for obj in targets:
        obj.step = _no_step
    try:
        yield
    finally:
        for obj, own in zip(targets, saved):
            if own is None:
                del obj.step
            else:
                obj.step = own


def finite(values) -> bool:
    return all(math.isfinite(v) for v in values)


class NonFiniteSteps:
    """Counts skipped steps in a row and says when the run must stop (``limit`` in a row)."""

    def __init__(self, limit: int, rank: int):
        self.limit, self.rank, self.streak, self.first = limit, rank, 0, None

    def warn(self, step: int, local: dict, paths: list):
        """This rank's own window had a non-finite loss: name the media it was computed on."""
        losses = " ".join(f"{k}={v:.4g}" for k, v in local.items())
        logger.warning("step %d: non-finite loss on rank %d (%s); media of its batch: %s", step, self.rank,
                       losses, ", ".join(map(str, paths)))

    def after_step(self, step: int, skipped: bool, last_checkpoint):
        """Account for optimizer step ``step``; raises :class:`NonFiniteLossError` at the limit, naming
        ``last_checkpoint()`` (the newest complete checkpoint's tag, or None)."""
        if not skipped:
            self.streak, self.first = 0, None
            return
        self.streak += 1
        self.first = step if self.first is None else self.first
        if self.streak >= self.limit:
            raise NonFiniteLossError(
                f"the loss was NaN/Inf for {self.streak} optimizer steps in a row (steps "
                f"{self.first}-{step}, max_nonfinite_steps={self.limit}; each skipped, the media of each "
                f"batch are in train.log); stopped without writing a checkpoint: resume=auto continues from "
                f"{last_checkpoint() or 'the start (no checkpoint yet)'}; lower optimizer.lr or remove "
                f"those media")
        logger.warning("step %d skipped: non-finite loss on some rank (%d in a row; the run stops at "
                       "max_nonfinite_steps=%d)", step, self.streak, self.limit)

    @property
    def in_streak(self) -> bool:
        """The last step was skipped: its state is not checkpointed (a diverged model would replace the
        last good checkpoint)."""
        return self.streak > 0
