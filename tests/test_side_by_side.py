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
