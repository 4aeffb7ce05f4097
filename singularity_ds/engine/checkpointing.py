"""DeepSpeed checkpoints that are never half-written, with ``resume=auto`` and fp32 export.

Every rank writes its shards into ``checkpoints/.tmp/<tag>``; after a barrier rank 0 marks it
complete, renames it to ``checkpoints/<tag>`` and only then rewrites ``checkpoints/latest``. A crash at
any point leaves the previous checkpoint and ``latest`` intact; older tags beyond ``keep_last`` go.
"""
import logging
import os
import re
import shutil

from ..fileio import atomic_write, write_json
from ..dist import barrier

logger = logging.getLogger(__name__)
COMPLETE = "COMPLETE"


class Checkpointer:
    """Saves every ``every_epochs`` epochs (and after the last), every ``every_steps`` optimizer steps
    inside an epoch when that is > 0, and keeps the newest ``keep_last``."""

    def __init__(self, run_dir: str, rank: int, keep_last: int = 2, every_steps: int = 0, every_epochs: int = 1):
        self.dir = os.path.join(run_dir, "checkpoints")
        self.tmp = os.path.join(self.dir, ".tmp")
        self.rank, self.keep_last = rank, max(1, keep_last)
        self.every_steps, self.every_epochs = every_steps, max(1, every_epochs)

    def due_in_epoch(self, global_step: int, epoch_done: bool) -> bool:
        """After an optimizer step; the step that ends an epoch is saved by :meth:`due_at_epoch_end`."""
        return bool(self.every_steps) and global_step % self.every_steps == 0 and not epoch_done

    def due_at_epoch_end(self, epoch: int, last: bool) -> bool:
        """After epoch ``epoch`` (0-based) stopped; ``last``: training stops here."""
        return last or (epoch + 1) % self.every_epochs == 0

    def save(self, engine, tag: str, client_state: dict):
        if self.rank == 0:
            shutil.rmtree(os.path.join(self.tmp, tag), ignore_errors=True)  # leftovers of a crashed save
        barrier()
        engine.save_checkpoint(self.tmp, tag=tag, client_state=client_state, save_latest=False)
        barrier()
        if self.rank == 0:
            src, dst = os.path.join(self.tmp, tag), os.path.join(self.dir, tag)
            write_json(client_state, os.path.join(src, COMPLETE), indent=None)
            shutil.rmtree(dst, ignore_errors=True)
            os.replace(src, dst)
            atomic_write(os.path.join(self.dir, "latest"), tag)
            self._prune()
            logger.info("checkpoint %s saved", dst)
        barrier()

    def tags(self):
        if not os.path.isdir(self.dir):
            return []
        done = [t for t in os.listdir(self.dir) if os.path.isfile(os.path.join(self.dir, t, COMPLETE))]
        return sorted(done, key=_step_of)

    def latest(self):
        """The newest complete checkpoint: ``latest`` if it names a complete one, else the highest step."""
        try:
            with open(os.path.join(self.dir, "latest")) as f:
                tag = f.read().strip()
            if os.path.isfile(os.path.join(self.dir, tag, COMPLETE)):
                return tag
        except OSError:
            pass
        tags = self.tags()
        return tags[-1] if tags else None

    def load(self, engine, tag: str) -> dict:
        path, client_state = engine.load_checkpoint(self.dir, tag=tag)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {os.path.join(self.dir, tag)}")
        return client_state

    def _prune(self):
        for tag in self.tags()[:-self.keep_last]:
            shutil.rmtree(os.path.join(self.dir, tag), ignore_errors=True)

    def has_optimizer_shards(self, tag: str) -> bool:
        return any(f.endswith("optim_states.pt") for f in os.listdir(os.path.join(self.dir, tag)))

    def fp32_state_dict(self, tag: str) -> dict:
        """Consolidated fp32 master weights of a ZeRO (or bf16) checkpoint: DeepSpeed's zero_to_fp32."""
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        state = get_fp32_state_dict_from_zero_checkpoint(self.dir, tag=tag)
        return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def _step_of(tag: str) -> int:
    m = re.search(r"(\d+)$", tag)
    return int(m.group(1)) if m else -1



