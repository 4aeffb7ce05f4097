"""What a run shows and keeps of its steps: TensorBoard scalars, the progress bar, ``train.log`` lines
every ``log_freq`` steps, and the per-step history returned by ``Trainer.train``. Rank 0 only."""
import logging
import os
import sys

logger = logging.getLogger("singularity_ds.train")

STEP_SCALARS = ("loss", "lr", "grad_norm", "samples_per_s", "data_wait", "memory_mb")


class RunLog:
    def __init__(self, run_dir: str, rank: int, total_steps: int, first_step: int, desc: str, log_freq: int,
                 force_progress_bar: bool):
        self.rank, self.log_freq, self.history = rank, max(1, log_freq), []
        self.writer = self.progress = None
        if rank != 0:
            return
        from torch.utils.tensorboard import SummaryWriter
        from tqdm import tqdm
        self.writer = SummaryWriter(os.path.join(run_dir, "tb"))
        self.progress = tqdm(total=total_steps, initial=first_step, desc=desc, dynamic_ncols=True,
                             disable=not sys.stderr.isatty() and not force_progress_bar)

    def step(self, record: dict, loss_names, broken_media: int):
        """One optimizer step's record (losses already averaged over accumulation and ranks)."""
        self.history.append(record)
        if self.rank != 0:
            return
        step = record["step"]
        for k in list(loss_names) + list(STEP_SCALARS):
            self.writer.add_scalar(f"train/{k}", record[k], step)
        self.writer.add_scalar("train/broken_media", broken_media, step)
        self.progress.update(1)
        self.progress.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.2e}")
        if step % self.log_freq == 0 or step == 1:
            shown = list(loss_names) + ["loss", "lr", "grad_norm", "samples_per_s"]
            logger.info("step %d epoch %d: %s", step, record["epoch"], " ".join(f"{k}={record[k]:.4f}" for k in shown))

    def evaluation(self, scalars: dict, step: int):
        if self.writer is not None:
            for k, v in scalars.items():
                self.writer.add_scalar(f"eval_{k}", v, step)

    def close(self):
        if self.progress is not None:
            self.progress.close()
        if self.writer is not None:
            self.writer.close()
