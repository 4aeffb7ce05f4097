"""Weighted shard corpora: ``train_corpus_weights`` and ``samples_per_epoch`` (OpenCLIP's
``--train-data-upsampling-factors`` and ``--train-num-samples``).

Without them an epoch reads every sample of the shard corpora once, in a shuffled shard order
(:class:`.shards.ShardStream`). With them, an epoch is ``samples_per_epoch`` samples (default: the corpora's
total) drawn **with replacement, a shard at a time**:

- each media type gets its share of the epoch by its weighted size ``sum(weight_i * samples_i)`` over its
  corpora (largest remainders, so the shares add up to ``samples_per_epoch``); images and videos keep their
  own loaders and batches, and a type whose weights are all 0 is not trained on;
- within a media type, the epoch's shard sequence is drawn (:func:`.shards.draw_shards`) from
  ``random.Random(epoch_seed(seed, epoch))``: each draw picks a shard with probability proportional to its
  corpus's weight (a shard of corpus i: ``weight_i / sum of the weights of all shards``), until the drawn
  shards hold the type's share (the last one is cut). A sample of corpus i is therefore drawn ``weight_i``
  times as often as in the unweighted union, whatever the shard sizes: corpus i's expected share of the
  epoch is ``weight_i * samples_i / sum_j(weight_j * samples_j)``;
- the drawn sequence takes the place of the shuffled shard order, and the rest is the stream's: equal
  contiguous parts per rank and worker, the shuffle buffer, every item's seed from its position. The draw
  is a function of (seed, epoch, the corpora, the weights), so every rank and worker computes the same one
  and a resumed run replays the same samples.

The unit of the draw is a shard (reading one sample of a tar means reading it from its start): write shards
of a few hundred samples or more of them than an epoch's draws need so the mixture is fine-grained.
"""
from typing import Dict, List, Optional

from ..errors import ConfigError
from .shards import is_shard_source


def corpus_weights(config, specs) -> Optional[List[float]]:
    """The validated weight of each ``train_file`` corpus (in its order), or None when the corpora are read
    unweighted (neither ``train_corpus_weights`` nor ``samples_per_epoch`` set). ``samples_per_epoch``
    alone weights every corpus 1. One-line :class:`ConfigError` otherwise."""
    weights, samples = config.train_corpus_weights, config.samples_per_epoch
    if weights is None and samples is None:
        return None
    key = "train_corpus_weights" if weights is not None else "samples_per_epoch"
    for i, (path, _, _) in enumerate(specs):
        if not is_shard_source(path):
            raise ConfigError(f"config key {key!r}: train_file corpus {i} ({path}) is an annotation file; "
                              f"weighted sampling streams shard corpora (write it with make-shards)")
    if weights is None:
        return [1.0] * len(specs)
    weights = [float(w) for w in weights]
    if len(weights) != len(specs):
        raise ConfigError(f"config key 'train_corpus_weights': {len(weights)} weight(s) for {len(specs)} "
                          f"train_file corpora; give one per corpus, in train_file's order")
    if any(w < 0 for w in weights):  # the schema checks it too; here for configs built in code
        raise ConfigError(f"config key 'train_corpus_weights' must be >= 0, got {weights}")
    if not any(w > 0 for w in weights):
        raise ConfigError("config key 'train_corpus_weights': every weight is 0; at least one corpus must "
                          "be drawn from")
    return weights


def epoch_samples(weights, specs, counts, samples_per_epoch: Optional[int]) -> Dict[str, int]:
    """Samples per media type in one epoch (over all ranks): ``samples_per_epoch`` (default: the corpora's
    total ``sum(counts)``) split by the types' weighted sizes, largest remainders first (ties: type name)."""
    total = sum(counts) if samples_per_epoch is None else samples_per_epoch
    mass: Dict[str, float] = {}
    for (_, _, media_type), w, n in zip(specs, weights, counts):
        mass[media_type] = mass.get(media_type, 0.0) + w * n
    whole = sum(mass.values())
    if whole <= 0:
        raise ConfigError("config key 'train_corpus_weights': the corpora with a weight above 0 hold no "
                          "samples")
    exact = {m: total * v / whole for m, v in mass.items()}
    out = {m: int(x) for m, x in exact.items()}
    for m in sorted(exact, key=lambda m: (-(exact[m] - out[m]), m))[:total - sum(out.values())]:
        out[m] += 1
    return out
