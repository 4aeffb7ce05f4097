import json
import os

import pytest
import torch
from omegaconf import OmegaConf

from singularity_ds.errors import CheckpointError
from singularity_ds.models import Singularity, load_model
from singularity_ds.models.weights import (
    export,
    geometric_grid,
    interpolate_rel_pos_bias,
    load_into,
    read_checkpoint,
    safe_load,
)


class Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_without_running(tmp_path):
    marker, path = tmp_path / "pwned", tmp_path / "evil.pth"
    torch.save({"model": {}, "config": Exploit(marker)}, path)
    with pytest.raises(CheckpointError, match=f"{path}: refused to load.*system"):
        load_model(str(path))
    assert not marker.exists()


def test_not_a_checkpoint_is_one_clear_error(tmp_path):
    path = tmp_path / "junk.pth"
    path.write_bytes(b"not a zip")
    with pytest.raises(CheckpointError, match="junk.pth: not a readable torch checkpoint"):
        safe_load(str(path))
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        safe_load(str(tmp_path / "missing.pth"))
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="expected a dict with a 'model' state dict"):
        read_checkpoint(str(tmp_path / "list.pth"))


@pytest.fixture(scope="module")
def original(tiny_ref):
    ckpt = torch.load(tiny_ref["path"] / "checkpoint.pth", weights_only=True)
    return ckpt["model"], ckpt["config"]


def _finetune_layout(state):
    """The original retrieval model's keys: text_encoder.X (no bert.), no MLM head, fp32."""
    return {k.replace("text_encoder.bert.", "text_encoder."): v.float() for k, v in state.items()
            if not k.startswith("text_encoder.cls.")}


def test_original_checkpoint_with_pickled_omegaconf_and_finetune_layout(tmp_path, original, tiny_ref):
    """As the original's training loop saves: config is an OmegaConf DictConfig with unresolved
    interpolations (env var unset), keys in the fine-tuned layout."""
    state, cfg = original
    cfg = dict(cfg, data_root="${oc.env:SL_DATA_DIR_NOT_SET}/videos", loss_weight={"itc": 1.0, "itm": 1.0},
               vit_name_or_pretrained_path="${vit_zoo[${vit_type}]}")
    path = tmp_path / "ret.pth"
    torch.save({"model": _finetune_layout(state), "config": OmegaConf.create(cfg), "epoch": 3}, path)
    model = load_model(str(path))
    assert not model.has_mlm_head
    inp, exp = tiny_ref["inputs"], tiny_ref["expected"]
    with torch.no_grad():
        te, _ = model.encode_text(inp["input_ids"], inp["attention_mask"])
        ie, _ = model.encode_image(inp["video"])
    assert torch.allclose(te, exp["text_embeds"], atol=1e-4)
    assert torch.allclose(ie, exp["image_embeds"], atol=1e-4)


def test_zero_shot_retrieval_model_from_pretrain_checkpoint_uses_text_weights(tiny_ref):
    """The original's evaluate path loads none of the text weights here; we map bert.* keys."""
    model = load_model(str(tiny_ref["path"] / "checkpoint.pth"),
                       loss_weight={"itc": 1.0, "itm": 1.0, "mlm": 0})
    assert not model.has_mlm_head
    with torch.no_grad():
        te, _ = model.encode_text(tiny_ref["inputs"]["input_ids"], tiny_ref["inputs"]["attention_mask"])
    assert torch.allclose(te, tiny_ref["expected"]["text_embeds"], atol=1e-4)


def test_temporal_embeddings_clip_and_zero_pad(tiny_ref, original):
    ref = original[0]["temporal_embeddings"].float()
    one = load_model(str(tiny_ref["path"] / "checkpoint.pth"), **{"video_input.num_frames": 1})
    assert torch.equal(one.temporal_embeddings.data, ref[:, :1])
    six = load_model(str(tiny_ref["path"] / "checkpoint.pth"), **{"video_input.num_frames": 6})
    assert torch.equal(six.temporal_embeddings.data[:, :4], ref)
    assert six.temporal_embeddings.data[:, 4:].abs().sum() == 0


def test_strict_report_names_keys(tmp_path, original):
    state, cfg = original
    model = Singularity(cfg)
    extra = dict(state, **{"foo.bar": torch.zeros(1)})
    del extra["itm_head.weight"]
    with pytest.raises(CheckpointError) as e:
        load_into(model, extra, source="x.pth")
    msg = str(e.value)
    assert ("x.pth" in msg and "1 missing key(s): itm_head.weight" in msg
            and "1 unexpected key(s): foo.bar" in msg)
    report = load_into(model, extra, strict=False)
    assert report["missing"] == ["itm_head.weight"] and report["unexpected"] == ["foo.bar"]
    with pytest.raises(CheckpointError,
                       match=r"vision_proj.weight: checkpoint \(256, 768\) vs model \(128, 768\)"):
        load_into(Singularity(dict(cfg, embed_dim=128)), state)


def test_second_stage_temporal_encoder_is_newly_initialised(original):
    state, cfg = original
    single = {k: v for k, v in state.items() if not k.startswith("temporal_vision_encoder.")}
    model = Singularity(cfg)
    report = load_into(model, single)
    assert report["newly_initialised"] and all(k.startswith("temporal_vision_encoder.")
                                               for k in report["newly_initialised"])
    assert not report["missing"]


def test_rel_pos_bias_grid_matches_beit_224_to_384():
    """BEiT's fine-tuning note: 224 -> 384 px (27 -> 47 relative positions) gives q ~= 1.090307."""
    x, dx, q = geometric_grid(27, 47)
    assert abs(q - 1.090307) < 1e-5 and len(x) == 27 and len(dx) == 47 and dx[0] == -23


def test_rel_pos_bias_interpolation_reproduces_cubic_polynomials():
    """A bicubic interpolating spline reproduces cubic polynomials exactly: checks values and axes."""
    src, dst, heads = 13, 27, 2  # 112 px -> 224 px at patch 16
    x, dx, _ = geometric_grid(src, dst)

    def table(coords):
        r, c = torch.meshgrid(torch.tensor(coords), torch.tensor(coords), indexing="ij")
        z = torch.stack([r ** 2 + 2 * r * c + 3 * c, 0.5 * r - c ** 3 / 50], dim=-1).reshape(-1, heads)
        return torch.cat([z.float(), torch.arange(3 * heads, dtype=torch.float32).view(3, heads)])

    out = interpolate_rel_pos_bias(table(x), dst * dst + 3)
    assert out.shape == (dst * dst + 3, heads)
    assert torch.allclose(out, table(list(dx)), atol=1e-3)


def test_image_res_change_interpolates_every_layer(tiny_ref):
    with pytest.raises(CheckpointError, match="too small to interpolate"):
        load_model(str(tiny_ref["path"] / "checkpoint.pth"), image_res=64)  # fixture grid is 2x2


def test_export_round_trip(tmp_path, tiny_ref):
    model = load_model(str(tiny_ref["path"] / "checkpoint.pth"))
    export(model, str(tmp_path / "export"))
    assert json.load(open(tmp_path / "export" / "config.json"))["video_input"]["num_frames"] == 4
    again = load_model(str(tmp_path / "export"))
    for (k, a), (k2, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    with torch.no_grad():
        v = tiny_ref["inputs"]["video"]
        assert torch.equal(model.encode_image(v)[0], again.encode_image(v)[0])
