"""The analytic FLOP formula of `bench train` against PyTorch's FlopCounterMode on the tiny model."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from conftest import tiny_config
from singularity_ds.engine.flops import step_flops
from singularity_ds.models import Singularity
from singularity_ds.models import attention as attn


@pytest.mark.parametrize("frames,temporal", [(1, False), (4, True)])
def test_formula_equals_counted_matmul_flops(frames, temporal):
    cfg = tiny_config(image_res=32, **{"video_input.num_frames": frames, "temporal_vision_encoder.enable": temporal,
                                       "add_temporal_embed": temporal, "max_txt_l.video": 20})
    b, length = 4, 20
    torch.manual_seed(0)
    model = Singularity(cfg).eval()
    attn.set_attention_impl("math")  # attention as explicit matmuls, which the counter sees
    try:
        ids = torch.randint(1000, 2000, (b, length))
        mask = torch.ones(b, length, dtype=torch.long)
        labels = torch.full((b, length), -100)
        masked = int(cfg.mlm_prob * length)  # the formula's expected count, exactly (pretrain: 0.5 x 20)
        labels[:, 1:1 + masked] = ids[:, 1:1 + masked]
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(torch.randn(b, frames, 3, 32, 32), ids, mask, torch.arange(b), mlm_inputs=(ids, labels))
    finally:
        attn.set_attention_impl("auto")
    formula = step_flops(cfg, b, frames, length)
    assert formula["forward"] * b == counter.get_total_flops()
    assert formula["train"] == 3 * formula["forward"] and (formula["temporal"] > 0) == temporal
