"""``singularity-ds doctor TASK [CONFIG ...] [key=value ...] [--media-fraction F] [--workers N] [--world N]``.

Validates a run before it starts, with the arguments ``train`` would take: the config (keys, types,
ranges), every annotation file (``train_file``, and ``test_file`` for the tasks evaluated during training:
schema, entry counts), a sample of
each corpus's media read exactly as training reads them (``--media-fraction`` of the entries, in
``--workers`` processes, with a progress bar), and the checkpoint ``pretrained_path`` names (read and
loaded into the task's model). Prints one table: entries, media sampled, missing and broken media
found, and the optimizer steps per epoch for ``--world`` ranks. Exit code 0 when nothing was found, 1
when media are missing or broken, 2 (one line) for an error that stops a run.
"""
import argparse
import os

from .data import corpus_specs, media_source, per_media
from .data.checks import check_corpus
from .data.mixing import corpus_weights, epoch_samples
from .engine.trainer import parse_train_args
from .errors import AnnotationError


def _steps_per_epoch(config, reports, world: int) -> int:
    """Micro-batches of every media type trained on (drop_last, split over ranks) / accumulation; with
    weighted shard corpora, of each type's share of ``samples_per_epoch``."""
    train = [r for r in reports if r.name.startswith("train_file")]
    specs = corpus_specs(config.train_file)
    weights = corpus_weights(config, specs)
    if weights is not None:
        samples = epoch_samples(weights, specs, [r.entries for r in train], config.samples_per_epoch)
    else:
        samples = {}
        for r in train:
            samples[r.media_type] = samples.get(r.media_type, 0) + r.entries
    micro = sum((n // world) // per_media(config.batch_size, m) for m, n in samples.items())
    return micro // config.gradient_accumulation_steps


def main(argv) -> int:
    p = argparse.ArgumentParser(prog="singularity-ds doctor", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--media-fraction", type=float, default=0.05, help="share of each corpus's media to read")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--world", type=int,
                   default=int(os.environ.get("WORLD_SIZE", "1")), help="ranks of the run")
    p.add_argument("--seed", type=int, default=0, help="which media are sampled")
    args, rest = p.parse_known_args(argv)
    if not 0 < args.media_fraction <= 1:
        raise AnnotationError(f"--media-fraction {args.media_fraction}: expected a number in (0, 1]")
    task, config = parse_train_args(rest)
    print(f"config: {task.name} ({', '.join(a for a in rest if '=' not in a)}) is valid")
    corpora = [(f"train_file[{i}]", spec, task.train_annotations, True)
               for i, spec in enumerate(corpus_specs(config.train_file))]
    for name in (config.test_types or config.test_file) if task.evaluate_each_epoch else ():
        (spec,) = corpus_specs(config.test_file[name], key=f"test_file.{name}")
        corpora.append((f"test_file.{name}", spec, task.eval_annotations, False))
    reports = []
    for name, spec, kind, train in corpora:
        source = media_source(config, spec[2], train=train)
        reports.append(check_corpus(name, spec, source, kind, args.media_fraction, args.workers, args.seed))
    checkpoint = "none (pretrained_path not set)"
    if config.pretrained_path:
        task.build_model(config)  # reads the file and loads it strictly into the task's model
        checkpoint = f"{config.pretrained_path}: loads into the {task.name} model"
    problems = _print_table(reports, checkpoint, _steps_per_epoch(config, reports, args.world), args.world)
    return 1 if problems else 0


def _print_table(reports, checkpoint: str, steps: int, world: int) -> int:
    """-> the number of problems: media missing or broken in the sample, plus one for no training step."""
    width = max([22] + [len(r.name) for r in reports])  # a long set name widens the column
    head = (f"{'corpus':<{width}} {'type':<6} {'entries':>9} {'sampled':>8} {'missing':>8} {'broken':>7}  "
            f"annotation file")
    print(head)
    print("-" * len(head))
    media = 0
    for r in reports:
        print(f"{r.name:<{width}} {r.media_type:<6} {r.entries:>9,d} {r.sampled:>8,d} {len(r.missing):>8,d} "
              f"{len(r.broken):>7,d}  {r.anno}{'  (' + r.note + ')' if r.note else ''}")
        media += len(r.missing) + len(r.broken)
    print(f"checkpoint: {checkpoint}")
    print(f"steps per epoch: {steps:,d} optimizer steps with {world} rank(s)")
    if steps == 0:
        print("no training step: every media type has fewer entries per rank than its batch size "
              "(batch_size)")
    for r in reports:
        for path in r.missing[:5]:
            print(f"missing  {r.name}: {path}")
        for line in r.broken[:5]:
            print(f"broken   {r.name}: {line}")
        extra = len(r.missing) + len(r.broken) - min(5, len(r.missing)) - min(5, len(r.broken))
        if extra > 0:
            print(f"... and {extra} more in {r.name}")
    if media:
        print(f"{media} media of the sample are missing or broken: training replaces them "
              f"(media_retries); evaluation needs skip_broken_media_eval=True")
    return media + (steps == 0)
