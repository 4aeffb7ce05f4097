"""``singularity-ds eval ret|mc|qa CONFIG [OVERLAY ...] CHECKPOINT [key=value ...] [--offload]``.

The architecture comes from the checkpoint (an original ``.pth`` -- pretraining or fine-tuned layout,
so zero-shot evaluation of a pretraining checkpoint loads its text weights -- or an exported folder),
and so does the resolution: frames are resized to the checkpoint's ``image_res`` unless ``image_res=N``
is given on the command line (then the position tables are interpolated to N, as the original does).
The data and evaluation settings (``test_file``, ``test_types``, ``video_input.num_frames_test``,
``k_test``, ``eval_frame_ensemble``, ...) come from the config.
Results go to ``output_dir`` (default ``runs/eval/<config>``): ``eval_<split>.json`` per split,
``eval.json`` + ``eval.png`` (recall@K), ``mc_<split>.json`` with every prediction, or for QA
``eval_qa.json`` + ``qa_<split>.json`` (predictions in the VQA submission format).
Launched under ``deepspeed`` / ``torchrun`` / ``srun``, extraction and re-ranking are split across ranks.
"""
import logging
import os

import torch
from omegaconf import OmegaConf

from ..config import load_config, run_folder
from ..config.args import RunUsage, split_run_args
from ..data import corpus_specs, eval_datasets, per_media
from ..dist import rank_world
from ..errors import CheckpointError, ConfigError
from ..fileio import write_json
from .broken import check_not_empty
from .mc import evaluate_mc
from .metrics import recall_table, save_results
from .retrieval import evaluate

logger = logging.getLogger(__name__)
# architecture keys a command line may set for the checkpoint's model (the rest of it is the checkpoint's):
# its resolution (a config file's image_res, the packaged ones say 224, would resize a 32 px model's tables
# for nothing) and the temporal flags the original's README appends for a Singularity-temporal checkpoint
ARCH_KEYS = ("image_res", "add_temporal_embed", "temporal_vision_encoder.")


def model_overrides(config, overrides) -> dict:
    """The architecture keys the command line set, with their values in ``config``, for ``load_model``."""
    given = [o.split("=", 1)[0].strip() for o in overrides]
    return {k: OmegaConf.select(config, k) for k in given if k.startswith(ARCH_KEYS)}


def set_label(config, name: str) -> str:
    """How errors name an evaluation set: its config key and annotation file."""
    return f"test_file.{name} ({corpus_specs(config.test_file[name], key=f'test_file.{name}')[0][0]})"


def checked_datasets(config, names=None, kind: str = "caption") -> dict:
    """``eval_datasets``, every set refused at once if empty, before the first one is evaluated."""
    sets = eval_datasets(config, names, kind=kind)
    for name, ds in sets.items():
        check_not_empty(ds, set_label(config, name))
    return sets


def evaluate_sets(model, config, tokenizer, names=None) -> dict:
    """Retrieval metrics per test set, {name: {"itm": {...}, "itc": {...}, "media", "texts", "skipped_media",
    "skipped_texts"[, "stats"]}} (ITM re-ranked / ITC only, the counts evaluated and left out:
    :func:`~.retrieval.evaluate`), with the config's settings (``eval_offload``, ``eval_x_only`` = ITM on
    every pair, ``k_test``, ``eval_frame_ensemble``, ``skip_broken_media_eval``)."""
    if not config.test_file:
        return {}
    results = {}
    for name, ds in checked_datasets(config, names).items():
        k_test = config.k_test
        if config.eval_x_only:  # the original crashes here (raw_n_image); we score all pairs
            k_test = max(len(ds), len(ds.text))
        res = evaluate(model, ds, tokenizer, per_media(config.max_txt_l, ds.media_type), k_test=k_test,
                       ensemble=config.eval_frame_ensemble,
                       batch_size=per_media(config.batch_size_test, ds.media_type),
                       offload=config.eval_offload,
                       feature_store=config.eval_feature_store,
                       feature_dir=config.eval_feature_dir or os.path.join(config.output_dir or ".",
                                                                                 "eval_features", name),
                       num_frames_test=config.video_input.num_frames_test, name=set_label(config, name),
                       progress=config.progress_bar or None)
        results[name] = {k: v for k, v in res.items() if k not in ("scores", "topk")}  # arrays, for the API
        logger.info("eval %s: %s", name, res["itm"])
    return results


def load_answer_list(config) -> list:
    import json

    from ..errors import AnnotationError
    path = config.answer_list
    try:
        with open(path) as f:
            answers = json.load(f)
    except (OSError, TypeError, ValueError) as e:
        raise AnnotationError(f"answer_list {path}: cannot read a JSON list of answers ({e})") from None
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
        raise AnnotationError(f"answer_list {path}: expected a non-empty JSON list of strings")
    return answers


def evaluate_qa_sets(model, config, tokenizer, names=None) -> dict:
    """QA metrics per test set (predictions written to ``<output_dir>/qa_<split>.json`` by rank 0)."""
    from .qa import evaluate_qa
    answers = load_answer_list(config)
    results = {}
    for name, ds in checked_datasets(config, names, kind="qa").items():
        res = evaluate_qa(model, ds, answers, tokenizer, config.max_q_len, config.max_a_len,
                          k_test=config.k_test, ensemble=config.eval_frame_ensemble,
                          batch_size=per_media(config.batch_size_test, ds.source.media_type),
                          eos=config.eos, name=set_label(config, name))
        if rank_world()[0] == 0 and config.output_dir:
            write_json(res["predictions"], os.path.join(config.output_dir, f"qa_{name}.json"))
        results[name] = {k: v for k, v in res.items() if k != "predictions"}
        logger.info("eval %s: %s %.2f (%d questions, %d with no answer in the list)", name, res["metric"],
                    res["accuracy"], res["questions"], res["missing_answers"])
    return results


def _skipped(res: dict) -> str:
    """`` (left out: N broken media, ...)`` for the printed summary, or nothing."""
    if not res.get("skipped_media"):
        return ""
    extra = {"skipped_texts": "texts", "skipped_questions": "questions"}
    more = "".join(f", {res[k]} {noun}" for k, noun in extra.items() if k in res)
    return f" (left out: {len(res['skipped_media'])} broken media{more})"


def evaluated(config, checkpoint: str) -> str:
    """What was evaluated, for the table and the plot: the model, its frames and their ensemble."""
    frames, ensemble = config.video_input.num_frames_test, config.eval_frame_ensemble
    return f"{checkpoint}: {frames} frame(s), {ensemble} ensemble"


def recall_report(results: dict, config, checkpoint: str) -> str:
    """What ``eval ret`` prints and writes to ``eval.txt``: the demo's recall table, a line per kind of
    scores, and each split's counts."""
    frames = config.video_input.num_frames_test
    splits = list(results)
    head = f"{evaluated(config, checkpoint)}; ITM re-ranks each query's k_test={config.k_test} best by ITC"
    table = recall_table([(kind, frames, {s: results[s][key] for s in splits})
                          for kind, key in (("ITM re-ranked", "itm"), ("ITC only", "itc"))], splits, "scores")
    counts = [f"{s}: {results[s]['media']} media, {results[s]['texts']} texts{_skipped(results[s])}"
              for s in splits]
    return "\n".join([head, table, *counts])


EVAL_FLAGS = {"--offload": "= eval_offload=True: extraction sharded across ranks, features in host memory "
                           "or on disk (eval_feature_store), no N x M matrix (large sets)"}
EVAL_CONFIGS = {"ret": "ret_msrvtt, ret_didemo, ret_anet, ret_ssv2_label, ret_ssv2_template, ret_coco, "
                       "ret_flickr",
                "mc": "ret_msrvtt_mc", "qa": "qa_msrvtt, qa_anet, qa_vqa"}


def eval_usage(kind: str) -> RunUsage:
    return RunUsage(
        f"singularity-ds eval {kind}", "CONFIG [OVERLAY ...] CHECKPOINT [key=value ...] [--offload]",
        {"CONFIG": f"the evaluation's config, a packaged name ({EVAL_CONFIGS[kind]}) or a YAML path: its "
                   "test_file, test_types, video_input.num_frames_test, eval_frame_ensemble, k_test",
         "OVERLAY": "more config names or YAML paths, merged in order",
         "CHECKPOINT": "an original .pth (pretraining: zero-shot, or fine-tuned) or an export folder; the "
                       "architecture and image_res come from it",
         "key=value": "config overrides (test_types=[val,test], video_input.num_frames_test=12, ...); "
                      "image_res and the temporal flags also change the checkpoint's model"},
        {"ret": "Retrieval: ITC ranks, ITM re-ranks each query's k_test best (the original's two stages).",
         "mc": "Multiple choice: the option with the highest ITM score.",
         "qa": "Question answering: the answer list ranked by the answer decoder."}[kind]
        + " Several ranks under deepspeed / torchrun / srun.")


def _split_args(argv, kind="ret"):
    args = split_run_args(argv, bool_flags=EVAL_FLAGS, usage=lambda: eval_usage(kind))
    if len(args.configs) < 2:
        raise ConfigError(f"usage: singularity-ds eval {kind} CONFIG [OVERLAY ...] CHECKPOINT "
                          "[key=value ...] [--offload]  (singularity-ds eval ret --help)")
    overrides = args.overrides + (["eval_offload=True"] if "offload" in args.flags else [])
    return args.configs[:-1], args.configs[-1], overrides


def eval_main(kind: str, argv) -> dict:
    from ..dist import setup
    from ..models import explicit_keys, follow_model_pixels, load_model, model_tokenizer
    configs, checkpoint, overrides = _split_args(list(argv), kind)
    if not os.path.exists(checkpoint):
        raise CheckpointError(f"checkpoint {checkpoint}: no such file or folder")
    config = load_config(configs, overrides)
    for name in config.test_types or config.test_file:  # an unset ${oc.env:...} fails before loading
        if name in config.test_file:
            OmegaConf.to_container(config.test_file[name], resolve=True)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1 or "SLURM_NTASKS" in os.environ
    device = (setup()["device"] if distributed
              else torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    asked = model_overrides(config, overrides)  # the checkpoint's architecture, but what was asked for
    # QA: the QA model (decoder initialised if the file has none); else as the checkpoint holds
    model = load_model(checkpoint, qa=True if kind == "qa" else None, **asked).to(device)
    if model.config.image_res != config.image_res and "image_res" not in asked:
        logger.info("image_res=%d from %s (the config says %d; pass image_res=%d to evaluate at that "
                    "resolution)", model.config.image_res, checkpoint, config.image_res, config.image_res)
    follow_model_pixels(config, model)  # transforms follow the model
    config.image_res = model.config.image_res
    out_dir = run_folder(config.output_dir,
                         os.path.join("runs", "eval", os.path.splitext(os.path.basename(configs[0]))[0]))
    config.output_dir = out_dir
    # the tokenizer the model was trained with (its config's), unless an override or overlay names one
    chosen = "text_encoder" in explicit_keys(config, load_config(configs[:1]), overrides)
    tokenizer = model_tokenizer(model, checkpoint, config.text_encoder if chosen else None)
    rank = rank_world()[0]
    if kind == "ret":
        results = evaluate_sets(model, config, tokenizer)
        if rank == 0 and results:
            report = recall_report(results, config, checkpoint)
            save_results(results, out_dir, title=evaluated(config, checkpoint))
            with open(os.path.join(out_dir, "eval.txt"), "w") as f:
                f.write(report + "\n")
            print(f"{report}\nresults: {out_dir}/eval.json, {out_dir}/eval.txt, {out_dir}/eval.png")
        return results
    if kind == "mc":
        results = {}
        for name, ds in checked_datasets(config, kind="mc").items():
            res = evaluate_mc(model, ds, tokenizer, per_media(config.max_txt_l, "video"),
                              config.eval_frame_ensemble, config.video_input.num_frames_test,
                              name=set_label(config, name))
            results[name] = {k: v for k, v in res.items() if k != "predictions"}
            if rank == 0:
                write_json(res, os.path.join(out_dir, f"mc_{name}.json"))
                print(f"{name}: MC accuracy {res['accuracy']:.2f}% over {res['videos']} videos"
                      f"{_skipped(res)} -> {out_dir}/mc_{name}.json")
        return results
    if kind == "qa":
        results = evaluate_qa_sets(model, config, tokenizer)
        if rank == 0:
            write_json(results, os.path.join(out_dir, "eval_qa.json"))
            for name, res in results.items():
                print(f"{name}: {res['metric']} {res['accuracy']:.2f}% over {res['questions']} questions "
                      f"({res['missing_answers']} with no answer in the list){_skipped(res)} "
                      f"-> {out_dir}/qa_{name}.json")
        return results
    raise ConfigError(f"unknown evaluation {kind!r}; expected ret, mc or qa")
