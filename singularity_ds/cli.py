"""``singularity-ds`` command line. Every subcommand is ``main(argv)``-callable for in-process tests."""
import argparse
import logging
import sys
from fractions import Fraction

from omegaconf.errors import OmegaConfBaseException

from .config import config_error_line, load_config
from .config.args import positive, split_run_args, strip_launcher_args
from .errors import ConfigError, SingularityError


def model_summary(model) -> str:
    """Parameter counts per top-level module, and the architecture in one line each."""
    rows = []
    for name, module in model.named_children():
        n = sum(p.numel() for p in module.parameters())
        rows.append(f"  {name:<26s} {n:>12,d}")
    total = sum(p.numel() for p in model.parameters())
    txt = model.text_encoder.config
    if model.vit_type == "timm":
        vis = model.vision_encoder
        vision = (f"vision: timm {vis.tower.architecture} {vis.depth} layers, width {vis.width}, "
                  f"{vis.image_res}px / patch {vis.patch_size}, {vis.num_prefix_tokens} prefix token(s)")
    else:
        vis = model.vision_encoder.config
        vision = (f"vision: {model.vit_type} {vis.num_hidden_layers} layers, width {vis.hidden_size}, "
                  f"{vis.image_size}px / patch {vis.patch_size}")
    head = [
        vision,
        f"text:   bert {txt.num_hidden_layers} layers (fusion from layer {txt.fusion_layer}), "
        f"width {txt.hidden_size}, vocab {txt.vocab_size}",
        f"temporal: {model.temporal_embeddings.shape[1]} embeddings, encoder "
        + ("off" if model.temporal_vision_encoder is None
           else f"{len(model.temporal_vision_encoder.layer)} layers"),
        f"MLM head: {'yes' if model.has_mlm_head else 'no'}",
    ]
    decoder = getattr(model, "text_decoder", None)
    if decoder is not None:  # the QA model (its answer decoder)
        head.append(f"answer decoder: {len(decoder.bert.encoder.layer)} layers")
    return "\n".join(head + rows + [f"  {'total':<26s} {total:>12,d}"])


def cmd_summary(args) -> int:
    from .models import Singularity, SingularityQA, is_qa_config, load_model
    if args.checkpoint:
        model = load_model(args.checkpoint)
    else:
        config = load_config(args.configs, args.overrides)
        model = (SingularityQA if is_qa_config(config) else Singularity)(config)
    print(model_summary(model))
    return 0


def cmd_config_docs(args) -> int:
    from .config.docs import config_docs
    print(config_docs(), end="")
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo, run_demo_qa
    if args.qa:
        run_demo_qa(args.run_dir)
    else:
        run_demo(args.run_dir, shards=args.shards, seed=args.seed)
    return 0


def cmd_make_synthetic(args) -> int:
    from .data.synthetic import make_synthetic
    if args.num_clips < 18:
        raise ConfigError(f"--num-clips {args.num_clips}: need at least 18 clips (3 groups of 6) "
                          f"for train/val/test")
    meta = make_synthetic(args.out_dir, num_clips=args.num_clips, size=args.size, frames=args.frames,
                          fps=args.fps, num_images=args.num_images, seed=args.seed, codec=args.codec,
                          workers=args.workers, shards=args.shards)
    print(f"wrote {meta['num_clips']} clips ({meta['splits']}) to {args.out_dir}; config overlays in "
          f"{args.out_dir}/configs/")
    return 0


def cmd_train(args) -> int:
    from .engine.trainer import train_main
    train_main(args.rest)
    return 0


def cmd_doctor(args) -> int:
    from .doctor import main as doctor
    return doctor(args.rest)


def cmd_eval(args) -> int:
    from .eval.run import EVAL_CONFIGS, eval_main
    from .tasks import TASKS
    if args.rest and args.rest[0] in TASKS:  # `train` takes the task, `eval` the config
        first = EVAL_CONFIGS[args.kind].split(",")[0]
        raise ConfigError(f"eval {args.kind} takes a config ({EVAL_CONFIGS[args.kind]}), not the task "
                          f"name {args.rest[0]!r}: singularity-ds eval {args.kind} {first} CHECKPOINT "
                          f"[key=value ...]")
    eval_main(args.kind, args.rest)
    return 0


def cmd_export(args) -> int:
    if args.original:
        from .original_export import export_original
        print(export_original(args.checkpoint, args.original))
        return 0
    from .hf_export import export_hf
    print(export_hf(args.checkpoint, args.hf))
    return 0


def cmd_embed(args) -> int:
    from .search.embed import embed_main
    embed_main(args.rest)
    return 0


def cmd_search(args) -> int:
    from .search.index import search_main
    return search_main(args.rest)


def cmd_serve(args) -> int:
    from .search.serve import serve_main
    return serve_main(args.rest)


def cmd_make_shards(args) -> int:
    from .data.shards import make_shards
    try:
        index = make_shards(args.anno, args.media_dir, args.out_dir, args.shard_size, args.media_type,
                            args.kind, overwrite=args.overwrite, media_outside_dir=args.media_outside_dir)
    except ValueError as e:  # a bad --shard-size
        raise ConfigError(str(e)) from None
    print(f"wrote {index['samples']} samples in {len(index['shards'])} shard(s) to {args.out_dir}; "
          f"{len(index['skipped'])} entries skipped (missing media, listed in index.json)")
    return 0


def cmd_corpus_stats(args) -> int:
    from .data.corpus_stats import main as corpus_stats
    return corpus_stats(args.rest)


def cmd_preprocess(args) -> int:
    from .data.preprocess import main as preprocess
    return preprocess([args.kind, *args.rest])


def cmd_download(args) -> int:
    from .data.download import main as download
    return download(args)


def cmd_reproduce(args) -> int:
    from .reproduce.run import main as reproduce
    return reproduce(args.rest)


def cmd_bench(args) -> int:
    if args.what == "data":
        from .data.benchmark import main as bench_data
        return bench_data(args.rest)
    if args.what == "eval":
        from .eval.benchmark import main as bench_eval
        return bench_eval(args.rest)
    if args.what == "download":
        from .data.download.benchmark import main as bench_download
        return bench_download(args.rest)
    if args.what == "train":
        from .engine.benchmark import main as bench_train
        return bench_train(args.rest)
    if args.what == "kernels":
        from .kernels.benchmark import main as bench_kernels
        return bench_kernels(args.rest)
    if args.what == "stream":
        from .data.stream_benchmark import main as bench_stream
        return bench_stream(args.rest)
    if args.what == "vectors":
        from .search.benchmark import main as bench_vectors
        return bench_vectors(args.rest)
    if args.what == "precision":
        q = argparse.ArgumentParser(prog="singularity-ds bench precision",
                                    description="bf16 correctness guard: the demo's single-frame stages "
                                                "per precision")
        q.add_argument("--run-dir", default="runs/precision")
        q.add_argument("--precisions", nargs="+", default=["fp32", "bf16", "amp_bf16"])
        q.add_argument("--seeds", nargs="+", type=int, default=[42])
        q.add_argument("--epochs-pt", type=int, default=40)
        q.add_argument("--epochs-ret", type=int, default=25)
        a = q.parse_args(args.rest)
        from .demo import run_precision_check
        run_precision_check(a.run_dir, a.precisions, a.seeds, a.epochs_pt, a.epochs_ret)
        return 0
    raise ConfigError(f"unknown benchmark {args.what!r}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="singularity-ds", usage="%(prog)s COMMAND ...",
                                description="Singularity (single-frame training, multi-frame inference) on "
                                            "DeepSpeed. `singularity-ds COMMAND --help` for each command.",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    # listed by job in the epilog (JOBS) rather than argparse's one flat list
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", help=argparse.SUPPRESS,
                           prog="singularity-ds")
    s = sub.add_parser("summary", help="print a model's architecture and parameter counts")
    s.add_argument("configs", nargs="*", default=[],
                   help="config names/paths (e.g. pretrain tiny) then key=value overrides")
    s.add_argument("--checkpoint", help="summarise a checkpoint instead of a config")
    s.set_defaults(func=cmd_summary)
    c = sub.add_parser("config-docs", help="print every config key (type, default, accepted values, doc) as "
                                           "markdown (docs/config.md)")
    c.set_defaults(func=cmd_config_docs)
    d = sub.add_parser("demo", help="the README's main job on the synthetic corpus (CPU)")
    d.add_argument("--run-dir", default="runs/demo")
    d.add_argument("--qa", action="store_true", help="video QA from the demo's pretraining (after `demo`)")
    d.add_argument("--shards", action="store_true",
                   help="pretrain from the corpus's tar shards (streaming loader)")
    d.add_argument("--seed", type=int, default=42, help="every training stage's seed (the corpus is fixed)")
    d.set_defaults(func=cmd_demo)
    t = sub.add_parser("train", help="train: TASK [--config BASE] [OVERLAY ...] [key=value ...]",
                       add_help=False)  # `train --help` / `train TASK --help`: the run's own help
    t.add_argument("rest", nargs=argparse.REMAINDER)
    t.set_defaults(func=cmd_train)
    dr = sub.add_parser("doctor", help="validate a run before it starts: TASK [CONFIG ...] [key=value ...]",
                        description="Config, annotation files, a sample of the media, the checkpoint; a "
                                    "summary table. `doctor --help` after the task for its options.")
    dr.add_argument("rest", nargs=argparse.REMAINDER)
    dr.set_defaults(func=cmd_doctor)
    e = sub.add_parser("eval",
                       help="evaluate: ret|mc|qa CONFIG [OVERLAY ...] CHECKPOINT [key=value ...] [--offload]",
                       usage="%(prog)s ret|mc|qa CONFIG [OVERLAY ...] CHECKPOINT [key=value ...] [--offload]",
                       description="Retrieval (two-stage ITC + ITM), multiple-choice or QA evaluation of a "
                                   "checkpoint; `eval ret --help` (mc, qa) for each one's arguments.")
    e.add_argument("kind", choices=["ret", "mc", "qa"])
    e.add_argument("rest", nargs=argparse.REMAINDER)
    e.set_defaults(func=cmd_eval)
    x = sub.add_parser("export", help="CHECKPOINT --hf OUT: a folder to publish (load_model, transformers "
                                      "towers, model card); CHECKPOINT --original OUT.pth: the original "
                                      "code's checkpoint layout")
    x.add_argument("checkpoint", help="a run folder, an export folder or an original .pth")
    to = x.add_mutually_exclusive_group(required=True)
    to.add_argument("--hf", metavar="OUT", help="the folder to write (new or empty)")
    to.add_argument("--original", metavar="OUT.pth",
                    help="a .pth the original Singularity code evaluates (its key layout for the task)")
    x.set_defaults(func=cmd_export)
    em = sub.add_parser("embed", help="embed videos/images into a search index: CHECKPOINT SOURCE "
                                      "OUT_DIR [--frames 4] [--batch N] [--dtype fp16|fp32] [--tokens] "
                                      "[key=value ...]",
                        add_help=False)
    em.add_argument("rest", nargs=argparse.REMAINDER)
    em.set_defaults(func=cmd_embed)
    se = sub.add_parser("search", help='search an index: INDEX "text" [-k 10] [--rerank K] [--json] '
                                       "[--like VIDEO]", add_help=False)
    se.add_argument("rest", nargs=argparse.REMAINDER)
    se.set_defaults(func=cmd_search)
    sv = sub.add_parser("serve", help="a search page over an index: INDEX [--port 8080] [--host 127.0.0.1]",
                        add_help=False)
    sv.add_argument("rest", nargs=argparse.REMAINDER)
    sv.set_defaults(func=cmd_serve)
    m = sub.add_parser("make-synthetic",
                       help="generate the synthetic video-text corpus (H.264 clips + annotations)")
    m.add_argument("out_dir")
    m.add_argument("--num-clips", type=int, default=300)
    m.add_argument("--size", type=int, default=96, help="frame size in pixels (square)")
    m.add_argument("--frames", type=int, default=16)
    m.add_argument("--fps", type=int, default=8)
    m.add_argument("--num-images", type=int, default=24)
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--codec", default="libx264", choices=["libx264", "mjpeg", "libvpx-vp9"])
    m.add_argument("--workers", type=int, default=1)
    m.add_argument("--no-shards", dest="shards", action="store_false", help="skip writing the tar-shard copy")
    m.set_defaults(func=cmd_make_synthetic)
    sh = sub.add_parser("make-shards",
                        help="write a corpus (annotation JSON + media folder) as WebDataset tar shards")
    sh.add_argument("anno")
    sh.add_argument("media_dir")
    sh.add_argument("out_dir")
    sh.add_argument("--shard-size", default="1GB", help="start a new shard past this size (e.g. 500MB, 1GB)")
    sh.add_argument("--media-type", default="video", choices=["video", "image"])
    sh.add_argument("--kind", default="caption", choices=["caption", "qa_train"],
                    help="annotation schema to validate")
    sh.add_argument("--overwrite", action="store_true", help="replace a shard corpus already in OUT_DIR")
    sh.add_argument("--media-outside-dir", action="store_true",
                    help="accept media paths outside MEDIA_DIR (absolute, or with ..), as the config key")
    sh.set_defaults(func=cmd_make_shards)
    cs = sub.add_parser("corpus-stats",
                        help="a corpus's entries, usable media, durations, resolutions, caption lengths, "
                             "duplicates, and the usable count against --expected",
                        description="corpus-stats INDEX_OR_ANNOTATION [--media-dir D] [--expected N] "
                                    "[--out DIR]; `corpus-stats --help` after the source for details")
    cs.add_argument("rest", nargs=argparse.REMAINDER)
    cs.set_defaults(func=cmd_corpus_stats)
    pp = sub.add_parser("preprocess",
                        help="re-encode videos (fps, size, no audio) or resize images, in parallel",
                        description="preprocess videos|images SRC DST [--fps 2] [--size 224] [--workers N] "
                                    "[--trim SECONDS]; `preprocess videos --help` for details")
    pp.add_argument("kind", choices=["videos", "images"])
    pp.add_argument("rest", nargs=argparse.REMAINDER)
    pp.set_defaults(func=cmd_preprocess)
    dl = sub.add_parser(
        "download", help="download a URL list (WebVid CSV, CC3M TSV, JSON lines, parquet) into tar shards "
                         "for train_corpus, re-encoded as preprocess does; resumable, a status per URL",
        description="Download a URL list (CSV, TSV, JSON lines, parquet) into WebDataset tar shards plus "
                    "index.json, re-encoded as `preprocess` does; resumable; every URL's status in "
                    "OUT_DIR/report.parquet. README: 'Downloading a corpus'.")
    dl.add_argument("url_list", metavar="URL_LIST")
    dl.add_argument("out_dir", metavar="OUT_DIR")
    dl.add_argument("--url-col", help="URL column (name, or position in a list without header); "
                                      "default: contentUrl/url/URL/..., or the column holding URLs")
    dl.add_argument("--caption-col", help="caption column; default: name/caption/TEXT/text/..., or the "
                                          "other column of a headerless list")
    dl.add_argument("--id-col", help="id column (the sample's media name); default: videoid/id/key if "
                                     "present, else the row number")
    dl.add_argument("--media-type", default="video", choices=["video", "image"])
    dl.add_argument("--fps", type=positive(Fraction), default=Fraction(2), help="output frame rate (videos)")
    dl.add_argument("--size", type=positive(int), default=224, help="output shorter side, pixels")
    dl.add_argument("--trim", type=positive(Fraction), metavar="SECONDS",
                    help="keep the first SECONDS of each video")
    dl.add_argument("--workers", type=positive(int), default=16, metavar="N", help="parallel downloads")
    dl.add_argument("--per-host", type=positive(int), default=8, metavar="N",
                    help="parallel downloads from one host")
    dl.add_argument("--decoders", type=positive(int), metavar="N",
                    help="re-encoding processes (default: the CPU count)")
    dl.add_argument("--timeout", type=positive(float), default=30, metavar="S",
                    help="seconds without an answer or data before a try fails")
    dl.add_argument("--retries", type=int, default=3, metavar="K",
                    help="retries of a transient failure (5xx, 429, timeout, reset, short body)")
    dl.add_argument("--retry-wait", type=positive(float), default=1.0, metavar="S",
                    help="first backoff wait, doubled at each retry")
    dl.add_argument("--shard-size", default="1GB", help="start a new shard past this size")
    dl.add_argument("--urls-per-chunk", type=positive(int), default=10000, metavar="N",
                    help="rows per unit of resume (a killed run redoes only the chunks in progress)")
    dl.add_argument("--max-size", default="200MB", help="refuse a download over this size")
    dl.add_argument("--max-duration", type=positive(float), default=600, metavar="S",
                    help="refuse videos longer than this (before --trim)")
    dl.add_argument("--min-duration", type=float, default=0, metavar="S", help="refuse videos shorter")
    dl.add_argument("--decode-timeout", type=positive(float), default=300, metavar="S",
                    help="kill a decoder busy with one file longer than this")
    dl.add_argument("--allow-file-urls", action="store_true",
                    help="also accept file:// URLs (tests, local mirrors); never as a redirect target")
    dl.add_argument("--no-progress", action="store_true", help="no progress bar")
    dl.set_defaults(func=cmd_download)
    rp = sub.add_parser("reproduce", add_help=False,
                        help="a result of the paper from its released checkpoint, paper vs measured: "
                             "ROW [--checkpoints DIR] [--data DIR] [--dry-run] [key=value ...]; --list "
                             "for the rows")
    rp.add_argument("rest", nargs=argparse.REMAINDER)
    rp.set_defaults(func=cmd_reproduce)
    b = sub.add_parser("bench", help="benchmarks: train (samples/s, MFU, memory), data (decode "
                                     "throughput, loader memory), eval (itm / itc cost), kernels (attention: "
                                     "Triton vs SDPA vs math), precision (bf16 vs fp32 retrieval after "
                                     "training the tiny model), stream (files vs shards loader, 10M-entry "
                                     "annotation memory), download (clips/s from a local HTTP server), "
                                     "vectors (faiss vs usearch vs exact search)")
    b.add_argument("what", choices=["train", "data", "eval", "kernels", "precision", "stream", "download",
                                    "vectors"])
    b.add_argument("rest", nargs=argparse.REMAINDER)
    b.set_defaults(func=cmd_bench)
    helps = {a.dest: a.help for a in sub._choices_actions}
    p.epilog = "\n\n".join(f"{job}:\n" + "\n".join(_wrapped(c, helps[c]) for c in cmds)
                             for job, cmds in JOBS.items())
    return p


# `singularity-ds --help` lists the sub-commands by the job a user comes with
JOBS = {
    "run": ["train", "demo", "doctor"],
    "data": ["download", "preprocess", "make-shards", "make-synthetic", "corpus-stats"],
    "use a model": ["eval", "reproduce", "embed", "search", "serve", "export"],
    "inspect": ["summary", "config-docs"],
    "benchmark": ["bench"],
}


def _wrapped(name: str, text: str, width: int = 100) -> str:
    import textwrap
    return textwrap.fill(text, width, initial_indent=f"  {name:<15s} ", subsequent_indent=" " * 18)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # DeepSpeed's import makes torch warn "No CUDA runtime is found" at every start on a CPU machine: a line
    # before a run's one-line error that says nothing about it
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    argv = sys.argv[1:] if argv is None else list(argv)
    parser, argv = build_parser(), strip_launcher_args(argv)
    # a sub-command that parses its own arguments (REMAINDER) gets the options before its first positional
    # too (argparse leaves `reproduce --list`, `embed --help` unmatched)
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        if not hasattr(args, "rest"):
            parser.parse_args(argv)  # argparse's own one-line error, exit 2
        args.rest = unknown + list(args.rest)
    try:
        if hasattr(args, "configs"):
            args.configs, args.overrides, _ = split_run_args(args.configs)
        return args.func(args)
    except SingularityError as e:  # every user-facing failure: one line
        print(f"singularity-ds: error: {e}", file=sys.stderr)
        return 2
    except OmegaConfBaseException as e:  # e.g. ${oc.env:SL_DATA_DIR} unset: one line naming the key
        print(f"singularity-ds: error: {config_error_line(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
