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


def test_eval_cli_lists_the_skipped_media_in_eval_json(broken_corpus, random_model, tmp_path, capsys):
    from singularity_ds.cli import main
    from singularity_ds.eval.retrieval import evaluate
    ckpt = _ckpt(random_model, tmp_path / "m.pth")
    args = ["eval", "ret", "ret_msrvtt", _overlay(tmp_path, broken_corpus, "x", "single"), ckpt,
            "image_res=32", "video_input.num_frames_test=3", "k_test=10", "max_txt_l=16"]
    assert main(args + [f"output_dir={tmp_path / 'a'}"]) == 2  # without the flag: one line, no results
    *warnings, err = capsys.readouterr().err.splitlines()  # the data layer's warning per broken file, then
    assert len(warnings) == 4 and all("broken media" in w for w in warnings)
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
    message = (f"test_file.empty ({broken_corpus / 'anno' / 'empty.json'}): no entries to evaluate (the "
               "annotation list is empty); fill it or leave this set out of test_types")
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
