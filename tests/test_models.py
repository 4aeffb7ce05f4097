import pytest
import torch

from conftest import tiny_config
from singularity_ds.models import Singularity
from singularity_ds.models.attention import attention, padding_bias
from singularity_ds.models.singularity import interpolate_temporal_embed


def batch(b=4, t=1, res=64, L=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 2000, (b, L), generator=g)
    ids[:, 0] = 101
    mask = torch.ones(b, L, dtype=torch.long)
    mask[1, 6:] = 0
    ids[mask == 0] = 0
    return torch.randn(b, t, 3, res, res, generator=g), ids, mask, torch.arange(b)


def test_attention_matches_math_reference_with_bias_and_padding():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 7, 8), torch.randn(2, 3, 7, 8)
    rel = torch.randn(3, 5, 7)  # per-head bias, broadcast over batch
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0, 0]])
    bias = rel.unsqueeze(0) + padding_bias(mask, q.dtype)
    ref = torch.softmax(q @ k.transpose(-1, -2) / 8 ** 0.5 + bias, -1) @ v
    assert torch.allclose(attention(q, k, v, bias), ref, atol=1e-6)


def test_each_model_keeps_its_own_attention_impl(monkeypatch):
    """attention_impl is a setting of each model: building another model does not change it."""
    from singularity_ds.config import load_config
    from singularity_ds.models import SingularityQA, attention as attn
    torch.manual_seed(0)
    by_math = Singularity(tiny_config(attention_impl="math")).eval()
    by_sdpa = Singularity(tiny_config(attention_impl="sdpa")).eval()  # built last
    by_sdpa.load_state_dict(by_math.state_dict())
    calls = []
    sdpa_fn = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(attn.F, "scaled_dot_product_attention",
                        lambda *args, **kw: calls.append(1) or sdpa_fn(*args, **kw))
    video, ids, mask, _ = batch(2, t=2)

    def run(model):
        calls.clear()
        with torch.no_grad():
            text, _ = model.encode_text(ids[:2], mask[:2])
            return model.fusion(text, mask[:2], model.encode_image(video)[0]), len(calls)

    (out_math, n_math), (out_sdpa, n_sdpa) = run(by_math), run(by_sdpa)
    assert n_math == 0 and n_sdpa == 2 + 2 + 2  # 2 vision layers, 2 text-only, 1 fusion (self + cross)
    assert torch.allclose(out_math, out_sdpa, atol=1e-5)  # the same numbers either way
    qa = SingularityQA(load_config(["qa_msrvtt", "tiny"], ["attention_impl=math", "image_res=64"]))
    def impls(module):
        return {m.attention_impl for m in module.modules() if isinstance(m, attn.AttentionLayer)}

    assert impls(qa) == impls(qa.text_decoder) == {"math"}  # the answer decoder, built after the towers, too
    assert run(by_math)[1] == 0  # still its own
    by_math.set_attention_impl("sdpa")
    assert run(by_math)[1] == 6 and impls(qa) == {"math"} and impls(by_sdpa) == {"sdpa"}


def test_temporal_embedding_interpolates_for_more_frames():
    cfg = tiny_config(**{"video_input.num_frames": 2, "add_temporal_embed": True})
    model = Singularity(cfg)
    with torch.no_grad():
        model.temporal_embeddings.copy_(torch.tensor([0.0, 1.0]).view(1, 2, 1, 1).expand(1, 2, 1, 128))
    assert torch.equal(model.temporal_embedding(1), model.temporal_embeddings[:, :1])
    four = model.temporal_embedding(4)  # linear, as the original's F.interpolate(mode='linear')
    assert torch.allclose(four[0, :, 0, 0], torch.tensor([0.0, 0.25, 0.75, 1.0]))
    assert torch.equal(four, interpolate_temporal_embed(model.temporal_embeddings, 4))


def test_temporal_encoder_changes_tokens_not_pooled_unless_asked():
    torch.manual_seed(0)
    cfg = tiny_config(**{"video_input.num_frames": 4, "temporal_vision_encoder.enable": True,
                         "temporal_vision_encoder.num_layers": 1})
    model = Singularity(cfg).eval()
    video = torch.randn(2, 4, 3, 64, 64)
    with torch.no_grad():
        frames, frame_pooled = model.encode_frames(video)
        tokens, pooled = model.encode_image(video)
        assert tokens.shape == (2, 4 * 17, 128) and torch.equal(pooled, frame_pooled)
        assert not torch.allclose(tokens.view(2, 4, 17, 128), frames)
        model.config.temporal_vision_encoder.update_pooler_embed = True
        tokens2, pooled2 = model.encode_image(video)
        assert torch.equal(pooled2, tokens2.view(2, 4, 17, 128)[:, :, 0])
        one, _ = model.encode_image(video[:, :1])  # a single frame skips the temporal encoder
        assert torch.allclose(one, frames[:, 0], atol=1e-6)


def test_late_ensemble_needs_per_frame_tokens():
    model = Singularity(tiny_config()).eval()
    video, ids, mask, _ = batch(2, t=3)
    with torch.no_grad():
        te, _ = model.encode_text(ids[:2], mask[:2])
        tokens, _ = model.encode_image(video)
        frames, _ = model.encode_frames(video)
        with pytest.raises(ValueError, match="needs per-frame tokens"):
            model.itm_logits(te, mask[:2], tokens, "mean")
        late = model.itm_logits(te, mask[:2], frames, "max")
        per = torch.stack([model.itm_logits(te, mask[:2], frames[:, f]) for f in range(3)], 1)
    assert torch.allclose(late, per.max(1).values, atol=1e-6)


def _loss_and_grads(model, seed):
    torch.manual_seed(seed)
    video, ids, mask, idx = batch(4, t=2)
    out = model(video, ids, mask, idx)
    loss = sum(out.values())
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return loss.detach(), grads


def test_gradient_checkpointing_gives_the_same_step():
    cfg = tiny_config(**{"video_input.num_frames": 2, "temporal_vision_encoder.enable": True,
                         "add_temporal_embed": True})
    torch.manual_seed(0)
    model = Singularity(cfg).train()
    loss_a, grads_a = _loss_and_grads(model, 1)
    for _ in range(4):  # deterministic: a resumed run must replay exactly
        _, grads_again = _loss_and_grads(model, 1)
        assert all(torch.equal(grads_a[n], grads_again[n]) for n in grads_a)
    model.set_gradient_checkpointing(True)
    loss_b, grads_b = _loss_and_grads(model, 1)
    assert loss_a == loss_b and grads_a.keys() == grads_b.keys()
    for name in grads_a:
        assert torch.allclose(grads_a[name], grads_b[name], atol=1e-6), name


def test_tiny_model_learns_a_fixed_batch():
    torch.manual_seed(0)
    model = Singularity(tiny_config()).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    video, ids, mask, idx = batch(4)
    fixed = dict(img_neg=torch.tensor([1, 2, 3, 0]), txt_neg=torch.tensor([3, 0, 1, 2]),
                 mlm_inputs=(ids.masked_fill(torch.arange(9) == 3, 103),
                             ids.masked_fill(torch.arange(9) != 3, -100)))
    history = []
    for _ in range(10):
        out = model(video, ids, mask, idx, **fixed)
        loss = sum(out.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(loss.item())
    assert set(out) == {"loss_ita", "loss_itm", "loss_mlm"}
    assert all(torch.isfinite(torch.tensor(history))) and history[-1] < history[0] - 1.5, history
    assert model.temp.item() != torch.tensor(0.07).item()  # the temperature is learned
    # ... and clamped into the original's [0.001, 0.5] at the start of every step
    with torch.no_grad():
        for start, clamped in ((1.0, 0.5), (1e-5, 0.001)):
            model.temp.fill_(start)
            model(video, ids, mask, idx, **fixed)
            assert model.temp.item() == torch.tensor(clamped).item()
