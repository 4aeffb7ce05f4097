"""``make demo``: the paper's point in miniature, on the synthetic corpus, on CPU.

1. generate the synthetic corpus (appearance and motion captions; 108 motion/order test captions);
2. pretrain the single-frame model (2 ranks, ZeRO-2, DeepSpeed launcher): tiny random towers;
3. second-stage temporal pretraining from it (4 frames, temporal embeddings + temporal encoder);
4. fine-tune both for retrieval (on the motion/order captions; the ITM head and fusion layer at 3e-3);
5. evaluate both with 1 and 4 inference frames on the appearance and motion test splits, and search
   the motion test clips with one text (``SEARCH``) as a user would: ``Index.build`` + ``search``.
Every stage is a real ``deepspeed`` launch of ``singularity-ds train``; logs, TensorBoard files and
checkpoints stay in the run folder.
"""
import glob
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import time

import torch

from .config import load_config
from .data import build_tokenizer, eval_datasets
from .data.synthetic import make_synthetic
from .dist import free_port
from .errors import ConfigError, SingularityError
from .eval.metrics import recall_table, save_results
from .eval.retrieval import evaluate
from .models import load_model

# random_flip=False: the motion captions name left and right, which a mirrored clip contradicts (with the
# original's flip, half the "left to right" training pairs show a clip moving right to left)
TINY = ["image_res=64", "random_flip=False", "num_workers=0", "optimizer.lr=1e-3",
        "optimizer.weight_decay=0.02", "scheduler.warmup_epochs=1", "log_freq=50", "save_every_epochs=10"]
# retrieval fine-tuning: the ITM head and the cross-attention (fusion) layer at 3x the towers' lr; with
# one fusion layer of width 128 the re-ranker otherwise stays near chance within the demo's budget
RET_ITM_LR = ["optimizer.different_lr.enable=True", "optimizer.different_lr.lr=3e-3",
              "optimizer.different_lr.module_names=[itm_head,crossattention]"]
SEARCH = "a red square moves from left to right"  # one clip of the motion test split matches it
TEMPORAL = ["video_input.num_frames=4", "add_temporal_embed=True", "temporal_vision_encoder.enable=True",
            "temporal_vision_encoder.num_layers=1", "temporal_vision_encoder.update_pooler_embed=True"]


def launch(name, args, run_dir, ranks=2):
    """One 2-rank DeepSpeed launch of `singularity-ds train`: the launcher's output goes to <run>/<name>.log,
    each rank's to <run>/<name>.ranks/<time>_rank<N>.log."""
    out = os.path.join(run_dir, name)
    launcher = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    # a log per rank: a rank's stderr into a file writes through piece by piece, so two ranks' tracebacks
    # in one file interleave mid-line ("ImportErrorImportError: : ...")
    ranks_dir = out + ".ranks"
    shutil.rmtree(ranks_dir, ignore_errors=True)
    cmd = [launcher, "--num_accelerators", str(ranks), "--master_port", str(free_port()),
           "--enable_each_rank_log", ranks_dir, "--module",
           "singularity_ds", "train", *args, f"output_dir={out}", "overwrite=True", "ds_config=zero2"]
    start = time.time()
    with open(out + ".log", "w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode:
        rank_logs = sorted(glob.glob(os.path.join(ranks_dir, "*.log")))
        raise SingularityError(f"demo stage {name} failed (exit {proc.returncode}): "
                               f"{last_error_line(out + '.log', *rank_logs)} "
                               f"(logs: {out}.log and {ranks_dir}/)")
    print(f"  {name:<14s} {time.time() - start:6.0f} s   -> {out}", flush=True)
    return out


# a rank's one-line error, and the last line of a Python traceback ("ImportError: cannot import name ...")
ONE_LINE = re.compile(r"singularity-ds: error: .*")
EXCEPTION = re.compile(r"(?:[A-Za-z_][\w.]*\.)?[A-Za-z_]\w*(?:Error|Exception|Interrupt|Exit)\b(?::.*)?")
# the launcher's own report of a rank's exit status, which names no cause
LAUNCHER = ("subprocess.CalledProcessError",)


def last_error_line(*log_paths: str) -> str:
    """The line of a failed stage's logs (the launcher's, then each rank's) that says why: a
    ``singularity-ds: error:`` line of the ranks, else a traceback's exception line (not the launcher's exit
    report), else the last line; of several, the one most ranks printed (the last of equals). Rank prefixes
    (``[rank0]:``) are dropped."""
    lines = []
    for log_path in log_paths:
        try:
            with open(log_path, errors="replace") as f:
                lines += [re.sub(r"^\[rank\d+\]:\s*", "", line.strip()) for line in f]
        except OSError as e:
            return f"its log cannot be read ({e.strerror}: {log_path})"
    lines = [line for line in lines if line]
    for pattern in (ONE_LINE, EXCEPTION):
        found = [m.group(0) for line in lines if not line.startswith(LAUNCHER)
                 for m in [pattern.search(line) if pattern is ONE_LINE else pattern.fullmatch(line)] if m]
        if found:  # every rank prints the same line: the one most ranks printed, the last of equals
            return max(reversed(found), key=found.count)
    return lines[-1] if lines else "its log is empty"


SPLITS = ("appearance", "motion")


def evaluate_model(export, data_cfg, frames, splits=SPLITS):
    """-> {"itm": {split: metrics} (ITM re-ranked), "itc": {split: metrics} (ITC only)}."""
    model = load_model(os.path.join(export, "export"))
    cfg = load_config(["ret_msrvtt", "tiny", data_cfg],
                      TINY + ["max_txt_l=16", f"video_input.num_frames_test={frames}"])
    tok = build_tokenizer(model.config.text_encoder)
    out = {"itm": {}, "itc": {}}
    for name, ds in eval_datasets(cfg, list(splits)).items():
        res = evaluate(model, ds, tok, 16, k_test=16, ensemble="concat", num_frames_test=frames)
        out["itm"][name], out["itc"][name] = res["itm"], res["itc"]
    save_results({name: {"itm": out["itm"][name], "itc": out["itc"][name]} for name in out["itm"]},
                 os.path.join(export, "eval"), f"eval_{frames}frames",
                 title=f"{os.path.basename(export)}: {frames} frame(s), concat")
    return out


def search_motion_clips(run, data, frames, k=5) -> dict:
    """What a user does with the model: `embed` the motion test clips (the annotation file, captions
    kept) into an index in <run>/index_<frames>f, then `search SEARCH -k 5` (ITC; the product's code
    path, :class:`~singularity_ds.search.Index`). -> {"top": the hits' captions, "rank": of the first
    clip whose caption is SEARCH among all the clips}."""
    from .search import Index
    meta = json.load(open(os.path.join(data, "synthetic.json")))
    model = load_model(os.path.join(run, "export"), **{"video_input.num_frames_test": frames})
    index = Index.build(model, meta["files"]["ret_test_motion"], os.path.join(run, f"index_{frames}f"),
                        frames=frames, batch_size=36, media_dir=meta["videos"], progress=False)
    hits = index.search(SEARCH, k=len(index.items))
    rank = next(h["rank"] for h in hits if SEARCH in h["caption"].split(" | "))
    return dict(top=[h["caption"] for h in hits[:k]], rank=rank, clips=len(hits))


def ensure_corpus(run_dir, num_clips=864, test_fraction=0.125) -> str:
    """The demo's synthetic corpus in <run_dir>/data (generated once; seeded, so always the same): every
    colour x shape x background combination twice, on two background shades (144 groups); an eighth of
    the groups (one per colour and shape) are the test split, 108 motion/order captions. The repeat is
    what makes shape learnable: with each combination once, the 47 training groups let the tiny ViT tell
    a group by its background shade, and shape stayed at chance on the test groups (measured)."""
    data = os.path.join(run_dir, "data")
    meta = os.path.join(data, "synthetic.json")
    want = dict(num_clips=num_clips, size=64, frames=16, test_fraction=test_fraction)
    if not (os.path.isfile(os.path.join(data, "shards", "image", "index.json")) and os.path.isfile(meta)
            and all(json.load(open(meta)).get(k) == v for k, v in want.items())
            and os.path.isfile(os.path.join(data, "configs", "ret_motion.yaml"))):
        shutil.rmtree(data, ignore_errors=True)
        make_synthetic(data, workers=2, **want)
    return data


def stage_args(data, shards=False, motion_finetune=False):
    """The demo's pretraining and retrieval arguments (epochs, frames and checkpoints are added per stage),
    and the retrieval overlay its evaluation reads. ``motion_finetune``: retrieval trains on the
    motion/order captions only (the ``ret_motion.yaml`` overlay; see :mod:`..data.synthetic`)."""
    pt_cfg, ret_cfg = os.path.join(data,
                                   "configs", "pretrain.yaml"), os.path.join(data, "configs", "ret.yaml")
    common = ["tiny", *TINY, "batch_size.video=32", "batch_size.image=8"]
    pt_args = ["pretrain", *common, pt_cfg, "max_txt_l.image=16", "max_txt_l.video=16",
               f"train_corpus={'synthetic_shards' if shards else 'synthetic'}"]
    ret_args = ["train_ret", *common, ret_cfg, "max_txt_l=16", "test_types=[appearance]", "k_test=16"]
    if motion_finetune:
        ret_args.insert(ret_args.index(ret_cfg) + 1, os.path.join(data, "configs", "ret_motion.yaml"))
    return pt_args, ret_args, ret_cfg


def run_demo(run_dir="runs/demo", epochs_pt=(17, 25), epochs_ret=22, shards=False, seed=42,
             extra=()) -> str:
    """``shards``: the pretraining stages stream the corpus from its tar shards
    (``train_corpus=synthetic_shards``); ``seed``: every stage's (the corpus is always the same);
    ``extra``: more ``key=value`` for every stage."""
    start = time.time()
    torch.set_num_threads(1)
    os.makedirs(run_dir, exist_ok=True)
    data = ensure_corpus(run_dir)
    print(f"singularity-ds demo: synthetic corpus in {data}; stages (2 CPU ranks, ZeRO-2):", flush=True)
    pt_args, ret_args, ret_cfg = stage_args(data, shards, motion_finetune=True)
    common = [f"seed={seed}", *extra]
    pt_args, ret_args = [*pt_args, *common], [*ret_args, *common]
    pt1 = launch("pretrain_1f", [*pt_args, f"scheduler.epochs={epochs_pt[0]}"], run_dir)
    pt4 = launch("pretrain_4f", [*pt_args, *TEMPORAL, f"scheduler.epochs={epochs_pt[1]}",
                                 f"pretrained_path={pt1}/export"], run_dir)
    ret_args = [*ret_args, *RET_ITM_LR, f"scheduler.epochs={epochs_ret}"]
    ret1 = launch("ret_1f", [*ret_args, f"pretrained_path={pt1}/export"], run_dir)
    ret4 = launch("ret_4f", [*ret_args, *TEMPORAL, f"pretrained_path={pt4}/export"], run_dir)
    rows = []
    for label, run in (("single-frame", ret1), ("temporal", ret4)):
        for frames in (1, 4):
            rows.append((label, frames, evaluate_model(run, ret_cfg, frames)))
    text = ("ITM re-ranked (the original's reported metric):\n"
            + recall_table([(m, f, r["itm"]) for m, f, r in rows], SPLITS)
            + "\n\nITC only (dual encoder):\n" + recall_table([(m, f, r["itc"]) for m, f, r in rows], SPLITS))
    print("\nText-to-video (t2v) and video-to-text (v2t) recall on the synthetic test splits\n" + text)
    for (label, run), frames in itertools.product((("single-frame", ret1), ("temporal", ret4)), (1, 4)):
        found = search_motion_clips(run, data, frames)
        print(f"\nsearch {SEARCH!r} over the {found['clips']} motion test clips, {label} model, {frames} "
              f"frame(s): the clip ranks {found['rank']}; top 5: " + "; ".join(found["top"]), flush=True)
    print(f"\nTensorBoard: tensorboard --logdir {run_dir}   checkpoints and exports: {run_dir}/<stage>/")
    print(f"total {time.time() - start:.0f} s")
    with open(os.path.join(run_dir, "results.txt"), "w") as f:
        f.write(text + "\n")
    return text


def run_precision_check(run_dir="runs/precision", precisions=("fp32", "bf16", "amp_bf16"), seeds=(42,),
                        epochs_pt=40, epochs_ret=25, num_clips=300) -> dict:
    """bf16 correctness guard: the demo's single-frame stages (pretrain, then retrieval fine-tuning) in
    each precision (and seed), evaluated the same way; returns and writes R@1/5/10 per run."""
    torch.set_num_threads(1)
    os.makedirs(run_dir, exist_ok=True)
    data = ensure_corpus(run_dir, num_clips, 0.25)
    pt_args, ret_args, ret_cfg = stage_args(data)
    results = {}
    for precision in precisions:
        for seed in seeds:
            name, extra = f"{precision}_seed{seed}", [f"precision={precision}", f"seed={seed}"]
            pt = launch(f"{name}_pt", [*pt_args, f"scheduler.epochs={epochs_pt}", *extra], run_dir)
            ret = launch(f"{name}_ret", [*ret_args, f"scheduler.epochs={epochs_ret}",
                                         f"pretrained_path={pt}/export", *extra], run_dir)
            res = evaluate_model(ret, ret_cfg, 1)
            results[name] = {kind: {split: {k: round(m[k], 1) for k in ("img_r1",
                                                                        "img_r5", "txt_r1", "txt_r5")}
                                    for split, m in res[kind].items()} for kind in ("itm", "itc")}
            print(name, json.dumps(results[name]), flush=True)
    from .fileio import write_json
    write_json(results, os.path.join(run_dir, "precision_check.json"))
    return results


def run_demo_qa(run_dir="runs/demo", epochs=8) -> dict:
    """``make demo-qa``: video QA on the synthetic corpus from the demo's single-frame pretraining
    (run ``make demo`` first): 2 CPU ranks, ZeRO-2; prints accuracy per question type."""
    start = time.time()
    pretrained = os.path.join(run_dir, "pretrain_1f", "export")
    if not os.path.isdir(pretrained):
        raise ConfigError(f"{pretrained} is missing: run `make demo` first (QA starts from its pretraining)")
    qa_cfg = os.path.join(ensure_corpus(run_dir), "configs", "qa.yaml")
    qa = launch("qa", ["train_qa", "tiny", qa_cfg, *TINY, "max_q_len=16", "max_a_len=6", "k_test=16",
                       f"scheduler.epochs={epochs}", "batch_size.video=32", f"pretrained_path={pretrained}"],
                run_dir)
    with open(os.path.join(qa, "eval_final.json")) as f:
        res = json.load(f)["test"]
    print(f"\nvideo QA on the synthetic test split ({res['questions']} questions, exact match): "
          f"{res['accuracy']:.1f}% overall, " + ", ".join(f"{t} {a:.1f}%" for t, a in res["per_type"].items())
          + f"\npredictions: {qa}/qa_test.json   total {time.time() - start:.0f} s")
    return res
