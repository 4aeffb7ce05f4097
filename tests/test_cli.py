import json

from conftest import tiny_config
from singularity_ds.cli import main
from singularity_ds.models import Singularity


def test_summary_and_clear_config_errors(capsys):
    assert main(["summary", "pretrain", "tiny", "video_input.num_frames=4",
                 "temporal_vision_encoder.enable=True"]) == 0
    out = capsys.readouterr().out
    assert "temporal: 4 embeddings, encoder 2 layers" in out
    # the parameter rows ("  name  1,234"): each top-level module's count, and the model's total
    rows = {name: int(n.replace(",", "")) for name, n in
            (line.split() for line in out.splitlines() if line.startswith("  "))}
    model = Singularity(tiny_config(**{"video_input.num_frames": 4, "temporal_vision_encoder.enable": True}))
    assert rows.pop("total") == sum(p.numel() for p in model.parameters())
    assert rows == {name: sum(p.numel() for p in m.parameters()) for name, m in model.named_children()}
    assert main(["summary", "pretrain", "tiny", "video_input.num_frame=4"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == ("singularity-ds: error: command line: unknown config key 'video_input.num_frame'; "
                           "did you mean 'video_input.num_frames'?")


def test_summary_of_a_qa_config_is_the_qa_model(capsys, monkeypatch):
    from singularity_ds.models import SingularityQA
    monkeypatch.delenv("SL_DATA_DIR", raising=False)  # the QA config's paths stay unresolved
    assert main(["summary", "qa_msrvtt", "tiny"]) == 0
    out = capsys.readouterr().out
    model = SingularityQA(tiny_config_of("qa_msrvtt"))
    assert f"answer decoder: {len(model.text_decoder.bert.encoder.layer)} layers" in out
    rows = {line.split()[0]: int(line.split()[1].replace(",", "")) for line in out.splitlines()
            if line.startswith("  ")}
    assert rows["text_decoder"] == sum(p.numel() for p in model.text_decoder.parameters())
    assert rows["total"] == sum(p.numel() for p in model.parameters())
    assert main(["summary", "ret_msrvtt", "tiny"]) == 0
    assert "answer decoder" not in capsys.readouterr().out


def tiny_config_of(task_config):
    from singularity_ds.config import load_config
    return load_config([task_config, "tiny"], [])


def test_make_synthetic_command(tmp_path, capsys):
    out = tmp_path / "syn"
    assert main(["make-synthetic", str(out), "--num-clips", "24", "--size", "32", "--frames", "6",
                 "--num-images", "2"]) == 0
    meta = json.load(open(out / "synthetic.json"))
    assert meta["num_clips"] == 24 and len(list((out / "videos").iterdir())) == 24
    assert (out / "configs" / "pretrain.yaml").is_file() and (out / "configs" / "ret.yaml").is_file()
    assert main(["make-synthetic", str(tmp_path / "x"), "--num-clips", "5"]) == 2
    assert "need at least 18 clips" in capsys.readouterr().err


def help_forms():
    """Every sub-command of the parser tree, and each task / kind / benchmark form of those that take one."""
    import argparse

    from singularity_ds.cli import build_parser
    from singularity_ds.tasks import TASKS
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    forms = []
    for name, parser in sub.choices.items():
        forms.append([name])
        for action in parser._actions:  # a choice positional: the kinds (eval ret|mc|qa, bench train|...)
            if action.choices and not action.option_strings and action.dest != "help":
                forms += [[name, choice] for choice in action.choices]
    forms += [["train", task] for task in TASKS] + [["doctor", task] for task in TASKS]
    forms += [["corpus-stats", "index.json"], ["reproduce", "msrvtt-ret-1f-5m"]]
    return forms


def test_every_command_and_form_answers_help(capsys):
    """`--help` and `-h` on every sub-command and form: exit 0 and a usage line naming the form."""
    forms = help_forms()
    assert ["train", "pretrain"] in forms and ["eval", "qa"] in forms and ["bench", "vectors"] in forms
    assert ["embed"] in forms and ["serve"] in forms and ["preprocess", "images"] in forms
    for form in forms:
        for flag in ("--help", "-h"):
            try:
                rc = main([*form, flag])
            except SystemExit as e:
                rc = e.code
            out = capsys.readouterr().out
            assert rc == 0, (form, flag)
            usage = out.split("\n\n")[0].replace("\n", " ")
            assert usage.startswith(f"usage: singularity-ds {form[0]}"), (form, out[:300])
            if form[0] in ("eval", "bench") and len(form) > 1:  # the kind's own help, not the command's
                assert usage.startswith(f"usage: singularity-ds {form[0]} {form[1]} "), (form, usage)


def test_top_level_help_lists_every_command_once_by_job(capsys):
    import argparse

    from singularity_ds.cli import JOBS, build_parser
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    listed = [c for cmds in JOBS.values() for c in cmds]
    assert sorted(listed) == sorted(sub.choices)  # each sub-command in exactly one job
    try:
        main(["--help"])
    except SystemExit as e:
        assert e.code == 0
    out = capsys.readouterr().out
    headers = [line[:-1] for line in out.splitlines() if line.endswith(":") and not line.startswith(" ")]
    assert headers == ["options"] + list(JOBS)
    for command in listed:
        assert sum(line.startswith(f"  {command} ") for line in out.splitlines()) == 1, command


def test_an_unset_environment_variable_is_one_line_naming_the_key(capsys, monkeypatch, tmp_path):
    """The original's configs read ${oc.env:SL_DATA_DIR}: unset, train and doctor say which key reads it
    and what to set."""
    monkeypatch.delenv("SL_DATA_DIR", raising=False)
    expected = ("singularity-ds: error: config key 'train_file' reads the environment variable SL_DATA_DIR, "
                "which is not set: export SL_DATA_DIR=/path (the data folder: anno_pretrain/, "
                "anno_downstream/ and videos_images/, as the original's README sets it), or give the paths "
                "in an overlay (make-synthetic writes one: OUT/configs/pretrain.yaml)")
    train = ["train", "pretrain", "tiny", f"output_dir={tmp_path / 'run'}"]
    for argv in (train, ["doctor", "pretrain", "tiny"]):
        assert main(argv) == 2
        assert capsys.readouterr().err.strip().splitlines()[-1] == expected
    assert not (tmp_path / "run").exists()
