"""Data: annotations -> media readers -> transforms -> datasets -> loaders, built from a config.

    loader = train_loader(config, tokenizer, rank, world)   # MetaLoader over image/video corpora
    for media_type, batch in loader: ...
"""
from .annotations import AnnotationError, AnnotationStore, corpus_specs, load_corpus, read_annotations
from .datasets import CaptionDataset, MCDataset, MediaSource, QADataset, RetrievalEvalDataset
from .loader import CaptionCollate, MetaLoader, QACollate, SeededSampler, collate_eval, collate_qa, make_loader
from .text import build_tokenizer, pre_text, tokenize
from .transforms import build_transform
from .video import MediaError, get_frame_indices, get_reader, load_image, read_frames


def per_media(value, media_type: str):
    """Config values given per media type ({image: .., video: ..}) or once for both."""
    return value[media_type] if hasattr(value, "keys") else value


def media_source(config, media_type: str, train: bool) -> MediaSource:
    vi = config.video_input
    transform = build_transform(config.image_res, config.get("vit_type", "beit"), train)
    if media_type == "image":
        return MediaSource("image", transform)
    return MediaSource("video", transform, vi.num_frames if train else vi.num_frames_test,
                       vi.sample_type if train else vi.sample_type_test, vi.get("reader", "decord"))


def train_datasets(config) -> dict:
    """One CaptionDataset per media type of ``train_file`` (corpora of a type are concatenated)."""
    specs = corpus_specs(config.train_file)
    out = {}
    for media_type in sorted({s[2] for s in specs}):
        store = load_corpus([s for s in specs if s[2] == media_type])
        out[media_type] = CaptionDataset(
            store, media_source(config, media_type, train=True), num_tries=config.get("media_retries", 3),
            has_multi_vision_gt=config.get("has_multi_vision_gt", False),
            is_paragraph_retrieval=config.get("is_paragraph_retrieval", False))
    return out


def qa_train_datasets(config) -> dict:
    """One QADataset per media type of ``train_file`` (video QA, or VQA's image corpora)."""
    specs = corpus_specs(config.train_file)
    return {media_type: QADataset(load_corpus([s for s in specs if s[2] == media_type], kind="qa_train"),
                                  media_source(config, media_type, train=True), train=True,
                                  eos=config.get("eos", "[SEP]"), num_tries=config.get("media_retries", 3))
            for media_type in sorted({s[2] for s in specs})}


def qa_eval_datasets(config, names=None) -> dict:
    """QA evaluation sets (``test_types`` of ``test_file``); entries may carry their answers for metrics."""
    names = list(names or config.get("test_types") or config.test_file.keys())
    out = {}
    for name in names:
        if name not in config.test_file:
            raise AnnotationError(f"config key 'test_types': {name!r} is not in test_file "
                                  f"({', '.join(config.test_file.keys())})")
        (spec,) = corpus_specs(config.test_file[name], key=f"test_file.{name}")
        out[name] = QADataset(load_corpus([spec], kind="qa_eval"), media_source(config, spec[2], train=False),
                              train=False, skip_broken=config.get("skip_broken_media_eval", False))
    return out


def train_loader(config, tokenizer, rank: int = 0, world: int = 1, num_workers: int = None) -> MetaLoader:
    """Training batches of the config's task: captions (pretrain / train_ret) or QA (train_qa)."""
    workers = config.get("num_workers", 0) if num_workers is None else num_workers
    qa = str(config.get("task", "")).endswith("qa")
    loaders = {}
    for media_type, ds in (qa_train_datasets(config) if qa else train_datasets(config)).items():
        collate = (QACollate(tokenizer, config.max_q_len, config.max_a_len) if qa
                   else CaptionCollate(tokenizer, per_media(config.max_txt_l, media_type)))
        loaders[media_type] = make_loader(ds, per_media(config.batch_size, media_type), collate, rank, world,
                                          shuffle=True, seed=config.get("seed", 42), drop_last=True,
                                          num_workers=workers)
    return MetaLoader(loaders, seed=config.get("seed", 42))


def eval_datasets(config, names=None, kind: str = "caption") -> dict:
    """Evaluation sets named in ``test_types`` (default: every ``test_file`` entry): retrieval sets,
    or with ``kind="mc"`` multiple-choice sets (entries with a list of option captions and ``answer``)."""
    names = list(names or config.get("test_types") or config.test_file.keys())
    out = {}
    for name in names:
        if name not in config.test_file:
            raise AnnotationError(f"config key 'test_types': {name!r} is not in test_file "
                                  f"({', '.join(config.test_file.keys())})")
        (spec,) = corpus_specs(config.test_file[name], key=f"test_file.{name}")
        if kind == "mc":
            out[name] = MCDataset(load_corpus([spec], kind="mc"), media_source(config, spec[2], train=False),
                                  skip_broken=config.get("skip_broken_media_eval", False))
            continue
        out[name] = RetrievalEvalDataset(
            load_corpus([spec]), media_source(config, spec[2], train=False),
            has_multi_vision_gt=config.get("has_multi_vision_gt", False),
            is_paragraph_retrieval=config.get("is_paragraph_retrieval", False),
            skip_broken=config.get("skip_broken_media_eval", False))
    return out
