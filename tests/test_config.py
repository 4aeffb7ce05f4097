import os

import pytest

from singularity_ds.config import load_config, packaged_configs
from singularity_ds.errors import ConfigError


def test_cli_overrides_like_the_original():
    cfg = load_config(["ret_msrvtt"], ["video_input.num_frames=4", "temporal_vision_encoder.enable=True",
                                       "test_types=[val,test]", "optimizer.lr=1e-4", "pretrained_path=None"])
    assert cfg.video_input.num_frames == 4 and cfg.temporal_vision_encoder.enable is True
    assert list(cfg.test_types) == ["val", "test"]
    assert cfg.optimizer.lr == pytest.approx(1e-4) and isinstance(cfg.optimizer.lr, float)
    assert cfg.pretrained_path is None and cfg.output_dir is None  # 'None' strings read as null
    assert cfg.tower_init == "pretrained" and cfg.itc_gather is False  # defaults.yaml merged under the task


def test_unknown_key_names_closest_valid_key():
    with pytest.raises(ConfigError, match=r"unknown config key 'video_input.num_frame'; did you mean 'video_input.num_frames'"):
        load_config(["pretrain"], ["video_input.num_frame=4"])
    with pytest.raises(ConfigError, match="unknown config key 'emb_dim'; did you mean 'embed_dim'"):
        load_config(["pretrain"], ["emb_dim=3"])


def test_wrong_type_is_an_error_naming_the_key():
    with pytest.raises(ConfigError, match="'image_res' expects integer"):
        load_config(["pretrain"], ["image_res=big"])
    with pytest.raises(ConfigError, match="'itm_hard_neg' expects boolean"):
        load_config(["pretrain"], ["itm_hard_neg=1"])
    assert load_config(["pretrain"], ["temp=1"]).temp == 1  # int where a float is expected is fine


def test_overlay_files_are_validated_too(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("video_input:\n  num_frmes: 2\n")
    with pytest.raises(ConfigError, match=f"config {bad}: unknown config key 'video_input.num_frmes'"):
        load_config(["pretrain", str(bad)])
    good = tmp_path / "good.yaml"
    good.write_text("available_corpus:\n  mine: [a.json, media, video]\ntrain_corpus: mine\n")
    cfg = load_config(["pretrain", str(good)])  # new corpora are allowed under available_corpus
    assert list(cfg.train_file) == ["a.json", "media", "video"]


def test_interpolation_and_env(monkeypatch):
    monkeypatch.setenv("SL_DATA_DIR", "/data/sl")
    cfg = load_config(["pretrain"], ["train_corpus=webvid_cc3m"])
    assert cfg.train_file[0][0] == "/data/sl/anno_pretrain/webvid_train.json"
    assert cfg.vit_name_or_pretrained_path == "microsoft/beit-base-patch16-224-pt22k-ft22k"


def test_tiny_preset_and_errors_for_missing_configs(tmp_path):
    assert "tiny" in packaged_configs() and "pretrain" in packaged_configs()
    assert load_config(["pretrain", "tiny"]).image_res == 64
    with pytest.raises(ConfigError, match="unknown config 'pretrian'; did you mean 'pretrain'"):
        load_config(["pretrian"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config([os.path.join(tmp_path, "nope.yaml")])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(["pretrain"], ["=3"])


@pytest.mark.parametrize("name", ["ret_msrvtt", "ret_didemo", "ret_anet", "ret_ssv2_label", "ret_ssv2_template",
                                  "ret_coco", "ret_flickr", "ret_msrvtt_mc"])
def test_every_retrieval_task_config_loads_with_the_tiny_overlay(name, monkeypatch):
    monkeypatch.setenv("SL_DATA_DIR", "/data")  # the original's data root variable
    cfg = load_config([name, "tiny"], ["video_input.num_frames_test=2"])
    assert cfg.image_res == 64 and cfg.video_input.num_frames_test == 2
    assert set(cfg.test_types) <= set(cfg.test_file) and cfg.k_test >= 10
    for spec in cfg.test_file.values():  # [annotation, media folder(, video)]: interpolations resolve
        assert "${" not in str(list(spec))
