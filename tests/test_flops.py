"""The analytic FLOP formula of `bench train` against PyTorch's FlopCounterMode on the tiny model."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from conftest import tiny_config
from singularity_ds.models import Singularity, SingularityQA
from singularity_ds.models.flops import qa_step_flops, step_flops


def counted(counter, *modules):
    """FLOPs FlopCounterMode attributed to the named submodules (0 for one that never ran)."""
    counts = counter.get_flop_counts()
    return sum(sum(counts.get(m, {}).values()) for m in modules)


@pytest.mark.parametrize("frames,temporal", [(1, False), (4, True)])
def test_formula_equals_counted_matmul_flops(frames, temporal):
    cfg = tiny_config(image_res=32, **{"video_input.num_frames": frames,
                                       "temporal_vision_encoder.enable": temporal,
                                       "add_temporal_embed": temporal, "max_txt_l.video": 20})
    b, length = 4, 20
    torch.manual_seed(0)
    model = Singularity(cfg).eval()
    model.set_attention_impl("math")  # attention as explicit matmuls, which the counter sees
    ids = torch.randint(1000, 2000, (b, length))
    mask = torch.ones(b, length, dtype=torch.long)
    labels = torch.full((b, length), -100)
    masked = int(cfg.mlm_prob * length)  # the formula's expected count, exactly (pretrain: 0.5 x 20)
    labels[:, 1:1 + masked] = ids[:, 1:1 + masked]
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.randn(b, frames, 3, 32, 32), ids, mask, torch.arange(b), mlm_inputs=(ids, labels))
    formula = step_flops(cfg, b, frames, length)
    assert formula["forward"] * b == counter.get_total_flops()
    assert formula["train"] == 3 * formula["forward"]
    # the towers' parts against what ran inside those modules
    assert formula["vision"] * b == counted(counter, "Singularity.vision_encoder")
    assert formula["temporal"] * b == counted(counter, "Singularity.temporal_vision_encoder")
    assert (formula["temporal"] > 0) == temporal


def test_formula_equals_hand_count():
    """Tiny config, 32 px (4 patches + CLS = 5 tokens), 1 frame, batch 2, 8 text tokens, 4 masked: every
    product listed by hand as 2 x (rows x inner x cols)."""
    cfg = tiny_config(image_res=32, **{"max_txt_l.video": 8})
    mm = lambda rows, inner, cols: 2 * rows * inner * cols  # noqa: E731
    # vision: patch embedding + 2 BEiT layers (width 128, FFN 256)
    vis_layer = 4 * mm(5, 128, 128) + mm(5, 128, 5) + mm(5, 5, 128) + mm(5, 128, 256) + mm(5, 256, 128)
    vision = mm(4, 3 * 16 * 16, 128) + 2 * vis_layer
    # text: 2 text-only layers and 1 fusion layer (width 128, FFN 256) over 8 tokens
    txt_layer = 4 * mm(8, 128, 128) + mm(8, 128, 8) + mm(8, 8, 128) + mm(8, 128, 256) + mm(8, 256, 128)
    cross_q = 2 * mm(8, 128, 128) + mm(8, 128, 5) + mm(8, 5, 128)  # query + output, scores, weighted sum
    cross_kv = 2 * mm(5, 128, 128)  # keys + values of the 5 video tokens, once per video
    itc = 2 * txt_layer + mm(1, 128, 64) + mm(1, 128, 64) + mm(1, 64, 2)  # projections, similarity row
    itm = cross_kv + 3 * (txt_layer + cross_q + mm(1, 128, 2))
    mlm = 2 * txt_layer + txt_layer + cross_q + 4 * (mm(1, 128, 128) + mm(1, 128, 30522))
    formula = step_flops(cfg, 2, 1, 8)
    assert (formula["vision"], formula["itc"], formula["itm"], formula["mlm"]) == (vision, itc, itm, mlm)
    assert formula["forward"] == vision + itc + itm + mlm == 54_399_744


@pytest.mark.parametrize("frames", [1, 2])
def test_qa_formula_equals_counted_matmul_flops(frames):
    from singularity_ds.config import load_config
    cfg = load_config(["qa_msrvtt", "tiny"], ["image_res=32", f"video_input.num_frames={frames}"])
    b, answers = 3, 2
    torch.manual_seed(0)
    model = SingularityQA(cfg).eval()
    model.set_attention_impl("math")
    q_ids, a_ids = torch.randint(1000, 2000, (b, 12)), torch.randint(1000, 2000, (b * answers, 5))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.randn(b, frames, 3, 32, 32), q_ids, torch.ones_like(q_ids), a_ids, torch.ones_like(a_ids),
              torch.ones(b * answers), [answers] * b)
    formula = qa_step_flops(cfg, frames, 12, 5, answers)
    assert formula["forward"] * b == counter.get_total_flops()
    # each part against what ran inside its modules: the question through the text encoder, the answers
    # through the decoder layers and the vocabulary head
    assert formula["vision"] * b == counted(counter, "SingularityQA.vision_encoder")
    assert formula["question"] * b == counted(counter, "SingularityQA.text_encoder.bert.encoder")
    assert formula["answer"] * b == counted(counter, "SingularityQA.text_decoder.bert.encoder",
                                            "SingularityQA.text_decoder.cls")
