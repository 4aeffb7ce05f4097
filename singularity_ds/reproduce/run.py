"""``singularity-ds reproduce ROW``: one of the paper's results, evaluated with the paper's settings from the
released checkpoint and the original's data layout, then paper vs measured with a verdict.

``--dry-run`` resolves everything (the config and its keys, the annotation and media folders, the checkpoint
and every one of its keys against the model) and prints the exact ``singularity-ds eval`` command, failing
in one line on the first thing missing. A real run evaluates with that command and writes
``<out>/reproduce.json``; a difference beyond ``--tolerance`` is reported with the checks that usually
explain it (media missing against the split's size, frames, the stored clips' resolution, the variant).
"""
import argparse
import functools
import logging
import os
import shlex
import sys
from dataclasses import dataclass, field
from typing import List

from ..config import load_config, run_folder
from ..errors import ConfigError
from ..fileio import write_json
from ..paper import Registry, Row, load
from . import locate

logger = logging.getLogger(__name__)
TOLERANCE = 0.3  # points: the paper prints one decimal; beyond this the checks below usually say why
PROBED = 5       # media files whose resolution is read for the report


@dataclass
class Plan:
    row: Row
    checkpoint: str
    data: str
    config: str
    overrides: List[str]
    out_dir: str
    temporal_layers: int
    media: dict                                  # {"entries", "present", "texts", "media_dir"}
    warnings: List[str] = field(default_factory=list)

    @property
    def argv(self) -> List[str]:
        return [self.row.task, self.config, self.checkpoint, *self.overrides]

    @property
    def command(self) -> str:
        args = " ".join(map(shlex.quote, self.argv))
        return f"SL_DATA_DIR={shlex.quote(self.data)} singularity-ds eval {args}"


def _media_counts(config, row: Row) -> dict:
    """The split's entries as the evaluation reads them: distinct media, those present, texts."""
    from ..data import eval_datasets
    from ..eval.run import set_label
    kind = {"ret": "caption", "mc": "mc", "qa": "qa"}[row.task]
    (ds,) = eval_datasets(config, [row.split.key], kind=kind).values()
    media_dir = config.test_file[row.split.key][1]
    paths = {ds.path(i) for i in range(len(ds))}
    present = sum(os.path.exists(p if os.path.isabs(p) else os.path.join(media_dir, p)) for p in paths)
    texts = len(ds.text) if row.task == "ret" else len(ds)
    return dict(entries=len(paths), present=present, texts=texts, media_dir=media_dir,
                label=set_label(config, row.split.key), sample=sorted(paths)[:PROBED])


def size_checks(row: Row, counts: dict) -> List[str]:
    """Lines where the split differs from the one the paper evaluated (a missing clip is a missing
    candidate: retrieval recall is not comparable then)."""
    out, expected = [], row.split.size
    noun = "images" if row.split.media in ("coco", "flickr") else "clips"
    if "media" in expected:
        if counts["entries"] != expected["media"]:
            out.append(f"{counts['label']}: {counts['entries']:,} {noun} in the annotation, the paper's "
                       f"{row.split.note} has {expected['media']:,}")
    if counts["present"] < counts["entries"]:
        out.append(f"{counts['media_dir']}: {counts['entries'] - counts['present']:,} of the split's "
                   f"{counts['entries']:,} {noun} are missing")
    if "texts" in expected and counts["texts"] != expected["texts"]:
        what = "questions" if row.task == "qa" else "texts"
        out.append(f"{counts['label']}: {counts['texts']:,} {what}, the paper's split has "
                   f"{expected['texts']:,}")
    return out


def _probe(path: str):
    """-> (shorter side, fps or None) of one media file, or None if it cannot be read."""
    try:
        if os.path.splitext(path)[1].lower() in (".jpg", ".jpeg", ".png", ".bmp", ".webp"):
            from PIL import Image
            with Image.open(path) as im:
                return min(im.size), None
        import av
        with av.open(path) as c:
            s = c.streams.video[0]
            return min(s.codec_context.width, s.codec_context.height), float(s.average_rate or 0) or None
    except Exception:  # a broken file: the evaluation reports it; here it only has no resolution
        return None


def resolution_checks(reg: Registry, row: Row, counts: dict) -> List[str]:
    """The stored media against the original's re-encoding of this folder (paper.yaml ``media``)."""
    preset = reg.media[row.split.media]
    seen = [p for p in (_probe(path if os.path.isabs(path) else os.path.join(counts["media_dir"], path))
                        for path in counts["sample"]) if p]
    if not seen or "size" not in preset:
        return []
    sides = sorted({s for s, _ in seen})
    rates = sorted({round(f, 2) for _, f in seen if f})
    out = []
    if any(s != preset["size"] for s in sides):
        out.append(f"{counts['media_dir']}: shorter side {'/'.join(map(str, sides))} px in {len(seen)} "
                   f"sampled files, the original's {preset['folder']} is {preset['size']} px "
                   f"(singularity-ds preprocess {preset['kind']} SRC DST --preset {row.split.media})")
    if "fps" in preset and any(abs(r - preset["fps"]) > 0.01 for r in rates):
        shown = "/".join(f"{r:g}" for r in rates)
        out.append(f"{counts['media_dir']}: {shown} fps in {len(seen)} sampled files, the original's "
                   f"{preset['folder']} is {preset['fps']} fps")
    return out


def plan(reg: Registry, row: Row, checkpoints=None, data=None, checkpoint=None, out_dir=None,
         extra=()) -> Plan:
    """Resolve one row: every path, config key and checkpoint key, or one line for the first miss."""
    root = locate.data_root(data)
    os.environ["SL_DATA_DIR"] = root  # what the packaged configs' ${oc.env:SL_DATA_DIR} read
    if checkpoint:
        if not os.path.exists(checkpoint):
            raise ConfigError(f"--checkpoint {checkpoint}: no such file or folder")
        path = checkpoint
    else:
        path = locate.find_checkpoint(reg, row, locate.checkpoint_roots(checkpoints))
    keys = locate.state_keys(path)
    layers = locate.check_variant(row, path, keys)
    out_dir = run_folder(out_dir, os.path.join("runs", "reproduce", row.id))
    overrides = [f"test_types=[{row.split.key}]", f"video_input.num_frames_test={row.frames}",
                 "eval_frame_ensemble=concat", f"output_dir={out_dir}"]
    if layers:  # the flags the original's README appends for a temporal model, from its weights
        overrides += ["add_temporal_embed=True", "temporal_vision_encoder.enable=True",
                      f"temporal_vision_encoder.num_layers={layers}"]
    overrides += list(extra)
    config = load_config([row.split.config], overrides)
    spec = config.test_file[row.split.key]
    anno, media_dir = spec[0], spec[1]
    archive = reg.annotations["file"]
    if not os.path.isfile(anno):
        raise ConfigError(f"{row.id}: {anno} is missing: it is {row.split.annotation} of the released "
                          f"{archive} ({reg.release}/{archive}), extracted in {root}")
    preset = reg.media[row.split.media]
    if not os.path.isdir(media_dir):
        how = (f"singularity-ds preprocess {preset['kind']} SRC {media_dir} --preset {row.split.media}"
               if "size" in preset else f"the files as downloaded into {media_dir}")
        raise ConfigError(f"{row.id}: {media_dir} is missing: {preset['from']}, then {how}")
    counts = _media_counts(config, row)
    if not counts["present"]:
        raise ConfigError(f"{row.id}: none of the {counts['entries']:,} media of {anno} is in {media_dir}")
    from ..eval.run import model_overrides
    _check_loads(path, row.task == "qa" or None, tuple(sorted(model_overrides(config, overrides).items())))
    p = Plan(row, path, root, row.split.config, overrides, out_dir, layers, counts)
    p.warnings = size_checks(row, counts) + resolution_checks(reg, row, counts)
    if int(config.video_input.num_frames_test) != row.frames:
        p.warnings.append(f"video_input.num_frames_test={config.video_input.num_frames_test}: the paper "
                          f"evaluates {row.title} with {row.frames} frames")
    return p


@functools.lru_cache(maxsize=16)
def _check_loads(path: str, qa, arch: tuple):
    """Every key of the checkpoint loads into the model its config (and ``arch``) describes; once per file
    and settings (``reproduce all`` checks the archives' few files for many rows)."""
    from ..models import load_model
    load_model(path, qa=qa, **dict(arch))


def measured(row: Row, results: dict) -> dict:
    """{metric name: measured} from ``eval_main``'s results for the row's split."""
    res = results[row.split.key]
    if row.metric.source == "itm":
        return {n: round(float(res["itm"][k]), 2) for n, k in zip(row.metric.names, row.metric.keys)}
    if row.metric.source == "accuracy":
        return {row.metric.names[0]: round(float(res["accuracy"]), 2)}
    return {}  # server-scored (VQA test-dev / test-std)


def compare(p: Plan, got: dict, tolerance: float) -> dict:
    row = p.row
    paper = dict(zip(row.metric.names, row.paper))
    diff = {n: round(got[n] - paper[n], 2) for n in got}
    if not got:
        verdict = (f"scored by the VQA server: submit {p.out_dir}/qa_{row.split.key}.json at "
                   f"eval.ai (VQA v2 test-dev / test-std); the paper's {row.paper[0]} / {row.paper[1]}")
    elif all(abs(d) <= tolerance for d in diff.values()):
        verdict = f"reproduced: every metric within {tolerance} points of the paper"
    else:
        worst = max(diff, key=lambda n: abs(diff[n]))
        verdict = f"differs: {worst} by {diff[worst]:+.2f} points (tolerance {tolerance})"
    checks = list(p.warnings)
    if got and not verdict.startswith("reproduced"):
        checks.append(f"checkpoint {p.checkpoint}: {p.temporal_layers}-layer temporal encoder"
                      if p.temporal_layers else f"checkpoint {p.checkpoint}: 1-frame (no temporal encoder)")
        if not p.warnings:
            checks.append(f"the split, frames ({row.frames}) and the sampled media's resolution match the "
                          f"paper's; compare the checkpoint with the archive's ({row.archive})")
    return dict(row=row.id, title=row.title, model=row.model_name, source=row.source, paper=paper,
                measured=got, diff=diff, tolerance=tolerance, verdict=verdict, checks=checks,
                checkpoint=p.checkpoint, command=p.command, media=dict(entries=p.media["entries"],
                                                                       present=p.media["present"],
                                                                       texts=p.media["texts"]))


def report(r: dict) -> str:
    lines = [f"{r['row']}: {r['title']}, {r['model']} ({r['source']})",
             f"  {'metric':<12s} {'paper':>7s} {'measured':>9s} {'diff':>7s}"]
    for name, value in r["paper"].items():
        got = r["measured"].get(name)
        shown = f"{got:9.2f} {r['diff'][name]:+7.2f}" if got is not None else f"{'-':>9s} {'-':>7s}"
        lines.append(f"  {name:<12s} {value:7.2f} {shown}")
    lines.append(f"  {r['verdict']}")
    lines += [f"  check: {c}" for c in r["checks"]]
    return "\n".join(lines)


def list_rows(reg: Registry) -> str:
    lines = [f"{'row':<31s} {'model':<33s} {'task':<53s} paper (source)"]
    for row in reg.rows.values():
        numbers = " / ".join(f"{n:.{row.metric.decimals}f}" for n in row.paper)
        lines.append(f"{row.id:<31s} {row.model_name:<33s} {row.title:<53s} {', '.join(row.metric.names)}: "
                     f"{numbers} ({row.source})")
    lines.append("sources: " + "; ".join(f"[{k}] {v}" for k, v in reg.sources.items()))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="singularity-ds reproduce",
        description="Evaluate a released checkpoint with the paper's settings and compare with the paper's "
                    "numbers. ROW: a row id of --list, a shell pattern (msrvtt-*), or all.")
    p.add_argument("items", nargs="*", default=[], metavar="ROW|key=value",
                   help="rows, then config overrides for the evaluation (e.g. eval_offload=True)")
    p.add_argument("--list", action="store_true", help="every row with its paper numbers and source")
    p.add_argument("--checkpoints", metavar="DIR",
                   help="where the released archives are extracted (default: $SL_EXP_DIR/ckpts, $SL_EXP_DIR)")
    p.add_argument("--checkpoint", metavar="PATH", help="this checkpoint instead of the archive's")
    p.add_argument("--data", metavar="DIR", help="the data root (default: $SL_DATA_DIR)")
    p.add_argument("--out", metavar="DIR",
                   help="results folder (default: runs/reproduce/ROW, under $SL_EXP_DIR when set)")
    p.add_argument("--dry-run", action="store_true", help="resolve everything, print the eval command, stop")
    p.add_argument("--tolerance", type=float, default=TOLERANCE, metavar="POINTS",
                   help=f"largest |measured - paper| called reproduced (default {TOLERANCE})")
    return p


def main(argv) -> int:
    args = build_parser().parse_args(argv)
    reg = load()
    if args.list:
        print(list_rows(reg))
        return 0
    names = [a for a in args.items if "=" not in a]
    extra = [a for a in args.items if "=" in a]
    if not names:
        raise ConfigError("reproduce: name a row (or a pattern, or all); `singularity-ds reproduce --list`")
    rows = reg.select(names)
    if len(rows) > 1 and (args.checkpoint or args.out):
        raise ConfigError("reproduce: --checkpoint and --out take one row")
    failed = 0
    for row in rows:
        p = plan(reg, row, args.checkpoints, args.data, args.checkpoint, args.out, extra)
        for w in p.warnings:
            print(f"warning: {row.id}: {w}", file=sys.stderr)
        if args.dry_run:
            print(f"{row.id}: {row.model_name}, {row.title} <- {p.checkpoint}\n  {p.command}")
            continue
        from ..eval.run import eval_main
        results = eval_main(row.task, p.argv[1:])
        r = compare(p, measured(row, results), args.tolerance)
        path = write_json(r, os.path.join(p.out_dir, "reproduce.json"))
        print(report(r) + f"\n  -> {path}")
        failed += r["verdict"].startswith("differs")
    return 1 if failed else 0


def markdown(reg: Registry) -> str:
    """The tables of ``docs/reproducing.md`` (generated; a test keeps the page equal to this): the data per
    split, then every row with its paper numbers."""
    lines = ["| split | annotation (`anno_downstream/`) | media (`videos_images/`) | expected | check |",
             "|---|---|---|---|---|"]
    for s in reg.splits.values():
        m = reg.media[s.media]
        make = (f"`preprocess {m['kind']} SRC DST --preset {s.media}`" if "size" in m else "as downloaded")
        expected = ", ".join(f"{v:,} {k}" for k, v in s.size.items())
        check = (f"`corpus-stats $SL_DATA_DIR/anno_downstream/{s.annotation} --media-dir "
                 f"$SL_DATA_DIR/videos_images/{m['folder']}"
                 + (f" --expected {s.size['media']}`" if "media" in s.size else "`"))
        lines.append(f"| {s.note} | `{s.annotation}` | `{m['folder']}`: {m['from']}; {make} | {expected} | "
                     f"{check} |")
    lines += ["", "| row | model | task | paper | source |", "|---|---|---|---|---|"]
    for row in reg.rows.values():
        numbers = " / ".join(f"{n:.{row.metric.decimals}f}" for n in row.paper)
        lines.append(f"| `{row.id}` | {row.model_name} | {row.title} | {', '.join(row.metric.names)}: "
                     f"{numbers} | {row.source} |")
    return "\n".join(lines) + "\n"
