"""The DeepSpeed engine with 2 CPU ranks (gloo), launched by the real `deepspeed` launcher."""
import glob
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import timm_overrides, tiny_config
from singularity_ds import dist
from singularity_ds.cli import main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def deepspeed_cmd(*args):
    launcher = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    return [launcher, "--num_accelerators", "2", "--master_port", str(dist.free_port()), *args]


def run(cmd, timeout=600, env=None):
    env = dict(env or os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def check_recalls(res, n_vid, n_txt):
    """Retrieval metrics as they follow from hit counts: every recall is 100 x hits / queries (videos for
    txt_r*, texts for img_r*), R@1 <= R@5 <= R@10, and the means are the means of those recalls."""
    means = {}
    for side, queries in (("txt", n_vid), ("img", n_txt)):
        hits = [round(res[f"{side}_r{k}"] * queries / 100) for k in (1, 5, 10)]
        recalls = [100.0 * h / queries for h in hits]
        assert [res[f"{side}_r{k}"] for k in (1, 5, 10)] == [round(r, 2) for r in recalls], (side, res)
        assert hits == sorted(hits) and hits[-1] <= queries, (side, hits)
        means[side] = (recalls[0] + recalls[1] + recalls[2]) / 3
        assert res[f"{side}_r_mean"] == round(means[side], 2), (side, res)
    assert res["r_mean"] == round((means["txt"] + means["img"]) / 2, 2), res


def assert_rounded(value, exact, decimals, rel=0.0):
    """``value`` is ``exact`` rounded to ``decimals`` places, where ``exact`` is known to relative error
    ``rel``."""
    assert abs(value - exact) <= 0.5 * 10 ** -decimals + abs(exact) * rel + 1e-12, (value, exact)


def train_args(corpus, out_dir, *extra):
    return ["--module", "singularity_ds", "train", "pretrain", "tiny",
            str(corpus / "configs" / "pretrain.yaml"), "image_res=32", "batch_size.video=4",
            "batch_size.image=4", "num_workers=0", "log_freq=1", *extra, f"output_dir={out_dir}"]


@pytest.mark.slow
@pytest.mark.multiproc
def test_every_zero_stage_and_offload_trains(tmp_path):
    out = tmp_path / "zero.json"
    run(deepspeed_cmd("tests/ds_worker.py", "zero", str(out)), env=dict(os.environ, PRECISION="fp32"))
    losses = json.load(open(out))
    assert set(losses) == {"zero0", "zero1", "zero2", "zero3", "zero2_offload", "zero3_offload"}
    first = {name: steps[0] for name, steps in losses.items()}
    assert len(set(first.values())) == 1, first  # same initial loss under every stage (fp32)
    for name, steps in losses.items():
        assert all(torch.isfinite(torch.tensor(steps))) and steps[0] > steps[1] > steps[2], (name, steps)


@pytest.mark.slow
@pytest.mark.multiproc
def test_amp_bf16_keeps_fp32_weights_and_runs_bf16_matmuls(tmp_path):
    out = tmp_path / "amp.json"
    run(deepspeed_cmd("tests/ds_worker.py", "amp", str(out)))
    for name, r in json.load(open(out)).items():
        assert r["autocast"] and r["weights"] == ["torch.float32"], (name, r)
        assert r["linear_out"] == ["torch.bfloat16"], (name, r)
        assert r["losses"][0] > r["losses"][1] > r["losses"][2], (name, r)


@pytest.mark.slow
@pytest.mark.multiproc
def test_gradient_accumulation_matches_a_larger_micro_batch(tmp_path):
    out = tmp_path / "acc.json"
    run(deepspeed_cmd("tests/ds_worker.py", "accumulation", str(out)))
    assert json.load(open(out))["max_param_diff"] < 1e-5


# the timm families whose layout differs from a plain ViT's (CLIP's and DeiT's: [CLS] + learned positions,
# the layout these share): no [CLS] + attention pool, rotary + SwiGLU, registers + layer scale
RESUMED_FAMILIES = ["dinov2", "eva02", "siglip"]


@pytest.mark.slow
@pytest.mark.multiproc
@pytest.mark.parametrize("tower", RESUMED_FAMILIES)
def test_kill_and_resume_is_bit_identical(corpus, tmp_path, tower):
    """2 ranks, ZeRO-2: the launcher and both ranks killed mid-epoch and resumed, every step's losses and
    learning rate equal the uninterrupted run's, for the timm families of their own layout (8 steps). The
    BEiT tower's case is tests/test_faults.py's killed rank, resumed bit-identical (three launches each:
    they cost the time; CLIP's two stages, fine-tuning and eval run in docs/training.md's recipe,
    tests/test_doc_commands.py)."""
    steps = 8
    args = (f"max_steps={steps}", "save_every_steps=2", "keep_last_checkpoints=3", *timm_overrides(tower))
    whole = tmp_path / "whole"
    run(deepspeed_cmd(*train_args(corpus, whole, *args)))
    reference = {r["step"]: r for r in json.load(open(whole / "history.json"))}
    assert sorted(reference) == list(range(1, steps + 1))

    killed = tmp_path / "killed"
    proc = subprocess.Popen(deepspeed_cmd(*train_args(corpus, killed, *args)), cwd=REPO,
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = killed / "checkpoints" / "latest"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if latest.exists() and latest.read_text() >= "step00000004":
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both ranks, mid-epoch
    proc.wait()
    assert not (killed / "export").exists(), "the run finished before it could be killed"
    run(deepspeed_cmd(*train_args(corpus, killed, *args, "resume=auto")))
    resumed = json.load(open(killed / "history.json"))
    assert resumed and resumed[-1]["step"] == steps
    for r in resumed:
        for k in ("loss_ita", "loss_itm", "loss_mlm", "lr"):
            assert r[k] == reference[r["step"]][k], (r["step"], k, r[k], reference[r["step"]][k])
    def ckpts(run_dir):
        return sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("step"))
    # keep_last_checkpoints=3 (every 2 steps and at the epoch's end, step 7): as the uninterrupted run kept
    kept = (6, 7, 8)
    assert ckpts(killed) == ckpts(whole) == [f"step{s:08d}" for s in kept]


@pytest.mark.slow
@pytest.mark.multiproc
def test_export_round_trips_and_tensorboard(corpus, tmp_path):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from singularity_ds.models import load_model

    out = tmp_path / "run"
    cmd = deepspeed_cmd(*train_args(corpus, out, "max_steps=3", "ds_config=zero3"))
    run(cmd)
    port = cmd[cmd.index("--master_port") + 1]  # DeepSpeed's CPU allreduce buffers were released
    assert not glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{port}_*")
    model = load_model(str(out / "export"))
    consolidated = get_fp32_state_dict_from_zero_checkpoint(str(out / "checkpoints"), tag="step00000003")
    own = model.state_dict()
    for k, v in consolidated.items():
        assert torch.equal(own[k], v.float()), k
    # DeepSpeed's recovery script beside the checkpoints, run there as DeepSpeed documents it
    subprocess.run([sys.executable, "zero_to_fp32.py", ".", str(tmp_path / "fp32")], check=True,
                   cwd=out / "checkpoints", capture_output=True)
    from safetensors.torch import load_file
    files = sorted((tmp_path / "fp32").glob("*.safetensors")) or sorted((tmp_path / "fp32").glob("*.bin"))
    script = {k: v for f in files for k, v in (load_file(f) if f.suffix == ".safetensors"
                                               else torch.load(f, weights_only=True)).items()}
    assert script.keys() == consolidated.keys()
    assert all(torch.equal(script[k].float(), own[k]) for k in script)
    assert model.config.ds_config == "zero3"
    assert (out / "config.yaml").is_file() and (out / "ds_config.json").is_file()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(out / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss_ita", "train/loss_itm", "train/loss_mlm", "train/lr", "train/grad_norm",
            "train/samples_per_s", "train/data_wait", "train/memory_mb"} <= tags
    assert len(events.Scalars("train/loss")) == 3


@pytest.mark.slow
@pytest.mark.multiproc
def test_train_ret_evaluates_each_epoch_under_zero3_with_sharded_offloaded_eval(corpus, tmp_path):
    out = tmp_path / "ret"
    args = ["--module", "singularity_ds", "train", "train_ret", "tiny", str(corpus / "configs" / "ret.yaml"),
            "image_res=32", "batch_size.video=8", "num_workers=0", "max_txt_l=16", "k_test=10",
            "ds_config=zero3", "scheduler.epochs=3", "save_every_epochs=2", "keep_last_checkpoints=5",
            "eval_offload=True", "test_types=[motion]", f"output_dir={out}"]
    run(deepspeed_cmd(*args))
    motion = json.load(open(corpus / "anno" / "ret_test_motion.json"))  # one caption, several clips each
    n_txt, n_vid = len(motion), sum(len(e["video"]) for e in motion)
    k_i2t, k_t2i = min(10, n_txt), min(10, n_vid)  # k_test=10
    evals = {name: json.load(open(out / name))["motion"]
             for name in ("eval_0.json", "eval_1.json", "eval_2.json", "eval_final.json")}
    for name, res in evals.items():
        check_recalls(res["itm"], n_vid, n_txt)
        check_recalls(res["itc"], n_vid, n_txt)
        stats = res["stats"]  # the ITM pairs: each direction's top-k, the pairs in both scored once
        assert stats["pairs_both_directions"] == n_vid * k_i2t + n_txt * k_t2i, (name, stats)
        assert max(n_vid * k_i2t, n_txt * k_t2i) <= stats["pairs"] <= stats["pairs_both_directions"], name
        assert stats["videos_reranked"] == n_vid, (name, stats)
    # the last epoch's evaluation scored the final model: its results are the final ones
    assert evals["eval_final.json"] == evals["eval_2.json"]
    history = json.load(open(out / "history.json"))
    per_epoch = max(r["step"] for r in history) // 3
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step"))
    assert ckpts == [f"step{2 * per_epoch:08d}", f"step{3 * per_epoch:08d}"]  # every 2nd epoch end + the last


@pytest.mark.slow
@pytest.mark.multiproc
def test_train_qa_two_ranks_lowers_the_loss_and_writes_predictions(corpus, tmp_path):
    out = tmp_path / "qa"
    args = ["--module", "singularity_ds", "train", "train_qa", "tiny", str(corpus / "configs" / "qa.yaml"),
            "image_res=32", "batch_size.video=8", "num_workers=0", "max_q_len=16", "max_a_len=6", "k_test=8",
            "optimizer.lr=2e-3", "scheduler.warmup_epochs=0", "scheduler.epochs=4", "log_freq=1",
            f"output_dir={out}"]
    run(deepspeed_cmd(*args))
    losses = [r["loss_qa"] for r in json.load(open(out / "history.json"))]
    n_train = len(json.load(open(corpus / "anno" / "qa_train.json")))
    assert len(losses) == 4 * (n_train // 2 // 8)  # 4 epochs of full batches of 8 on each of 2 ranks
    assert sum(losses[-3:]) < 0.8 * sum(losses[:3]), losses
    res = json.load(open(out / "eval_final.json"))["test"]
    assert res["metric"] == "exact_match" and res["missing_answers"] == 0
    test = {e["question_id"]: e for e in json.load(open(corpus / "anno" / "qa_test.json"))}
    predictions = json.load(open(out / "qa_test.json"))
    assert sorted(p["question_id"] for p in predictions) == sorted(test) and res["questions"] == len(test)
    right = [p["answer"] == test[p["question_id"]]["answer"] for p in predictions]
    assert res["accuracy"] == round(100 * sum(right) / len(right), 2)


def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SL_DATA_DIR", str(tmp_path))  # the default corpora's root (the files need not exist)
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("precious")
    bad_ds = tmp_path / "bad_ds.json"
    bad_ds.write_text(json.dumps({"train_micro_batch_size_per_gpu": 3, "zero_optimization": {"stage": 2}}))
    cases = [
        (["train", "pretrian"], "unknown task 'pretrian'"),
        (["train", "pretrain", "tiny", "batch_sise.video=2"],
         "unknown config key 'batch_sise'; did you mean 'batch_size'?"),
        (["train", "pretrain", "tiny", f"ds_config={bad_ds}", f"output_dir={tmp_path / 'a'}"],
         "ds_config sets train_micro_batch_size_per_gpu=3 but the YAML config gives 128"),
        (["train", "train_ret", "tiny", f"pretrained_path={tmp_path / 'nope.pth'}"],
         "nope.pth: no such file"),
        (["train", "pretrain", "tiny", f"output_dir={existing}"], "exists and is not empty"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and message in err, (argv, err)
    assert not (tmp_path / "a").exists() and os.listdir(existing) == ["keep.txt"]


@pytest.mark.slow  # one training process (no launcher)
def test_bench_train_reports_throughput_flops_and_mfu(tmp_path):
    from singularity_ds.config import load_config
    from singularity_ds.models.flops import step_flops
    out = tmp_path / "bench.json"
    run([sys.executable, "-m", "singularity_ds", "bench", "train", "pretrain", "tiny", "image_res=32",
         "batch_size.video=4", "--steps", "2", "--warmup", "1", "--json", str(out)])
    res = json.load(open(out))
    cfg = load_config(["pretrain", "tiny"], ["image_res=32", "batch_size.video=4"])
    assert res["train_gflop_per_sample"] == round(step_flops(cfg, 4)["train"] / 1e9, 2)
    # the rates follow from the reported step time; every reported value is rounded (the median to 0.1 ms)
    median = res["step_s_median"]
    slack = 1e-4 / median  # relative error of 1 / median
    achieved = step_flops(cfg, 4)["train"] * 4 / median / 1e12  # TFLOP/s
    assert_rounded(res["samples_per_s"], 4 / median, 3, slack)
    assert_rounded(res["achieved_tflops_per_device"], achieved, 3, slack)
    assert_rounded(res["mfu"], achieved / res["peak_tflops"], 4, slack + 1e-3 / res["peak_tflops"])
    assert res["peak_memory_gib"] > 0  # the process's peak RSS: not known beforehand
    assert res["step_s_median"] >= res["forward_s"] and res["batch_per_rank"] == 4


@pytest.mark.slow
@pytest.mark.multiproc
def test_bench_train_qa_under_the_deepspeed_launcher(tmp_path):
    """QA step, 2 frames, two ranks: per-device and total throughput, the QA FLOP formula."""
    from singularity_ds.config import load_config
    from singularity_ds.models.flops import qa_step_flops
    out = tmp_path / "bench.json"
    overrides = ["image_res=32", "batch_size.video=2", "video_input.num_frames=2"]
    run(deepspeed_cmd("--module", "singularity_ds", "bench", "train", "train_qa", "tiny", *overrides,
                      "--steps", "2", "--warmup", "1", "--json", str(out)))
    res = json.load(open(out))
    cfg = load_config(["qa_msrvtt", "tiny"], overrides)
    assert res["task"] == "train_qa" and res["ranks"] == 2 and res["frames"] == 2
    assert res["train_gflop_per_sample"] == round(qa_step_flops(cfg)["train"] / 1e9, 2)
    assert res["samples_per_s"] == pytest.approx(2 * res["samples_per_s_per_device"], rel=1e-3)


def test_train_from_a_checkpoint_takes_its_architecture(tmp_path, tiny_ref, capsys):
    """`train TASK pretrained_path=EXPORT` without the first stage's overlays builds the export's model (as
    `eval` does); an overlay that contradicts the checkpoint is one line; an original .pth's too."""
    from singularity_ds.engine.trainer import parse_train_args
    from singularity_ds.models import build_model, load_model
    from singularity_ds.models.weights import export
    from singularity_ds.tasks import TASKS
    first = tiny_config(embed_dim=48)
    export(build_model(first), str(tmp_path / "export"))
    task, config = parse_train_args(["train_ret", "--config", "ret_msrvtt",
                                     f"pretrained_path={tmp_path}/export"])
    assert config.embed_dim == 48 and config.vit_name_or_pretrained_path == "beit-tiny"
    assert config.bert_config_dict["num_hidden_layers"] == 3 and config.image_res == 224  # the config's
    model = task.build_model(config)  # strict: every key of the export, every shape
    assert model.vision_proj.out_features == 48
    # where the tokenizer is found is the config's to say (a local copy); what the model is, the checkpoint's
    assert parse_train_args(["train_ret", "text_encoder=/my/bert", f"pretrained_path={tmp_path}/export"]
                            )[1].text_encoder == "/my/bert"
    # the same overlay again agrees; one that contradicts is one line naming the key and both values
    assert parse_train_args(["train_ret", "tiny", "embed_dim=48", f"pretrained_path={tmp_path}/export"])[1]
    for extra, key in [("embed_dim=128", "'embed_dim' is 128"), ("clip_b16", "'vit_type' is 'timm'")]:
        assert main(["train", "train_ret", extra, f"pretrained_path={tmp_path}/export",
                     f"output_dir={tmp_path / 'x'}"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and key in err and f"pretrained_path {tmp_path}/export holds" in err, err
    assert not (tmp_path / "x").exists()
    # an original checkpoint: its inline towers (the reference's BERT is 768 wide, 3 layers; its 2x2 patch
    # grid is too small to interpolate to 224 px)
    pth = str(tiny_ref["path"] / "checkpoint.pth")
    task, config = parse_train_args(["train_ret", "--config", "ret_msrvtt", f"pretrained_path={pth}",
                                     "image_res=32"])
    assert config.add_temporal_embed and config.temporal_vision_encoder.num_layers == 1  # a temporal one
    assert main(["train", "train_ret", f"pretrained_path={pth}", "temporal_vision_encoder.num_layers=2",
                 f"output_dir={tmp_path / 'x'}"]) == 2
    assert "'temporal_vision_encoder' is" in capsys.readouterr().err
    loaded = load_model(pth)
    assert config.embed_dim == loaded.config.embed_dim == 256
    assert config.bert_config_dict == loaded.config.bert_config_dict
    assert TASKS["train_ret"].build_model(config).text_encoder.config.num_hidden_layers == 3
