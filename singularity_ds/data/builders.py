"""Datasets and loaders built from a config: the training loaders of caption tasks (pretrain,
train_ret) and of QA, and the evaluation sets.

    loader = caption_train_loader(config, tokenizer, rank, world)   # MetaLoader over image/video corpora
    for media_type, batch in loader: ...

Each task calls the loader it trains on (:mod:`singularity_ds.tasks`); nothing here reads the task's name.
"""
from ..errors import AnnotationError, MediaError
from .annotations import corpus_specs, load_corpus
from .datasets import CaptionDataset, MCDataset, QADataset, RetrievalEvalDataset
from .loader import CaptionCollate, MetaLoader, QACollate, make_loader
from .media import ClipPlanner, MediaSource
from .mixing import corpus_weights, epoch_samples
from .readers import clip_pipeline
from .shards import ShardStream, is_shard_source, shard_list
from .transforms import build_transform, pixel_statistics


def per_media(value, media_type: str):
    """Config values given per media type ({image: .., video: ..}) or once for both."""
    return value[media_type] if hasattr(value, "keys") else value


def config_transform(config, train: bool):
    """The config's training or evaluation transform (resolution, normalisation, ``random_flip``)."""
    return build_transform(config.image_res, train=train, flip=config.random_flip,
                           stats=pixel_statistics(config))


def media_source(config, media_type: str, train: bool) -> MediaSource:
    """The pixels of a media type's items: the training or the evaluation transform and frame sampling."""
    transform = config_transform(config, train)
    if media_type == "image":
        return MediaSource("image", transform)
    video_input = config.video_input
    return MediaSource("video", transform, video_input.num_frames if train else video_input.num_frames_test,
                       video_input.sample_type if train else video_input.sample_type_test,
                       video_input.reader)


def train_source(config, media_type: str):
    """What training items of a media type carry: clip plans with ``video_input.dali_device`` (videos
    decoded per batch by :func:`dali_finish`), else pixels."""
    video_input = config.video_input
    if media_type != "video" or not video_input.dali_device:
        return media_source(config, media_type, train=True)
    return ClipPlanner(config_transform(config, train=True), video_input.num_frames, video_input.sample_type,
                       video_input.reader)


def dali_finish(config):
    """``video_input.dali_device=gpu|cpu``: the training loader's clip plans become pixels in one DALI
    graph per batch (decode, crop, resize, flip, normalise), in the main process, on that device."""
    mean, std, _ = pixel_statistics(config)
    device = config.video_input.dali_device

    def finish(batch):
        plans = batch["media"]
        if isinstance(plans, list):
            try:
                batch["media"] = clip_pipeline(
                    [plan.path for plan in plans], [plan.indices for plan in plans],
                    [plan.box for plan in plans], [plan.flip for plan in plans],
                    config.image_res, mean, std, device=device)
            except RuntimeError as e:
                reason = str(e).strip().splitlines()[0][:160]
                raise MediaError(", ".join(plan.path for plan in plans),
                                 f"DALI could not decode this batch ({reason})") from None
        return batch
    return finish


def shard_stream(config, specs, media_type, rank, world, weights=None, samples=None) -> ShardStream:
    """The streaming dataset of a media type's shard corpora (their shards are read in one order); with
    ``weights`` (one per corpus) and ``samples`` (this type's share of an epoch), drawn with replacement
    (:mod:`.mixing`)."""
    if config.video_input.dali_device and media_type == "video":
        raise AnnotationError("video_input.dali_device: DALI batch decoding reads files; shard corpora "
                              "decode per sample (video_input.reader)")
    shards, shard_weights = [], []
    for i, spec in enumerate(specs):
        listed = shard_list(spec[0], media_type)
        shards += listed
        shard_weights += [weights[i] if weights is not None else 1.0] * len(listed)  # a shard: its corpus's
    return ShardStream(shards, media_source(config, media_type, train=True),
                       per_media(config.batch_size, media_type), rank, world, seed=config.seed,
                       buffer=config.shard_shuffle_buffer,
                       has_multi_vision_gt=config.has_multi_vision_gt,
                       is_paragraph_retrieval=config.is_paragraph_retrieval,
                       weights=shard_weights if weights is not None else None, samples=samples)


def weighted_epoch(config, specs):
    """``(weights per corpus, samples per media type)`` of weighted shard corpora (:mod:`.mixing`), or
    ``(None, None)`` unweighted."""
    weights = corpus_weights(config, specs)
    if weights is None:
        return None, None
    counts = [sum(n for _, n in shard_list(path, media_type)) for path, _, media_type in specs]
    return weights, epoch_samples(weights, specs, counts, config.samples_per_epoch)


def caption_train_datasets(config, rank: int = 0, world: int = 1) -> dict:
    """One dataset per media type of ``train_file`` (corpora of a type are concatenated): a
    CaptionDataset over annotation files, or a ShardStream over tar shards."""
    specs = corpus_specs(config.train_file)
    weights, samples = weighted_epoch(config, specs)
    out = {}
    for media_type in sorted({spec[2] for spec in specs}):
        of_type = [spec for spec in specs if spec[2] == media_type]
        sharded = [is_shard_source(spec[0]) for spec in of_type]
        if any(sharded):
            if not all(sharded):
                raise AnnotationError(f"config key 'train_file': the {media_type} corpora mix shards and "
                                      f"annotation files; give one kind per media type")
            if weights is None:
                out[media_type] = shard_stream(config, of_type, media_type, rank, world)
            elif samples[media_type] > 0:  # a type whose corpora all weigh 0 is not trained on
                of_type_weights = [w for w, spec in zip(weights, specs) if spec[2] == media_type]
                out[media_type] = shard_stream(config, of_type, media_type, rank, world, of_type_weights,
                                               samples[media_type])
            continue
        store = load_corpus(of_type, media_outside_dir=config.media_outside_dir)
        out[media_type] = CaptionDataset(
            store, train_source(config, media_type), num_tries=config.media_retries,
            has_multi_vision_gt=config.has_multi_vision_gt,
            is_paragraph_retrieval=config.is_paragraph_retrieval)
    return out


def qa_train_datasets(config) -> dict:
    """One QADataset per media type of ``train_file`` (video QA, or VQA's image corpora)."""
    specs = corpus_specs(config.train_file)
    if any(is_shard_source(spec[0]) for spec in specs):
        raise AnnotationError("config key 'train_file': shard corpora stream caption training (pretrain, "
                              "train_ret); QA training reads annotation files")
    out = {}
    for media_type in sorted({spec[2] for spec in specs}):
        store = load_corpus([spec for spec in specs if spec[2] == media_type], kind="qa_train",
                            media_outside_dir=config.media_outside_dir)
        out[media_type] = QADataset(store, train_source(config, media_type), train=True,
                                    eos=config.eos, num_tries=config.media_retries)
    return out


def _train_loader(config, datasets: dict, collate_of, rank, world, num_workers) -> MetaLoader:
    """A MetaLoader over one shuffled loader per media type; ``collate_of(media_type)`` batches its items."""
    workers = config.num_workers if num_workers is None else num_workers
    loaders = {media_type: make_loader(dataset, per_media(config.batch_size, media_type),
                                       collate_of(media_type), rank, world, shuffle=True,
                                       seed=config.seed, drop_last=True, num_workers=workers)
               for media_type, dataset in datasets.items()}
    for media_type, loader in loaders.items():
        if len(loader) == 0:  # drop_last leaves no batch: the first step would find nothing to train on
            files = ", ".join(spec[0] for spec in corpus_specs(config.train_file) if spec[2] == media_type)
            key = f"batch_size.{media_type}" if hasattr(config.batch_size, "keys") else "batch_size"
            raise AnnotationError(f"{files}: {len(datasets[media_type])} entries make no whole batch of "
                                  f"{key}={loader.batch_size} per rank ({world} rank(s)); add entries or "
                                  f"lower the batch size")
    finish = dali_finish(config) if config.video_input.dali_device else None
    return MetaLoader(loaders, seed=config.seed, finish=finish)


def caption_train_loader(config, tokenizer, rank: int = 0, world: int = 1,
                         num_workers: int = None) -> MetaLoader:
    """Caption training batches (pretrain, train_ret): media, tokenised captions (``max_txt_l``), idx."""
    def collate_of(media_type):
        return CaptionCollate(tokenizer, per_media(config.max_txt_l, media_type))
    datasets = caption_train_datasets(config, rank, world)
    return _train_loader(config, datasets, collate_of, rank, world, num_workers)


def qa_train_loader(config, tokenizer, rank: int = 0, world: int = 1, num_workers: int = None) -> MetaLoader:
    """QA training batches (train_qa): media, tokenised questions and weighted answers."""
    return _train_loader(config, qa_train_datasets(config),
                         lambda media_type: QACollate(tokenizer, config.max_q_len, config.max_a_len),
                         rank, world, num_workers)


def eval_datasets(config, names=None, kind: str = "caption") -> dict:
    """Evaluation sets named in ``test_types`` (default: every ``test_file`` entry): retrieval sets,
    ``kind="mc"`` multiple-choice sets (entries with a list of option captions and ``answer``), or
    ``kind="qa"`` QA sets (entries may carry their answers, for the metrics)."""
    names = list(names or config.test_types or config.test_file.keys())
    out = {}
    for name in names:
        if name not in config.test_file:
            raise AnnotationError(f"config key 'test_types': {name!r} is not in test_file "
                                  f"({', '.join(config.test_file.keys())})")
        (spec,) = corpus_specs(config.test_file[name], key=f"test_file.{name}")
        skip, outside = config.skip_broken_media_eval, config.media_outside_dir
        schema = {"mc": "mc", "qa": "qa_eval"}.get(kind, "caption")
        try:
            store = load_corpus([spec], kind=schema, media_outside_dir=outside)
        except AnnotationError as e:  # which set of the config it is, besides the file
            raise AnnotationError(f"config key 'test_file.{name}': {e}") from None
        source = media_source(config, spec[2], train=False)
        if kind == "mc":
            out[name] = MCDataset(store, source, skip_broken=skip)
        elif kind == "qa":
            out[name] = QADataset(store, source, train=False, skip_broken=skip)
        else:
            out[name] = RetrievalEvalDataset(
                store, source, has_multi_vision_gt=config.has_multi_vision_gt,
                is_paragraph_retrieval=config.is_paragraph_retrieval, skip_broken=skip)
    return out
