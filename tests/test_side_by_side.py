"""``bench train --original PATH``: the original code's step beside ours. The side-by-side run needs a
clone of github.com/jayleicn/singularity: set SINGULARITY_ORIGINAL to its folder (no network here)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REFERENCE

ORIGINAL = os.environ.get("SINGULARITY_ORIGINAL")


def test_original_path_must_be_a_clone(tmp_path):
    from singularity_ds.engine.original import load_original
    from singularity_ds.errors import ConfigError
    with pytest.raises(ConfigError, match="not a clone of github.com/jayleicn/singularity"):
        load_original(str(tmp_path))


@pytest.mark.slow
@pytest.mark.skipif(not ORIGINAL or not Path(ORIGINAL, "models", "xbert.py").is_file(),
                    reason="set SINGULARITY_ORIGINAL to a clone of github.com/jayleicn/singularity")
def test_side_by_side_builds_the_original_with_our_architecture(tmp_path, free_port):
    """The reference fixture's towers (768 wide, the original's hard-coded width; 2 BEiT and 3 BERT
    layers), a full-size vocabulary for bench train's random ids: both models train a step in one process."""
    ref = json.loads((REFERENCE / "singularity_tiny" / "config.json").read_text())
    bert = dict(ref["bert_config_dict"], vocab_size=30522)
    overlay = tmp_path / "arch.yaml"
    overlay.write_text(yaml.safe_dump(dict(bert_config_dict=bert, beit_config_dict=ref["beit_config_dict"],
                                           image_res=32, max_txt_l=dict(video=12, image=12))))
    out = tmp_path / "side.json"
    env = dict(os.environ, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port), DS_ACCELERATOR="cpu")
    proc = subprocess.run([sys.executable, "-m", "singularity_ds", "bench", "train", "pretrain", str(overlay),
                           "precision=fp32", "ds_config=zero0", "batch_size.video=3",
                           "--steps", "1", "--warmup", "1",
                           "--original", ORIGINAL, "--json", str(out)],
                          env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(out.read_text())
    ours, orig = res["ours"], res["original"]
    assert ours["parameters"] == orig["parameters"]  # the same towers and heads, built by two codes
    # the original projects each video's cross-attention keys/values once per pairing (4) and its MLM
    # head at every position; ours once per video and at masked positions only
    assert orig["train_gflop_per_sample"] > ours["train_gflop_per_sample"]
    assert res["ratio_samples_per_s"] == round(ours["samples_per_s"] / orig["samples_per_s"], 3)
    assert "| **ours / original** |" in proc.stdout


@pytest.mark.slow
@pytest.mark.skipif(not ORIGINAL or not Path(ORIGINAL, "models", "xbert.py").is_file(),
                    reason="set SINGULARITY_ORIGINAL to a clone of github.com/jayleicn/singularity")
def test_export_original_loads_into_the_original_retrieval_model(tmp_path):
    """`export --original` of a retrieval model: the original's model_retrieval.Singularity (built from the
    clone, the reference's 768-wide architecture) loads it with no key missing or unexpected -- what its
    evaluate path (load_state_dict(strict=False), no renaming) needs -- and encodes as ours does."""
    import types

    import torch

    from singularity_ds.cli import main
    from singularity_ds.engine.original import build_original
    from singularity_ds.models import load_model
    from singularity_ds.models.arch import bert_config
    ref = REFERENCE / "singularity_tiny" / "checkpoint.pth"
    ours = load_model(str(ref), **{"task": "train_ret", "loss_weight.mlm": 0}).eval()
    assert not ours.has_mlm_head
    from singularity_ds.models.weights import export
    export(ours, str(tmp_path / "export"))
    out = tmp_path / "ret.pth"
    assert main(["export", str(tmp_path / "export"), "--original", str(out)]) == 0
    bert_json = tmp_path / "config_bert.json"  # the temporal encoder's config, as the checkpoint's
    bert_config(ours.config).to_json_file(str(bert_json))
    original = build_original(ORIGINAL, ours.config, retrieval=True, bert_json=str(bert_json)).eval()
    state = torch.load(out, weights_only=True)["model"]
    result = original.load_state_dict(state, strict=False)
    # the original ran on transformers 4.15, whose BEiT names are the file's; the BEiT of the installed
    # transformers 5 the clone's model is built with here renames its tensors (layers.N.attention.q_proj
    # ...) and no longer saves relative_position_index: those, and only those, differ
    from singularity_ds.models.weights import _hf4_vision_name
    tower = "vision_encoder."
    renamed = {tower + _hf4_vision_name(k[len(tower):]): k for k in result.missing_keys}
    assert all(k.startswith(tower) for k in result.missing_keys)
    index_buffers = {k for k in result.unexpected_keys if k.endswith(".relative_position_index")}
    assert index_buffers and sorted(renamed) == sorted(set(result.unexpected_keys) - index_buffers)
    state = {renamed.get(k, k): v for k, v in state.items() if k not in index_buffers}
    result = original.load_state_dict(state, strict=False)
    assert result.missing_keys == [] and result.unexpected_keys == []
    inputs = torch.load(REFERENCE / "singularity_tiny" / "inputs.pt", weights_only=True)
    video, ids, mask = inputs["video"], inputs["input_ids"], inputs["attention_mask"]
    with torch.no_grad():
        theirs_img, theirs_pooled = original.encode_image(video)
        mine_img, mine_pooled = ours.encode_image(video)
        theirs_txt = original.encode_text(types.SimpleNamespace(input_ids=ids, attention_mask=mask))[0]
        mine_txt = ours.encode_text(ids, mask)[0]
    assert torch.allclose(theirs_pooled, mine_pooled, atol=1e-5)
    assert torch.allclose(theirs_img.reshape(mine_img.shape), mine_img, atol=1e-5)
    assert torch.allclose(theirs_txt, mine_txt, atol=1e-5)
