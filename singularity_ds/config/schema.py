"""Every config key: its type, default, accepted values and one-line doc, in one place.

The keys are the original Singularity's (its ``configs/*.yaml``) plus singularity-ds's own, grouped
as the YAML files nest them (``video_input.num_frames``, ``optimizer.lr``, ...). The packaged task
configs set the values each task needs; a key they leave out takes the default here. Where the
original's task configs disagree (``num_workers`` 12/16/24, ``scheduler.epochs`` 10/5, ...), the
default is its ``pretrain.yaml`` value; where a key's absence meant "off" in the code (``loss_weight.mlm``
absent from retrieval and QA configs: no MLM head), the default keeps it off. Defaults that replace a
different one in the code's ``config.get(key, default)``: ``batch_size_test`` {100, 100} (32 and 16),
``video_input.num_frames_test`` 4 (1), ``mlm_prob`` 0.5 (0.15), ``num_workers`` 12 (0); the QA keys
take the video QA configs' values (``max_a_len`` 5; VQA sets 6).

Why plain dataclasses (as torchtitan's job_config) and not OmegaConf structured configs:

- several keys take values OmegaConf cannot type: ``max_txt_l`` / ``batch_size`` an integer or
  ``{image, video}``, ``train_file`` a corpus or a list of corpora, ``resume`` a boolean or a tag.
  Structured configs only allow unions of primitives, so these would become ``Any``, unchecked;
- a structured (typed, struct-mode) DictConfig changes how the config behaves downstream: it converts
  values (an integer ``warmup_epochs`` becomes a float), rejects the extra keys an original checkpoint
  stores, and reports a bad value in OmegaConf's multi-line wording. The config built here stays a plain
  DictConfig, so interpolation (``${available_corpus[${train_corpus}]}``, ``${oc.env:SL_DATA_DIR}``)
  resolves as in the original, and a wrong key or value is one line naming it (config/check.py);
- ranges and choices need checking either way, and OmegaConf has no notion of them.

A key is ``key(default, doc, ge=/gt=/le=, choices=, pattern=)``; a group of keys is a dataclass.
``keys()`` lists every key (dotted) with its type and metadata, for loading (config/load.py),
checking (config/check.py) and the reference table (``singularity-ds config-docs``, docs/config.md).
"""
import copy
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, NamedTuple, Optional, Tuple

# A corpus: [annotation JSON, media folder] (images), [anno, folder, video], [shard index.json, null, video].
CorpusSpec = list[Optional[str]]
# fpsX: frames sampled at X per second (X > 0, e.g. fps0.5); data/readers/sampling.py reads it.
FPS = (r"fps(?=[0-9.]*[1-9])(\d+\.?\d*|\.\d+)", "fpsX")
SAMPLE_TYPES = ("rand", "middle", "uniform")
# Choices the code checks too (where a value can also arrive outside a config): defined once, here.
READERS = ("decord", "av", "dali", "auto")
PRECISIONS = ("auto", "bf16", "amp_bf16", "fp16", "fp32")
ATTENTION_IMPLS = ("auto", "triton", "sdpa", "math")
ENSEMBLES = ("concat", "mean", "max", "lse")


def key(default, doc: str, *, ge=None, gt=None, le=None, choices: Tuple[str, ...] = None,
        pattern: Tuple[str, str] = None):
    """A config key. ``ge``/``gt``/``le`` bound a number (or each value of an ``{image, video}`` pair, or
    each element of a list); ``choices`` (and ``pattern``: (regex, how the docs show it)) list the strings
    it accepts."""
    meta = dict(doc=doc, ge=ge, gt=gt, le=le, choices=choices, pattern=pattern)
    if isinstance(default, (list, dict)) or dataclasses.is_dataclass(default):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return field(default=default, metadata=meta)


def group(cls):
    """A nested group of keys (a YAML mapping); its doc is the class's docstring."""
    return field(default_factory=cls, metadata=dict(doc=cls.__doc__))


@dataclass
class PerMedia:
    """A value given per media type (the original's ``{image: .., video: ..}``)."""
    image: int = field(metadata=dict(doc="for image corpora"))
    video: int = field(metadata=dict(doc="for video corpora"))


@dataclass
class VideoInput:
    """How clips are read and sampled."""
    num_frames: int = key(1, "frames sampled per training clip (also the number of temporal embeddings)",
                          ge=1)
    reader: str = key("decord", "video decoder: decord, av (PyAV / FFmpeg), dali (NVIDIA DALI), auto (DALI "
                                "when installed, decord for what it cannot decode)",
                      choices=READERS)
    sample_type: str = key("rand", "training frame sampling: rand (one random frame per segment), middle / "
                                   "uniform (segment centres), fpsX (X frames per second)",
                           choices=SAMPLE_TYPES, pattern=FPS)
    num_frames_test: int = key(4, "frames per clip at evaluation", ge=1)
    sample_type_test: str = key("middle", "evaluation frame sampling (as sample_type)",
                                choices=SAMPLE_TYPES, pattern=FPS)
    dali_device: Optional[str] = key(None, "training clips decoded and augmented per batch by DALI on this "
                                           "device, in the main process (loader workers only plan them); "
                                           "null: per clip in the workers", choices=("gpu", "cpu"))


@dataclass
class TemporalVisionEncoder:
    """The transformer over frame features (second-stage temporal pretraining)."""
    enable: bool = key(False, "encode the frames' tokens jointly across time before the fusion layers")
    num_layers: int = key(2, "its layers (built from the BERT config, without cross-attention)", ge=1)
    update_pooler_embed: bool = key(False, "also update the pooled [CLS] frame embedding through it")


@dataclass
class LossWeight:
    """Weights of the training losses (0 turns a loss off)."""
    itc: float = key(1.0, "image/video-text contrastive loss", ge=0)
    mlm: float = key(0.0, "masked language modelling (> 0 builds the MLM head; pretraining sets 1)", ge=0)
    itm: float = key(1.0, "image/video-text matching loss", ge=0)


@dataclass
class DifferentLr:
    """A separate learning rate for some modules (e.g. newly added ones)."""
    enable: bool = key(False, "use `lr` below for parameters whose name contains one of `module_names`")
    module_names: list[str] = key(["temporal_vision_encoder"], "substrings of parameter names that get `lr`")
    lr: float = key(1e-3, "their learning rate", ge=0)


@dataclass
class Optimizer:
    """The optimizer (AdamW; decoupled weight decay, none on biases and norms)."""
    opt: str = key("adamW", "optimizer name; only adamW is implemented")
    lr: float = key(1e-4, "peak learning rate", ge=0)
    opt_betas: list[float] = key([0.9, 0.999], "AdamW betas")
    weight_decay: float = key(0.02, "weight decay of matrices (biases and norms get none)", ge=0)
    max_grad_norm: float = key(-1.0, "clip gradients to this global norm; -1 (any value <= 0) disables "
                                     "clipping")
    different_lr: DifferentLr = group(DifferentLr)


@dataclass
class Scheduler:
    """The learning-rate schedule: linear warmup, then cosine decay to optimizer.lr * min_lr_multi."""
    sched: str = key("cosine", "schedule name; only cosine is implemented")
    epochs: int = key(10, "training epochs", ge=0)
    min_lr_multi: float = key(0.01, "final learning rate as a fraction of optimizer.lr", ge=0)
    warmup_epochs: float = key(1.0, "linear warmup length in epochs (fractions allowed)", ge=0)


@dataclass
class Wandb:
    """Weights & Biases logging (the original's keys): the scalars TensorBoard gets, to W&B too."""
    enable: bool = key(False, "log the training / evaluation scalars to W&B as well as TensorBoard (needs "
                              "`pip install singularity-ds[wandb]`; WANDB_MODE=offline: local run files)")
    entity: Optional[str] = key(None, "W&B user or team")
    project: str = key("pretrain", "W&B project")


@dataclass
class Config:
    """Every key of a singularity-ds config."""
    # --- data: corpora (the original's layout: interpolated from $SL_DATA_DIR)
    data_root: Optional[str] = key(
        "${oc.env:SL_DATA_DIR}/videos_images", "folder of the media folders (the corpora interpolate it)")
    anno_root_pt: Optional[str] = key(
        "${oc.env:SL_DATA_DIR}/anno_pretrain", "folder of the pretraining annotations")
    anno_root_downstream: Optional[str] = key(
        "${oc.env:SL_DATA_DIR}/anno_downstream", "folder of the downstream (retrieval, QA) annotations")
    available_corpus: Dict[str, Any] = key({}, "named corpora: `name: [anno_json, media_dir(, video)]`, or "
                                               "a list of them for a combination (open: add your own)")
    train_corpus: Optional[str] = key(None, "the available_corpus entry pretraining uses (train_file "
                                            "interpolates it)")
    train_file: Optional[CorpusSpec | list[CorpusSpec]] = key(
        None, "training corpus `[anno_json, media_dir(, video)]` (or `[shard index.json, null, video]`), or "
              "a list of them; checked where read")
    train_corpus_weights: Optional[list[float]] = key(
        None, "shard corpora: a sampling weight per train_file corpus, in its order (OpenCLIP's "
              "--train-data-upsampling-factors): epochs draw shards with replacement, a sample of corpus i "
              "weight_i times as often as in the plain union (expected share weight_i x samples_i / "
              "sum_j weight_j x samples_j); 0 leaves a corpus out; null: each sample once per epoch",
        ge=0)
    samples_per_epoch: Optional[int] = key(
        None, "shard corpora: samples per epoch over all ranks, drawn with replacement and split over the "
              "media types by their weighted sizes (OpenCLIP's --train-num-samples); null: the corpora's "
              "total (with train_corpus_weights) or every sample once", ge=1)
    test_file: Dict[str, CorpusSpec] = key({}, "evaluation sets: `name: corpus` (open: add your own)")
    test_types: list[str] = key([], "the test_file entries evaluated (empty: all of them)")
    stop_key: Optional[str] = key(None, "the original's test_file entry that picks the best checkpoint; "
                                        "unused here (a run keeps its last)")
    caption_type: Optional[str] = key(None, "SSV2 captions (interpolated into its corpus paths)",
                                      choices=("label", "template"))
    answer_list: Optional[str] = key(None, "QA: JSON list of the candidate answers ranked at evaluation")
    dataset_name: Optional[str] = key(None, "QA: the original's dataset name (vqa, msrvtt, anet); unused")
    has_multi_vision_gt: bool = key(False, "one text, several ground-truth videos (SSV2): they share an "
                                           "idx, never negatives of each other")
    is_paragraph_retrieval: bool = key(False, "caption lists are joined into one paragraph (DiDeMo, "
                                              "ActivityNet)")
    shard_shuffle_buffer: int = key(500, "shard corpora: raw samples each loader worker holds to shuffle "
                                         "(memory: x sample size)", ge=1)
    media_retries: int = key(3, "training: a broken clip is replaced by another random item, up to this "
                                "many tries", ge=0)
    skip_broken_media_eval: bool = key(False, "evaluation: leave broken media out (with the texts / "
                                              "questions left without one), counted and listed in the "
                                              "results, instead of stopping with their paths")
    media_outside_dir: bool = key(False, "accept annotation media paths that are absolute or leave the "
                                         "corpus's media folder with '..' (read as written); off: such a "
                                         "path is refused at start-up, naming the file and entry")
    num_workers: int = key(12, "data loader worker processes per rank (0: load in the main process)", ge=0)
    # --- model
    task: Optional[str] = key(None, "set by `singularity-ds train TASK` (pretrain, train_ret, train_qa); a "
                                    "name ending in qa builds the QA model (answer decoder)")
    text_encoder: str = key("bert-base-uncased", "text tower: tokenizer name, and the local Hugging Face "
                                                 "folder or Hub repo id its weights load from "
                                                 "(tower_init=pretrained)")
    text_decoder: Optional[str] = key(None, "QA: the original's decoder name; unused here (the decoder is "
                                            "built from the text tower's config)")
    bert_config: Optional[str] = key(
        "configs/config_bert.json", "BERT architecture JSON (a path, or a file shipped in "
                                    "singularity_ds/configs/arch/); null: the text_encoder folder's "
                                    "config.json")
    bert_config_dict: Optional[Dict[str, Any]] = key(None, "inline BERT architecture (as original "
                                                           "checkpoints store it); wins over bert_config")
    text_decoder_config_dict: Optional[Dict[str, Any]] = key(
        None, "inline QA decoder architecture (as original checkpoints store it); default: derived from the "
              "text tower's")
    fusion_layer: Optional[int] = key(None, "override the BERT config's fusion_layer (first layer with "
                                            "cross-attention; needed for a plain HF BERT config)", ge=0)
    vit_type: str = key("beit", "vision tower family: beit, vit, deit (the original's; they also pick the "
                                "pixel normalisation) or timm (any timm ViT named by timm_model; its "
                                "pretrained_cfg gives the normalisation)",
                        choices=("beit", "vit", "deit", "timm"))
    vit_zoo: Dict[str, Optional[str]] = key({"beit": "microsoft/beit-base-patch16-224-pt22k-ft22k",
                                             "timm": "${timm_model}"},
                                            "vit_type -> pretrained vision tower name (open: add your own)")
    vit_name_or_pretrained_path: Optional[str] = key(
        "${vit_zoo[${vit_type}]}", "vision tower: local Hugging Face folder or Hub repo id (its "
                                   "architecture JSON shipped, cached or downloaded)")
    beit_config_dict: Optional[Dict[str, Any]] = key(None, "inline BEiT architecture (as original "
                                                           "checkpoints store it); wins over "
                                                           "vit_name_or_pretrained_path")
    vit_config_dict: Optional[Dict[str, Any]] = key(None, "inline ViT/DeiT architecture; wins over "
                                                          "vit_name_or_pretrained_path")
    timm_model: Optional[str] = key(
        None, "vit_type=timm: the tower as timm names it (NAME or NAME.TAG from timm.list_pretrained(), e.g. "
              "vit_base_patch16_clip_224.openai), a Hub repo in timm's layout (org/name or hf-hub:org/name) "
              "or a local folder in it (config.json + model.safetensors)")
    timm_model_args: Dict[str, Any] = key({}, "vit_type=timm: extra timm.create_model keyword arguments "
                                              "(drop_path_rate; embed_dim / depth / num_heads for a small "
                                              "random tower)")
    timm_config_dict: Optional[Dict[str, Any]] = key(
        None, "inline timm tower (architecture, model_args, pretrained_cfg pixel statistics), as exports "
              "store it; wins over timm_model")
    tower_init: str = key("pretrained", "where the towers start without pretrained_path: pretrained (from "
                                        "text_encoder / vit_name_or_pretrained_path or timm_model: local "
                                        "folders, or Hub repo ids downloaded into the HF cache; "
                                        "HF_HUB_OFFLINE=1: the cache only), pretrained_text (the text "
                                        "tower so, the vision tower random: a pretrained BERT on a new ViT) "
                                        "or random (BERT-style init; a timm tower: timm's own init)",
                          choices=("pretrained", "pretrained_text", "random"))
    temporal_vision_encoder: TemporalVisionEncoder = group(TemporalVisionEncoder)
    add_temporal_embed: bool = key(False, "add learned temporal embeddings to the encoded frames")
    image_res: int = key(224, "input resolution in pixels (square; a multiple of the patch size)", ge=1)
    random_flip: bool = key(True, "training augmentation flips images and clips horizontally half the time "
                                  "(the original's); False where captions name left and right (SSV2's "
                                  "templates, the demo's motion captions), which a flipped clip contradicts")
    embed_dim: int = key(256, "width of the contrastive (ITC) projections", ge=1)
    attention_impl: str = key("auto", "attention kernel: auto (Triton for forward-only attention on CUDA, "
                                      "else SDPA), triton, sdpa or math",
                              choices=ATTENTION_IMPLS)
    gradient_checkpointing: bool = key(False, "recompute each transformer layer's activations in backward "
                                              "(both towers)")
    # --- text and inputs
    video_input: VideoInput = group(VideoInput)
    max_txt_l: int | PerMedia = key(PerMedia(32, 32), "caption length in tokens (once, or per media type)",
                                    ge=1)
    max_q_len: int = key(25, "QA: question length in tokens", ge=1)
    max_a_len: int = key(5, "QA: answer length in tokens", ge=1)
    eos: str = key("[SEP]", "QA: the token that ends an answer")
    # --- objectives
    temp: float = key(0.07, "initial ITC temperature (a learned parameter)", gt=0)
    mlm_prob: float = key(0.5, "fraction of caption tokens masked for MLM", ge=0, le=1)
    loss_weight: LossWeight = group(LossWeight)
    itm_hard_neg: bool = key(True, "ITM negatives drawn by ITC similarity (else uniformly among "
                                   "non-positives)")
    itc_gather: bool = key(False, "ITC against every rank's batch (with gradient); the original uses the "
                                  "local batch")
    # --- batches and evaluation
    batch_size: int | PerMedia = key(PerMedia(128, 96), "training batch per rank (once, or per media type)",
                                     ge=1)
    batch_size_test: int | PerMedia = key(
        PerMedia(100, 100), "evaluation batch per rank (once, or per media type)", ge=1)
    k_test: int = key(128, "retrieval: candidates per query re-ranked by ITM (QA: answers re-ranked)", ge=1)
    eval_frame_ensemble: str = key("concat", "scores with more test than training frames: concat (frames "
                                             "joined before the fusion layers) or mean / max / lse of "
                                             "per-frame scores", choices=ENSEMBLES)
    eval_x_only: bool = key(False, "retrieval: ITM on every pair (k_test = all) instead of the ITC top k")
    eval_offload: bool = key(False, "retrieval: keep evaluation features off the accelerator "
                                    "(eval_feature_store=cpu)")
    eval_feature_store: Optional[str] = key(None, "where evaluation token features live: device, cpu or "
                                                  "disk (null: device, or cpu with eval_offload)",
                                            choices=("device", "cpu", "disk"))
    eval_feature_dir: Optional[str] = key(None, "disk store folder (shared between nodes); null: "
                                                "<output_dir>/eval_features/<split>")
    evaluate: bool = key(False, "the original's evaluate-only switch; unused here (`singularity-ds eval`)")
    # --- optimisation
    optimizer: Optimizer = group(Optimizer)
    scheduler: Scheduler = group(Scheduler)
    # --- run and engine
    output_dir: Optional[str] = key(None, "run folder (checkpoints, logs, results); null: runs/<task>; a "
                                                "relative one lies under $SL_EXP_DIR when that is set")
    resume: bool | str = key(False, "continue a run in output_dir: True / auto (latest checkpoint) or a "
                                    "checkpoint tag")
    resume_allow_data_change: bool = key(False, "resume although a training annotation file changed since "
                                                "the checkpoint (entries added or removed): the "
                                                "interrupted epoch continues at its position in the new "
                                                "data's order")
    pretrained_path: Optional[str] = key(None, "start from this checkpoint (an original .pth or an export "
                                               "folder)")
    overwrite: bool = key(False, "replace an existing output_dir (else it must be new, or resumed)")
    seed: int = key(42, "random seed (data order, augmentation, initialisation)")
    ds_config: str = key("zero2", "DeepSpeed config: a file in ds_configs/ (name or path); batch size, "
                                  "accumulation, clipping and precision are filled from this config")
    precision: str = key("auto", "auto (bf16 where the device computes it natively, else fp32; fp16 on a "
                                 "GPU without bf16 when fp16 is set), bf16, amp_bf16 (fp32 weights, bf16 "
                                 "autocast), fp16 or fp32",
                         choices=PRECISIONS)
    fp16: bool = key(True, "the original's mixed precision switch: read by precision=auto on GPUs without "
                           "bf16")
    compile: bool = key(False, "torch.compile the model (inductor, in place; the first steps compile)")
    gradient_accumulation_steps: int = key(1, "micro-batches per optimizer step", ge=1)
    max_steps: int = key(-1, "stop after this many optimizer steps (smoke runs); -1: scheduler.epochs", ge=-1)
    save_every_steps: int = key(0, "also checkpoint every N optimizer steps (0: at epoch ends only)", ge=0)
    save_every_epochs: int = key(1, "checkpoint at the end of every Nth epoch (and always after the last)",
                                 ge=1)
    keep_last_checkpoints: int = key(2, "checkpoints kept in output_dir (older ones are deleted)", ge=1)
    max_nonfinite_steps: int = key(10, "stop the run after this many optimizer steps in a row with a NaN/Inf "
                                       "loss (each is skipped: no update; none writes a checkpoint)", ge=1)
    dist_timeout: float = key(600, "seconds a collective waits for the other ranks: a rank that outlives a "
                                   "killed or frozen one stops after at most this long, naming it", gt=0)
    log_freq: int = key(100, "log training losses every N steps", ge=1)
    progress_bar: bool = key(False, "force the tqdm bar when stderr is not a terminal")
    device: str = key("cuda", "the original's device; unused (the launcher and CUDA availability decide)")
    dist_url: str = key("env://", "the original's torch.distributed init URL; unused here (DeepSpeed / "
                                  "SLURM environment)")
    distributed: bool = key(True, "the original's distributed switch; unused here (WORLD_SIZE decides)")
    debug: bool = key(False, "the original's debug switch; unused here")
    wandb: Wandb = group(Wandb)


class Key(NamedTuple):
    """One dotted key of the schema, with its type and what it accepts."""
    path: str
    type: Any
    default: Any  # plain (dicts and lists; a group's default is its mapping)
    doc: str
    ge: Any = None
    gt: Any = None
    le: Any = None
    choices: Optional[Tuple[str, ...]] = None
    pattern: Optional[Tuple[str, str]] = None
    group: Optional[type] = None  # the dataclass whose keys nest under this one (a group, or {image, video})
    member: bool = False  # a key of a union's mapping form ({image, video}): present only in that form


def group_of(tp) -> Optional[type]:
    """The dataclass a key's value may be a mapping of (the type itself, or one arm of a union)."""
    if dataclasses.is_dataclass(tp):
        return tp
    for arm in typing.get_args(tp) if is_union(tp) else ():
        if dataclasses.is_dataclass(arm):
            return arm
    return None


def is_union(tp) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def _walk(cls, prefix: str, default: dict, inherited: dict, member: bool):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, meta = hints[f.name], dict(f.metadata, **{k: v for k, v in inherited.items() if v is not None})
        sub = group_of(tp)
        yield Key(prefix + f.name, tp, default.get(f.name), meta["doc"], meta.get("ge"), meta.get("gt"),
                  meta.get("le"), meta.get("choices"), meta.get("pattern"), sub, member)
        if sub is not None:
            # An {image, video} pair inherits its key's bounds; a group's keys have their own.
            union = sub is not tp
            bounds = {k: meta.get(k) for k in ("ge", "gt", "le")} if union else {}
            sub_default = default.get(f.name) if isinstance(default.get(f.name), dict) else {}
            yield from _walk(sub, prefix + f.name + ".", sub_default, bounds, member or union)


_KEYS: Dict[str, Key] = {}


def keys() -> Dict[str, Key]:
    """Every key of the schema by dotted path, groups before their keys, in declaration order."""
    if not _KEYS:
        _KEYS.update((k.path, k) for k in _walk(Config, "", defaults(), {}, False))
    return _KEYS


def defaults() -> dict:
    """The whole config at its defaults, as plain (OmegaConf-ready) containers."""
    return dataclasses.asdict(Config())
