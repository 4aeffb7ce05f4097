"""scripts/*.sh: the original Singularity's script shapes, each run at tiny size on the fake released tree
(tests/release_tree.py) with the original's arguments, and its runs where the original puts them."""
import json
import os
import subprocess
import sys

import pytest

from singularity_ds import launch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["max_steps=1", "scheduler.epochs=1", "batch_size.video=2", "batch_size.image=2",
        "batch_size_test.video=8", "video_input.num_frames_test=2", "k_test=4", "max_txt_l=16"]


def env_for(release, exp_dir, port):
    return dict(os.environ, SL_DATA_DIR=release["data"], SL_EXP_DIR=str(exp_dir), DS_ACCELERATOR="cpu",
                MASTER_PORT=str(port), PYTHON=sys.executable)


def script(name, args, env, cwd):
    out = subprocess.run(["bash", os.path.join(REPO, "scripts", f"{name}.sh"), *args], env=env, cwd=cwd,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    return out.stderr


def ckpt(release, archive=None, size="5m"):
    """A released checkpoint: the pretraining archive's, or a fine-tuned one of ``archive``."""
    if archive is None:
        return os.path.join(release["ckpts"], "pt", f"singularity_{size}.pth")
    return os.path.join(release["ckpts"], archive, f"ft_{archive}_singularity_{size}.pth")


@pytest.mark.slow
@pytest.mark.multiproc
def test_the_training_scripts_run_where_the_original_puts_their_runs(release, tmp_path, free_port):
    env = env_for(release, tmp_path / "exp", free_port)
    text = release["text"]  # the reference checkpoints' 512-word tokenizer
    runs = {
        "pretrain": (["t1", "webvid", "1", "local", "tiny", *TINY], "pt_webvid/webvid_t1",
                     "singularity-ds train pretrain output_dir=pt_webvid/webvid_t1 train_corpus=webvid "
                     "wandb.project=sb_pt_webvid tiny"),
        "train_ret": (["t1", "msrvtt", "2", "local", f"pretrained_path={ckpt(release)}", text, "image_res=32",
                       *TINY], "ret_msrvtt/msrvtt_t1",
                      "singularity-ds train train_ret --config ret_msrvtt output_dir=ret_msrvtt/msrvtt_t1 "
                      "wandb.project=sb_ret_msrvtt pretrained_path="),
        "train_vqa": (["t1", "msrvtt", "1", "local", f"pretrained_path={ckpt(release)}", text, "image_res=32",
                       *TINY], "qa_msrvtt/t1",
                      "singularity-ds train train_qa --config qa_msrvtt output_dir=qa_msrvtt/t1 "
                      "wandb.project=sb_qa_msrvtt pretrained_path="),
    }
    for name, (args, run, native) in runs.items():
        err = script(name, args, env, str(tmp_path))
        processes = args[2]
        assert f"scripts/{name}.sh runs: {native}" in err and f"(local, {processes} process(es))" in err
        run_dir = tmp_path / "exp" / run  # under $SL_EXP_DIR, named as the original names it
        assert (run_dir / "export" / "model.safetensors").is_file(), name
        assert f"{processes} rank(s)" in (run_dir / "train.log").read_text()
        assert json.loads((run_dir / "history.json").read_text())[-1]["step"] == 1


@pytest.mark.slow
@pytest.mark.multiproc
def test_the_evaluation_scripts_write_beside_the_checkpoint(release, tmp_path, free_port):
    env = env_for(release, tmp_path / "exp", free_port)
    save = f"eval_{tmp_path.name}"  # the tree is the session's: a folder name of this test's own
    evals = {
        "eval_ret": ("msrvtt", ckpt(release, "msrvtt_ret"), "eval.json", "eval ret ret_msrvtt"),
        "eval_ret_mc": ("msrvtt_mc", ckpt(release, "msrvtt_ret"), "mc_mc_test.json",
                        "eval mc ret_msrvtt_mc"),
        "eval_qa": ("msrvtt", ckpt(release, "msrvtt_qa"), "eval_qa.json", "eval qa qa_msrvtt"),
        "eval_vqa": ("msrvtt", ckpt(release, "msrvtt_qa", "17m"), "eval_qa.json", "eval qa qa_msrvtt"),
    }
    for name, (dataset, path, result, native) in evals.items():
        err = script(name, [dataset, path, save, "local", "1", release["text"], *TINY], env, str(tmp_path))
        out = os.path.join(os.path.dirname(path), save)  # $(dirname CKPT)/SAVE_DIRNAME, as the original
        assert f"runs: singularity-ds {native} {path} output_dir={out}" in err
        assert os.path.isfile(os.path.join(out, result)), (name, os.listdir(out))


@pytest.mark.slow
@pytest.mark.multiproc
def test_a_script_in_slurm_mode_runs_under_sbatch(slurm, release, tmp_path):
    """`sbatch scripts/eval_ret.sh ... slurm 1` on the 2-node cluster: srun starts it on both nodes."""
    path = ckpt(release, "didemo_ret", "17m")
    args = ["--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1", "--partition=debug", "--time=10",
            "--gres=none", "--export=ALL", "--output=job.out", os.path.join(REPO, "scripts", "eval_ret.sh"),
            "didemo", path, f"slurm_{tmp_path.name}", "slurm", "1", release["text"], "test_types=[test]",
            *TINY]
    env = {"MASTER_ADDR": "127.0.0.1", "PYTHON": sys.executable, "SL_DATA_DIR": release["data"],
           "DS_ACCELERATOR": "cpu"}
    job = slurm.sbatch(args, cwd=str(tmp_path), env=env)
    state = slurm.wait(job, timeout=300)
    log = (tmp_path / "job.out").read_text()
    assert state == "COMPLETED", log[-3000:]
    assert "2 processes" in log and "runs: singularity-ds eval ret ret_didemo" in log
    assert os.path.isfile(os.path.join(os.path.dirname(path), f"slurm_{tmp_path.name}", "eval.json"))


def test_bad_arguments_are_one_line(release, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    path = ckpt(release, "msrvtt_ret")
    cases = [
        (["train_ret", "t1", "msrvtt"], "usage: scripts/train_ret.sh EXP_NAME DATASET NGPU local|slurm "
                                         "[key=value ...] (the original's arguments)"),
        (["train_ret", "t1", "kinetics", "1", "local"],
         "scripts/train_ret.sh: dataset 'kinetics' is not one of coco, flickr, msrvtt, didemo, anet, "
         "ssv2_label, ssv2_template (as the original's script)"),
        (["train_vqa", "t1", "msrvtt", "1", "cluster"],
         "scripts/train_vqa.sh: mode 'cluster': expected local or slurm"),
        (["pretrain", "t1", "webvid", "two", "local"], "NGPU must be a number of processes >= 1, got 'two'"),
        (["eval_ret", "msrvtt", str(tmp_path / "none.pth"), "x", "local", "1"],
         f"scripts/eval_ret.sh: checkpoint {tmp_path / 'none.pth'}: no such file or folder"),
        (["eval_ret", "msrvtt", path, "x", "local"], "usage: scripts/eval_ret.sh DATASET CKPT SAVE_DIRNAME "
                                                     "local|slurm NGPU [key=value ...]"),
        (["eval_ret_mc", "msrvtt", path, "x", "local", "1"],
         "scripts/eval_ret_mc.sh: dataset 'msrvtt' is not one of msrvtt_mc (as the original's script)"),
        (["eval_ret", "msrvtt", path, "x", "slurm", "1"],
         "mode slurm runs inside a SLURM job: submit it with sbatch (or use local)"),
    ]
    for args, line in cases:
        assert launch.main(["original", *args]) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1] == f"singularity-ds: error: {line}", (args, err)


def test_every_script_is_the_launcher_for_its_name():
    """Each scripts/NAME.sh hands its arguments to `launch original NAME` (the name decides the shape)."""
    names = sorted(f[:-3] for f in os.listdir(os.path.join(REPO, "scripts")) if f.endswith(".sh"))
    assert names == sorted(launch.SCRIPTS)
    for name in names:
        text = open(os.path.join(REPO, "scripts", f"{name}.sh")).read()
        assert text.rstrip().endswith(f'-m singularity_ds.launch original {name} "$@"'), name
        assert os.access(os.path.join(REPO, "scripts", f"{name}.sh"), os.X_OK)
