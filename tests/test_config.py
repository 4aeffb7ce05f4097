import os
from pathlib import Path

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
    with pytest.raises(ConfigError, match=r"unknown config key 'video_input.num_frame'; "
                                          r"did you mean 'video_input.num_frames'"):
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


@pytest.mark.parametrize("name", ["ret_msrvtt", "ret_didemo", "ret_anet", "ret_ssv2_label",
                                  "ret_ssv2_template", "ret_coco", "ret_flickr", "ret_msrvtt_mc"])
def test_every_retrieval_task_config_loads_with_the_tiny_overlay(name, monkeypatch):
    monkeypatch.setenv("SL_DATA_DIR", "/data")  # the original's data root variable
    cfg = load_config([name, "tiny"], ["video_input.num_frames_test=2"])
    assert cfg.image_res == 64 and cfg.video_input.num_frames_test == 2
    assert set(cfg.test_types) <= set(cfg.test_file) and cfg.k_test >= 10
    for spec in cfg.test_file.values():  # [annotation, media folder(, video)]: interpolations resolve
        assert "${" not in str(list(spec))


# ---------------------------------------------------------------------- the schema
def test_ranges_and_choices_are_checked_after_the_merge(tmp_path):
    errors = {
        "video_input.num_frames=0": "config key 'video_input.num_frames' must be >= 1, got 0",
        "temp=0": "config key 'temp' must be > 0, got 0",
        "mlm_prob=1.5": "config key 'mlm_prob' must be in [0, 1], got 1.5",
        "batch_size.video=0": "config key 'batch_size.video' must be >= 1, got 0",  # a per-media value
        "video_input.reader=opencv": "config key 'video_input.reader' must be one of decord, av, dali, auto, "
                                     "got 'opencv'",
        "video_input.sample_type_test=fps0": "config key 'video_input.sample_type_test' must be one of rand, "
                                             "middle, uniform, fpsX, got 'fps0'",
        # interpolations are resolved before the check
        "video_input.num_frames=${max_steps}": "config key 'video_input.num_frames' must be >= 1, got -1",
    }
    for override, message in errors.items():
        with pytest.raises(ConfigError) as e:
            load_config(["pretrain"], [override])
        assert str(e.value) == message
    bad = tmp_path / "bad.yaml"
    bad.write_text("video_input:\n  num_frames_test: 0\n")  # files are validated too
    with pytest.raises(ConfigError, match="'video_input.num_frames_test' must be >= 1, got 0"):
        load_config(["ret_msrvtt", str(bad)])
    assert load_config(["pretrain"], ["video_input.sample_type=fps0.5"]).video_input.sample_type == "fps0.5"


def test_type_errors_name_the_key_and_the_schema_type():
    with pytest.raises(ConfigError) as e:
        load_config(["pretrain"], ["image_res=big"])
    assert str(e.value) == ("command line: config key 'image_res' expects integer (default 224), "
                            "got 'big' (string)")
    with pytest.raises(ConfigError, match=r"'test_file.val' expects corpus, got 3 \(integer\)"):
        load_config(["ret_msrvtt"], ["test_file.val=3"])  # an open mapping's entry is named
    with pytest.raises(ConfigError, match="key 'batch_size.vid'; did you mean 'batch_size.video'"):
        load_config(["pretrain"], ["batch_size.vid=8"])


def test_union_keys_take_each_of_their_forms():
    cfg = load_config(["ret_msrvtt"], ["batch_size=8", "resume=auto"])
    assert cfg.batch_size == 8 and cfg.max_txt_l == 32 and cfg.resume == "auto"
    cfg = load_config(["ret_msrvtt"], ["max_txt_l={image: 20, video: 16}", "resume=True"])
    assert dict(cfg.max_txt_l) == {"image": 20, "video": 16} and cfg.resume is True
    with pytest.raises(ConfigError, match="'max_txt_l': given per media type, it needs both image and video; "
                                          "image is missing"):
        load_config(["ret_msrvtt"], ["max_txt_l.video=16"])  # an int made a half mapping


def test_an_unresolvable_value_is_no_error_at_load(monkeypatch):
    monkeypatch.delenv("SL_DATA_DIR", raising=False)
    cfg = load_config(["ret_msrvtt"], ["num_workers=${oc.env:SL_NUM_WORKERS_UNSET}"])
    with pytest.raises(Exception, match="SL_DATA_DIR"):  # reported where it is used, as before
        list(cfg.train_file)
    with pytest.raises(Exception, match="SL_NUM_WORKERS_UNSET"):
        cfg.num_workers


def test_every_key_has_a_doc_and_a_default_that_validates():
    from singularity_ds.config.schema import keys
    assert len(keys()) > 100
    for path, spec in keys().items():
        assert spec.doc and spec.doc.strip(), path
    from omegaconf import OmegaConf

    from singularity_ds.config.check import validate
    from singularity_ds.config.schema import defaults
    validate(OmegaConf.create(defaults()))


def _yaml_keys(node, prefix=""):
    """A YAML file's dotted keys, not descending into open mappings (test_file, available_corpus, ...)."""
    from singularity_ds.config.schema import keys
    out = []
    for k, v in node.items():
        out.append(prefix + k)
        spec = keys().get(prefix + k)
        if isinstance(v, dict) and spec is not None and spec.group is not None:
            out += _yaml_keys(v, prefix + k + ".")
    return out


@pytest.mark.parametrize("name", packaged_configs())
def test_every_packaged_config_is_in_the_schema_and_loads(name, monkeypatch):
    import yaml
    from omegaconf import OmegaConf

    from singularity_ds.config.load import CONFIG_DIR
    from singularity_ds.config.schema import keys
    monkeypatch.setenv("SL_DATA_DIR", "/data")
    raw = yaml.safe_load((CONFIG_DIR / f"{name}.yaml").read_text())
    assert [k for k in _yaml_keys(raw) if k not in keys()] == []
    cfg = load_config([name])
    for path, spec in keys().items():  # every schema key is there: code never needs .get(key, default)
        if not spec.member:
            value = OmegaConf.select(cfg, path, default="absent", throw_on_resolution_failure=False)
            assert value != "absent", path
    if name not in ("tiny", "clip_b16", "siglip_b16"):  # task configs (the others are overlays)
        assert OmegaConf.to_container(cfg.test_file, resolve=True)  # interpolations resolve
        assert str(cfg.data_root) == "/data/videos_images"


def test_defaults_come_from_the_schema(tmp_path):
    from singularity_ds.config.load import CONFIG_DIR
    assert not (CONFIG_DIR / "defaults.yaml").exists()
    assert load_config(["pretrain"]).media_retries == 3
    ret, qa = load_config(["ret_msrvtt"]), load_config(["qa_msrvtt"])
    # keys a task config leaves out keep the behaviour their absence had: no MLM head for retrieval / QA
    assert ret.loss_weight.mlm == 0 and ret.mlm_prob == 0.5 and qa.loss_weight.itc == 1.0
    assert qa.max_txt_l.video == 32 and qa.itm_hard_neg is True
    assert ret.text_decoder is None and ret.answer_list is None
    mine = tmp_path / "mine.yaml"
    mine.write_text("image_res: 32\n")  # a task config of one key: the rest from the schema
    cfg = load_config([str(mine)])
    assert cfg.image_res == 32 and cfg.video_input.num_frames == 1 and cfg.batch_size.video == 96
    assert cfg.optimizer.different_lr.lr == pytest.approx(1e-3) and cfg.test_file == {} and cfg.task is None


def test_reader_choices_are_the_registered_readers():
    from singularity_ds.config.schema import READERS, keys
    from singularity_ds.data.readers import get_reader
    assert keys()["video_input.reader"].choices == READERS
    for name in READERS:  # each name the schema accepts is a registered reader (dali: an error naming DALI)
        try:
            get_reader(name)
        except ValueError as e:
            assert "unknown video reader" not in str(e), name
    with pytest.raises(ValueError, match="unknown video reader"):
        get_reader("ffmpeg")


# ---------------------------------------------------------------------- checkpoint configs
@pytest.mark.parametrize("name", ["singularity_tiny", "singularity_tiny_qa"])
def test_complete_config_fills_the_schema_under_the_stored_values(name):
    import json

    from conftest import reference
    from singularity_ds.config import complete_config
    from singularity_ds.models import Singularity, SingularityQA, is_qa_state
    from singularity_ds.models.weights import load_into, read_checkpoint
    path = reference(name)
    stored = json.loads((path / "config.json").read_text())
    state, pth_config = read_checkpoint(str(path / "checkpoint.pth"))
    assert pth_config == stored  # the folder's config.json is the .pth's stored config
    cfg = complete_config(stored)
    assert cfg.media_retries == 3 and cfg.tower_init == "pretrained"  # schema defaults
    assert cfg.optimizer.lr == pytest.approx(1e-4) and cfg.video_input.num_frames_test == 4
    assert cfg.video_input.num_frames == 4 and cfg.image_res == 32  # stored values
    assert cfg.temporal_vision_encoder.num_layers == 1
    assert cfg.bert_config_dict == stored["bert_config_dict"]
    if name == "singularity_tiny":
        assert cfg.max_txt_l.image == 12 and cfg.loss_weight.mlm == 1.0 and cfg.mlm_prob == 0.5
    else:
        assert cfg.max_a_len == 5 and cfg.k_test == 4 and cfg.loss_weight.mlm == 0
        assert cfg.text_decoder_config_dict.num_hidden_layers == 1
    # the filled defaults leave the architecture as stored: the checkpoint loads strictly
    model = (SingularityQA if is_qa_state(state) else Singularity)(cfg)
    load_into(model, state, strict=True, source=name)
    assert model.has_mlm_head is (name == "singularity_tiny")


def test_complete_config_keeps_unknown_keys_and_validates_known_ones():
    from singularity_ds.config import complete_config
    cfg = complete_config({"rank": 0, "dist_backend": "nccl", "output_dir": "None",
                                  "video_input": {"num_frames": 2, "fps": 3},
                                  "data_root": "${oc.env:SL_UNSET_DIR}/videos"})
    assert cfg.rank == 0 and cfg.dist_backend == "nccl" and cfg.video_input.fps == 3  # the run's record
    assert cfg.video_input.num_frames == 2 and cfg.video_input.num_frames_test == 4 and cfg.output_dir is None
    with pytest.raises(ConfigError, match="config key 'video_input.num_frames' must be >= 1, got 0"):
        complete_config({"video_input": {"num_frames": 0}})
    with pytest.raises(ConfigError, match="checkpoint config: config key 'image_res' expects integer"):
        complete_config({"image_res": "big"})


# ---------------------------------------------------------------------- config-docs
def test_config_docs_lists_every_key_and_docs_config_md_is_current(capsys):
    from singularity_ds.cli import main
    from singularity_ds.config.docs import config_docs
    from singularity_ds.config.schema import keys
    text = config_docs()
    assert main(["config-docs"]) == 0
    assert capsys.readouterr().out == text
    rows = {line.split(" | ")[0].strip("|`* ") for line in text.splitlines() if line.startswith("| ")}
    assert rows - {"key"} == {p for p, spec in keys().items() if not spec.member}
    assert "| `video_input.num_frames` | integer | `1` | >= 1 | frames sampled per training clip" in text
    assert "| `batch_size` | integer or {image, video} | `{image: 128, video: 96}` | >= 1 |" in text
    doc = Path(__file__).resolve().parents[1] / "docs" / "config.md"
    assert doc.read_text() == text, "stale: run `singularity-ds config-docs > docs/config.md`"
