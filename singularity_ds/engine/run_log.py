"""What a run shows and keeps of its steps: scalars (TensorBoard, and W&B: :mod:`.scalars`), the progress
bar, ``train.log`` lines every ``log_freq`` steps, and the per-step history. Rank 0 only.

Nothing of a run is lost when it is killed and resumed: every step's record is appended to
``history.jsonl`` as it happens (``history.json``, written at the end, is all of them); a resumed run
first drops the records past the step it resumes from (the replayed steps are recorded again), and its
TensorBoard writer purges the events past that step, so each step appears once in both. The error that
stops a run (even at start-up) is written to ``train.log`` too.
"""
import contextlib
import json
import logging
import os
import sys

from ..errors import SingularityError
from ..fileio import atomic_write
from .scalars import open_sinks

logger = logging.getLogger("singularity_ds.train")

STEP_SCALARS = ("loss", "lr", "grad_norm", "samples_per_s", "data_wait", "memory_mb")
HISTORY = "history.jsonl"


def setup_logging(run_dir: str, rank: int):
    """Log to stderr (every rank; warnings only but on rank 0) and, on rank 0, to ``train.log`` (appended:
    the lines of an earlier attempt in this folder stay). Returns that file's handler (None on other
    ranks); the handler of an earlier run in this process is replaced, so runs never share a log."""
    root = logging.getLogger()
    root.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    fmt = logging.Formatter(f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s")
    if not any(isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
               for h in root.handlers):
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(fmt)
        root.addHandler(h)
    for h in [h for h in root.handlers if getattr(h, "singularity_run_log", False)]:
        root.removeHandler(h)
        h.close()
    if rank != 0:
        return None
    fh = logging.FileHandler(os.path.join(run_dir, "train.log"))
    fh.setFormatter(fmt)
    fh.singularity_run_log = True
    root.addHandler(fh)
    return fh


@contextlib.contextmanager
def failures_logged(handler):
    """Write the exception that leaves this block to ``train.log`` (``handler``) only: stderr shows it
    already (``cli.main`` prints user errors as one line; Python prints the rest). A user error is one
    line, anything else its traceback."""
    try:
        yield
    except BaseException as e:
        if handler is not None and not isinstance(e, (KeyboardInterrupt, SystemExit)):
            if isinstance(e, SingularityError):
                record = logger.makeRecord(logger.name, logging.ERROR, __file__, 0, "%s", (e,), None)
            else:
                record = logger.makeRecord(logger.name, logging.ERROR, __file__, 0, "run failed: %s: %s",
                                           (type(e).__name__, e), sys.exc_info())
            handler.handle(record)
        raise


def _read_history(path: str) -> list:
    """The records of ``history.jsonl``; a line cut short by a kill (the last one) is dropped."""
    records = []
    try:
        with open(path) as f:
            for line in f:
                try:
                    records.append(json.loads(line))
                except ValueError:
                    continue
    except OSError:
        pass
    return records


class RunLog:
    def __init__(self, run_dir: str, rank: int, total_steps: int, first_step: int, desc: str, log_freq: int,
                 force_progress_bar: bool, config=None):
        """``first_step``: the optimizer step the run starts after (the resumed checkpoint's; 0 when fresh).
        ``history`` holds every step of the run on rank 0 (those before a resume too), this process's
        steps on the others. ``config``: the run's (which scalar sinks: :func:`.scalars.open_sinks`)."""
        self.rank, self.log_freq, self.history = rank, max(1, log_freq), []
        self.sinks, self.progress, self._file = [], None, None
        if rank != 0:
            return
        from tqdm import tqdm
        path = os.path.join(run_dir, HISTORY)
        # steps past first_step were done by a run that stopped before saving them: they are replayed
        self.history = [r for r in _read_history(path) if r.get("step", 0) <= first_step]
        atomic_write(path, "".join(json.dumps(r) + "\n" for r in self.history))
        self._file = open(path, "a")
        self.sinks = open_sinks(config, run_dir, first_step)
        self.progress = tqdm(total=total_steps, initial=first_step, desc=desc, dynamic_ncols=True,
                             disable=not sys.stderr.isatty() and not force_progress_bar)

    def step(self, record: dict, loss_names, broken_media: int):
        """One optimizer step's record (losses already averaged over accumulation and ranks)."""
        self.history.append(record)
        if self.rank != 0:
            return
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        step = record["step"]
        scalars = {f"train/{k}": record[k] for k in list(loss_names) + list(STEP_SCALARS)}
        scalars["train/broken_media"] = broken_media
        self._log(scalars, step)
        self.progress.update(1)
        self.progress.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.2e}")
        if step % self.log_freq == 0 or step == 1:
            shown = list(loss_names) + ["loss", "lr", "grad_norm", "samples_per_s", "data_wait"]
            logger.info("step %d epoch %d: %s", step, record["epoch"],
                        " ".join(f"{k}={record[k]:.4f}" for k in shown))

    def _log(self, scalars: dict, step: int):
        for sink in self.sinks:  # every sink gets the same tags, values and step
            sink.log(scalars, step)

    def evaluation(self, scalars: dict, step: int):
        self._log({f"eval_{k}": v for k, v in scalars.items()}, step)

    def close(self):
        if self.progress is not None:
            self.progress.close()
        for sink in self.sinks:
            sink.close()
        if self._file is not None:
            self._file.close()
