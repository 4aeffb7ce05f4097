"""The one-shot GPU check (``make gpu-check``): its CPU dry run writes the report with every step's
numbers."""
import json
import os
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KIB = 1024


@pytest.mark.slow
def test_dry_run_writes_the_report_with_every_step(tmp_path):
    """``make gpu-check DRY=1``: every step at CPU size, one report whose steps all carry their numbers."""
    out = tmp_path / "report"
    proc = subprocess.run([sys.executable, "-m", "singularity_ds.gpu_check", "--dry", "--out", str(out),
                           "--work", str(tmp_path / "work")], capture_output=True, text=True, cwd=REPO,
                          env=dict(os.environ, DS_ACCELERATOR="cpu"))
    report = json.loads((out / "gpu_check.json").read_text())
    steps = {s["name"]: s for s in report["steps"]}
    assert list(steps) == ["gpu_tests", "bench_train", "corpus", "train_e2e", "eval_itm", "kernels"]
    assert {name: s["status"] for name, s in steps.items()} == dict.fromkeys(steps, "ok"), proc.stderr[-3000:]
    assert proc.returncode == 0
    n = {name: s["numbers"] for name, s in steps.items()}
    # no CUDA here: the gpu-marked tests are collected and skipped, none fails
    assert n["gpu_tests"]["failed"] == n["gpu_tests"]["errors"] == n["gpu_tests"]["passed"] == 0
    assert n["gpu_tests"]["skipped"] >= 1
    bench = n["bench_train"]
    assert (bench["precision"], bench["batch_per_rank"], bench["device"]) == ("amp_bf16", 4, "cpu")
    # MFU = FLOPs per step / step time / the measured GEMM peak (the JSON's values are rounded)
    achieved = bench["train_gflop_per_sample"] * 4 / bench["step_s_median"] / 1e3
    assert bench["mfu"] == pytest.approx(achieved / bench["peak_tflops"], rel=0.02, abs=1e-4)
    assert (n["corpus"]["clips"], n["corpus"]["res"]) == (4 * 8, 224)
    e2e = n["train_e2e"]
    assert e2e["steps"] == 6 and len(e2e["per_step"]) == 6
    # the steady state is the last 3 steps: samples over their summed step times, wait weighted by time
    last = e2e["per_step"][3:]
    windows = [4 / p["samples_per_s"] for p in last]
    assert e2e["samples_per_s"] == pytest.approx(12 / sum(windows), rel=2e-3)  # 4 significant digits
    waited = sum(p["data_wait"] * w for p, w in zip(last, windows))
    assert e2e["data_wait"] == pytest.approx(waited / sum(windows), abs=1e-4)
    assert list(n["eval_itm"]) == ["frames12", "few_tokens"]  # `bench eval itm`'s two settings
    for r in n["eval_itm"].values():
        assert (r["texts"], r["frames"], r["k_test"], r["same_metrics"]) == (32, 2, 10, True)
    assert n["kernels"]["errors"] == [] and len(n["kernels"]["shapes"]) == 5
    assert [g["met"] for g in report["goals"]] == ["not measured (dry run on CPU)"] * 3
    md = (out / "gpu_check.md").read_text()
    assert "no GPU number here is measured" in md
    for name in steps:
        assert f"| {name}: " in md
    assert f"{e2e['samples_per_s']} samples/s, data-wait {100 * e2e['data_wait']:.1f}%" in md
    assert (out / "gpu_check.png").stat().st_size > 0
    log = (out / "gpu_check.log").read_text()
    assert all(f"===== {name} (ok" in log for name in steps)


def test_without_cuda_the_gpu_run_is_one_line_pointing_to_the_dry_run(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "singularity_ds.gpu_check", "--out", str(tmp_path)],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("singularity-ds: error: no CUDA device: run `make gpu-check DRY=1` for "
                                   "the CPU dry run")


def test_the_gpu_sized_steps_are_valid_runs(tmp_path):
    """The GPU plan's arguments (which the dry run does not take: compile, batch 256, 14 workers) parse as
    the configs the steps will run, with the sizes the report describes."""
    from singularity_ds.engine.trainer import parse_train_args
    from singularity_ds.gpu_check import SIZES, plan
    steps = {s.name: s for s in plan(dry=False, work=str(tmp_path))}
    bench = steps["bench_train"].cmd
    _, cfg = parse_train_args(bench[bench.index("train") + 1:bench.index("--steps")])
    assert (cfg.ds_config, cfg.precision, cfg.compile, cfg.batch_size.video, cfg.video_input.num_frames,
            cfg.image_res) == ("zero0", "amp_bf16", True, 256, 1, 224)
    train = steps["train_e2e"].cmd
    _, cfg = parse_train_args(train[train.index("train") + 1:])
    assert (cfg.ds_config, cfg.precision, cfg.compile, cfg.batch_size.video, cfg.max_steps,
            cfg.video_input.reader) == ("zero0", "amp_bf16", True, 256, 100, "decord")
    assert cfg.train_file == [[str(tmp_path / "corpus" / "shards" / "index.json"), None, "video"]]
    corpus = steps["corpus"].cmd
    assert corpus[-6:-3] == [str(tmp_path / "corpus"), str(256 * 102), "200"]  # clips, distinct: one epoch
    assert steps["gpu_tests"].cmd[6:7] == ["tests/test_dali.py"]  # the files that use the gpu marker
    # the 8 minutes: no step starts or runs past `total`; the steps run one after another, the corpus
    # beside the first two
    assert sum(s.budget for s in steps.values() if not s.background) <= SIZES["gpu"]["total"] <= 480
    assert steps["corpus"].background and steps["corpus"].budget <= sum(steps[k].budget for k in
                                                                          ("gpu_tests", "bench_train"))


def test_a_failed_or_stopped_step_is_recorded_and_the_others_run(tmp_path):
    """Real subprocesses: one outlives its budget (it and the child it started are ended), one fails with
    the project's one-line error, one needs the failed one, and the last still runs."""
    from singularity_ds.gpu_check import Step, run_steps
    pid_file = tmp_path / "child.pid"
    hang = ("import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; "
            f"time.sleep(60)']); open({str(pid_file)!r}, 'w').write(str(p.pid)); time.sleep(60)")
    fail = "import sys; print('working'); sys.exit('singularity-ds: error: anno.json: entry 3: missing key')"
    steps = [Step("hang", "hangs", [sys.executable, "-c", hang], 3, lambda: {}),
             Step("fail", "fails", [sys.executable, "-c", fail], 30, lambda: {}),
             Step("after", "needs fail", [sys.executable, "-c", "pass"], 30, lambda: {}, needs="fail"),
             Step("last", "runs", [sys.executable, "-c", "print('done')"], 30, lambda: {"x": 1})]
    results = {r["name"]: r for r in run_steps(steps, dry=True, work=str(tmp_path), total=60, progress=False)}
    assert results["hang"]["status"] == "timeout" and results["hang"]["error"].startswith("stopped after 3 s")
    child = int(pid_file.read_text())
    with pytest.raises(ProcessLookupError):  # the step's own child went with it
        for _ in range(50):
            os.kill(child, 0)
            time.sleep(0.1)
    assert (results["fail"]["status"], results["fail"]["exit_code"], results["fail"]["error"]) == (
        "failed", 1, "singularity-ds: error: anno.json: entry 3: missing key")
    assert (results["after"]["status"], results["after"]["error"]) == (
        "not run", "needs step fail, which did not finish")
    assert (results["last"]["status"], results["last"]["numbers"]) == ("ok", {"x": 1})
