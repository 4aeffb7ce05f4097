"""DeepSpeed checkpoints that are never half-written and never resumed damaged, with ``resume=auto``
and fp32 export.

Every rank writes its shards into ``checkpoints/.tmp/<tag>``; after every rank reports success, rank 0
writes the folder's manifest (each file's size and sha256, :mod:`.manifest`), marks it complete,
renames it to ``checkpoints/<tag>`` and only then rewrites ``checkpoints/latest`` (DeepSpeed's
``zero_to_fp32.py`` lies beside them, as DeepSpeed's own save leaves it). A crash, a full
disk or a read-only folder at any point leaves the previous checkpoint and ``latest`` intact: a failed
save removes its partial folder and stops every rank with one line naming the folder; a partial folder
left by a killed run is removed when the next run starts. Older tags beyond ``keep_last`` go.

Resuming checks the manifest first (rank 0; every rank gets its answer): ``resume=auto`` takes the
newest intact checkpoint and logs each damaged one it skips and why; an explicit tag that is damaged
is refused with the damaged file's name.
"""
import json
import logging
import os
import pickle
import re
import shutil

from ..dist import all_gather, barrier
from ..errors import CheckpointError, describe
from ..fileio import atomic_write, write_json
from .manifest import check_manifest, has_manifest, write_manifest

logger = logging.getLogger(__name__)
COMPLETE = "COMPLETE"


def complete_tags(checkpoint_dir: str) -> list:
    """The complete checkpoints of a ``checkpoints/`` folder, oldest first."""
    if not os.path.isdir(checkpoint_dir):
        return []
    done = [t for t in os.listdir(checkpoint_dir)
            if os.path.isfile(os.path.join(checkpoint_dir, t, COMPLETE))]
    return sorted(done, key=_step_of)


def _space(path: str, previous: str = None) -> str:
    """Free space of ``path``'s file system, and what a checkpoint takes (the size of ``previous``)."""
    try:
        text = f"{shutil.disk_usage(path).free / 2 ** 20:,.0f} MiB free there"
    except OSError:
        return "free space unknown"
    if previous:
        folder = os.path.join(path, previous)
        size = sum(os.path.getsize(os.path.join(root, n))
                   for root, _, names in os.walk(folder) for n in names)
        text += f", a checkpoint takes {size / 2 ** 20:,.0f} MiB"
    return text


class Checkpointer:
    """Saves every ``every_epochs`` epochs (and after the last), every ``every_steps`` optimizer steps
    inside an epoch when that is > 0, and keeps the newest ``keep_last``."""

    def __init__(self, run_dir: str, rank: int, keep_last: int = 2,
                 every_steps: int = 0, every_epochs: int = 1):
        self.dir = os.path.join(run_dir, "checkpoints")
        self.tmp = os.path.join(self.dir, ".tmp")
        self.rank, self.keep_last = rank, max(1, keep_last)
        self.every_steps, self.every_epochs = every_steps, max(1, every_epochs)
        self._saved = None  # (tag, client_state) of this process's last save
        if rank == 0:
            self._discard_partial()

    def _discard_partial(self):
        """A save cut short by a killed run leaves ``.tmp/<tag>``: ours, never resumed from, as large as a
        checkpoint. Removed before anything is saved (the other ranks write into ``.tmp`` only after the
        first save's collective check, which rank 0 reaches after this)."""
        if not os.path.isdir(self.tmp):
            return
        partial = [n for n in os.listdir(self.tmp) if os.path.isdir(os.path.join(self.tmp, n))]
        shutil.rmtree(self.tmp, ignore_errors=True)
        if partial:
            logger.info("removed %s in %s: left by a save that did not finish", ", ".join(sorted(partial)),
                        self.tmp)

    def due_in_epoch(self, global_step: int, epoch_done: bool) -> bool:
        """After an optimizer step; the step that ends an epoch is saved by :meth:`due_at_epoch_end`."""
        return bool(self.every_steps) and global_step % self.every_steps == 0 and not epoch_done

    def due_at_epoch_end(self, epoch: int, last: bool) -> bool:
        """After epoch ``epoch`` (0-based) stopped; ``last``: training stops here."""
        return last or (epoch + 1) % self.every_epochs == 0

    # ------------------------------------------------------------------ saving
    def save(self, engine, tag: str, client_state: dict):
        """Write checkpoint ``tag`` (all ranks). Raises :class:`CheckpointError` on every rank when any
        rank could not write its part; the previous checkpoint and ``latest`` are untouched then."""
        if self._saved == (tag, client_state):  # a run cut by max_steps on a save_every_steps step
            return
        staging, final = os.path.join(self.tmp, tag), os.path.join(self.dir, tag)
        error = None
        if self.rank == 0:
            try:
                shutil.rmtree(staging, ignore_errors=True)  # leftovers of a crashed save
                os.makedirs(staging)
            except OSError as e:
                error = describe(e)
        self._agree(error, tag, staging)
        try:
            engine.save_checkpoint(self.tmp, tag=tag, client_state=client_state, save_latest=False)
            error = None
        except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
            error = describe(e)
            # DeepSpeed's save ends with a barrier, in which the ranks that wrote their files now wait;
            # meet them there before all ranks compare notes
            barrier()
        self._agree(error, tag, staging)
        if self.rank == 0:
            try:
                self._publish(staging, final, tag, client_state)
            except OSError as e:
                error = describe(e)
        self._agree(error, tag, staging)
        self._saved = (tag, client_state)

    def _publish(self, staging: str, final: str, tag: str, client_state: dict):
        """Rank 0, once every rank's files are in ``staging``: manifest, COMPLETE, rename, ``latest``."""
        write_manifest(staging)
        write_json(client_state, os.path.join(staging, COMPLETE), indent=None)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staging, final)
        atomic_write(os.path.join(self.dir, "latest"), tag)
        self._recovery_script()
        self._prune()
        logger.info("checkpoint %s saved", final)

    def _recovery_script(self):
        """DeepSpeed's ``zero_to_fp32.py`` beside the tags, where DeepSpeed's own save puts it (our save
        writes into ``.tmp``): ``python zero_to_fp32.py . OUT`` in ``checkpoints/`` consolidates ``latest``
        without this package."""
        import deepspeed.utils.zero_to_fp32 as script
        path = os.path.join(self.dir, "zero_to_fp32.py")
        if not os.path.isfile(path):
            shutil.copyfile(script.__file__, path + ".part")
            os.replace(path + ".part", path)

    def _agree(self, error, tag: str, staging: str):
        """Every rank learns whether any rank failed, so all stop with the same line (rather than the
        healthy ones waiting forever in the next collective). The partial folder goes, freeing its space."""
        errors = [e for e in all_gather(error) if e]
        if not errors:
            return
        if self.rank == 0:
            shutil.rmtree(staging, ignore_errors=True)
        previous = self.latest()
        kept = "no earlier checkpoint exists"
        if previous:
            kept = f"checkpoint {previous} and 'latest' are intact"
        raise CheckpointError(
            f"checkpoint {tag} could not be written to {self.dir} ({errors[0]}; "
            f"{_space(self.dir, previous)}); {kept}: free space or make the folder writable, then rerun with "
            f"resume=auto")

    # ------------------------------------------------------------------ finding and loading
    def tags(self):
        return complete_tags(self.dir)

    def latest(self):
        """The newest complete checkpoint: ``latest`` if it names a complete one, else the highest step."""
        order = self._newest_first()
        return order[0] if order else None

    def _newest_first(self) -> list:
        tags = self.tags()[::-1]
        try:
            with open(os.path.join(self.dir, "latest")) as f:
                pointed = f.read().strip()
        except OSError:
            pointed = None
        if pointed in tags:
            tags.remove(pointed)
            tags.insert(0, pointed)
        return tags

    def verify(self, tag: str):
        """``None`` when checkpoint ``tag`` matches its manifest (or predates manifests), else what is
        wrong, naming the file."""
        folder = os.path.join(self.dir, tag)
        if not has_manifest(folder):
            logger.info("%s has no manifest (saved by an earlier version): its files are not verified",
                        folder)
            return None
        return check_manifest(folder)

    def resume_tag(self, resume):
        """The checkpoint ``resume`` names, checked against its manifest by rank 0 (every rank gets the
        same answer). ``True``/``"auto"``: the newest intact checkpoint, damaged newer ones skipped with a
        warning; ``None`` when the run has no checkpoint. A tag: that checkpoint, if complete and intact.
        Anything else raises :class:`CheckpointError` naming the folder or the damaged file."""
        answer = None
        if self.rank == 0:
            try:
                answer = (self._choose(resume), None)
            except CheckpointError as e:
                answer = (None, str(e))
        tag, error = all_gather(answer)[0]
        if error:
            raise CheckpointError(error)
        return tag

    def _choose(self, resume):
        if resume not in (True, "auto"):
            tag = str(resume)
            folder = os.path.join(self.dir, tag)
            if not os.path.isfile(os.path.join(folder, COMPLETE)):
                raise CheckpointError(f"resume={tag}: {folder} is not a complete checkpoint (complete ones: "
                                      f"{', '.join(self.tags()) or 'none'}); pass one of them or resume=auto")
            problem = self.verify(tag)
            if problem:
                raise CheckpointError(f"resume={tag}: {problem}; resume from another checkpoint (resume=auto "
                                      f"takes the newest intact one)")
            return tag
        problems = []
        for tag in self._newest_first():
            problem = self.verify(tag)
            if problem is None:
                return tag
            logger.warning("resume=%s: skipping checkpoint %s: %s", resume, tag, problem)
            problems.append(problem)
        if problems:
            raise CheckpointError(f"resume={resume}: no intact checkpoint in {self.dir} ({problems[0]}"
                                  f"{f'; and {len(problems) - 1} more' if len(problems) > 1 else ''}); "
                                  f"start a new run (another output_dir, or overwrite=True)")
        return None

    def client_state(self, tag: str) -> dict:
        """What :meth:`save` stored beside the weights (epoch, step, data...), read without loading them."""
        path = os.path.join(self.dir, tag, COMPLETE)
        try:
            with open(path) as f:
                return json.load(f)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{path}: unreadable ({describe(e)}); resume from another checkpoint"
                                  ) from None

    def load(self, engine, tag: str) -> dict:
        folder = os.path.join(self.dir, tag)
        try:
            path, client_state = engine.load_checkpoint(self.dir, tag=tag)
        except (OSError, RuntimeError, EOFError, ValueError, KeyError, pickle.UnpicklingError) as e:
            raise CheckpointError(f"{folder}: DeepSpeed could not load this checkpoint ({describe(e)}); "
                                  f"resume from another one (resume=<tag>)") from None
        if path is None:
            raise CheckpointError(f"{folder}: DeepSpeed could not load this checkpoint; resume from another "
                                  f"one (resume=<tag>)")
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
