"""``wandb.enable``: the scalars TensorBoard gets go to W&B too, identical; offline (``WANDB_MODE=offline``),
the run's local transaction log is read back here. Nothing leaves the machine."""
import glob
import json
import struct
import sys

import numpy as np
import pytest

from conftest import tiny_config
from singularity_ds.engine.scalars import open_sinks
from singularity_ds.errors import ConfigError
from test_faults import one_rank_in_process, train, video_overlay  # noqa: F401  (a fixture, helpers)


def wandb_history(run_dir) -> dict:
    """{tag: [(step, value)]} from the offline run's ``run-<id>.wandb``. wandb 0.31 ships no Python reader
    for it (its Go core writes it): the file is a LevelDB log (32 KiB blocks of records with a 7-byte header:
    crc32c, length, type FULL/FIRST/MIDDLE/LAST) after a 7-byte ``:W&B`` header, each record one of wandb's
    own protobuf ``Record`` messages, parsed with wandb's classes."""
    from wandb.proto import wandb_internal_pb2

    (path,) = glob.glob(str(run_dir / "wandb" / "offline-run-*" / "run-*.wandb"))
    data, block = open(path, "rb").read(), 32768
    assert data[:4] == b":W&B"
    pos, part, out = 7, b"", {}
    while pos + 7 <= len(data):
        left = block - pos % block
        length, kind = struct.unpack("<HB", data[pos + 4:pos + 7]) if left >= 7 else (0, 0)
        if left < 7 or (length, kind) == (0, 0):  # block trailer / padding
            pos += left
            continue
        part += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(part)
            part = b""
            if record.WhichOneof("record_type") == "history":
                row = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                       for item in record.history.item}
                for k, v in row.items():
                    if not k.startswith("_"):
                        out.setdefault(k, []).append((row["_step"], v))
    return out


def test_wandb_offline_gets_the_tensorboard_scalars(corpus, tmp_path, monkeypatch, one_rank_in_process):  # noqa: F811
    for name, value in dict(WANDB_MODE="offline", WANDB_SILENT="true", WANDB_CONFIG_DIR=tmp_path / "wcfg",
                            WANDB_CACHE_DIR=tmp_path / "wcache", WANDB_DATA_DIR=tmp_path / "wdata").items():
        monkeypatch.setenv(name, str(value))
    out = tmp_path / "run"
    assert train(video_overlay(corpus, tmp_path), out, "max_steps=3", "wandb.enable=True",
                 "wandb.project=sds-test") == 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(out / "tb"))
    events.Reload()
    tb = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    wb = wandb_history(out)
    assert {"train/loss", "train/loss_ita", "train/lr", "train/grad_norm", "train/broken_media"} <= set(tb)
    assert set(wb) == set(tb)
    for tag, points in tb.items():
        assert [s for s, _ in wb[tag]] == [s for s, _ in points] == [1, 2, 3], tag
        # TensorBoard stores float32, W&B the float64 it was given: equal once rounded the same way
        assert [np.float32(v) for _, v in wb[tag]] == [v for _, v in points], tag
    history = json.load(open(out / "history.json"))
    assert [r["loss"] for r in history] == [v for _, v in wb["train/loss"]]
    assert (out / "wandb" / "run_id").read_text() in glob.glob(str(out / "wandb" / "offline-run-*"))[0]


def test_wandb_enable_without_the_package_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError (not installed)
    with pytest.raises(ConfigError, match=r"^config key 'wandb.enable' is True but the wandb package is not "
                                          r"installed: pip install 'singularity-ds\[wandb\]'"):
        open_sinks(tiny_config(**{"wandb.enable": True}), str(tmp_path), 0)
    sinks = open_sinks(tiny_config(), str(tmp_path), 0)  # off (the default): TensorBoard only
    assert [type(s).__name__ for s in sinks] == ["TensorBoardSink"]
    for s in sinks:
        s.close()
