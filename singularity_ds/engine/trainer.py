"""The one train loop, on DeepSpeed, for every task object (:mod:`singularity_ds.tasks`).

    singularity-ds train TASK [--config BASE] [CONFIG ...] [key=value ...]
    deepspeed --num_accelerators 2 -m singularity_ds train pretrain tiny output_dir=runs/pt

Run folder (``output_dir``): ``config.yaml`` (resolved), ``ds_config.json``, ``train.log``,
``history.jsonl`` (a line per step, as it happens) and ``history.json`` (every step, at the end),
``tb/`` (TensorBoard), ``checkpoints/`` and ``export/`` (consolidated fp32 weights, loadable with
``singularity_ds.models.load_model``). Randomness is a function of (seed, epoch, step, rank): the data
order and every item's frames/crops come from the loaders' seeds, and the model's RNG (dropout, ITM
negatives, MLM masks) is reseeded at every micro-step, so a resumed run repeats an uninterrupted one.

:meth:`Trainer.train_step` is one optimizer step (its gradient-accumulation micro-steps inside);
:meth:`Trainer.train` runs epochs of them and asks the components when to act: the checkpointer when
to save, the task whether to evaluate, the run log when to print.

Faults: a step whose loss is NaN/Inf on any rank makes no update and writes no checkpoint, and
``max_nonfinite_steps`` of them in a row stop the run (:mod:`.nonfinite`); a rank that is killed, crashes
or freezes stops the others within ``dist_timeout`` seconds with one line naming it (:mod:`..heartbeat`).
"""
import contextlib
import logging
import os
import shutil
import time

import torch
from omegaconf import OmegaConf

from .. import dist, heartbeat
from ..config import load_config, packaged_configs
from ..config.args import RunUsage, split_run_args
from ..data import corpus_specs
from ..data.checks import preflight
from ..data.loader import item_seed
from ..data.mixing import corpus_weights
from ..errors import CheckpointError, ConfigError, RankLostError
from ..fileio import write_json
from ..models import take_architecture
from ..models.weights import export as export_model, plain_config
from ..tasks import TASKS
from .build import build_engine
from .checkpointing import Checkpointer
from .data_record import check_data_unchanged, data_record
from .ds_config import WEIGHT_DTYPE, build_ds_config, resolve_precision
from .nonfinite import NonFiniteSteps, finite, update_skipped
from .run_dir import prepare_run_dir
from .run_log import RunLog, failures_logged, setup_logging

logger = logging.getLogger("singularity_ds.train")


def _memory_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    import psutil
    return psutil.Process().memory_info().rss / 2 ** 20


def preflight_data(config, task):
    """The cheap part of ``singularity-ds doctor``, before anything is written: media folders exist and the
    first media of each corpus too, for training and (when evaluated during training) the test sets."""
    preflight(corpus_specs(config.train_file), "train_file", task.train_annotations)
    corpus_weights(config, corpus_specs(config.train_file))  # weights that do not fit the corpora: one line
    if task.evaluate_each_epoch:
        for name in config.test_types or config.test_file:
            preflight(corpus_specs(config.test_file[name], key=f"test_file.{name}"), f"test_file.{name}",
                      task.eval_annotations)


class Trainer:
    def __init__(self, config, task):
        self.config, self.task = config, task
        self._last_eval, self._last_eval_step = {}, None
        self.run_dir = prepare_run_dir(config)
        self.precision = resolve_precision(config)
        self.ds_cfg = build_ds_config(config,
                                      task.micro_batch(config), self.precision)  # refuse before writing
        preflight_data(config, task)
        self.info = dist.setup(config.dist_timeout)
        self.rank, self.world, self.device = self.info["rank"], self.info["world"], self.info["device"]
        # every annotation entry read and checked before anything is written: a bad entry anywhere in a
        # training or test file stops the run in its one line with no run folder (nor a removed one)
        task.check_evaluation_data(config)
        self.tokenizer = task.tokenizer(config)
        self.loader = task.train_loader(config, self.tokenizer, self.rank, self.world)
        if self.rank == 0:
            if config.overwrite and not config.resume and os.path.isdir(self.run_dir):
                shutil.rmtree(self.run_dir)
            os.makedirs(self.run_dir, exist_ok=True)
        dist.barrier()
        self.log_file = setup_logging(self.run_dir, self.rank)
        self.dtype = WEIGHT_DTYPE[self.precision]
        self.seed = config.seed
        self.accumulation = config.gradient_accumulation_steps
        self.replaced = {}  # the broken media files replaced in training (this rank's), each once, in order
        self.nonfinite = NonFiniteSteps(config.max_nonfinite_steps, self.rank)

    def build(self):
        config, task = self.config, self.task
        torch.manual_seed(self.seed)  # identical initial weights on every rank and every run
        model = task.build_model(config)
        self.steps_per_epoch = max(1, len(self.loader) // self.accumulation)
        self.data = data_record(config, self.loader)  # in every checkpoint: a resume must read the same files
        self.engine, self.scheduler = build_engine(model, config, self.ds_cfg, self.steps_per_epoch)
        self.checkpointer = Checkpointer(self.run_dir, self.rank, config.keep_last_checkpoints,
                                         config.save_every_steps, config.save_every_epochs)
        if self.rank == 0:
            # resolved where it can be (an unused ${oc.env:...} without its variable stays as written)
            OmegaConf.save(OmegaConf.create(plain_config(config)), os.path.join(self.run_dir, "config.yaml"))
            write_json(self.ds_cfg, os.path.join(self.run_dir, "ds_config.json"), indent=2)
            logger.info("task %s, %d rank(s), %s, %s, %d micro-batches/epoch, gradient accumulation %d",
                        task.name, self.world, config.ds_config, self.precision, len(self.loader),
                        self.accumulation)

    def _resume(self):
        fresh = dict(epoch=0, micro_step=0, global_step=0)
        if not self.config.resume:
            return fresh
        tag = self.checkpointer.resume_tag(self.config.resume)  # verified against its manifest
        if tag is None:
            logger.info("resume=%s: no complete checkpoint in %s, starting fresh",
                        self.config.resume, self.run_dir)
            return fresh
        check_data_unchanged(self.checkpointer.client_state(tag).get("data"), self.data, tag,
                             self.config.resume_allow_data_change)
        state = self.checkpointer.load(self.engine, tag)
        saved, current = state.get("stream_layout"), self._stream_layout()
        if saved and current and saved != current:
            raise ConfigError(f"resume from {tag}: its shard streams were split for {saved}, this run has "
                              f"{current}; an epoch splits over ranks and loader workers (and is drawn from "
                              f"the corpus weights), so resume with the same ranks and num_workers (and "
                              f"train_corpus_weights, samples_per_epoch)")
        logger.info("resumed from %s: epoch %d, micro-step %d, global step %d", tag, state["epoch"],
                    state["micro_step"], state["global_step"])
        return {k: state[k] for k in fresh}

    def _stream_layout(self):
        """How shard streams split an epoch (ranks x loader workers) and, when weighted, what they draw it
        from; None without shard corpora."""
        from torch.utils.data import IterableDataset
        streams = [ld for ld in self.loader.loaders.values() if isinstance(ld.dataset, IterableDataset)]
        if not streams:
            return None
        layout = dict(world=self.world, num_workers=streams[0].num_workers)
        if self.config.train_corpus_weights is not None or self.config.samples_per_epoch is not None:
            weights = corpus_weights(self.config, corpus_specs(self.config.train_file))
            layout.update(train_corpus_weights=weights, samples_per_epoch=self.config.samples_per_epoch)
        return layout

    def _save(self, epoch, micro_step, global_step):
        if self.nonfinite.in_streak:  # see NonFiniteSteps.in_streak; the same decision on every rank
            logger.warning("step %d: no checkpoint after a skipped (non-finite) step; the last one stays %s",
                           global_step, self.checkpointer.latest())
            return
        state = dict(epoch=epoch, micro_step=micro_step, global_step=global_step,
                     stream_layout=self._stream_layout(), data=self.data)
        self.checkpointer.save(self.engine, f"step{global_step:08d}", state)

    def train_step(self, batches, epoch: int, micro: int) -> dict:
        """One optimizer step: ``gradient_accumulation_steps`` micro-batches from ``batches``, the first
        being micro-step ``micro`` of ``epoch``. Returns the step's record without ``step``/``epoch``:
        each loss averaged over the micro-steps and the ranks, lr, grad norm, throughput, data wait; and,
        for the loop, ``skipped`` (a loss was NaN/Inf on some rank: no update, see :mod:`.nonfinite`) and
        ``nonfinite_media`` (this rank's own losses and media paths when its loss was not finite)."""
        start, wait, sums, broken, paths = time.perf_counter(), 0.0, {}, 0, []
        for i in range(self.accumulation):
            t0 = time.perf_counter()
            media_type, batch = next(batches)
            wait += time.perf_counter() - t0
            torch.manual_seed(item_seed(self.seed, epoch, micro + i) * 64 + self.rank)
            losses = self.task.losses(self.engine, batch, self.dtype, self.device)
            self.engine.backward(sum(losses.values()))
            if i + 1 < self.accumulation:  # the boundary's step waits for the skip decision below
                self.engine.step()
            broken += len(batch.get("failures", []))
            self.replaced.update(dict.fromkeys(path for path, _ in batch.get("failures", [])))
            paths += batch["paths"]
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + v.item() / self.accumulation
        names, local = list(sums), dict(sums)
        sums = dict(zip(names, dist.mean_over_ranks([sums[k] for k in names])))
        skipped = not finite(sums.values())  # the same numbers, so the same decision, on every rank
        with update_skipped(self.engine) if skipped else contextlib.nullcontext():
            self.engine.step()
        window = time.perf_counter() - start
        gn = self.engine.get_global_grad_norm()
        return dict(media=media_type, **sums, loss=sum(sums.values()), lr=self.scheduler.get_last_lr()[0],
                    grad_norm=float(gn) if gn is not None else float("nan"),
                    samples_per_s=batch["media"].shape[0] * self.accumulation * self.world / window,
                    data_wait=wait / window, memory_mb=_memory_mb(self.device), broken_media=broken,
                    skipped=skipped, nonfinite_media=None if finite(local.values()) else (local, paths))

    def train(self) -> dict:
        self.build()
        cfg = self.config
        state = self._resume()
        epochs, max_steps = cfg.scheduler.epochs, cfg.max_steps
        total = epochs * self.steps_per_epoch if max_steps < 0 else min(max_steps,
                                                                        epochs * self.steps_per_epoch)
        log = RunLog(self.run_dir, self.rank, total, state["global_step"], self.task.name, cfg.log_freq,
                     cfg.progress_bar, config=cfg)
        failures, global_step = 0, state["global_step"]
        per_epoch = self.steps_per_epoch * self.accumulation  # micro-batches used per epoch (whole windows)
        for epoch in range(state["epoch"], epochs):
            if global_step >= total:
                break
            self.loader.set_epoch(epoch)
            micro = state["micro_step"] if epoch == state["epoch"] else 0
            self.engine.train()
            batches = self.loader.iterate(micro)
            while micro < per_epoch and global_step < total:
                record = self.train_step(batches, epoch, micro)
                micro, global_step = micro + self.accumulation, global_step + 1
                failures += record.pop("broken_media")
                skipped, bad_media = record.pop("skipped"), record.pop("nonfinite_media")
                record = dict(step=global_step, epoch=epoch, **record)
                log.step(record, [k for k in record if k.startswith("loss_")], failures)
                if bad_media:
                    self.nonfinite.warn(global_step, *bad_media)
                self.nonfinite.after_step(global_step, skipped, self.checkpointer.latest)
                if self.checkpointer.due_in_epoch(global_step, epoch_done=micro >= per_epoch):
                    self._save(epoch, micro, global_step)
            finished = micro >= per_epoch
            last = not finished or global_step >= total or epoch + 1 == epochs
            if self.checkpointer.due_at_epoch_end(epoch, last):
                self._save(epoch + 1 if finished else epoch, 0 if finished else micro, global_step)
            if finished and self.task.evaluate_each_epoch:
                self._evaluate(log, epoch, global_step)
        log.close()
        results = {}
        if self.task.evaluate_each_epoch:  # the last epoch's evaluation already scored this very model
            results = (self._last_eval if self._last_eval_step == global_step
                       else self._evaluate(log, "final", global_step))
            if self.rank == 0 and results:
                write_json(results, os.path.join(self.run_dir, "eval_final.json"))
        self._export()
        if self.rank == 0:
            write_json(log.history, os.path.join(self.run_dir, "history.json"))
        if failures:
            paths = list(self.replaced)
            logger.warning("%d broken media were replaced during training (%d files): %s", failures,
                           len(paths), ", ".join(paths))
        return dict(history=log.history, eval=results, run_dir=self.run_dir, failures=failures)

    def _evaluate(self, log, epoch, step) -> dict:
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
            write_json(results, os.path.join(self.run_dir, f"eval_{epoch}.json"))
            log.evaluation(self.task.eval_scalars(results), step)
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
            model = self.task.build_model(OmegaConf.merge(self.config,
                                                          {"pretrained_path": None, "tower_init": "random"}))
            model.load_state_dict(state)
            export_model(model, os.path.join(self.run_dir, "export"))
            logger.info("exported fp32 weights of %s to %s", tag, os.path.join(self.run_dir, "export"))
        dist.barrier()


TRAIN_FLAGS = {"--config": "the task's base config, a packaged name or a YAML path (default: the task's own: "
                           "pretrain -> pretrain, train_ret -> ret_msrvtt, train_qa -> qa_msrvtt)"}


def train_usage():
    return RunUsage(
        "singularity-ds train", "TASK [--config BASE] [OVERLAY ...] [key=value ...]",
        {"TASK": ", ".join(TASKS),
         "OVERLAY": "config names or YAML paths merged over BASE in order (packaged: "
                    + ", ".join(packaged_configs()) + ")",
         "key=value": "any config key (singularity-ds config-docs); pretrained_path=CKPT starts from a "
                      "checkpoint (an original .pth or an export folder)"},
        "Train with DeepSpeed: one process here; several under deepspeed, torchrun, srun or "
        "launchers/local.sh N.")


def parse_train_args(argv):
    """``TASK [--config BASE] [CONFIG ...] [key=value ...]`` -> (task, config). BASE defaults to the
    task's packaged config (pretrain -> pretrain.yaml, train_ret -> ret_msrvtt.yaml, ...)."""
    args = split_run_args(argv, value_flags=TRAIN_FLAGS, usage=train_usage)
    if not args.configs or args.configs[0] not in TASKS:
        raise ConfigError(f"unknown task {args.configs[0] if args.configs else ''!r}; "
                          f"expected one of {', '.join(TASKS)}")
    task = TASKS[args.configs[0]]
    base = args.flags.get("config", task.default_config)
    config = load_config([base] + args.configs[1:], args.overrides)
    config.task = task.name
    path = config.pretrained_path
    if path and not os.path.exists(path):
        raise CheckpointError(f"pretrained_path {path}: no such file")
    if path:  # the checkpoint's architecture, as eval builds it (an overlay that contradicts it: one line)
        changed = take_architecture(config, load_config([base]), path, args.overrides)
        if changed:
            logger.info("from pretrained_path %s: %s", path, ", ".join(changed))
    return task, config


def train_main(argv) -> dict:
    task, config = parse_train_args(argv)
    trainer = Trainer(config, task)
    try:
        # the error that stops the run, at start-up too, in train.log; a lost rank: one line naming it
        with failures_logged(trainer.log_file), heartbeat.reporting_lost_ranks():
            results = trainer.train()
    except RankLostError:
        dist.release_cpu_shm(failed=True)
        raise
    dist.release_cpu_shm()
    heartbeat.stop()
    return results
