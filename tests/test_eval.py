import numpy as np
import pytest
import torch

from singularity_ds.config import load_config
from singularity_ds.data import build_tokenizer, eval_datasets, tokenize
from singularity_ds.eval.retrieval import evaluate, itm_eval
from singularity_ds.models import Singularity


def brute_recall(scores, gts, k):
    hits = 0
    for i, row in enumerate(scores):
        order = sorted(range(len(row)), key=lambda j: -row[j])
        gt = gts[i] if isinstance(gts[i], list) else [gts[i]]
        hits += min(order.index(g) for g in gt) < k
    return 100.0 * hits / len(scores)


def test_itm_eval_matches_brute_force_with_several_ground_truths():
    rng = np.random.default_rng(0)
    i2t, t2i = rng.normal(size=(6, 9)), rng.normal(size=(9, 6))
    img2txt = {v: [v, v + 6] if v < 3 else [v] for v in range(6)}  # videos 0-2 have two captions
    txt2img = {t: (t if t < 6 else t - 6) for t in range(9)}
    res = itm_eval(i2t, t2i, txt2img, img2txt)
    for k in (1, 5, 10):
        assert res[f"txt_r{k}"] == round(brute_recall(i2t, img2txt, k), 2)
        assert res[f"img_r{k}"] == round(brute_recall(t2i, txt2img, k), 2)
    assert res["r_mean"] == pytest.approx((res["txt_r_mean"] + res["img_r_mean"]) / 2, abs=0.01)


@pytest.mark.parametrize("ensemble", ["concat", "mean"])
def test_two_stage_scores_equal_all_pairs_itm_when_k_covers_everything(corpus, ensemble):
    cfg = load_config(["ret_msrvtt", "tiny", str(corpus / "configs" / "ret.yaml")],
                      ["image_res=32", "video_input.num_frames_test=3"])
    ds = eval_datasets(cfg, ["motion"])["motion"]
    torch.manual_seed(0)
    model = Singularity(cfg).eval()
    tok = build_tokenizer()
    res = evaluate(model, ds, tok, 16, k_test=len(ds) + len(ds.text), ensemble=ensemble)
    with torch.no_grad():
        ids, mask = tokenize(tok, ds.text, 16)
        te, _ = model.encode_text(ids, mask)
        media = torch.stack([ds[i]["media"] for i in range(len(ds))])
        vids = model.encode_image(media)[0] if ensemble == "concat" else model.encode_frames(media)[0]
        full = torch.stack([model.itm_logits(te, mask, vids[v:v + 1].expand(len(te), *vids.shape[1:]),
                                             ensemble)[:, 1]
                            for v in range(len(ds))])  # (videos, texts)
    assert torch.allclose(res["scores"]["i2t"], full, atol=1e-4)
    assert torch.allclose(res["scores"]["t2i"], full.T, atol=1e-4)


# ---------------------------------------------------------------------- scale path (issue: evaluation)
from singularity_ds.errors import ConfigError  # noqa: E402
from singularity_ds.eval.features import extract  # noqa: E402
from singularity_ds.eval.metrics import topk_eval  # noqa: E402
from singularity_ds.eval.retrieval import (  # noqa: E402
    itm_scores,
    itm_scores_shared,
    text_fusion_state,
    topk_blockwise,
    videos_cross_kv,
)


def test_topk_metrics_equal_dense_metrics_with_several_ground_truths():
    rng = np.random.default_rng(1)
    n_vid, n_txt = 14, 23
    i2t = rng.normal(size=(n_vid, n_txt))
    img2txt = {v: [v, v + n_vid] if v + n_vid < n_txt else [v] for v in range(n_vid)}
    txt2img = {t: (t if t < n_vid else t - n_vid) for t in range(n_txt)}
    cand_i2t = np.argsort(-i2t, axis=1)[:, :10]
    cand_t2i = np.argsort(-i2t.T, axis=1)[:, :10]
    res = topk_eval(cand_i2t, np.take_along_axis(i2t, cand_i2t, 1),
                    cand_t2i, np.take_along_axis(i2t.T, cand_t2i, 1), txt2img, img2txt)
    assert res == itm_eval(i2t, i2t.T, txt2img, img2txt)
    for k in (1, 5, 10):
        assert res[f"txt_r{k}"] == round(brute_recall(i2t, img2txt, k), 2)
        assert res[f"img_r{k}"] == round(brute_recall(i2t.T, txt2img, k), 2)


def test_blockwise_topk_equals_full_topk():
    torch.manual_seed(0)
    q, c = torch.randn(50, 16), torch.randn(37, 16)
    values, indices = topk_blockwise(q, c, k=12, block=8)  # 7 x 5 tiles, running merge
    full = (q @ c.T).topk(12, dim=1)
    assert torch.allclose(values, full.values, atol=1e-6)
    assert torch.equal(indices, full.indices)


def _eval_setup(root, task="ret_msrvtt", **overrides):
    overlay = "pretrain.yaml" if task == "pretrain" else "ret.yaml"
    cfg = load_config([task, "tiny", str(root / "configs" / overlay)],
                      ["image_res=32", "video_input.num_frames_test=3"]
                      + [f"{k}={v}" for k, v in overrides.items()])
    torch.manual_seed(0)
    model = Singularity(cfg).eval()
    with torch.no_grad():  # spread the ITM logits so that ranks are decided by real differences
        model.itm_head.weight.mul_(20)
    return cfg, model


@pytest.mark.parametrize("ensemble", ["concat", "lse"])
def test_text_shared_itm_equals_uncached(corpus, ensemble):
    cfg, model = _eval_setup(corpus)
    ds = eval_datasets(cfg, ["motion"])["motion"]
    tok = build_tokenizer()
    with torch.no_grad():
        ids, mask = tokenize(tok, ds.text, 16)
        te = model.encode_text(ids, mask)[0]
        media = torch.stack([ds[i]["media"] for i in range(3)])
        if ensemble == "concat":
            clips = model.encode_image(media)[0].unsqueeze(1)
        else:
            clips = model.encode_frames(media)[0]
        state = text_fusion_state(model, te, mask)
        video_kv = videos_cross_kv(model, clips.flatten(0, 1))  # all 3 videos' clips in one batch
        for v in range(3):
            plain = itm_scores(model, te, mask, clips[v:v + 1].expand(len(te), -1, -1, -1), ensemble)
            shared = itm_scores_shared(model, state, mask, video_kv, torch.arange(len(te)),
                                       torch.full((len(te),), v), ensemble, clips=clips.shape[1])
            assert torch.allclose(plain, shared, atol=1e-5), (plain - shared).abs().max()


@pytest.mark.parametrize("store", ["cpu", "disk"])
def test_offloaded_path_equals_in_memory_path(corpus, tmp_path, store):
    cfg, model = _eval_setup(corpus)
    tok = build_tokenizer()
    for name, ds in eval_datasets(cfg, ["appearance", "motion"]).items():
        dense = evaluate(model, ds, tok, 16, k_test=10)
        off = evaluate(model, ds, tok, 16, k_test=10, offload=True, feature_store=store,
                       feature_dir=str(tmp_path / name))
        assert off["itm"] == dense["itm"] and off["itc"] == dense["itc"], name
        both = ds.__len__() * min(10, len(ds.text)) + len(ds.text) * min(10, len(ds))
        # the distinct pairs: those either direction of the in-memory path scored (its others stay -100)
        scored = (dense["scores"]["i2t"] != -100) | (dense["scores"]["t2i"].T != -100)
        assert off["stats"]["pairs_both_directions"] == both
        assert off["stats"]["pairs"] == int(scored.sum()) < both  # pairs in both directions' top-k are shared
    if store == "disk":
        assert sorted(p.name for p in (tmp_path / "motion").iterdir()) == [
            "text_tokens.0.bin", "text_tokens.0.bin.json", "video_tokens.0.bin", "video_tokens.0.bin.json"]


def test_late_ensemble_on_a_temporal_checkpoint_is_refused(corpus):
    cfg, model = _eval_setup(corpus, **{"video_input.num_frames": 4, "add_temporal_embed": True,
                                                "temporal_vision_encoder.enable": True})
    ds = eval_datasets(cfg, ["motion"])["motion"]
    with pytest.raises(ConfigError,
                       match="eval_frame_ensemble=mean .* temporal .* use eval_frame_ensemble=concat"):
        evaluate(model, ds, build_tokenizer(), 16, k_test=10, ensemble="mean")


def _sharded_worker(rank, world, port, root, feature_dir, out):
    import os

    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    cfg, model = _eval_setup(root)
    ds = eval_datasets(cfg, ["motion"])["motion"]
    tok = build_tokenizer()
    feats = extract(model, ds, tok, 16, store="disk", feature_dir=feature_dir)
    res = evaluate(model, ds, tok, 16, k_test=10, offload=True, feature_store="disk",
                   feature_dir=feature_dir + "2")
    out[rank] = dict(text=feats.text_tokens.rows(range(len(ds.text))),
                     video=feats.video_tokens.rows(range(len(ds))),
                     text_feat=feats.text_feat, video_feat=feats.video_feat, itm=res["itm"], itc=res["itc"])
    dist.destroy_process_group()


@pytest.mark.multiproc
def test_two_rank_sharded_extraction_equals_one_rank(corpus, tmp_path, free_port):
    import torch.multiprocessing as mp
    out = mp.Manager().dict()
    mp.start_processes(_sharded_worker, args=(2, free_port, corpus, str(tmp_path / "f"), out),
                       nprocs=2, start_method="spawn")
    cfg, model = _eval_setup(corpus)
    ds = eval_datasets(cfg, ["motion"])["motion"]
    tok = build_tokenizer()
    one = extract(model, ds, tok, 16)
    ref = evaluate(model, ds, tok, 16, k_test=10)
    assert len(list((tmp_path / "f").glob("video_tokens.*.bin"))) == 2  # each rank wrote its shard
    for r in (0, 1):
        got = out[r]
        assert torch.allclose(got["text"], one.text_tokens.rows(range(len(ds.text))), atol=1e-5)
        assert torch.allclose(got["video"], one.video_tokens.rows(range(len(ds))), atol=1e-5)
        assert torch.allclose(got["text_feat"], one.text_feat, atol=1e-5)
        assert torch.allclose(got["video_feat"], one.video_feat, atol=1e-5)
        assert got["itm"] == ref["itm"] and got["itc"] == ref["itc"]


def _original_pth(model, cfg, path):
    """A checkpoint as the original's pretraining saves it: {"model": state (text_encoder.bert.*),
    "config"}."""
    from singularity_ds.models.weights import plain_config
    torch.save({"model": model.state_dict(), "config": plain_config(cfg)}, path)
    return str(path)


def test_eval_cli_zero_shot_from_pretraining_checkpoint(corpus, tmp_path, capsys):
    from singularity_ds.cli import main
    cfg, model = _eval_setup(corpus, task="pretrain")
    assert any(k.startswith("text_encoder.bert.") for k in model.state_dict())
    ckpt = _original_pth(model, cfg, tmp_path / "pretrain.pth")
    ret_cfg = str(corpus / "configs" / "ret.yaml")
    out = tmp_path / "out"
    assert main(["eval", "ret", "ret_msrvtt", ret_cfg, ckpt, "image_res=32", "video_input.num_frames_test=3",
                 "k_test=10", "max_txt_l=16", f"output_dir={out}", "test_types=[motion]", "--offload"]) == 0
    import json

    from PIL import Image
    got = json.loads((out / "eval.json").read_text())["motion"]
    ds = eval_datasets(cfg, ["motion"])["motion"]
    ref = evaluate(model, ds, build_tokenizer(), 16, k_test=10)  # the pretraining model itself
    assert got["itm"] == ref["itm"] and got["itc"] == ref["itc"]
    assert Image.open(out / "eval.png").size == (600, 390)  # one test set: a 6 x 3.9 in chart at 100 dpi
    # the demo's table, printed and in eval.txt: a row per kind of scores with eval.json's numbers
    report = (out / "eval.txt").read_text()
    assert report in capsys.readouterr().out + "\n"
    assert report.startswith(f"{ckpt}: 3 frame(s), concat ensemble; ITM re-ranks each query's k_test=10 best")
    for kind, key in (("ITM re-ranked", "itm"), ("ITC only", "itc")):
        row = next(line for line in report.splitlines() if line.startswith(kind))
        assert row.split("|")[0].split() == [*kind.split(), "3"]
        assert [float(x) for x in row.split("|", 1)[1].replace("|", " ").split()] == [
            float(f"{got[key][f'{d}_r{k}']:.1f}") for d in ("img", "txt") for k in (1, 5, 10)]
    assert report.splitlines()[-1] == f"motion: {got['media']} media, {got['texts']} texts"


def test_eval_cli_multiple_choice(corpus, tmp_path):
    import json

    from singularity_ds.cli import main
    from singularity_ds.eval.mc import evaluate_mc
    cfg, model = _eval_setup(corpus)
    ckpt = _original_pth(model, cfg, tmp_path / "ret.pth")
    mc_cfg = tmp_path / "mc.yaml"
    mc_cfg.write_text(f"test_types: [mc]\ntest_file:\n  mc: ['{corpus}/anno/mc_test.json', "
                      f"'{corpus}/videos', video]\n")
    out = tmp_path / "out"
    assert main(["eval", "mc", "ret_msrvtt", str(mc_cfg), ckpt, "image_res=32",
                 "video_input.num_frames_test=3", "max_txt_l=16", f"output_dir={out}"]) == 0
    saved = json.loads((out / "mc_mc.json").read_text())
    mc_set = json.loads((corpus / "anno" / "mc_test.json").read_text())
    assert len(saved["predictions"]) == len(mc_set)
    assert all(len(p["scores"]) == 5 for p in saved["predictions"])
    # each prediction is the argmax of the plain (uncached) ITM logit over the options
    mc_config = load_config(["ret_msrvtt", "tiny", str(mc_cfg)],
                            ["image_res=32", "video_input.num_frames_test=3"])
    ds = eval_datasets(mc_config, kind="mc")["mc"]
    tok = build_tokenizer()
    with torch.no_grad():
        for i in range(3):
            item = ds[i]
            ids, mask = tokenize(tok, item["captions"], 16)
            video = model.encode_image(item["media"][None])[0]
            text = model.encode_text(ids, mask)[0]
            logits = model.itm_logits(text, mask, video.expand(len(ids), -1, -1))[:, 1]
            assert saved["predictions"][i]["pred"] == int(logits.argmax())
            assert np.allclose(saved["predictions"][i]["scores"], logits.numpy(), atol=1e-4)
    acc = 100 * np.mean([p["pred"] == p["answer"] for p in saved["predictions"]])
    assert saved["accuracy"] == round(acc, 2)
    assert evaluate_mc(model, ds, tok, 16, num_frames_test=3)["accuracy"] == saved["accuracy"]


def test_eval_cli_bad_input_is_one_clear_line(corpus, tmp_path, capsys, monkeypatch):
    from singularity_ds.cli import main
    assert main(["eval", "ret", "ret_msrvtt", str(tmp_path / "missing.pth")]) == 2
    assert "missing.pth: no such file" in capsys.readouterr().err
    (tmp_path / "x.pth").write_bytes(b"")
    monkeypatch.delenv("SL_DATA_DIR", raising=False)
    # data root unset: a config error
    assert main(["eval", "ret", "ret_msrvtt", str(tmp_path / "x.pth")]) == 2
    err = capsys.readouterr().err
    assert err == ("singularity-ds: error: config key 'test_file.msrvtt_1k_test[0]' reads the environment "
                   "variable SL_DATA_DIR, which is not set: export SL_DATA_DIR=/path (the data folder: "
                   "anno_pretrain/, anno_downstream/ and videos_images/, as the original's README sets it), "
                   "or give the paths in an overlay (make-synthetic writes one: OUT/configs/pretrain.yaml)\n")
    cfg, model = _eval_setup(corpus, **{"video_input.num_frames": 4, "add_temporal_embed": True})
    ckpt = _original_pth(model, cfg, tmp_path / "t.pth")
    assert main(["eval", "ret", "ret_msrvtt", str(corpus / "configs" / "ret.yaml"), ckpt, "image_res=32",
                 "eval_frame_ensemble=max", f"output_dir={tmp_path / 'o'}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "eval_frame_ensemble=max" in err and not (tmp_path / "o").exists()


def test_eval_x_only_scores_every_pair_instead_of_crashing(corpus):
    """The original's eval_x_only path reads a missing dataset attribute (raw_n_image) and crashes."""
    from singularity_ds.eval.run import evaluate_sets
    cfg, model = _eval_setup(corpus, eval_x_only=True, k_test=3, max_txt_l=16, test_types="[motion]")
    tok = build_tokenizer()
    got = evaluate_sets(model, cfg, tok)["motion"]
    ds = eval_datasets(cfg, ["motion"])["motion"]
    every = evaluate(model, ds, tok, 16, k_test=len(ds) + len(ds.text))
    assert got["itm"] == every["itm"]
    # every pair was scored (the offloaded path counts them); k_test=3 alone scores fewer: the most
    # similar pair is in both directions' top 3 and scored once
    cfg.eval_offload = True
    assert evaluate_sets(model, cfg, tok)["motion"]["stats"]["pairs"] == len(ds) * len(ds.text)
    assert evaluate(model, ds, tok, 16, k_test=3, offload=True)["stats"]["pairs"] < len(ds) * len(ds.text)


# ---------------------------------------------------------------------- text-shared re-ranking (issue 19)
from singularity_ds.eval.features import Features, TokenStore  # noqa: E402
from singularity_ds.eval.retrieval import _dense, _offload  # noqa: E402


def _assert_offloaded_equals_original(model, feats, k_test, txt2img, img2txt, **batching):
    """The offloaded re-rank (text-shared, batched across videos) gives the original algorithm's scores
    (every pair it scored, within 1e-5) and the same metrics (which needs k_test >= 10: the dense matrices
    rank the unscored -100 entries too)."""
    i2t, t2i, _ = _dense(model, feats, k_test, "concat")
    itm, _, stats = _offload(model, feats, k_test, "concat", progress=False, **batching)
    for dense, (cand, scores) in ((i2t, itm["i2t"]), (t2i, itm["t2i"])):
        want = dense.gather(1, torch.from_numpy(cand))
        assert (want != -100).all()  # the original scored exactly these candidates
        assert torch.allclose(torch.from_numpy(scores), want, atol=1e-5), (torch.from_numpy(scores)
                                                                           - want).abs().max()
    if k_test >= 10:
        assert topk_eval(*itm["i2t"], *itm["t2i"], txt2img, img2txt) == itm_eval(i2t.numpy(), t2i.numpy(),
                                                                                txt2img, img2txt)
    return stats


def test_text_shared_rerank_equals_original_on_reference_checkpoint(tiny_ref):
    """The ORIGINAL code's checkpoint (temporal, 4 frames, 1 fusion layer): on its recorded inputs the
    offloaded scores also match the original code's own evaluation scores; on more random inputs, the
    original algorithm's, in batches that split videos and blocks of texts."""
    from singularity_ds.models import load_model
    model = load_model(str(tiny_ref["path"] / "checkpoint.pth")).eval()
    inp = tiny_ref["inputs"]
    with torch.no_grad():
        te, text_pooled = model.encode_text(inp["input_ids"], inp["attention_mask"])
        vid, video_pooled = model.encode_image(inp["video"])
        vf, tf = model.project(video_pooled, text_pooled)
    feats = Features(TokenStore([te], "cpu"), inp["attention_mask"], tf, TokenStore([vid[:, None]], "cpu"),
                     vf)
    gt = {i: i for i in range(3)}
    _assert_offloaded_equals_original(model, feats, 2, gt, gt, pair_batch=2, text_block=2)
    itm, _, _ = _offload(model, feats, 3, "concat", progress=False)
    original = tiny_ref["expected"]["eval_concat_i2t_scores_x"]  # (videos, texts), the original's code
    want = original.gather(1, torch.from_numpy(itm["i2t"][0]))
    assert torch.allclose(torch.from_numpy(itm["i2t"][1]), want, atol=1e-4)  # test_fidelity's tolerance

    # more videos and texts (random pixels and token ids, a third of the texts padded), two-stage
    torch.manual_seed(0)
    n = 16
    ids = torch.randint(1, model.text_encoder.config.vocab_size, (n, 12))
    mask = torch.ones(n, 12, dtype=torch.long)
    mask[::3, 7:] = 0
    with torch.no_grad():
        te, text_pooled = model.encode_text(ids, mask)
        vid, video_pooled = model.encode_image(torch.randn(n, 4, 3, 32, 32))
        vf, tf = model.project(video_pooled, text_pooled)
    feats = Features(TokenStore([te], "cpu"), mask, tf, TokenStore([vid[:, None]], "cpu"), vf)
    gt = {i: i for i in range(n)}
    stats = _assert_offloaded_equals_original(model, feats, 10, gt, gt, pair_batch=7, text_block=5)
    assert stats["pairs"] < stats["pairs_both_directions"] and stats["pairs"] < n * n  # two-stage


@pytest.mark.parametrize("fusion_layer", [2, 1])
def test_text_shared_rerank_equals_original_on_temporal_model(corpus, fusion_layer):
    """tiny + 4 frames + temporal embeddings and encoder, with 1 and 2 fusion layers (the first fusion
    layer's text-only part shared, a middle layer per pair, the last at [CLS] only)."""
    cfg, model = _eval_setup(corpus, **{"video_input.num_frames": 4, "video_input.num_frames_test": 4,
                                        "add_temporal_embed": True, "temporal_vision_encoder.enable": True,
                                        "fusion_layer": fusion_layer})
    assert len(model.text_encoder.bert.encoder.layer) - model.text_encoder.fusion_layer == 3 - fusion_layer
    ds = eval_datasets(cfg, ["motion"])["motion"]
    feats = extract(model, ds, build_tokenizer(), 16)
    batching = dict(pair_batch=7, text_block=5)  # batches that split videos, several blocks of texts
    stats = _assert_offloaded_equals_original(model, feats, 3, ds.txt2img, ds.img2txt, **batching)
    assert stats["pairs"] < len(ds) * len(ds.text)  # two-stage: not every pair is scored
    _assert_offloaded_equals_original(model, feats, 10, ds.txt2img, ds.img2txt)  # + metrics, default batches


def test_text_shared_itm_pads_and_masks_videos_of_different_token_counts(corpus):
    """Videos of 1, 2 and 3 frames (17, 34, 51 tokens) in one batch: keys/values padded to the longest
    and masked give each pair the score of its unpadded fusion."""
    cfg, model = _eval_setup(corpus, fusion_layer=1)
    ds = eval_datasets(cfg, ["motion"])["motion"]
    tok = build_tokenizer()
    with torch.no_grad():
        ids, mask = tokenize(tok, ds.text[:4], 16)
        te = model.encode_text(ids, mask)[0]
        videos = [model.encode_image(ds[i]["media"][None, :i + 1])[0][0] for i in range(3)]
        kv, kv_bias = video_kv = videos_cross_kv(model, videos)
        assert kv[0][0].shape[2] == videos[2].shape[0] == 3 * videos[0].shape[0]
        assert kv_bias.shape == (3, 1, 1, videos[2].shape[0])
        pair_text, pair_video = torch.arange(4).repeat(3), torch.arange(3).repeat_interleave(4)
        shared = itm_scores_shared(model, text_fusion_state(model, te, mask), mask, video_kv, pair_text,
                                   pair_video)
        plain = torch.cat([itm_scores(model, te, mask, videos[v][None, None].expand(4, -1, -1, -1), "concat")
                           for v in range(3)])
    assert torch.allclose(shared, plain, atol=1e-5), (shared - plain).abs().max()
