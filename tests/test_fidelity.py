"""Every tensor the ORIGINAL Singularity code produced for ../shared/reference/singularity_tiny,
reproduced from its checkpoint through our loader (fp32, eval mode)."""
import pytest
import torch

from singularity_ds.models import load_model, losses
from singularity_ds.models.losses import mlm_loss

ATOL = 1e-4


def compute_all(model, inp, exp):
    """Our value for every name in expected.pt (the fixture README's call paths)."""
    v, ids, am, idx = inp["video"], inp["input_ids"], inp["attention_mask"], inp["idx"]
    B, T = v.shape[:2]
    out = {"temp": model.temp.detach().reshape(())}
    out["frame_embeds"], out["frame_pooled_embeds"] = model.encode_frames(v)
    out["image_embeds"], out["pooled_image_embeds"] = ie, ip = model.encode_image(v)
    out["text_embeds"], out["pooled_text_embeds"] = te, tp = model.encode_text(ids, am)
    out["image_feat"], out["text_feat"] = model.project(ip, tp)
    out["sim_i2t"] = model.get_sim(ip, tp, t=1)[0]
    out["loss_ita"], out["sim_i2t_temp"], _ = model.get_contrastive_loss(ip, tp, idx)

    # all (text t, video v) pairs, row = t * B + v
    pair_t, pair_v = torch.arange(B).repeat_interleave(B), torch.arange(B).repeat(B)
    fused = model.fusion(te[pair_t], am[pair_t], ie[pair_v])
    out["itm_cls_embeds"] = fused[:, 0].view(B, B, -1)
    out["itm_logits"] = model.itm_head(fused[:, 0]).view(B, B, 2)
    out["fusion_hidden_matched"] = model.fusion(te, am, ie)

    # MLM with the recorded masking
    mlm_ids, labels = inp["mlm_input_ids"], inp["mlm_labels"]
    out["mlm_text_embeds"] = model.text_encoder.text(mlm_ids, am)
    out["mlm_logits"] = model.text_encoder.mlm_logits(model.fusion(out["mlm_text_embeds"], am, ie))
    out["mlm_loss"] = mlm_loss(out["mlm_logits"], labels)

    # forward losses, replaying the recorded negatives and MLM masks
    fwd = model(v, ids, am, idx, img_neg=exp["fwd_img_neg_indices"], txt_neg=exp["fwd_txt_neg_indices"],
                mlm_inputs=(exp["fwd_mlm_input_ids"], exp["fwd_mlm_labels"]))
    out["fwd_loss_ita"], out["fwd_loss_itm"] = fwd["loss_ita"], fwd["loss_itm"]
    out["fwd_loss_mlm"] = fwd["loss_mlm"]
    # ... and drawing them with the original's RNG order from the recorded seed
    torch.manual_seed(int(inp["fwd_seed"]))
    _, s_i2t, s_t2i = model.get_contrastive_loss(ip, tp, idx)
    out["fwd_img_neg_indices"], out["fwd_txt_neg_indices"] = losses.sample_negatives(s_i2t, s_t2i, idx)
    out["fwd_mlm_input_ids"], out["fwd_mlm_labels"] = losses.mask_tokens(ids,
                                                                         model.text_encoder.config.vocab_size,
                                                                         0.5)

    # single frame
    v1 = v[:, :1]
    out["t1_image_embeds"], out["t1_pooled_image_embeds"] = ie1, ip1 = model.encode_image(v1)
    out["t1_sim_i2t"] = model.get_sim(ip1, tp)[0]
    out["t1_loss_ita"] = model.get_contrastive_loss(ip1, tp, idx)[0]
    out["t1_itm_logits"] = model.itm_logits(te[pair_t], am[pair_t], ie1[pair_v]).view(B, B, 2)

    # evaluation scores: concat (early fusion) and late-fusion ensembles of per-frame logits
    out["eval_concat_t2i_scores_x"] = out["itm_logits"][..., 1]
    out["eval_concat_i2t_scores_x"] = out["itm_logits"][..., 1].T
    out["eval_i2t_scores_emb"] = out["sim_i2t"]
    out["eval_t2i_scores_emb"] = out["sim_i2t"].T
    fe = out["frame_embeds"]
    per_frame = torch.stack([model.itm_logits(te[pair_t], am[pair_t], fe[pair_v][:, f:f + 1], "mean")[:, 1]
                             for f in range(T)], dim=1)  # (t*B+v, T)
    out["late_frame_itm_scores"] = per_frame.view(B, B, T).permute(1, 2, 0)  # [v, f, t]
    for how in ("mean", "max", "lse"):
        s = model.itm_logits(te[pair_t], am[pair_t], fe[pair_v], how)[:, 1].view(B, B)  # [t, v]
        out[f"eval_{how}_t2i_scores_x"], out[f"eval_{how}_i2t_scores_x"] = s, s.T
    return out


@pytest.fixture(scope="module")
def computed(tiny_ref):
    model = load_model(str(tiny_ref["path"] / "checkpoint.pth"))
    with torch.no_grad():
        return compute_all(model, tiny_ref["inputs"], tiny_ref["expected"])


FLOAT_TENSORS = [
    "temp", "frame_embeds", "frame_pooled_embeds", "image_embeds", "pooled_image_embeds", "text_embeds",
    "pooled_text_embeds", "image_feat", "text_feat", "sim_i2t", "sim_i2t_temp", "loss_ita", "itm_logits",
    "itm_cls_embeds", "fusion_hidden_matched", "mlm_text_embeds", "mlm_logits", "mlm_loss", "fwd_loss_ita",
    "fwd_loss_itm", "fwd_loss_mlm", "t1_image_embeds", "t1_pooled_image_embeds", "t1_sim_i2t", "t1_loss_ita",
    "t1_itm_logits", "eval_concat_i2t_scores_x", "eval_concat_t2i_scores_x", "eval_i2t_scores_emb",
    "eval_t2i_scores_emb", "late_frame_itm_scores", "eval_mean_i2t_scores_x", "eval_mean_t2i_scores_x",
    "eval_max_i2t_scores_x", "eval_max_t2i_scores_x", "eval_lse_i2t_scores_x", "eval_lse_t2i_scores_x"]
INDEX_TENSORS = ["fwd_img_neg_indices", "fwd_txt_neg_indices", "fwd_mlm_input_ids", "fwd_mlm_labels"]


def test_every_expected_tensor_is_checked(computed, tiny_ref):
    assert set(FLOAT_TENSORS + INDEX_TENSORS) == set(tiny_ref["expected"])
    assert set(computed) == set(tiny_ref["expected"])


@pytest.mark.parametrize("name", FLOAT_TENSORS)
def test_float_tensor_matches_original(computed, tiny_ref, name):
    ref, ours = tiny_ref["expected"][name], computed[name]
    assert ours.shape == ref.shape, (name, ours.shape, ref.shape)
    diff = (ours.float() - ref.float()).abs().max().item()
    assert diff <= ATOL, f"{name}: max |diff| {diff:.3g}"


@pytest.mark.parametrize("name", INDEX_TENSORS)
def test_random_draws_replay_original_rng_order(computed, tiny_ref, name):
    """Same seed -> the same hard negatives and MLM masks as the original's forward."""
    assert torch.equal(computed[name], tiny_ref["expected"][name]), (computed[name],
                                                                     tiny_ref["expected"][name])


def test_forward_with_own_draws_reproduces_original_losses(tiny_ref):
    model = load_model(str(tiny_ref["path"] / "checkpoint.pth"))
    inp, exp = tiny_ref["inputs"], tiny_ref["expected"]
    torch.manual_seed(int(inp["fwd_seed"]))
    with torch.no_grad():
        out = model(inp["video"], inp["input_ids"], inp["attention_mask"], inp["idx"])
    for k in ("loss_ita", "loss_itm", "loss_mlm"):
        assert abs(out[k].item() - exp["fwd_" + k].item()) < 1e-5, k
