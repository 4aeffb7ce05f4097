import numpy as np
import pytest
import torch

from singularity_ds.config import load_config
from singularity_ds.data import build_tokenizer, eval_datasets, tokenize
from singularity_ds.data.synthetic import make_synthetic
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
def test_two_stage_scores_equal_all_pairs_itm_when_k_covers_everything(tmp_path, ensemble):
    make_synthetic(str(tmp_path), num_clips=24, size=32, frames=6, num_images=2, seed=1)
    cfg = load_config(["ret_msrvtt", "tiny", str(tmp_path / "configs" / "ret.yaml")],
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
        full = torch.stack([model.itm_logits(te, mask, vids[v:v + 1].expand(len(te), *vids.shape[1:]), ensemble)[:, 1]
                            for v in range(len(ds))])  # (videos, texts)
    assert torch.allclose(res["scores"]["i2t"], full, atol=1e-4)
    assert torch.allclose(res["scores"]["t2i"], full.T, atol=1e-4)
