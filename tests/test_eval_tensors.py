"""``evaluate_tensors`` (retrieval evaluation from tensors) and the top-k lists both evaluation paths
return."""
import numpy as np
import pytest
import torch

from singularity_ds.data import build_tokenizer, eval_datasets, tokenize
from singularity_ds.errors import ConfigError
from singularity_ds.eval import evaluate, evaluate_tensors
from singularity_ds.models import load_model
from test_eval import _eval_setup


def test_evaluate_tensors_gives_the_original_evaluation_scores(tiny_ref):
    """The reference checkpoint's tensors: the score matrices the ORIGINAL evaluation computed."""
    model = load_model(str(tiny_ref["path"] / "checkpoint.pth"))
    inp, exp = tiny_ref["inputs"], tiny_ref["expected"]
    res = evaluate_tensors(model, inp["video"], inp["input_ids"], inp["attention_mask"], k_test=128)
    for ours, theirs in ((res["scores"]["i2t"], "eval_concat_i2t_scores_x"),
                         (res["scores"]["t2i"], "eval_concat_t2i_scores_x"),
                         (res["scores"]["i2t_itc"], "eval_i2t_scores_emb")):
        assert (ours - exp[theirs].float()).abs().max().item() <= 1e-4, theirs
    assert res["media"] == 3 and res["texts"] == 3
    # text i <-> video i by default: the metrics of those matrices
    from singularity_ds.eval import itm_eval
    i2t = exp["eval_concat_i2t_scores_x"].float().numpy()
    gt = {i: i for i in range(3)}
    assert res["itm"] == itm_eval(i2t, i2t.T.copy(), gt, {i: [i] for i in range(3)})
    # the ground truth is honoured (every video matches every text: each list starts with a hit)
    every = evaluate_tensors(model, inp["video"], inp["input_ids"], inp["attention_mask"],
                             txt2img=[[0, 1, 2]] * 3)
    assert res["itm"]["img_r1"] < 100 and set(every["itm"].values()) == {100.0}
    with pytest.raises(ConfigError, match="3 texts and 2 videos: pass txt2img"):
        evaluate_tensors(model, inp["video"][:2], inp["input_ids"], inp["attention_mask"])


def test_evaluate_tensors_equals_the_dataset_path(corpus):
    cfg, model = _eval_setup(corpus)
    ds = eval_datasets(cfg, ["motion"])["motion"]  # one caption, several clips: lists of ground truths
    tok = build_tokenizer()
    via_dataset = evaluate(model, ds, tok, 16, k_test=10)
    videos = torch.stack([ds[i]["media"] for i in range(len(ds))])
    ids, mask = tokenize(tok, ds.text, 16)
    via_tensors = evaluate_tensors(model, videos, ids, mask, txt2img=ds.txt2img, img2txt=ds.img2txt,
                                   k_test=10)
    assert via_tensors["itm"] == via_dataset["itm"] and via_tensors["itc"] == via_dataset["itc"]
    for k in ("i2t", "t2i", "i2t_itc"):
        assert torch.equal(via_tensors["scores"][k], via_dataset["scores"][k]), k


def test_offloaded_path_returns_the_in_memory_top_k_lists(corpus):
    cfg, model = _eval_setup(corpus)
    ds = eval_datasets(cfg, ["appearance"])["appearance"]
    tok = build_tokenizer()
    dense = evaluate(model, ds, tok, 16, k_test=10)
    off = evaluate(model, ds, tok, 16, k_test=10, offload=True)
    n_vid, n_txt = len(ds), len(ds.text)
    shapes = dict(itm=dict(i2t=(n_vid, min(10, n_txt)), t2i=(n_txt, min(10, n_vid))),
                  itc=dict(i2t=(n_vid, min(10, n_txt)), t2i=(n_txt, min(10, n_vid))))
    for kind in ("itm", "itc"):
        for d in ("i2t", "t2i"):
            a, b = dense["topk"][kind][d], off["topk"][kind][d]
            assert a["index"].shape == b["index"].shape == shapes[kind][d], (kind, d)
            np.testing.assert_array_equal(a["index"], b["index"], err_msg=f"{kind} {d}")
            np.testing.assert_allclose(a["score"], b["score"], atol=1e-5, err_msg=f"{kind} {d}")
            assert (np.diff(b["score"], axis=1) <= 0).all()  # best first
    # the lists are the dense matrices' rows: ITM scores of the scored pairs, ITC similarities
    i2t = dense["scores"]["i2t"].numpy()
    rows = np.arange(n_vid)[:, None]
    np.testing.assert_array_equal(off["topk"]["itm"]["i2t"]["score"],
                                  i2t[rows, off["topk"]["itm"]["i2t"]["index"]].astype(np.float32))
    assert off["topk"]["itm"]["t2i"]["score"].min() > -100  # only pairs the fusion encoder scored
