"""``singularity-ds embed CHECKPOINT SOURCE OUT_DIR``: encode a library of videos / images into a search
index (:mod:`.index` reads it).

The items of SOURCE (:mod:`.sources`) are cut into parts of ``part_size``; each part is encoded by all
ranks (each its contiguous share, through the evaluation's :func:`~singularity_ds.eval.features.encode_media`
and :class:`~singularity_ds.eval.broken.Reading`) and then marked done by rank 0 (``parts/NNNNN/done.json``).
A rerun skips the parts already done, so a killed run loses at most one part. When every part is done,
rank 0 merges them into the index folder:

- ``embeddings.npy``: (N, d) L2-normalised video embeddings, fp16 or fp32: the mean over the sampled
  frames of the model's normalised per-frame ITC projections, normalised again (evaluation's ITC score
  of a text is this cosine times the row's ``itc_norm`` in ``items.parquet``);
- ``items.parquet``: path (relative to the media root), media_type, duration, frames (distinct frames
  used), caption (from an annotation file or a shard sample, else empty), thumb, itc_norm;
- ``thumbs/``: a middle-frame JPEG per item, extracted here once;
- ``meta.json``: the checkpoint (path, size, sha256), the model's config, frames, dtype, the media root;
- ``broken.jsonl``: the media that could not be read (path, reason), left out of the index;
- with ``--tokens``: ``parts/NNNNN/video_tokens.<rank>.bin`` (+ ``.json``), the per-video token states ITM
  re-ranking needs, in the evaluation's disk feature-store format (:func:`~singularity_ds.eval.features.
  open_shards`).
"""
import argparse
import json
import logging
import os
import time

import numpy as np
import torch
from tqdm import tqdm

from ..dist import all_gather, barrier, rank_world
from ..errors import CheckpointError, ConfigError, describe
from ..eval.broken import Reading
from ..eval.features import ShardWriter, encode_media, shard_range
from ..fileio import sha256, write_json
from .sources import MediaItems, open_source

logger = logging.getLogger(__name__)

META, ITEMS, EMBEDDINGS, BROKEN, PLAN = (
    "meta.json", "items.parquet", "embeddings.npy", "broken.jsonl", "plan.json")
DTYPES = {"fp16": np.float16, "fp32": np.float32}
THUMB_HEIGHT = 144


def checkpoint_id(path: str) -> dict:
    """Path, size and sha256 of a checkpoint file (a folder export: of its weights file)."""
    files = ([os.path.join(path, f) for f in sorted(os.listdir(path))
              if f.endswith((".safetensors", ".pth", ".bin", ".pt"))] if os.path.isdir(path) else [path])
    if not files:
        raise CheckpointError(f"checkpoint {path}: no weights file in this folder")
    return dict(checkpoint=os.path.abspath(path), size=sum(os.path.getsize(f) for f in files),
                sha256=sha256(files[0]) if len(files) == 1 else [sha256(f) for f in files])


def _save_thumb(frame: torch.Tensor, path: str):
    """uint8 (C, H, W) -> a JPEG THUMB_HEIGHT pixels high (never enlarged)."""
    from PIL import Image
    img = Image.fromarray(frame.permute(1, 2, 0).numpy())
    if img.height > THUMB_HEIGHT:
        img = img.resize((max(1, round(img.width * THUMB_HEIGHT / img.height)), THUMB_HEIGHT), Image.BICUBIC)
    img.save(path + ".part.jpg", quality=85)
    os.replace(path + ".part.jpg", path)


def _plan(out_dir: str, source, run: dict) -> None:
    """Record what this index is built from; a rerun over another source, model or settings is refused
    (its parts would not fit together)."""
    path = os.path.join(out_dir, PLAN)
    plan = dict(run, root=source.root, items=[it.path for it in source.items])
    if os.path.exists(path):
        old = _read_part_file(path, _read_json, f"delete {out_dir} and embed anew (the plan of its parts "
                                               f"is lost)")
        for key in ("sha256", "frames", "dtype", "tokens", "part_size", "root", "items", "config"):
            if old.get(key) != plan.get(key):
                what = "the listed items" if key == "items" else key
                raise ConfigError(f"{out_dir}: holds an index built with other {what} (see {path}); resume "
                                  f"with the same checkpoint, source and options, or use a new OUT_DIR")
        return
    write_json(plan, path)


@torch.no_grad()
def build(model, source, out_dir: str, config, frames: int = 4, batch_size: int = 32, dtype: str = "fp16",
          tokens: bool = False, part_size: int = 256, checkpoint: dict = None, progress: bool = True) -> dict:
    """Embed ``source`` (a :class:`~.sources.Source`) with ``model`` into ``out_dir`` (see the module
    doc); every rank calls this. ``config``: the model's complete config (the evaluation transform and
    frame sampling, ``video_input.num_frames_test`` set to ``frames``). -> the meta dict."""
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype}: expected one of {', '.join(DTYPES)}")
    rank, world = rank_world()
    model.eval()
    dataset = MediaItems(source, config)
    bounds = _parts(source.items, part_size)
    n, parts = len(dataset), len(bounds)
    from ..models.weights import plain_config
    run = dict(checkpoint or {}, frames=frames, dtype=dtype, tokens=tokens, part_size=part_size,
               config=plain_config(model.config))
    refused = None
    if rank == 0:
        os.makedirs(os.path.join(out_dir, "thumbs"), exist_ok=True)
        try:
            _plan(out_dir, source, run)
        except ConfigError as e:
            refused = str(e)
    refused = all_gather(refused)[0]  # every rank stops on rank 0's one line (none waits at a barrier)
    if refused:
        raise ConfigError(refused)
    done = [os.path.exists(_part(out_dir, p, "done.json")) for p in range(parts)]
    if rank == 0 and any(done):
        logger.info("%s: %d of %d parts already embedded; embedding the rest", out_dir, sum(done), parts)
    bar = tqdm(total=n, initial=sum(stop - start for (start, stop), d in zip(bounds, done) if d),
               desc="embed", unit="item", dynamic_ncols=True, disable=not progress or rank != 0)
    store_dtype = getattr(torch, {"fp16": "float16", "fp32": "float32"}[dtype])
    for p in range(parts):
        if done[p]:
            continue
        start, stop = bounds[p]
        mine = shard_range(stop - start, rank, world)
        reading = Reading(dataset, range(start + mine.start, start + mine.stop), batch_size)
        info = {}

        def recorded():  # each batch's items as they pass: duration, frames, thumbnail
            for batch in reading:
                for i, item in batch:
                    thumb = f"thumbs/{i:08d}.jpg"
                    _save_thumb(item["thumb"], os.path.join(out_dir, thumb))
                    info[i] = dict(duration=float(item["duration"]), frames=int(item["frames"]), thumb=thumb)
                yield batch
                bar.update(len(batch) * world)
        writer = ShardWriter(_part(out_dir, p), "video_tokens", rank) if tokens else None
        readable, feats = encode_media(model, recorded(), "concat",
                                       (lambda t: writer.write(t.to(store_dtype))) if writer else None)
        if writer:
            writer.close()
        gathered = all_gather((readable, feats, info, reading.failures))
        if rank == 0:
            _finish_part(out_dir, p, gathered, world, dtype)
        barrier()
    bar.close()
    meta = None
    if rank == 0:
        meta = _merge(out_dir, source, parts, run)
    barrier()
    meta = meta if rank == 0 else _read_json(os.path.join(out_dir, META))
    return dict(meta, embedded_now=sum(stop - start for (start, stop), d in zip(bounds, done) if not d))


def _parts(items, part_size: int) -> list:
    """[(start, stop)] of each part: ``part_size`` items at most, all of one media type (a batch stacks
    clips of one shape; the sources list each type's items together)."""
    bounds, start = [], 0
    while start < len(items):
        stop, kind = start + 1, items[start].media_type
        while stop < len(items) and stop - start < part_size and items[stop].media_type == kind:
            stop += 1
        bounds.append((start, stop))
        start = stop
    return bounds


def _part(out_dir, p, name=""):
    return os.path.join(out_dir, "parts", f"{p:05d}", name)


def _read_json(path):
    with open(path) as f:
        return json.load(f)


def _read_part_file(path, load, fix):
    """``load(path)``; a missing or damaged file is the one line naming it, with ``fix``."""
    try:
        return load(path)
    except FileNotFoundError:
        raise ConfigError(f"{path}: missing; {fix}") from None
    except (OSError, ValueError, EOFError) as e:
        raise ConfigError(f"{path}: damaged ({describe(e)}); {fix}") from None


def _finish_part(out_dir, p, gathered, world, dtype):
    """Rank 0: one part's rows from every rank (in rank order: ascending items) -> its files, then done."""
    rows = [i for r in gathered for i in r[0]]
    feats = [r[1] for r in gathered if len(r[1])]
    per_frame = torch.cat(feats) if feats else torch.zeros(0, 1, 1)
    mean = per_frame.mean(1)
    norm = mean.norm(dim=-1).clamp_min(1e-12)
    info = {k: v for r in gathered for k, v in r[2].items()}
    os.makedirs(_part(out_dir, p), exist_ok=True)
    np.save(_part(out_dir, p, "embeddings.npy"), (mean / norm[:, None]).numpy().astype(DTYPES[dtype]))
    write_json(dict(rows=[dict(info[i], index=i, itc_norm=float(x)) for i, x in zip(rows, norm.tolist())],
                    broken=[dict(path=path, reason=reason) for r in gathered for path, reason in r[3]],
                    world=world), _part(out_dir, p, "rows.json"))
    write_json(dict(rows=len(rows)), _part(out_dir, p, "done.json"))


def _merge(out_dir, source, parts, run) -> dict:
    """Rank 0: every part's rows -> embeddings.npy, items.parquet, broken.jsonl, meta.json."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    embeddings, rows, broken, token_parts = [], [], [], []
    for p in range(parts):
        again = (f"delete {_part(out_dir, p).rstrip(os.sep)} and run the same embed again (it embeds that "
                 f"part anew)")
        part = _read_part_file(_part(out_dir, p, "rows.json"), _read_json, again)
        emb = _read_part_file(_part(out_dir, p, "embeddings.npy"), lambda f: np.load(f, allow_pickle=False),
                              again)
        if not isinstance(part, dict) or len(part.get("rows", ())) != len(emb) or emb.ndim != 2:
            raise ConfigError(f"{_part(out_dir, p, 'rows.json')}: damaged (its rows and embeddings.npy do "
                              f"not match); {again}")
        if len(emb):  # a part whose media were all broken has no rows (and no width)
            embeddings.append(emb)
        rows += part["rows"]
        broken += part["broken"]
        if run["tokens"]:
            token_parts.append(dict(folder=os.path.join("parts", f"{p:05d}"), world=part["world"]))
    emb = np.concatenate(embeddings) if embeddings else np.zeros((0, 0), DTYPES[run["dtype"]])
    np.save(os.path.join(out_dir, EMBEDDINGS + ".part.npy"), emb)
    os.replace(os.path.join(out_dir, EMBEDDINGS + ".part.npy"), os.path.join(out_dir, EMBEDDINGS))
    items = [source.items[r["index"]] for r in rows]
    table = pa.table(dict(path=[it.path for it in items], media_type=[it.media_type for it in items],
                          duration=[r["duration"] for r in rows], frames=[r["frames"] for r in rows],
                          caption=[it.caption for it in items], thumb=[r["thumb"] for r in rows],
                          itc_norm=[r["itc_norm"] for r in rows]))
    pq.write_table(table, os.path.join(out_dir, ITEMS + ".part"))
    os.replace(os.path.join(out_dir, ITEMS + ".part"), os.path.join(out_dir, ITEMS))
    with open(os.path.join(out_dir, BROKEN + ".part"), "w") as f:
        f.writelines(json.dumps(b) + "\n" for b in broken)
    os.replace(os.path.join(out_dir, BROKEN + ".part"), os.path.join(out_dir, BROKEN))
    meta = dict(run, media_root=source.root, source_kind=source.kind, items=len(rows), broken=len(broken),
                dim=int(emb.shape[1]) if emb.size else 0, token_parts=token_parts,
                embedding="L2-normalised mean over frames of the normalised per-frame ITC projections")
    write_json(meta, os.path.join(out_dir, META))
    return meta


def _parse(argv):
    p = argparse.ArgumentParser(prog="singularity-ds embed",
                                description="Embed a folder of videos/images, an annotation file or a shard "
                                            "index into a search index folder (resumable).")
    p.add_argument("checkpoint")
    p.add_argument("source", help="folder (recursive), annotation .json, shard index.json, or a folder or "
                                  "glob of .tar shards (img2dataset / video2dataset output)")
    p.add_argument("out_dir")
    p.add_argument("overrides", nargs="*", default=[], metavar="key=value",
                   help="model config overrides (e.g. image_res=224)")
    p.add_argument("--frames", type=int, default=4, help="frames per video (uniformly spread)")
    p.add_argument("--batch", type=int, default=32, help="media per forward pass, per rank")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp16", help="embedding (and token) precision")
    p.add_argument("--tokens", action="store_true", help="also store the token features for ITM re-ranking")
    p.add_argument("--media-dir", help="an annotation file's media folder (default: the file's folder)")
    p.add_argument("--part-size", type=int, default=256, help="items per resumable part")
    args = p.parse_intermixed_args(argv)
    if args.frames < 1 or args.batch < 1 or args.part_size < 1:
        raise ConfigError("--frames, --batch and --part-size must be >= 1")
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        raise ConfigError(f"embed: unexpected argument {bad[0]!r}; overrides are key=value")
    return args


def embed_main(argv) -> dict:
    import yaml

    from ..dist import setup
    from ..models import follow_model_pixels, load_model
    args = _parse(list(argv))
    if not os.path.exists(args.checkpoint):
        raise CheckpointError(f"checkpoint {args.checkpoint}: no such file or folder")
    source = open_source(args.source, args.media_dir)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1 or "SLURM_NTASKS" in os.environ
    device = (setup()["device"] if distributed
              else torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    overrides = {k.strip(): yaml.safe_load(v) for k, v in (o.split("=", 1) for o in args.overrides)}
    overrides["video_input.num_frames_test"] = args.frames
    model = load_model(args.checkpoint, **overrides).to(device)
    config = model.config
    follow_model_pixels(config, model)
    ident = checkpoint_id(args.checkpoint) if rank_world()[0] == 0 else None
    ident = all_gather(ident)[0]
    t0 = time.perf_counter()
    meta = build(model, source, args.out_dir, config, args.frames, args.batch, args.dtype, args.tokens,
                 args.part_size, ident)
    if rank_world()[0] == 0:
        took = time.perf_counter() - t0
        now = meta["embedded_now"]
        print(f"embedded {meta['items']} items into {args.out_dir} ({now} in this run: {took:.1f} s, "
              f"{now / took:.1f} items/s; {meta['broken']} broken, listed in "
              f"{os.path.join(args.out_dir, BROKEN)})")
    return meta

