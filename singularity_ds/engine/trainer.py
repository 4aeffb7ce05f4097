"""The one train loop, on DeepSpeed, for every task.

    singularity-ds train TASK [CONFIG ...] [key=value ...]
    deepspeed --num_accelerators 2 -m singularity_ds train pretrain tiny output_dir=runs/pt

Run folder (``output_dir``): ``config.yaml`` (resolved), ``ds_config.json``, ``train.log``,
``tb/`` (TensorBoard), ``checkpoints/`` and ``export/`` (consolidated fp32 weights, loadable with
``singularity_ds.models.load_model``). Randomness is a function of (seed, epoch, step, rank): the data
order and every item's frames/crops come from the loaders' seeds, and the model's RNG (dropout, ITM
negatives, MLM masks) is reseeded at every micro-step, so a resumed run repeats an uninterrupted one.
"""
import json
import logging
import os
import shutil
import sys
import time

import torch
from omegaconf import OmegaConf

from ..errors import CheckpointError, ConfigError
from ..models.weights import export as export_model, plain_config
from ..config import load_config
from ..data.loader import item_seed
from .. import dist
from .checkpointing import Checkpointer
from .ds_config import WEIGHT_DTYPE, build_ds_config, offloads_optimizer, resolve_precision
from .optim import build_optimizer, build_scheduler
from .tasks import TASKS

logger = logging.getLogger("singularity_ds.train")


def prepare_run_dir(config) -> str:
    """``output_dir`` must be new unless ``resume`` or ``overwrite`` (checked before anything is written)."""
    run_dir = config.get("output_dir") or os.path.join("runs", config.task)
    exists = os.path.isdir(run_dir) and any(n != ".tmp" for n in os.listdir(run_dir))
    if exists and not (config.get("resume") or config.get("overwrite")):
        raise ConfigError(f"output_dir {run_dir} exists and is not empty; pass resume=auto to continue it or "
                          f"overwrite=True to replace it")
    return run_dir


def _setup_logging(run_dir: str, rank: int):
    root = logging.getLogger()
    root.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    fmt = logging.Formatter(f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s")
    if not any(isinstance(h, logging.StreamHandler) for h in root.handlers):
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(fmt)
        root.addHandler(h)
    if rank == 0:
        fh = logging.FileHandler(os.path.join(run_dir, "train.log"))
        fh.setFormatter(fmt)
        root.addHandler(fh)
        return fh
    return None


def _memory_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    import psutil
    return psutil.Process().memory_info().rss / 2 ** 20


class Trainer:
    def __init__(self, config, task):
        self.config, self.task = config, task
        self._last_eval, self._last_eval_step = {}, None
        self.run_dir = prepare_run_dir(config)
        self.precision = resolve_precision(config)
        self.ds_cfg = build_ds_config(config, task.micro_batch(config), self.precision)  # refuse before writing
        self.info = dist.setup()
        self.rank, self.world, self.device = self.info["rank"], self.info["world"], self.info["device"]
        if self.rank == 0:
            if config.get("overwrite") and not config.get("resume") and os.path.isdir(self.run_dir):
                shutil.rmtree(self.run_dir)
            os.makedirs(self.run_dir, exist_ok=True)
        dist.barrier()
        self._log_handler = _setup_logging(self.run_dir, self.rank)
        self.dtype = WEIGHT_DTYPE[self.precision]
        self.seed = int(config.get("seed", 42))

    def build(self):
        import deepspeed

        config, task = self.config, self.task
        torch.manual_seed(self.seed)  # identical initial weights on every rank and every run
        self.tokenizer = task.tokenizer(config)
        model = task.build_model(config)
        self.loader = task.train_loader(config, self.tokenizer, self.rank, self.world)
        self.gas = int(config.get("gradient_accumulation_steps", 1))
        self.steps_per_epoch = max(1, len(self.loader) // self.gas)
        ds_cfg = self.ds_cfg
        optimizer = build_optimizer(model, config.optimizer, cpu_adam=offloads_optimizer(ds_cfg))
        scheduler = build_scheduler(optimizer, config.scheduler, self.steps_per_epoch)
        self.engine, _, _, self.scheduler = deepspeed.initialize(model=model, optimizer=optimizer,
                                                                  lr_scheduler=scheduler, config=ds_cfg)
        if config.get("compile", False):
            self.engine.compile()  # nn.Module.compile in place (inductor): checkpoint keys unchanged
        self.checkpointer = Checkpointer(self.run_dir, self.rank, int(config.get("keep_last_checkpoints", 2)))
        if self.rank == 0:
            # resolved where it can be (an unused ${oc.env:...} without its variable stays as written)
            OmegaConf.save(OmegaConf.create(plain_config(config)), os.path.join(self.run_dir, "config.yaml"))
            with open(os.path.join(self.run_dir, "ds_config.json"), "w") as f:
                json.dump(ds_cfg, f, indent=2)
            logger.info("task %s, %d rank(s), %s, %s, %d micro-batches/epoch, gradient accumulation %d",
                        task.name, self.world, config.get("ds_config", "zero2"), self.precision, len(self.loader), self.gas)

    def _resume(self):
        if not self.config.get("resume"):
            return dict(epoch=0, micro_step=0, global_step=0)
        tag = self.checkpointer.latest() if self.config.resume in (True, "auto") else str(self.config.resume)
        if tag is None:
            logger.info("resume=%s: no complete checkpoint in %s, starting fresh", self.config.resume, self.run_dir)
            return dict(epoch=0, micro_step=0, global_step=0)
        state = self.checkpointer.load(self.engine, tag)
        saved, current = state.get("stream_layout"), self._stream_layout()
        if saved and current and saved != current:
            raise ConfigError(f"resume from {tag}: its shard streams were split for {saved}, this run has {current}; "
                              f"an epoch splits over ranks and loader workers, so resume with the same ranks and "
                              f"num_workers")
        logger.info("resumed from %s: epoch %d, micro-step %d, global step %d", tag, state["epoch"],
                    state["micro_step"], state["global_step"])
        return dict(epoch=state["epoch"], micro_step=state["micro_step"], global_step=state["global_step"])

    def _stream_layout(self):
        """How shard streams split an epoch (ranks x loader workers); None without shard corpora."""
        from torch.utils.data import IterableDataset
        streams = [l for l in self.loader.loaders.values() if isinstance(l.dataset, IterableDataset)]
        return dict(world=self.world, num_workers=streams[0].num_workers) if streams else None

    def _save(self, epoch, micro_step, global_step):
        state = dict(epoch=epoch, micro_step=micro_step, global_step=global_step, stream_layout=self._stream_layout())
        self.checkpointer.save(self.engine, f"step{global_step:08d}", state)

    def train(self) -> dict:
        self.build()
        cfg = self.config
        state = self._resume()
        epochs, max_steps = int(cfg.scheduler.epochs), int(cfg.get("max_steps", -1))
        save_every = int(cfg.get("save_every_steps", 0))
        save_every_epochs = max(1, int(cfg.get("save_every_epochs", 1)))
        writer = None
        if self.rank == 0:
            from torch.utils.tensorboard import SummaryWriter
            writer = SummaryWriter(os.path.join(self.run_dir, "tb"))
        total = epochs * self.steps_per_epoch if max_steps < 0 else min(max_steps, epochs * self.steps_per_epoch)
        progress = None
        if self.rank == 0:
            from tqdm import tqdm
            progress = tqdm(total=total, initial=state["global_step"], desc=self.task.name, dynamic_ncols=True,
                            disable=not sys.stderr.isatty() and not cfg.get("progress_bar", False))
        history, failures, global_step = [], 0, state["global_step"]
        per_epoch = self.steps_per_epoch * self.gas  # micro-batches used per epoch (whole accumulation windows)
        for epoch in range(state["epoch"], epochs):
            if global_step >= total:
                break
            self.loader.set_epoch(epoch)
            start = state["micro_step"] if epoch == state["epoch"] else 0
            self.engine.train()
            sums, t_wait, t_window = {}, 0.0, time.perf_counter()
            micro = start
            batches = self.loader.iterate(start)
            while micro < per_epoch and global_step < total:
                t0 = time.perf_counter()
                media_type, batch = next(batches)
                t_wait += time.perf_counter() - t0
                torch.manual_seed(item_seed(self.seed, epoch, micro) * 64 + self.rank)
                losses = self.task.losses(self.engine, batch, self.dtype, self.device)
                self.engine.backward(sum(losses.values()))
                self.engine.step()
                micro += 1
                failures += len(batch.get("failures", []))
                for k, v in losses.items():
                    sums[k] = sums.get(k, 0.0) + v.item() / self.gas
                if micro % self.gas:
                    continue
                global_step += 1
                window = time.perf_counter() - t_window
                gn = self.engine.get_global_grad_norm()
                record = dict(step=global_step, epoch=epoch, media=media_type, **sums, loss=sum(sums.values()),
                              lr=self.scheduler.get_last_lr()[0], grad_norm=float(gn) if gn is not None else float("nan"),
                              samples_per_s=batch["media"].shape[0] * self.gas * self.world / window,
                              data_wait=t_wait / window, memory_mb=_memory_mb(self.device))
                history.append(record)
                self._log(writer, progress, record, list(losses), failures)
                sums, t_wait, t_window = {}, 0.0, time.perf_counter()
                if save_every and global_step % save_every == 0 and micro < per_epoch:
                    self._save(epoch, micro, global_step)
            finished = micro >= per_epoch
            last = not finished or global_step >= total or epoch + 1 == epochs
            if last or (epoch + 1) % save_every_epochs == 0:
                self._save(epoch + 1 if finished else epoch, 0 if finished else micro, global_step)
            if finished and self.task.evaluate_each_epoch:
                self._evaluate(writer, epoch, global_step)
        if progress is not None:
            progress.close()
        results = {}
        if self.task.evaluate_each_epoch:  # the last epoch's evaluation already scored this very model
            results = self._last_eval if self._last_eval_step == global_step else self._evaluate(writer, "final", global_step)
            if self.rank == 0 and results:
                with open(os.path.join(self.run_dir, "eval_final.json"), "w") as f:
                    json.dump(results, f, indent=1)
        self._export()
        if writer is not None:
            writer.close()
        if self.rank == 0:
            with open(os.path.join(self.run_dir, "history.json"), "w") as f:
                json.dump(history, f, indent=1)
        if failures:
            logger.warning("%d broken media were replaced during training (paths in train.log)", failures)
        return dict(history=history, eval=results, run_dir=self.run_dir, failures=failures)

    def _log(self, writer, progress, record, loss_names, failures):
        if self.rank != 0:
            return
        for k in loss_names + ["loss", "lr", "grad_norm", "samples_per_s", "data_wait", "memory_mb"]:
            writer.add_scalar(f"train/{k}", record[k], record["step"])
        writer.add_scalar("train/broken_media", failures, record["step"])
        progress.update(1)
        progress.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.2e}")
        if record["step"] % int(self.config.get("log_freq", 100)) == 0 or record["step"] == 1:
            logger.info("step %d epoch %d: %s", record["step"], record["epoch"],
                        " ".join(f"{k}={record[k]:.4f}" for k in loss_names + ["loss", "lr", "grad_norm", "samples_per_s"]))

    def _evaluate(self, writer, epoch, step) -> dict:
        model = self.engine.module
        model.eval()
        # evaluation calls the module's methods, outside the engine's forward (and its autocast)
        amp = torch.autocast(self.device.type, torch.bfloat16, enabled=self.precision == "amp_bf16")
        if self.engine.zero_optimization_stage() == 3:  # evaluation reads whole parameters directly
            import deepspeed
            with deepspeed.zero.GatheredParameters(list(model.parameters())), amp:
                results = self.task.evaluate(model, self.config, self.tokenizer)
        else:
            with amp:
                results = self.task.evaluate(model, self.config, self.tokenizer)
        model.train()
        self._last_eval, self._last_eval_step = results, step
        if self.rank == 0 and results:
            with open(os.path.join(self.run_dir, f"eval_{epoch}.json"), "w") as f:
                json.dump(results, f, indent=1)
            if writer is not None:
                for name, res in results.items():
                    for k, v in res.get("x", res).items():  # retrieval: re-ranked metrics; QA: accuracy
                        if isinstance(v, (int, float)):
                            writer.add_scalar(f"eval_{name}/{k}", v, step)
        return results

    def _export(self):
        tag = self.checkpointer.latest()
        dist.barrier()
        if self.rank == 0 and tag is not None:
            if self.checkpointer.has_optimizer_shards(tag):
                state = self.checkpointer.fp32_state_dict(tag)
            else:  # ZeRO-0 in fp32: the live module holds the fp32 weights
                state = {k: v.detach().float() if v.is_floating_point() else v
                         for k, v in self.engine.module.state_dict().items()}
            model = self.task.build_model(OmegaConf.merge(self.config, {"pretrained_path": None, "tower_init": "random"}))
            model.load_state_dict(state)
            export_model(model, os.path.join(self.run_dir, "export"))
            logger.info("exported fp32 weights of %s to %s", tag, os.path.join(self.run_dir, "export"))
        dist.barrier()


def parse_train_args(argv):
    """``TASK [--config BASE] [OVERLAY ...] [key=value ...]`` -> (task, config). BASE defaults to the
    task's packaged config (pretrain -> pretrain.yaml, train_ret -> ret_msrvtt.yaml)."""
    argv = [a for a in argv if not a.startswith("--local_rank")]  # the deepspeed launcher adds it
    if not argv or argv[0] not in TASKS:
        raise ConfigError(f"unknown task {argv[0] if argv else ''!r}; expected one of {', '.join(TASKS)}")
    task, rest = TASKS[argv[0]], argv[1:]
    base = task.default_config
    if "--config" in rest:
        i = rest.index("--config")
        if i + 1 >= len(rest):
            raise ConfigError("--config needs a config name or YAML path")
        base = rest[i + 1]
        rest = rest[:i] + rest[i + 2:]
    config = load_config([base] + [a for a in rest if "=" not in a], [a for a in rest if "=" in a])
    config.task = task.name
    path = config.get("pretrained_path")
    if path and not os.path.exists(path):
        raise CheckpointError(f"pretrained_path {path}: no such file")
    return task, config


def train_main(argv) -> dict:
    task, config = parse_train_args(argv)
    results = Trainer(config, task).train()
    dist.release_cpu_shm()
    return results
