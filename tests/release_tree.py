"""A fake released tree: the original Singularity's checkpoints and data folders, at tiny size.

Laid out as the released archives and the original's data folders are: the reference checkpoints produced
by the original code (temporal; and their 1-frame variant: the same weights less the temporal encoder)
under the archives' names (``ckpts/``, as ``$SL_EXP_DIR/ckpts``), annotation files in the released formats
(``data/anno_downstream``, as ``$SL_DATA_DIR``), the session's synthetic clips and images under the
original's media folder names (``data/videos_images``). Used by the reproduce, scripts and doc-command
tests (the session's ``release`` fixture)."""
import json
import os
import re
from pathlib import Path

import torch
import yaml

from singularity_ds.paper import load as load_paper

PAPER = load_paper()
CONFIGS = Path(__file__).resolve().parents[1] / "singularity_ds" / "configs"


def one_frame(src, dst):
    """The 1-frame variant of an original checkpoint: no temporal encoder, one temporal embedding, the
    config as the original saves a 1-frame run's."""
    ckpt = torch.load(src, map_location="cpu", weights_only=False)
    ckpt["model"] = {k: v for k, v in ckpt["model"].items() if not k.startswith("temporal_vision_encoder.")}
    ckpt["model"]["temporal_embeddings"] = ckpt["model"]["temporal_embeddings"][:, :1].clone()
    cfg = ckpt["config"]
    cfg["temporal_vision_encoder"]["enable"] = False
    cfg["add_temporal_embed"] = False
    cfg["video_input"]["num_frames"] = 1
    torch.save(ckpt, dst)


def packaged_test_files(config: str) -> list:
    """The downstream annotation file names a packaged config's ``test_file`` reads."""
    raw = yaml.safe_load((CONFIGS / f"{config}.yaml").read_text())
    return [os.path.basename(spec[0]) for spec in (raw.get("test_file") or {}).values()
            if isinstance(spec, list) and "anno_root_downstream" in str(spec[0])]


def link(src, dst):
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    os.symlink(src, dst)


def make_tree(root, corpus, reference) -> dict:
    """The tree under ``root``, from the session's synthetic ``corpus``; ``reference(name)``: the folder of
    a reference checkpoint. -> its paths: root, ckpts (the archives extracted), data (SL_DATA_DIR's
    layout), single / temporal ({"ret", "qa"}: the checkpoints), text (the override for their tokenizer)."""
    root = Path(root)
    ckpts, data = root / "ckpts", root / "data"
    temporal = {"ret": str(reference("singularity_tiny") / "checkpoint.pth"),
                "qa": str(reference("singularity_tiny_qa") / "checkpoint.pth")}
    single = {}
    for kind, src in temporal.items():
        single[kind] = str(root / f"{kind}_1f.pth")
        one_frame(src, single[kind])
    for variant, name in PAPER.archives["pt"]["names"].items():
        link(temporal["ret"] if variant.startswith("temporal") else single["ret"], str(ckpts / name))
    for archive in PAPER.archives:
        if archive == "pt":
            continue
        kind = "qa" if archive in ("msrvtt_qa", "anet_qa", "vqa") else "ret"
        image = archive in ("coco_ret", "flickr_ret", "vqa")
        for corpus_size in ("5m", "17m"):
            link(single[kind], str(ckpts / archive / f"ft_{archive}_singularity_{corpus_size}.pth"))
            if not image:
                name = f"ft_{archive}_singularity_temporal_{corpus_size}.pth"
                link(temporal[kind], str(ckpts / archive / name))
    anno_dir = data / "anno_downstream"
    anno_dir.mkdir(parents=True)
    syn = json.loads((corpus / "anno" / "mc_test.json").read_text())
    qa = json.loads((corpus / "anno" / "qa_test.json").read_text())
    images = json.loads((corpus / "anno" / "pretrain_image.json").read_text())
    for name, preset in PAPER.media.items():
        folder = data / "videos_images" / preset["folder"]
        folder.mkdir(parents=True)
        src = corpus / ("images" if preset["kind"] == "images" else "videos")
        for f in sorted(os.listdir(src)):
            os.symlink(src / f, folder / f)
    ret = [{"video": e["video"], "caption": e["caption"][e["answer"]]} for e in syn]
    formats = {  # the released formats: caption entries, paragraphs as sentence lists, MC options, QA
        "ret": ret,
        "paragraph": [{"video": e["video"], "caption": [e["caption"], "and then it stops"]} for e in ret],
        "image": [{"image": e["image"], "caption": [e["caption"], "a picture"]} for e in images],
        "mc": syn, "qa": qa,
        "vqa": [{"image": e["image"], "question": "what shape is it", "question_id": i, "answer": "square"}
                for i, e in enumerate(images)],
    }
    for split in PAPER.splits.values():
        kind = {"didemo": "paragraph", "anet": "paragraph", "coco": "image", "flickr": "image"}.get(
            split.media, "ret")
        if split.config.startswith("qa_"):
            kind = "vqa" if split.media == "coco" else "qa"
        elif split.config == "ret_msrvtt_mc":
            kind = "mc"
        (anno_dir / split.annotation).write_text(json.dumps(formats[kind]))
        for other in packaged_test_files(split.config):  # its config's other sets (didemo's val, ...)
            if not (anno_dir / other).exists():
                (anno_dir / other).write_text(json.dumps(formats[kind]))
    # what the packaged configs train on: ret_msrvtt, qa_msrvtt, and pretrain's corpora (their media
    # folders: the synthetic clips and images)
    videos = json.loads((corpus / "anno" / "pretrain_video.json").read_text())
    train = {"msrvtt_ret_train7k.json": ret, "msrvtt_test1k.json": ret, "msrvtt_qa_train.json": qa,
             "msrvtt_qa_val.json": qa}
    for name, entries in train.items():
        (anno_dir / name).write_text(json.dumps(entries))
    (data / "anno_pretrain").mkdir()
    pretrain = {"webvid_train.json": ("webvid_2fps_224", "videos", videos),
                "cc3m_train.json": ("cc3m_224", "images", images), "coco.json": ("coco", "images", images),
                "vg.json": ("vg", "images", images)}
    for name, (folder, kind, entries) in pretrain.items():
        (data / "anno_pretrain" / name).write_text(json.dumps(entries))
        if not (data / "videos_images" / folder).exists():
            os.symlink(corpus / kind, data / "videos_images" / folder)
    answers = sorted({e["answer"] for e in qa} | {"square"})
    for name in ("msrvtt_qa_answer_list.json", "anet_qa_answer_list.json", "vqa_answer_list.json"):
        (anno_dir / name).write_text(json.dumps(answers))
    # the reference checkpoints' text tower has a 512-word vocabulary: a BERT tokenizer over the words of
    # the fake tree's texts, the special tokens where bert-base-uncased has them
    words = {w for f in anno_dir.iterdir() for w in re.findall(r"[a-z]+", f.read_text().lower())}
    vocab = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab += sorted(words)
    vocab += [f"[unused{i}]" for i in range(99, 99 + 512 - len(vocab))]
    tok = root / "tokenizer"
    tok.mkdir()
    (tok / "vocab.txt").write_text("\n".join(vocab) + "\n")
    (tok / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "BertTokenizer",
                                                           "do_lower_case": True}))
    return dict(root=root, ckpts=str(ckpts), data=str(data), single=single, temporal=temporal,
                text=f"text_encoder={tok}")
