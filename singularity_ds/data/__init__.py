"""Data: annotations -> media readers -> transforms -> datasets -> loaders, built from a config.

    loader = train_loader(config, tokenizer, rank, world)   # MetaLoader over image/video corpora
    for media_type, batch in loader: ...
"""
from ..errors import AnnotationError, MediaError
from .annotations import AnnotationStore, corpus_specs, load_corpus, read_annotations
from .datasets import CaptionDataset, MCDataset, MediaSource, QADataset, RetrievalEvalDataset
from .loader import CaptionCollate, MetaLoader, QACollate, SeededSampler, collate_eval, collate_qa, make_loader
from .shards import ShardStream, is_shard_source, make_shards, shard_list
from .text import build_tokenizer, pre_text, tokenize
from .transforms import build_transform
from .video import get_frame_indices, get_reader, load_image, read_frames


def per_media(value, media_type: str):
    """Config values given per media type ({image: .., video: ..}) or once for both."""
    return value[media_type] if hasattr(value, "keys") else value


def media_source(config, media_type: str, train: bool) -> MediaSource:
    vi = config.video_input
    transform = build_transform(config.image_res, config.get("vit_type", "beit"), train)
    if media_type == "image":
        return MediaSource("image", transform)
    return MediaSource("video", transform, vi.num_frames if train else vi.num_frames_test,
                       vi.sample_type if train else vi.sample_type_test, vi.get("reader", "decord"),
                       plan=train and bool(vi.get("dali_device")), train=train)


def dali_finish(config):
    """``video_input.dali_device=gpu|cpu``: the training loader's clip plans become pixels in one DALI
    graph per batch (decode, crop, resize, flip, normalise), in the main process, on that device."""
    from .dali import clip_pipeline
    from .transforms import normalization
    mean, std = normalization(config.get("vit_type", "beit"))
    device = config.video_input.dali_device

    def finish(batch):
        plans = batch["media"]
        if isinstance(plans, list):
            try:
                batch["media"] = clip_pipeline([p.path for p in plans], [p.indices for p in plans],
                                               [p.box for p in plans], [p.flip for p in plans],
                                               config.image_res, mean, std, device=device)
            except RuntimeError as e:
                raise MediaError(", ".join(p.path for p in plans),
                                 f"DALI could not decode this batch ({str(e).strip().splitlines()[0][:160]})") from None
        return batch
    return finish


def shard_stream(config, specs, media_type, rank, world) -> ShardStream:
    """The streaming dataset of a media type's shard corpora (their shards are read in one order)."""
    if config.video_input.get("dali_device") and media_type == "video":
        raise AnnotationError("video_input.dali_device: DALI batch decoding reads files; shard corpora decode per "
                              "sample (video_input.reader)")
    return ShardStream([s for spec in specs for s in shard_list(spec[0], media_type)],
                       media_source(config, media_type, train=True),
                       per_media(config.batch_size, media_type), rank, world, seed=config.get("seed", 42),
                       buffer=config.get("shard_shuffle_buffer", 500),
                       has_multi_vision_gt=config.get("has_multi_vision_gt", False),
                       is_paragraph_retrieval=config.get("is_paragraph_retrieval", False))


def train_datasets(config, rank: int = 0, world: int = 1) -> dict:
    """One dataset per media type of ``train_file`` (corpora of a type are concatenated): a
    CaptionDataset over annotation files, or a ShardStream over tar shards."""
    specs = corpus_specs(config.train_file)
    out = {}
    for media_type in sorted({s[2] for s in specs}):
        typed = [s for s in specs if s[2] == media_type]
        sharded = [is_shard_source(s[0]) for s in typed]
        if any(sharded):
            if not all(sharded):
                raise AnnotationError(f"config key 'train_file': the {media_type} corpora mix shards and annotation "
                                      f"files; give one kind per media type")
            out[media_type] = shard_stream(config, typed, media_type, rank, world)
            continue
        store = load_corpus(typed)
        out[media_type] = CaptionDataset(
            store, media_source(config, media_type, train=True), num_tries=config.get("media_retries", 3),
            has_multi_vision_gt=config.get("has_multi_vision_gt", False),
            is_paragraph_retrieval=config.get("is_paragraph_retrieval", False))
    return out


def qa_train_datasets(config) -> dict:
    """One QADataset per media type of ``train_file`` (video QA, or VQA's image corpora)."""
    specs = corpus_specs(config.train_file)
    if any(is_shard_source(s[0]) for s in specs):
        raise AnnotationError("config key 'train_file': shard corpora stream caption training (pretrain, train_ret); "
                              "QA training reads annotation files")
    return {media_type: QADataset(load_corpus([s for s in specs if s[2] == media_type], kind="qa_train"),
                                  media_source(config, media_type, train=True), train=True,
                                  eos=config.get("eos", "[SEP]"), num_tries=config.get("media_retries", 3))
            for media_type in sorted({s[2] for s in specs})}


def train_loader(config, tokenizer, rank: int = 0, world: int = 1, num_workers: int = None) -> MetaLoader:
    """Training batches of the config's task: captions (pretrain / train_ret) or QA (train_qa)."""
    workers = config.get("num_workers", 0) if num_workers is None else num_workers
    qa = str(config.get("task", "")).endswith("qa")
    loaders = {}
    for media_type, ds in (qa_train_datasets(config) if qa else train_datasets(config, rank, world)).items():
        collate = (QACollate(tokenizer, config.max_q_len, config.max_a_len) if qa
                   else CaptionCollate(tokenizer, per_media(config.max_txt_l, media_type)))
        loaders[media_type] = make_loader(ds, per_media(config.batch_size, media_type), collate, rank, world,
                                          shuffle=True, seed=config.get("seed", 42), drop_last=True,
                                          num_workers=workers)
    finish = dali_finish(config) if config.video_input.get("dali_device") else None
    return MetaLoader(loaders, seed=config.get("seed", 42), finish=finish)


def eval_datasets(config, names=None, kind: str = "caption") -> dict:
    """Evaluation sets named in ``test_types`` (default: every ``test_file`` entry): retrieval sets,
    ``kind="mc"`` multiple-choice sets (entries with a list of option captions and ``answer``), or
    ``kind="qa"`` QA sets (entries may carry their answers, for the metrics)."""
    names = list(names or config.get("test_types") or config.test_file.keys())
    out = {}
    for name in names:
        if name not in config.test_file:
            raise AnnotationError(f"config key 'test_types': {name!r} is not in test_file "
                                  f"({', '.join(config.test_file.keys())})")
        (spec,) = corpus_specs(config.test_file[name], key=f"test_file.{name}")
        skip = config.get("skip_broken_media_eval", False)
        if kind == "mc":
            out[name] = MCDataset(load_corpus([spec], kind="mc"), media_source(config, spec[2], train=False),
                                  skip_broken=skip)
            continue
        if kind == "qa":
            out[name] = QADataset(load_corpus([spec], kind="qa_eval"), media_source(config, spec[2], train=False),
                                  train=False, skip_broken=skip)
            continue
        out[name] = RetrievalEvalDataset(
            load_corpus([spec]), media_source(config, spec[2], train=False),
            has_multi_vision_gt=config.get("has_multi_vision_gt", False),
            is_paragraph_retrieval=config.get("is_paragraph_retrieval", False),
            skip_broken=skip)
    return out
