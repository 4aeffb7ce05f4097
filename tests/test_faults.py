"""Injected faults (issue 16): each test breaks an input and checks the one-line error or the documented
recovery. Each area has its own section below, with its own imports."""


# ====================================================================== eval: broken media and empty sets
# (singularity_ds/eval/broken.py) A few clips of a small corpus are overwritten with garbage; with
# skip_broken_media_eval the metrics must equal those of the same evaluation on an annotation file
# that never listed the broken clips, in memory and offloaded; without it, one line names them.
import json  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from singularity_ds.config import load_config  # noqa: E402
from singularity_ds.data import build_tokenizer, eval_datasets  # noqa: E402
from singularity_ds.data.synthetic import make_synthetic  # noqa: E402
from singularity_ds.errors import AnnotationError, MediaError  # noqa: E402
from singularity_ds.models import Singularity  # noqa: E402

BROKEN = ("clip_00001.mp4", "clip_00004.mp4", "clip_00009.mp4", "clip_00013.mp4")


@pytest.fixture(scope="module")
def broken_corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("broken_eval")
    make_synthetic(str(root), num_clips=18, size=32, frames=6, num_images=2, seed=1)
    anno = root / "anno"
    captions = {}  # clip -> its caption, for retrieval sets over all 18 clips
    for name in ("pretrain_video", "ret_val_motion", "ret_test_motion"):
        for e in json.loads((anno / f"{name}.json").read_text()):
            video = e["video"] if isinstance(e["video"], str) else e["video"][0]
            captions.setdefault(video, e["caption"])
    clips = sorted(captions)
    assert len(clips) == 18 and set(BROKEN) <= set(clips)
    # one video, two captions: a broken clip takes both with it (every text distinct: no tied scores,
    # whose order the in-memory and the offloaded paths may break differently)
    single = [{"video": c, "caption": [f"{captions[c]} {i}", f"clip {i} shows {captions[c]}"]}
              for i, c in enumerate(clips)]
    # one caption, several videos (SSV2): a caption keeps its readable videos (clips 1, 4, 13 have
    # readable companions), leaves with its only video (clip 9) or with two broken ones (13 and 1 again)
    multi = [{"video": clips[i:i + 3], "caption": f"{captions[clips[i]]} {i}"} for i in range(0, 18, 3)]
    multi[3]["video"] = ["clip_00009.mp4"]
    multi.append({"video": ["clip_00013.mp4", "clip_00001.mp4"], "caption": "two broken clips"})
    for name, entries in (("single", single), ("multi", multi)):
        (anno / f"{name}.json").write_text(json.dumps(entries))
        (anno / f"{name}_clean.json").write_text(json.dumps(without_broken(entries)))
    for name in ("mc_test", "qa_test"):
        entries = json.loads((anno / f"{name}.json").read_text())
        (anno / f"{name}_clean.json").write_text(json.dumps(without_broken(entries)))
    (anno / "empty.json").write_text("[]")
    garbage = torch.randint(0, 256, (3000,), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    for clip in BROKEN:  # garbage bytes where an MP4 was
        (root / "videos" / clip).write_bytes(garbage.numpy().tobytes())
    return root


def without_broken(entries):
    """The annotation file a user would write after deleting the broken clips from it."""
    out = []
    for e in entries:
        if isinstance(e["video"], list):
            kept = [v for v in e["video"] if v not in BROKEN]
            if kept:
                out.append(dict(e, video=kept))
        elif e["video"] not in BROKEN:
            out.append(e)
    return out


def _config(root, name, anno, skip, kind="ret", multi=False, extra=()):
    task = {"ret": "ret_msrvtt", "mc": "ret_msrvtt", "qa": "qa_msrvtt"}[kind]
    spec = f"[{root}/anno/{anno}.json,{root}/videos,video]"
    return load_config([task, "tiny"], ["image_res=32", "video_input.num_frames_test=3", "max_txt_l=16",
                                        f"test_types=[{name}]", f"test_file={{{name}: {spec}}}",
                                        f"has_multi_vision_gt={multi}", f"skip_broken_media_eval={skip}",
                                        *extra])


def _paths(root, clips=BROKEN):
    return [str(root / "videos" / c) for c in clips]


@pytest.fixture(scope="module")
def random_model():
    torch.manual_seed(0)
    model = Singularity(load_config(["pretrain", "tiny"], ["image_res=32"])).eval()
    with torch.no_grad():  # spread the ITM logits so that ranks are decided by real differences
        model.itm_head.weight.mul_(20)
    return model


@pytest.mark.parametrize("multi", [False, True])
def test_skipped_broken_media_give_the_metrics_of_the_set_without_them(broken_corpus, random_model, tmp_path,
                                                                        multi):
    from singularity_ds.eval.retrieval import evaluate
    kind = "multi" if multi else "single"
    tok = build_tokenizer()
    ds = eval_datasets(_config(broken_corpus, "x", kind, True, multi=multi))["x"]
    clean = eval_datasets(_config(broken_corpus, "x", f"{kind}_clean", False, multi=multi))["x"]
    ref = evaluate(random_model, clean, tok, 16, k_test=10)
    dense = evaluate(random_model, ds, tok, 16, k_test=10)
    off = evaluate(random_model, ds, tok, 16, k_test=10, offload=True, feature_store="disk",
                   feature_dir=str(tmp_path / "f"))
    assert dense["itm"] == ref["itm"] and dense["itc"] == ref["itc"]
    assert off["itm"] == ref["itm"] and off["itc"] == ref["itc"]
    if not multi:  # not a vacuous equality: the ITM stage reorders
        assert ref["itm"] != evaluate(random_model, clean, tok, 16, k_test=1)["itm"]
    # same batches as the clean set: the very same score matrices
    for key in ("i2t", "t2i", "i2t_itc"):
        assert torch.equal(dense["scores"][key], ref["scores"][key]), key
    # single: 18 videos, 36 captions, each broken clip takes its two; multi: 18 media (clips 13 and 1
    # listed twice), 7 captions, two of which lose every video
    media, texts, skipped_texts = (12, 5, 2) if multi else (14, 28, 8)
    for res in (dense, off):
        assert res["skipped_media"] == _paths(broken_corpus)  # distinct, in order
        assert (res["media"], res["texts"], res["skipped_texts"]) == (media, texts, skipped_texts)
        assert (len(ds), len(ds.text)) == (18, texts + skipped_texts)
        assert (len(clean), len(clean.text)) == (media, texts)
    assert set(dense) - {"scores"} == set(off) - {"stats"}


def test_broken_media_without_the_flag_is_one_line_naming_them(broken_corpus, random_model):
    from singularity_ds.eval.retrieval import evaluate
    ds = eval_datasets(_config(broken_corpus, "x", "single", False))["x"]
    first, second, third, _ = _paths(broken_corpus)
    with pytest.raises(MediaError) as err:
        evaluate(random_model, ds, build_tokenizer(), 16, k_test=10, name="test_file.x (single.json)")
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"{first}: ") and err.value.path == first
    assert msg.endswith(f"; 4 of the 18 media of test_file.x (single.json) could not be read ({first}, "
                        f"{second}, {third} and 1 more); set skip_broken_media_eval=True to evaluate "
                        "without them")


def _ckpt(model, path):
    from singularity_ds.models.weights import plain_config
    torch.save({"model": model.state_dict(), "config": plain_config(model.config)}, path)
    return str(path)


def _overlay(tmp_path, root, name, anno):
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"test_types: [{name}]\ntest_file:\n"
                    f"  {name}: ['{root}/anno/{anno}.json', '{root}/videos', video]\n")
    return str(path)


def test_eval_cli_lists_the_skipped_media_in_eval_json(broken_corpus, random_model, tmp_path, capsys, caplog):
    from singularity_ds.cli import main
    from singularity_ds.eval.retrieval import evaluate
    ckpt = _ckpt(random_model, tmp_path / "m.pth")
    args = ["eval", "ret", "ret_msrvtt", _overlay(tmp_path, broken_corpus, "x", "single"), ckpt,
            "image_res=32", "video_input.num_frames_test=3", "k_test=10", "max_txt_l=16"]
    assert main(args + [f"output_dir={tmp_path / 'a'}"]) == 2  # without the flag: one line, no results
    err = capsys.readouterr().err.splitlines()[-1]  # after the data layer's warning per broken file
    warnings = [r.getMessage() for r in caplog.records if r.getMessage().startswith("broken media")]
    assert len(warnings) == 4, warnings
    assert err.startswith("singularity-ds: error: ") and "4 of the 18 media of test_file.x (" in err
    assert err.endswith("set skip_broken_media_eval=True to evaluate without them")
    assert not (tmp_path / "a" / "eval.json").exists()
    assert main(args + [f"output_dir={tmp_path / 'b'}", "skip_broken_media_eval=True", "--offload"]) == 0
    got = json.loads((tmp_path / "b" / "eval.json").read_text())["x"]
    assert got["skipped_media"] == _paths(broken_corpus)
    assert (got["media"], got["texts"], got["skipped_texts"]) == (14, 28, 8)
    clean = eval_datasets(_config(broken_corpus, "x", "single_clean", False))["x"]
    ref = evaluate(random_model, clean, build_tokenizer(), 16, k_test=10)
    assert got["itm"] == ref["itm"] and got["itc"] == ref["itc"]
    assert "left out: 4 broken media, 8 texts" in capsys.readouterr().out


def test_train_ret_epoch_results_list_the_skipped_media(broken_corpus, random_model):
    """What the trainer writes to eval_<epoch>.json is the task's evaluation: counts and paths included."""
    from singularity_ds.tasks.caption import RetrievalTask
    task = RetrievalTask()
    for offload in (False, True):
        cfg = _config(broken_corpus, "x", "single", True, extra=[f"eval_offload={offload}", "k_test=10"])
        res = task.evaluate(random_model, cfg, build_tokenizer())["x"]
        assert res["skipped_media"] == _paths(broken_corpus)
        assert (res["media"], res["texts"], res["skipped_texts"]) == (14, 28, 8)
        assert sorted(task.eval_scalars({"x": res})) == sorted(f"x/{k}" for k in res["itm"])
        json.dumps(res)  # written as JSON


def _two_rank_worker(rank, world, port, root, feature_dir, out):
    import os

    import torch.distributed as dist

    from singularity_ds.eval.retrieval import evaluate
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = Singularity(load_config(["pretrain", "tiny"], ["image_res=32"])).eval()
    with torch.no_grad():
        model.itm_head.weight.mul_(20)
    tok = build_tokenizer()
    ds = eval_datasets(_config(root, "x", "single", True))["x"]
    res = evaluate(model, ds, tok, 16, k_test=10, offload=True, feature_store="disk", feature_dir=feature_dir)
    ds.skip_broken = False
    try:  # rank 0 reads clips 0-8 (1 and 4 broken), rank 1 clips 9-17 (9 and 13): both stop alike
        evaluate(model, ds, tok, 16, k_test=10)
        error = None
    except MediaError as e:
        error = str(e)
    out[rank] = dict(itm=res["itm"], itc=res["itc"], skipped_media=res["skipped_media"], media=res["media"],
                     texts=res["texts"], error=error)
    dist.destroy_process_group()


@pytest.mark.multiproc
def test_two_ranks_skip_and_refuse_broken_media_alike(broken_corpus, random_model, tmp_path, free_port):
    import torch.multiprocessing as mp

    from singularity_ds.eval.retrieval import evaluate
    out = mp.Manager().dict()
    mp.start_processes(_two_rank_worker, args=(2, free_port, broken_corpus, str(tmp_path / "f"), out),
                       nprocs=2, start_method="spawn")
    clean = eval_datasets(_config(broken_corpus, "x", "single_clean", False))["x"]
    ref = evaluate(random_model, clean, build_tokenizer(), 16, k_test=10)
    for r in (0, 1):
        got = out[r]
        assert got["itm"] == ref["itm"] and got["itc"] == ref["itc"]
        assert got["skipped_media"] == _paths(broken_corpus) and (got["media"], got["texts"]) == (14, 28)
        assert got["error"] == out[0]["error"] and "4 of the 18 media of evaluation set could not be read" \
            in got["error"]


def test_multiple_choice_skips_the_questions_of_broken_videos(broken_corpus, random_model):
    from singularity_ds.eval.mc import evaluate_mc
    tok = build_tokenizer()
    ds = eval_datasets(_config(broken_corpus, "mc", "mc_test", True, kind="mc"), kind="mc")["mc"]
    clean = eval_datasets(_config(broken_corpus, "mc", "mc_test_clean", False, kind="mc"), kind="mc")["mc"]
    assert len(clean) == len(ds) - 2  # clips 1 and 4 are test clips
    res, ref = (evaluate_mc(random_model, d, tok, 16, num_frames_test=3) for d in (ds, clean))
    assert res["predictions"] == ref["predictions"] and res["accuracy"] == ref["accuracy"]
    assert res["videos"] == len(clean)
    assert res["skipped_media"] == _paths(broken_corpus, BROKEN[:2])
    ds.skip_broken = False
    with pytest.raises(MediaError, match=r"; 2 of the 6 videos of MC \(x\) could not be read \(.*clip_00001"
                                         r".mp4, .*clip_00004.mp4\); set skip_broken_media_eval=True"):
        evaluate_mc(random_model, ds, tok, 16, num_frames_test=3, name="MC (x)")


def test_qa_skips_the_questions_of_broken_videos(broken_corpus):
    from singularity_ds.eval.qa import evaluate_qa
    from singularity_ds.eval.run import load_answer_list
    from singularity_ds.models import SingularityQA
    cfg = _config(broken_corpus, "test", "qa_test", True, kind="qa",
                  extra=[f"answer_list={broken_corpus}/anno/qa_answers.json", "max_q_len=16", "max_a_len=6"])
    cfg.task = "train_qa"
    torch.manual_seed(0)
    model = SingularityQA(cfg).eval()
    tok, answers = build_tokenizer(), load_answer_list(cfg)
    ds = eval_datasets(cfg, kind="qa")["test"]
    cfg.skip_broken_media_eval, cfg.test_file.test[0] = False, f"{broken_corpus}/anno/qa_test_clean.json"
    clean = eval_datasets(cfg, kind="qa")["test"]
    args = dict(k_test=4, batch_size=4)
    res, ref = (evaluate_qa(model, d, answers, tok, 16, 6, **args) for d in (ds, clean))
    skipped = res.pop("skipped_questions")
    assert skipped == len(ds) - len(clean) == 6  # three questions about each of clips 1 and 4
    assert res.pop("skipped_media") == _paths(broken_corpus, BROKEN[:2])
    assert res == {k: v for k, v in ref.items() if k not in ("skipped_questions", "skipped_media")}
    assert ref["skipped_questions"] == 0 and ref["skipped_media"] == []
    ds.skip_broken = False
    with pytest.raises(MediaError, match=r"; 6 of the 18 questions of QA could not be read \(2 media files: "
                                         r".*clip_00001.mp4, .*clip_00004.mp4\); set skip_broken_media_eval"):
        evaluate_qa(model, ds, answers, tok, 16, 6, name="QA", **args)


def test_empty_set_is_one_line_before_any_model_work(broken_corpus, tmp_path, capsys):
    from singularity_ds.cli import main
    from singularity_ds.eval.run import evaluate_qa_sets, evaluate_sets
    message = (f"config key 'test_file.empty': {broken_corpus / 'anno' / 'empty.json'}: no entries (an empty "
               "list); a corpus needs at least one")
    for kind, run in (("ret", evaluate_sets), ("qa", evaluate_qa_sets)):
        cfg = _config(broken_corpus, "empty", "empty", False, kind=kind,
                      extra=[f"answer_list={broken_corpus}/anno/qa_answers.json"])
        if kind == "ret":  # a good set listed first is not evaluated either (the "model" is no model)
            cfg.test_types = ["good", "empty"]
            cfg.test_file.good = [str(broken_corpus / "anno" / "single_clean.json"),
                                  str(broken_corpus / "videos"), "video"]
        with pytest.raises(AnnotationError) as err:
            run(object(), cfg, build_tokenizer())
        assert str(err.value) == message
    torch.manual_seed(0)
    ckpt = _ckpt(Singularity(load_config(["pretrain", "tiny"], ["image_res=32"])), tmp_path / "m.pth")
    for kind in ("ret", "mc"):
        assert main(["eval", kind, "ret_msrvtt", _overlay(tmp_path, broken_corpus, "empty", "empty"), ckpt,
                     "image_res=32", f"output_dir={tmp_path / kind}"]) == 2
        assert capsys.readouterr().err == f"singularity-ds: error: {message}\n"


def test_every_media_broken_with_the_flag_is_one_line(broken_corpus, tmp_path, random_model):
    from singularity_ds.eval.run import evaluate_sets
    anno = tmp_path / "all_broken.json"
    anno.write_text(json.dumps([{"video": c, "caption": "a caption"} for c in BROKEN]))
    cfg = _config(broken_corpus, "bad", "empty", True)
    cfg.test_file.bad[0] = str(anno)
    with pytest.raises(MediaError) as err:
        evaluate_sets(random_model, cfg, build_tokenizer())
    first, second, third, _ = _paths(broken_corpus)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"{first}: ")
    assert msg.endswith(f"; 4 of the 4 media of test_file.bad ({anno}) could not be read ({first}, {second}, "
                        f"{third} and 1 more): nothing left to evaluate")
# ====================================================================== end of eval: broken media, empty sets


import os  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402

import pytest  # noqa: E402

from singularity_ds.cli import main  # noqa: E402

# ====================================================================================================
# Run folder, checkpoints and exports (faults_run): corrupt exports, damaged checkpoints and resume=auto,
# a full or read-only disk during a save, the run folder after a resume or a failed start, annotation
# files changed before a resume, exports evaluated at their own resolution.
# ====================================================================================================
from singularity_ds.engine.manifest import check_manifest  # noqa: E402
from singularity_ds.models import load_model  # noqa: E402
from singularity_ds.models.weights import export  # noqa: E402


def video_overlay(corpus, folder) -> str:
    """A training overlay on a private copy of the video annotations (tests may edit it)."""
    anno = folder / "anno.json"
    shutil.copy(corpus / "anno" / "pretrain_video.json", anno)
    overlay = folder / "data.yaml"
    overlay.write_text(f"train_file: ['{anno}', '{corpus / 'videos'}', video]\n")
    return str(overlay)


def train(overlay, out, *extra):
    return main(["train", "pretrain", "tiny", overlay, "image_res=32", "batch_size.video=4", "num_workers=0",
                 "log_freq=1", *extra, f"output_dir={out}"])


def error_line(capsys) -> str:
    """The one ``singularity-ds: error:`` line of the last command (and no traceback)."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("singularity-ds: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


def history(out) -> list:
    return [r["step"] for r in json.load(open(out / "history.json"))]


def tiny_export(folder, **overrides):
    from conftest import tiny_config
    torch.manual_seed(0)
    model = Singularity(tiny_config(image_res=32, tower_init="random", **overrides))
    export(model, str(folder))
    return model


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage"])
def test_corrupt_export_weights_are_one_line(tmp_path, damage):
    tiny_export(tmp_path / "export")
    weights = tmp_path / "export" / "model.safetensors"
    data = weights.read_bytes()
    damaged = {"truncated": data[:len(data) // 2], "empty": b"", "garbage": os.urandom(4096)}[damage]
    weights.write_bytes(damaged)
    with pytest.raises(Exception) as e:
        load_model(str(tmp_path / "export"))
    msg = str(e.value)
    assert type(e.value).__name__ == "CheckpointError" and "\n" not in msg, msg
    assert msg.startswith(f"{weights}: not a readable safetensors file") and "export it again" in msg


def test_corrupt_export_config_is_one_line_in_load_model_eval_and_training(corpus, tmp_path, capsys,
                                                                           monkeypatch):
    tiny_export(tmp_path / "export")
    cfg = tmp_path / "export" / "config.json"
    cfg.write_text(cfg.read_text()[:200])
    with pytest.raises(Exception, match=rf"^{cfg}: not valid JSON \(.* at line \d+, column \d+\); the "
                                        r"export is damaged"):
        load_model(str(tmp_path / "export"))
    monkeypatch.setenv("SL_DATA_DIR", str(tmp_path))  # the packaged corpora's root (never read here)
    assert main(["eval", "ret", "ret_msrvtt", "tiny", str(tmp_path / "export")]) == 2
    assert f"{cfg}: not valid JSON" in error_line(capsys)
    out = tmp_path / "run"
    assert main(["train", "train_ret", "tiny", str(corpus / "configs" / "ret.yaml"),  # data that reads
                 f"pretrained_path={tmp_path / 'export'}", f"output_dir={out}"]) == 2
    assert f"{cfg}: not valid JSON" in error_line(capsys)


def test_export_is_self_contained_and_eval_follows_its_image_res(corpus, tmp_path, capsys):
    """An export loads without the architecture file its training named; `eval` runs it at the image_res
    it was trained at (tiny.yaml says 64), and an explicit other one names the file, tensor and key."""
    from singularity_ds.models.arch import ARCH_DIR
    arch = tmp_path / "my_bert.json"
    arch.write_text((ARCH_DIR / "config_bert_tiny.json").read_text())
    model = tiny_export(tmp_path / "export", bert_config=str(arch))
    arch.unlink()
    again = load_model(str(tmp_path / "export"))
    for (k, a), (k2, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    args = ["eval", "ret", "ret_msrvtt", "tiny", str(corpus / "configs" / "ret.yaml"),
            str(tmp_path / "export"), "test_types=[motion]", "k_test=4", "max_txt_l=16",
            "video_input.num_frames_test=1"]
    assert main(args + [f"output_dir={tmp_path / 'eval'}"]) == 0
    assert "r_mean" in json.loads((tmp_path / "eval" / "eval.json").read_text())["motion"]["itm"]
    capsys.readouterr()
    assert main(args + ["image_res=64", f"output_dir={tmp_path / 'eval64'}"]) == 2
    line = error_line(capsys)
    assert f"{tmp_path / 'export'}: vision_encoder." in line and "relative_position_bias_table" in line
    assert "image_res=64" in line and "load it with image_res=32" in line


def test_resume_auto_skips_a_damaged_checkpoint_and_the_run_keeps_every_step(corpus, tmp_path, capsys):
    overlay = video_overlay(corpus, tmp_path)
    reference, out = tmp_path / "reference", tmp_path / "run"
    args = ("save_every_steps=2", "keep_last_checkpoints=4")
    assert train(overlay, reference, "max_steps=6", *args) == 0
    # step 6 is due (save_every_steps) and ends the run: saved (and hashed) once
    assert (reference / "train.log").read_text().count("step00000006 saved") == 1
    # a run that stops after step 5 (its last checkpoint, step 5, then cut short on disk) ...
    assert train(overlay, out, "max_steps=5", *args) == 0
    ckpts = out / "checkpoints"
    assert check_manifest(str(ckpts / "step00000005")) is None
    shard = next((ckpts / "step00000005").glob("*optim_states.pt"))
    shard.write_bytes(shard.read_bytes()[:1000])
    # ... named explicitly: one line naming the file
    assert train(overlay, out, "max_steps=6", *args, "resume=step00000005") == 2
    line = error_line(capsys)
    assert f"resume=step00000005: {shard} is 1000 bytes, the manifest says" in line
    # ... resume=auto: falls back to step 4, says why, replays step 5
    assert train(overlay, out, "max_steps=6", *args, "resume=auto") == 0
    log = (out / "train.log").read_text()
    assert f"skipping checkpoint step00000005: {shard} is 1000 bytes" in log
    assert "resumed from step00000004" in log
    got, want = json.load(open(out / "history.json")), json.load(open(reference / "history.json"))
    assert [r["step"] for r in got] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(got, want):
        assert (a["loss_ita"], a["loss_mlm"], a["lr"]) == (b["loss_ita"], b["loss_mlm"], b["lr"]), a["step"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(out / "tb"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4, 5, 6]
    # a damaged checkpoint of an earlier version (no manifest): DeepSpeed's failure is one line too
    ckpt6 = ckpts / "step00000006"
    os.remove(ckpt6 / "manifest.json")
    shard6 = next(ckpt6.glob("*optim_states.pt"))
    shard6.write_bytes(shard6.read_bytes()[:1000])
    assert train(overlay, out, "max_steps=7", *args, "resume=step00000006") == 2
    assert f"{ckpt6}: DeepSpeed could not load this checkpoint (" in error_line(capsys)


@pytest.fixture
def small_disk(tmp_path):
    """``mount(fs_folder)`` makes ``fs_folder`` a 90 MiB tmpfs (one tiny checkpoint fits, not two);
    ``read_only(fs_folder)`` remounts it read-only. Skipped where mounting is not allowed."""
    mounted = []

    def mount(folder):
        folder.mkdir(parents=True)
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=90m", "tmpfs", str(folder)],
                              capture_output=True)
        if proc.returncode:
            pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.decode().strip()})")
        mounted.append(folder)

    def read_only(folder):
        subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)

    yield mount, read_only
    for folder in mounted:
        subprocess.run(["umount", str(folder)], check=False)


def test_full_or_read_only_disk_during_a_save_keeps_the_previous_checkpoint(corpus, tmp_path, capsys,
                                                                            small_disk):
    mount, read_only = small_disk
    overlay = video_overlay(corpus, tmp_path)
    out = tmp_path / "run"
    ckpts = out / "checkpoints"
    mount(ckpts)
    assert train(overlay, out, "max_steps=4", "save_every_steps=2", "keep_last_checkpoints=3") == 2
    line = error_line(capsys)
    assert line.startswith(f"singularity-ds: error: checkpoint step00000004 could not be written to {ckpts} ")
    assert re.search(r"; \d+ MiB free there, a checkpoint takes \d+ MiB\); checkpoint step00000002 and "
                     r"'latest' are intact: free space or make the folder writable, then rerun with "
                     r"resume=auto$", line), line
    assert (ckpts / "latest").read_text() == "step00000002"
    assert check_manifest(str(ckpts / "step00000002")) is None
    assert not (ckpts / ".tmp" / "step00000004").exists()  # the partial save's space is given back
    assert line[len("singularity-ds: error: "):] in (out / "train.log").read_text()
    read_only(ckpts)
    assert train(overlay, out, "max_steps=4", "save_every_steps=2", "resume=auto") == 2
    line = error_line(capsys)
    assert f"could not be written to {ckpts} (Read-only file system" in line
    assert "checkpoint step00000002 and 'latest' are intact" in line


def test_a_failed_start_is_logged_and_does_not_block_the_rerun(corpus, tmp_path, capsys):
    overlay = video_overlay(corpus, tmp_path)
    out = tmp_path / "run"
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "model.safetensors").write_bytes(b"")
    (tmp_path / "broken" / "config.json").write_text("{}")
    # a damaged pretrained_path is named before its config's architecture is taken, and before anything
    # is written
    assert train(overlay, out, "max_steps=2", f"pretrained_path={tmp_path / 'broken'}") == 2
    assert "model.safetensors: not a readable safetensors file" in error_line(capsys)
    assert not out.exists()
    # a start that fails once the run folder is there: its line is in train.log
    assert train(overlay, out, "max_steps=2", "resume=step00000007") == 2
    line = error_line(capsys)
    assert "resume=step00000007: " in line and "is not a complete checkpoint (complete ones: none)" in line
    assert line[len("singularity-ds: error: "):] in (out / "train.log").read_text()
    partial = out / "checkpoints" / ".tmp" / "step00000099"  # as a save killed midway leaves it
    partial.mkdir(parents=True)
    (partial / "mp_rank_00_model_states.pt").write_bytes(b"partial")
    assert train(overlay, out, "max_steps=2") == 0  # the corrected rerun, same folder, no resume
    assert not partial.exists() and history(out) == [1, 2]
    # the first attempt's line stays (train.log is appended to)
    assert "is not a complete checkpoint" in (out / "train.log").read_text()
    (out / "notes.txt").write_text("mine")
    assert train(overlay, tmp_path / "run", "max_steps=2") == 2
    assert "exists and is not empty (it holds checkpoint step00000002)" in error_line(capsys)


def test_resume_refuses_changed_annotations_unless_allowed(corpus, tmp_path, capsys):
    overlay = video_overlay(corpus, tmp_path)
    out = tmp_path / "run"
    assert train(overlay, out, "max_steps=2") == 0
    anno = tmp_path / "anno.json"
    entries = json.loads(anno.read_text())
    anno.write_text(json.dumps(entries + entries[:4]))
    assert train(overlay, out, "max_steps=3", "resume=auto") == 2
    line = error_line(capsys)
    assert f"train_file {anno} changed since checkpoint step00000002 ({len(entries)} entries, sha256 " in line
    assert f"then, {len(entries) + 4} entries, sha256 " in line and "resume_allow_data_change=True" in line
    assert train(overlay, out, "max_steps=3", "resume=auto", "resume_allow_data_change=True") == 0
    assert history(out) == [1, 2, 3]


import sys  # noqa: E402

import pytest  # noqa: E402

from singularity_ds.data import (  # noqa: E402
    CaptionDataset,
    MediaSource,
    build_transform,
    caption_train_loader,
    load_corpus,
    make_loader,
)
from singularity_ds.data.annotations import read_annotations  # noqa: E402
from singularity_ds.data.loader import CaptionCollate  # noqa: E402
from singularity_ds.data.shards import ShardStream, make_shards, shard_list  # noqa: E402
from singularity_ds.errors import ConfigError  # noqa: E402
from singularity_ds.tasks import TASKS  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# =====================================================================================================
# Data layer and config loading: broken media in loader workers, annotation validation, YAML syntax
# errors, media paths outside the media folder.
# =====================================================================================================
def _write(path, obj) -> str:
    path.write_text(json.dumps(obj))
    return str(path)


def _garbage_corpus(tmp_path, names, entries_per_file=2):
    """A video corpus whose every file is garbage: (annotation file, media folder)."""
    media = tmp_path / "garbage"
    media.mkdir()
    for name in names:
        (media / name).write_bytes(b"not a video" * 10)
    anno = _write(tmp_path / "garbage.json", [{"video": n, "caption": f"caption {i} of {n}"}
                                              for n in names for i in range(entries_per_file)])
    return anno, str(media)


def _worker_error(dataset, num_workers):
    loader = make_loader(dataset, 2, CaptionCollate(build_tokenizer(), 16), num_workers=num_workers)
    with pytest.raises(MediaError) as raised:
        next(iter(loader))
    return raised.value


def test_broken_media_in_a_loader_worker_is_the_same_one_line_error(tmp_path):
    """Before: ``RuntimeError: Caught MediaError in DataLoader worker process 0.`` + the worker's traceback
    (MediaError(path, reason) could not be rebuilt from the traceback text); now the MediaError itself."""
    anno, media = _garbage_corpus(tmp_path, [f"v{i}.mp4" for i in range(4)])

    def dataset():
        return CaptionDataset(load_corpus([(anno, media, "video")]),
                              MediaSource("video", build_transform(32), 2), num_tries=3)
    in_process, in_worker = _worker_error(dataset(), 0), _worker_error(dataset(), 2)
    assert str(in_worker) == str(in_process) and "\n" not in str(in_worker)
    paths = in_worker.path.split(", ")
    assert len(paths) == 3 and all(os.path.dirname(p) == media for p in paths)
    assert "3 broken media in a row for one training item" in in_worker.reason
    assert in_worker.reason.endswith("check them, or raise media_retries")


def test_shard_stream_error_in_a_loader_worker_arrives_whole(tmp_path):
    """A worker whose whole part of a shard corpus is broken: the MediaError naming the shards, not a
    RuntimeError with a traceback."""
    anno, media = _garbage_corpus(tmp_path, [f"v{i}.mp4" for i in range(4)], entries_per_file=1)
    make_shards(anno, media, str(tmp_path / "shards"), progress=False)
    stream = ShardStream(shard_list(str(tmp_path / "shards" / "index.json"), "video"),
                         MediaSource("video", build_transform(32), 2), batch_size=2)
    loader = make_loader(stream, 2, CaptionCollate(build_tokenizer(), 16), num_workers=1)
    with pytest.raises(MediaError, match=r"shard-000000.tar: no sample of this worker's part \(4 samples\)"):
        next(iter(loader))


class CountingSource:
    """A media source that reads nothing: files named in ``broken`` fail, the others give a tensor made
    from the path's number and the seed (so two items are equal iff they used the same file and seed)."""
    media_type = "video"

    def __init__(self, broken):
        self.broken, self.reads = set(broken), []

    def __call__(self, path, seed):
        self.reads.append(os.path.basename(path))
        if os.path.basename(path) in self.broken:
            raise MediaError(path, "garbage")
        return torch.tensor([[float(os.path.basename(path)[1:-4]), float(seed)]])


def test_known_broken_files_are_never_read_again_nor_drawn_as_replacements(tmp_path):
    """Before: a broken file was read again every time its entry or a replacement draw met it, and each
    of those reads used up a try. Now it is read once per process, and an item comes out the same as
    from a process that knew nothing (resumed run, other num_workers)."""
    names = [f"v{i}.mp4" for i in range(12)]
    broken = set(names[:8])  # two thirds of the corpus
    anno = _write(tmp_path / "a.json", [{"video": n, "caption": f"c {n} {i}"}
                                        for n in names for i in range(2)])
    store = load_corpus([(anno, str(tmp_path), "video")])
    source = CountingSource(broken)
    warm = CaptionDataset(store, source, num_tries=30)
    items = [(i, 1000 + 7 * i) for i in range(len(store))] * 2  # every entry, twice
    failures, replaced_own = [], 0
    for index, seed in items:
        got = warm[(index, seed)]
        fresh = CaptionDataset(store, CountingSource(broken), num_tries=30)[(index, seed)]
        assert torch.equal(got["media"], fresh["media"]) and got["caption"] == fresh["caption"], index
        assert f"v{int(got['media'][0, 0])}.mp4" not in broken  # the file it was read from
        if os.path.basename(store[index]["media"]) in broken:  # its own file comes first in its failures
            replaced_own += got["failures"][0][0] == store[index]["media"]
        failures += got["failures"]
    assert sorted(n for n in source.reads if n in broken) == sorted(broken)  # each broken file read once
    assert {os.path.basename(p) for p, _ in failures} == broken
    assert replaced_own == 2 * 16  # the 16 entries of broken files, each time they came


def test_a_corpus_whose_every_file_is_known_broken_stops_with_one_line(tmp_path):
    anno = _write(tmp_path / "a.json", [{"video": f"v{i}.mp4", "caption": "c"} for i in range(3)])
    ds = CaptionDataset(load_corpus([(anno, str(tmp_path), "video")]),
                        CountingSource({"v0.mp4", "v1.mp4", "v2.mp4"}), num_tries=3)
    with pytest.raises(MediaError, match="3 broken media in a row"):
        ds[(0, 1)]
    with pytest.raises(MediaError, match=r"1000 replacement draws for one training item landed on files "
                                         r"this loader found broken \(3 files so far, "
                                         r"in a corpus of 3 entries\)"):
        ds[(1, 1)]
    assert len(ds.source.reads) == 3  # the second item read nothing


def _train(tmp_path, out, *args):
    cmd = [sys.executable, "-m", "singularity_ds", "train", "pretrain", "tiny", "image_res=32",
           "batch_size.video=4", "log_freq=1", "max_steps=3", "num_workers=2", f"output_dir={out}", *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, SL_DATA_DIR=str(tmp_path), PYTHONUNBUFFERED="1"))


@pytest.mark.slow
def test_train_with_broken_media_in_workers(tmp_path):
    """``singularity-ds train`` with num_workers=2: files that stay broken end the run in the one line
    (also in train.log); a few broken files are replaced and the summary names each of them."""
    make_synthetic(str(tmp_path / "c"), num_clips=18, size=32, frames=8, num_images=4, seed=2, shards=False)
    anno = tmp_path / "c" / "anno" / "pretrain_video.json"
    names = sorted({e["video"] for e in json.loads(anno.read_text())})
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    for n in names:
        (garbage / n).write_bytes(b"not a video" * 10)
    proc = _train(tmp_path, tmp_path / "dead", f"train_file=[{anno},{garbage},video]")
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert last.startswith("singularity-ds: error: ")
    assert "3 broken media in a row for one training item" in last
    named = last[len("singularity-ds: error: "):].split(": ")[0].split(", ")
    assert len(named) == 3 and {os.path.dirname(p) for p in named} == {str(garbage)}
    log = (tmp_path / "dead" / "train.log").read_text().strip().splitlines()[-1]
    assert log.endswith("ERROR singularity_ds.train: " + last[len("singularity-ds: error: "):])

    some = tmp_path / "some"
    shutil.copytree(tmp_path / "c" / "videos", some)
    for n in names[:2]:
        (some / n).write_bytes(b"not a video" * 10)
    proc = _train(tmp_path, tmp_path / "ok", f"train_file=[{anno},{some},video]", "media_retries=10")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = [line for line in (tmp_path / "ok" / "train.log").read_text().splitlines()
               if "broken media were replaced during training" in line]
    assert len(summary) == 1, summary
    assert set(summary[0].split("(2 files): ")[1].split(", ")) == {str(some / n) for n in names[:2]}, summary
    entries = sum(e["video"] in names[:2] for e in json.loads(anno.read_text()))
    # one epoch (3 steps of 4 = all 12 entries): each entry of a broken file replaced at least once
    assert int(summary[0].split("WARNING singularity_ds.train: ")[1].split()[0]) >= entries


def test_bad_annotation_entries_are_refused_naming_file_entry_and_key(tmp_path):
    """Before: ``StopIteration`` (empty list), ``'int' object has no attribute 'lower'`` / ``unhashable
    type: 'list'`` (ints in a caption list), ``join() argument must be str`` (an int in a video list),
    each after training had started."""
    cases = [
        ([], r"empty.json: no entries \(an empty list\); a corpus needs at least one"),
        ([{"video": "a.mp4", "caption": "x"}, {"video": "b.mp4", "caption": [1, 2]}],
         r"ints.json: entry 1: key 'caption' must be a non-empty list of strings, got a list holding int 1"),
        ([{"video": "a.mp4", "caption": [["x"]]}],
         r"nested.json: entry 0: key 'caption' must be a non-empty list of strings, got a list holding list"),
        ([{"video": ["a.mp4", 3], "caption": "x"}],
         r"vint.json: entry 0: key 'video' must be a non-empty list of strings, got a list holding int 3"),
        ([{"video": [], "caption": "x"}],
         r"vempty.json: entry 0: key 'video' must be a non-empty list of strings, got an empty list"),
        ([{"video": "", "caption": "x"}], r"vblank.json: entry 0: key 'video': empty media path"),
    ]
    for entries, message in cases:
        name = message.split(".json")[0]
        with pytest.raises(AnnotationError, match=message):
            read_annotations(_write(tmp_path / f"{name}.json", entries), str(tmp_path), "video")


def test_too_few_entries_for_one_batch_is_refused(tmp_path):
    """Before: ``StopIteration`` at the first step (drop_last leaves the loader empty)."""
    anno = _write(tmp_path / "few.json", [{"video": f"v{i}.mp4", "caption": "x"} for i in range(3)])
    cfg = load_config(["pretrain", "tiny"], [f"train_file=[{anno},{tmp_path},video]", "batch_size.video=4"])
    message = r"few.json: 3 entries make no whole batch of batch_size.video=4 per rank \(1 rank\(s\)\)"
    with pytest.raises(AnnotationError, match=message):
        caption_train_loader(cfg, build_tokenizer(), num_workers=0)


def test_frame_counts_out_of_range_are_refused_by_train(capsys):
    for key, value in (("video_input.num_frames", 0), ("video_input.num_frames", -2),
                       ("video_input.num_frames_test", -1)):
        assert main(["train", "pretrain", "tiny", f"{key}={value}"]) == 2
        err = capsys.readouterr().err.strip()
        assert err == f"singularity-ds: error: config key '{key}' must be >= 1, got {value}", err


def test_an_empty_evaluation_set_is_refused_before_training(tmp_path):
    """Before: the run trained, then its first evaluation died with ``'NoneType' object has no attribute
    'shape'``. Now the task checks its evaluation sets first (the trainer asks before building anything)."""
    empty = _write(tmp_path / "empty_test.json", [])
    cfg = load_config(["ret_msrvtt", "tiny"], [f"test_file={{empty: [{empty}, {tmp_path}, video]}}",
                                               "test_types=[empty]"])
    with pytest.raises(AnnotationError, match=r"empty_test.json: no entries"):
        TASKS["train_ret"].check_evaluation_data(cfg)
    TASKS["pretrain"].check_evaluation_data(cfg)  # pretraining does not evaluate: nothing read
    qa = load_config(["qa_msrvtt", "tiny"], [f"test_file={{empty: [{empty}, {tmp_path}, video]}}",
                                             "test_types=[empty]"])
    with pytest.raises(AnnotationError, match=r"empty_test.json: no entries"):
        TASKS["train_qa"].check_evaluation_data(qa)


@pytest.mark.parametrize("text, where", [
    ("a: 1\nb: [1, 2\nc: 3\n",
     r"line 3 column 2: did not find expected ',' or '\]' "
     r"\(while parsing a flow sequence at line 2 column 4\)"),
    ("seed: 1\n\tbatch_size: 2\n", r"line 2 column 1: found a tab character that violates indentation"),
    ("seed: 1\nseed: 2\n", r"line 2 column 1: found duplicate key seed"),
    ("seed: 1\noutput_dir: ${oc.env:X\n", r"line 2 column 13: key output_dir: "),
    ("seed: 1\noutput_dir: caf\xe9\n".encode("latin-1"), r"line 2 column 16: not UTF-8"),
])
def test_yaml_syntax_errors_name_the_file_line_and_column(tmp_path, text, where):
    """Before: PyYAML's several-line message (the position in its middle), or none (a bad byte, a bad
    interpolation); now one line with the file, line and column."""
    path = tmp_path / "bad.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ConfigError, match=f"config file {path}: invalid YAML at {where}") as raised:
        load_config(["pretrain", str(path)])
    assert "\n" not in str(raised.value)


def test_media_paths_outside_the_media_folder(tmp_path):
    """Before: ``../`` and absolute paths were joined silently and read files outside the media folder.
    Now refused naming the file, entry and key, unless media_outside_dir=True (then read as written)."""
    media = tmp_path / "media"
    media.mkdir()
    inside = [{"video": "a/../b.mp4", "caption": "x"}, {"video": str(media / "c.mp4"), "caption": "y"}]
    entries = read_annotations(_write(tmp_path / "in.json", inside), str(media), "video")
    assert [e["media"] for e in entries] == [str(media / "a/../b.mp4"), str(media / "c.mp4")]
    for name, path in (("up", "../x.mp4"), ("deep", "a/../../x.mp4"), ("abs", "/elsewhere/x.mp4"),
                       ("sibling", str(tmp_path / "media2" / "x.mp4"))):
        anno = _write(tmp_path / f"{name}.json", [{"video": "ok.mp4", "caption": "x"},
                                                   {"video": ["ok.mp4", path], "caption": "y"}])
        with pytest.raises(AnnotationError, match=rf"{name}.json: entry 1: key 'video': media path '{path}' "
                                                  rf"is outside the media folder '{media}'; "
                                                  rf".*media_outside_dir=True"):
            read_annotations(anno, str(media), "video")
        entries = read_annotations(anno, str(media), "video", media_outside_dir=True)
        assert entries[1]["media"] == [str(media / "ok.mp4"), os.path.join(str(media), path)]
    # the config key, through the builders (evaluation sets here), and make-shards' flag
    anno = str(tmp_path / "up.json")
    cfg = load_config(["ret_msrvtt", "tiny"], [f"test_file={{t: [{anno}, {media}, video]}}",
                                               "test_types=[t]"])
    with pytest.raises(AnnotationError, match="up.json: entry 1: key 'video'"):
        eval_datasets(cfg)
    cfg.media_outside_dir = True
    assert eval_datasets(cfg)["t"].media == [str(media / "ok.mp4"), str(media / "ok.mp4")]
    with pytest.raises(AnnotationError, match="up.json: entry 1: key 'video'"):
        make_shards(anno, str(media), str(tmp_path / "shards"), progress=False)


# ======================================================================================================
# Distributed faults and the train step: a rank lost (dist.py, heartbeat.py), NaN/Inf losses
# (engine/nonfinite.py, Trainer.train_step)
# ======================================================================================================
import logging  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import time  # noqa: E402

import psutil  # noqa: E402
import pytest  # noqa: E402

from singularity_ds import heartbeat  # noqa: E402
from singularity_ds.errors import RankLostError  # noqa: E402


def _train_args(corpus, out_dir, *extra):
    return ["pretrain", "tiny", str(corpus / "configs" / "pretrain.yaml"), "image_res=32",
            "batch_size.video=4", "batch_size.image=4", "num_workers=0", "log_freq=1", *extra,
            f"output_dir={out_dir}"]


@pytest.fixture
def one_rank_in_process(monkeypatch):
    """A run of `singularity-ds train` inside this process: its rank variables, logging handlers and the
    task's losses are put back afterwards."""
    from singularity_ds.dist import free_port
    for name, value in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                            MASTER_PORT=str(free_port()), DS_ACCELERATOR="cpu").items():
        monkeypatch.setenv(name, value)
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    from singularity_ds.tasks.caption import CaptionTask
    original = CaptionTask.losses
    yield
    CaptionTask.losses = original
    for h in root.handlers[:]:
        if h not in handlers:
            root.removeHandler(h)
            h.close()
    root.setLevel(level)


def test_a_nonfinite_micro_step_skips_its_whole_update(corpus, tmp_path, one_rank_in_process):
    """ZeRO-0 in fp32 (DeepSpeed applies NaN gradients there as they come), two micro-steps per step: a
    NaN loss in the second micro-step of step 2 leaves the weights and the learning rate as step 1 left
    them (the first micro-step's gradient goes too); step 3 trains again. The log names the batch's media."""
    from nan_worker import inject_nan
    from singularity_ds.cli import main
    digests, out = [], tmp_path / "run"
    inject_nan({4}, digests)  # micro-steps 3 and 4 make optimizer step 2; digests[k] as micro-step k+1 starts
    args = _train_args(corpus, out, "ds_config=zero0", "precision=fp32",
                       "gradient_accumulation_steps=2", "max_steps=4", "save_every_steps=1",
                       "keep_last_checkpoints=5")
    assert main(["train", *args]) == 0
    after = {step: digests[2 * step] for step in range(4)}  # the weights after each optimizer step
    assert after[1] != after[0] and after[2] == after[1] and after[3] != after[2]
    history = json.load(open(out / "history.json"))
    assert [torch.isfinite(torch.tensor(r["loss"])).item() for r in history] == [True, False, True, True]
    assert history[1]["lr"] == history[0]["lr"] != history[2]["lr"]  # the schedule waits too
    log = (out / "train.log").read_text()
    warning = next(line for line in log.splitlines() if "non-finite loss on rank 0" in line)
    media = warning.split("media of its batch: ")[1].split(", ")
    assert "step 2:" in warning and "loss_itm=nan" in warning and len(media) == 8, warning  # 2 x 4 clips
    assert all(os.path.isfile(m) for m in media), media
    assert "step 2 skipped" in log
    # the skipped step writes no checkpoint, the others do
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step")) == \
        ["step00000001", "step00000003", "step00000004"]


def test_nonfinite_steps_in_a_row_stop_the_run_and_keep_the_last_good_checkpoint(
        corpus, tmp_path, capsys, one_rank_in_process):
    """NaN from step 3 on, max_nonfinite_steps=3, a checkpoint every step and only one kept: the run stops
    after step 5 with one line, and the checkpoint of step 2 is still the latest."""
    from nan_worker import inject_nan
    from singularity_ds.cli import main
    out = tmp_path / "run"
    inject_nan(set(range(3, 100)), [])
    args = _train_args(corpus, out, "max_steps=8", "save_every_steps=1", "keep_last_checkpoints=1",
                       "max_nonfinite_steps=3")
    assert main(["train", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("singularity-ds: error: the loss was NaN/Inf for 3 optimizer steps in a row "
                          "(steps 3-5"), err
    assert "resume=auto continues from step00000002" in err, err
    assert (out / "checkpoints" / "latest").read_text() == "step00000002"
    assert [p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step")] == ["step00000002"]
    assert not (out / "export").exists()


def test_lost_ranks_are_the_ones_whose_heartbeat_stopped(monkeypatch):
    """Rank 0 of 2 (this process) with the rendezvous store; rank 1 beats from a thread. While it beats, a
    failure passes through unchanged; once it stops, a failure becomes one line naming rank 1. Without
    the store (rank 0's process gone), rank 1 names rank 0."""
    import threading

    from torch.distributed import TCPStore

    from singularity_ds.dist import free_port
    port = free_port()
    server = TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    monkeypatch.setattr(heartbeat, "INTERVAL", 0.2)
    silent = threading.Event()

    def rank1():
        client = TCPStore("127.0.0.1", port, is_master=False, wait_for_workers=False)
        while not silent.wait(0.2):
            client.add(heartbeat.KEY.format(1), 1)
    threading.Thread(target=rank1, daemon=True).start()
    heartbeat.start(0, 2)
    try:
        with pytest.raises(ValueError, match="not about ranks"):
            with heartbeat.reporting_lost_ranks():
                raise ValueError("not about ranks")
        assert heartbeat._beat is None  # a failing rank stops beating: the others see it go
        heartbeat.start(0, 2)
        silent.set()
        time.sleep(0.5)
        assert heartbeat.lost_ranks(0, 2) == [1]
        with pytest.raises(RankLostError) as info:
            with heartbeat.reporting_lost_ranks():
                raise RuntimeError("[pair.cc:561] Connection closed by peer [127.0.0.1]:1234. GLHF\nmore")
        message = str(info.value)
        assert message.startswith("rank 1 of 2 was lost (its heartbeat stopped") and "\n" not in message
        assert "rank 0 stopped too (RuntimeError: [pair.cc:561] Connection closed by peer" in message
    finally:
        heartbeat.stop()
    del server  # the store goes with rank 0's process
    assert heartbeat.lost_ranks(1, 2) == [0]


# --- two ranks under the real `deepspeed` launcher (CPU, gloo)

def _deepspeed(*args):
    from singularity_ds.dist import free_port
    launcher = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    return [launcher, "--num_accelerators", "2", "--master_port", str(free_port()), *args]


def _start(cmd, log_path):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=open(log_path, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def _rank_process(launcher, local_rank: int):
    """The process of one rank (a child of the launcher's launch.py)."""
    deadline = time.time() + 120
    while time.time() < deadline:
        for p in psutil.Process(launcher.pid).children(recursive=True):
            try:
                cmdline = p.cmdline()
                if f"--local_rank={local_rank}" in cmdline and "deepspeed.launcher.launch" not in cmdline:
                    return p
            except psutil.NoSuchProcess:
                pass
        time.sleep(0.2)
    raise AssertionError("rank process not found")


def _wait_for_checkpoint(run_dir, tag: str, proc, timeout=600):
    latest = run_dir / "checkpoints" / "latest"
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if latest.exists() and latest.read_text() >= tag:
            return
        time.sleep(0.05)
    raise AssertionError(f"no checkpoint {tag} in {run_dir} (rc {proc.poll()})")


@pytest.mark.slow
def test_nonfinite_loss_on_one_rank_skips_the_step_on_every_rank(corpus, tmp_path):
    """Rank 1's loss is NaN in step 2 (ZeRO-0, fp32: DeepSpeed itself would apply it): both ranks skip
    the update (their weights stay equal and unchanged), rank 1 names its batch's media."""
    out, digests = tmp_path / "run", tmp_path / "digests"
    cmd = _deepspeed("tests/nan_worker.py", str(digests), "1", "2",
                     *_train_args(corpus, out, "ds_config=zero0", "precision=fp32", "max_steps=3"))
    proc = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, PYTHONUNBUFFERED="1"), capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    d0, d1 = (json.load(open(f"{digests}.{r}.json")) for r in (0, 1))
    assert d0 == d1 and len(d0) == 3  # the same weights on both ranks as each step starts
    assert d0[1] != d0[0] and d0[2] == d0[1]  # step 1 trained, step 2 did not
    assert "non-finite loss on rank 1" in proc.stdout + proc.stderr
    history = json.load(open(out / "history.json"))
    assert [torch.isfinite(torch.tensor(r["loss_itm"])).item() for r in history] == [True, False, True]


@pytest.mark.slow
def test_a_killed_rank_is_named_and_the_other_stops(corpus, tmp_path):
    """SIGKILL rank 0 (it also serves the rendezvous store) mid-run: rank 1 stops within seconds with one
    line naming rank 0, and the launcher exits non-zero."""
    out = tmp_path / "run"
    proc = _start(_deepspeed("--module", "singularity_ds", "train", *_train_args(
        corpus, out, "max_steps=40", "save_every_steps=2")), tmp_path / "log")
    try:
        _wait_for_checkpoint(out, "step00000002", proc)
        time.sleep(1.0)  # mid-step
        killed = time.time()
        _rank_process(proc, 0).send_signal(signal.SIGKILL)
        rc = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    log = (tmp_path / "log").read_text()
    assert rc != 0 and time.time() - killed < 60, log[-3000:]
    lines = [line for line in log.splitlines() if "singularity-ds: error:" in line]
    assert len(lines) == 1 and "rank 0 of 2 was lost (its heartbeat stopped" in lines[0], log[-3000:]
    assert "rank 1 stopped too" in lines[0]


@pytest.mark.slow
def test_a_killed_rank_is_named_and_resume_is_bit_identical(corpus, tmp_path):
    """SIGKILL rank 1 mid-step after the step-2 checkpoint: the job ends within a minute with one line
    naming rank 1; resume=auto then repeats the uninterrupted run's steps bit for bit. (A rank frozen
    with SIGSTOP instead is not tested: on one node DeepSpeed's CPU shared-memory allreduce, which
    carries the gradients, waits without a timeout; dist_timeout bounds gloo's collectives.)"""
    args = ("max_steps=6", "save_every_steps=2", "keep_last_checkpoints=3", "dist_timeout=45")
    whole = tmp_path / "whole"
    proc = _start(_deepspeed("--module", "singularity_ds", "train", *_train_args(corpus, whole, *args)),
                  tmp_path / "whole.log")
    assert proc.wait(timeout=900) == 0, (tmp_path / "whole.log").read_text()[-3000:]
    reference = {r["step"]: r for r in json.load(open(whole / "history.json"))}

    frozen = tmp_path / "frozen"
    proc = _start(_deepspeed("--module", "singularity_ds", "train",
                             *_train_args(corpus, frozen, *args)), tmp_path / "frozen.log")
    try:
        _wait_for_checkpoint(frozen, "step00000002", proc)
        time.sleep(0.5)
        stopped = time.time()
        _rank_process(proc, 1).send_signal(signal.SIGKILL)
        rc = proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    waited, log = time.time() - stopped, (tmp_path / "frozen.log").read_text()
    assert rc != 0 and waited < 60, (waited, log[-3000:])
    lines = [line for line in log.splitlines() if "singularity-ds: error:" in line]
    assert len(lines) == 1 and "rank 1 of 2 was lost (its heartbeat stopped" in lines[0], log[-3000:]
    assert not (frozen / "export").exists()

    proc = _start(_deepspeed("--module", "singularity_ds", "train",
                             *_train_args(corpus, frozen, *args, "resume=auto")),
                  tmp_path / "resumed.log")
    assert proc.wait(timeout=900) == 0, (tmp_path / "resumed.log").read_text()[-3000:]
    resumed = json.load(open(frozen / "history.json"))
    assert resumed and resumed[-1]["step"] == 6
    for r in resumed:
        for k in ("loss_ita", "loss_itm", "loss_mlm", "lr"):
            assert r[k] == reference[r["step"]][k], (r["step"], k, r[k], reference[r["step"]][k])


def test_a_taken_port_is_replaced_when_this_process_chose_it(tmp_path):
    """One process without a launcher picks its own rendezvous port; if another process takes it before
    the store binds it (EADDRINUSE), setup picks another instead of failing."""
    code = """
import os, socket
from singularity_ds import dist
taken = socket.socket(); taken.bind(("127.0.0.1", 0)); taken.listen()
ports = iter([taken.getsockname()[1], dist.free_port()])
dist.free_port = lambda: next(ports)
for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
    os.environ.pop(k, None)
info = dist.setup()
print("port", os.environ["MASTER_PORT"], taken.getsockname()[1], sorted(info))
"""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("port "))
    _, chosen, taken, keys = line.split(" ", 3)
    assert chosen != taken and keys.strip() == "['device', 'local_rank', 'rank', 'world']"
