"""Data: annotations -> media readers -> transforms -> datasets -> loaders, built from a config.

    loader = caption_train_loader(config, tokenizer, rank, world)   # MetaLoader over image/video corpora
    for media_type, batch in loader: ...

Modules: ``annotations`` (corpora), ``readers`` (decoding backends + frame sampling), ``transforms``,
``media`` (MediaSource, ClipPlanner), ``datasets``, ``loader`` (samplers, collation, MetaLoader),
``shards`` (tar-shard corpora), ``builders`` (all of it from a config), ``text`` (tokenisation),
``worker_errors`` (a loader worker's user error raised whole in the main process).
This file only re-exports their public names.
"""
from .annotations import AnnotationStore, corpus_specs, load_corpus, read_annotations
from .builders import (
    caption_train_datasets,
    caption_train_loader,
    dali_finish,
    eval_datasets,
    media_source,
    per_media,
    qa_train_datasets,
    qa_train_loader,
    shard_stream,
    train_source,
)
from .datasets import CaptionDataset, MCDataset, QADataset, RetrievalEvalDataset
from .loader import CaptionCollate, MetaLoader, QACollate, SeededSampler, collate_qa, make_loader
from .media import ClipPlan, ClipPlanner, MediaSource
from .readers import get_frame_indices, get_reader, load_image, read_frames
from .shards import ShardStream, is_shard_source, make_shards, shard_list
from .text import build_tokenizer, pre_text, tokenize
from .transforms import build_transform

__all__ = [
    "AnnotationStore", "corpus_specs", "load_corpus", "read_annotations",
    "caption_train_datasets", "caption_train_loader", "dali_finish", "eval_datasets", "media_source",
    "per_media", "qa_train_datasets", "qa_train_loader", "shard_stream", "train_source",
    "CaptionDataset", "MCDataset", "QADataset", "RetrievalEvalDataset",
    "CaptionCollate", "MetaLoader", "QACollate", "SeededSampler", "collate_qa", "make_loader",
    "ClipPlan", "ClipPlanner", "MediaSource",
    "get_frame_indices", "get_reader", "load_image", "read_frames",
    "ShardStream", "is_shard_source", "make_shards", "shard_list",
    "build_tokenizer", "pre_text", "tokenize",
    "build_transform",
]
