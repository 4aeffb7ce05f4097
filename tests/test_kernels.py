"""The Triton attention kernel under the interpreter (TRITON_INTERPRET=1, CPU tensors), against the
math reference: outputs and gradients (q, k, v, bias) for every attention the model runs."""
import os

import pytest
import torch

from singularity_ds.kernels.attention import flash_attention
from singularity_ds.models import attention as attn

assert os.environ.get("TRITON_INTERPRET") == "1"  # set by conftest.py before anything imports Triton


def reference(q, k, v, bias):
    s = q.double() @ k.double().transpose(-1, -2) / q.shape[-1] ** 0.5
    if bias is not None:
        s = s + bias.double()
    return s.softmax(-1) @ v.double()


def check(q, k, v, bias=None, leaves=(), tol=1e-4, rel=False):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    leaves = [x.detach().requires_grad_() for x in leaves]
    b = bias(*leaves) if callable(bias) else bias
    out = flash_attention(q, k, v, b)
    grad = torch.randn_like(out)
    out.backward(grad)
    got = [out.detach()] + [t.grad for t in (q, k, v, *leaves)]
    for t in (q, k, v, *leaves):
        t.grad = None
    b = bias(*leaves) if callable(bias) else bias
    ref = reference(q, k, v, b)
    ref.backward(grad.double())
    want = [ref.detach()] + [t.grad for t in (q, k, v, *leaves)]
    for name, g, w in zip(["out", "dq", "dk", "dv"] + ["dbias"] * len(leaves), got, want):
        err = (g.double() - w.double()).abs().max().item()
        bound = tol * max(1.0, w.abs().max().item()) if rel else tol
        assert err <= bound, (name, err, bound)


def test_beit_self_attention_with_relative_position_bias_gradient_to_the_table():
    torch.manual_seed(0)
    b, h, n, d = 3, 2, 17, 32  # 4x4 patches + [CLS]
    table = torch.randn(40, h)
    index = torch.randint(0, 40, (n, n))
    rel_pos = lambda t: t[index.view(-1)].view(n, n, h).permute(2, 0, 1).unsqueeze(0)  # noqa: E731
    check(torch.randn(b, h, n, d), torch.randn(b, h, n, d), torch.randn(b, h, n, d), rel_pos, leaves=[table])


def test_bert_self_attention_with_key_padding():
    torch.manual_seed(1)
    mask = torch.ones(4, 20)
    mask[0, 12:] = 0
    mask[2, 5:] = 0
    pad = (1.0 - mask[:, None, None, :]) * -10000.0
    check(torch.randn(4, 2, 20, 64), torch.randn(4, 2, 20, 64), torch.randn(4, 2, 20, 64), pad)


def test_fusion_cross_attention_text_queries_over_frame_tokens():
    torch.manual_seed(2)
    text, frames = 9, 3 * 17  # queries vs T * Li keys, different lengths, blocks not multiples of 16
    check(torch.randn(2, 2, text, 32), torch.randn(2, 2, frames, 32), torch.randn(2, 2, frames, 32))


def test_cached_video_keys_values_broadcast_over_texts():
    torch.manual_seed(3)
    k, v = torch.randn(1, 2, 34, 32), torch.randn(1, 2, 34, 32)  # one video's K/V for 5 texts
    check(torch.randn(5, 2, 8, 32), k, v)


def test_temporal_attention_short_sequences_large_batch():
    torch.manual_seed(4)
    check(torch.randn(96, 2, 4, 16), torch.randn(96, 2, 4, 16), torch.randn(96, 2, 4, 16))


def test_decoder_causal_and_padding_bias():
    from singularity_ds.models.qa import causal_bias
    torch.manual_seed(5)
    mask = torch.ones(3, 6, dtype=torch.long)
    mask[1, 4:] = 0
    check(torch.randn(3, 2, 6, 128), torch.randn(3, 2, 6, 128), torch.randn(3, 2, 6, 128),
          causal_bias(mask, torch.float32))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_within_2e_2_relative(dtype):
    torch.manual_seed(6)
    table = torch.randn(1, 2, 17, 17)
    q, k, v = (torch.randn(2, 2, 17, 64).to(dtype) for _ in range(3))
    check(q, k, v, lambda t: t.to(dtype), leaves=[table], tol=2e-2, rel=True)


def test_dispatch_uses_the_kernel_only_where_it_can(monkeypatch, caplog):
    q = torch.randn(2, 2, 5, 32)
    assert attn._triton_reason(q, q, q, None, 0.1) == "attention dropout is on"
    odd = torch.randn(1, 1, 3, 24)
    assert "head dim 24" in attn._triton_reason(odd, odd, odd, None, 0.0)
    assert attn._triton_reason(q, q, q, None, 0.0) == ""
    monkeypatch.delenv("TRITON_INTERPRET")
    with caplog.at_level("INFO"):
        out = attn.attention(q, q, q, impl="triton")  # falls back to SDPA on CPU, says why once
    assert "no CUDA device" in caplog.text
    assert torch.allclose(out, reference(q, q, q, None).float(), atol=1e-5)
    with pytest.raises(Exception, match="attention_impl='flash'"):
        attn.check_attention_impl("flash")


def test_whole_model_unchanged_with_the_kernel(tiny_ref):
    from singularity_ds.models import load_model
    inp, exp = tiny_ref["inputs"], tiny_ref["expected"]
    model = load_model(str(tiny_ref["path"] / "checkpoint.pth"), attention_impl="triton")
    with torch.no_grad():
        image_embeds, _ = model.encode_image(inp["video"])
        text_embeds, _ = model.encode_text(inp["input_ids"], inp["attention_mask"])
        fused = model.fusion(text_embeds, inp["attention_mask"], image_embeds)
    assert torch.allclose(image_embeds, exp["image_embeds"], atol=1e-4)
    assert torch.allclose(text_embeds, exp["text_embeds"], atol=1e-4)
    sdpa = load_model(str(tiny_ref["path"] / "checkpoint.pth"))
    with torch.no_grad():
        assert torch.allclose(fused, sdpa.fusion(text_embeds, inp["attention_mask"], image_embeds), atol=1e-4)
