"""``make gpu-check`` (``python -m singularity_ds.gpu_check``): everything worth measuring on a GPU, in one
run of at most 8 minutes on one H200, into one report (``gpu_check.md`` + ``gpu_check.json``, a
plot of the end-to-end run, and every step's output in ``gpu_check.log``).

Steps, each a subprocess with its own time budget (a failure or a timeout is recorded and the next step
runs; the whole run stops starting steps at ``--total`` seconds):

- ``env``        the GPU, driver, Python, torch and the project's packages (missing ones named);
- ``gpu_tests``  ``pytest -m gpu`` (the tests that need CUDA);
- ``bench_train`` ``bench train pretrain`` at the best GPU setting (``amp_bf16``, ``compile=True``, batch
  256): samples/s and MFU against the measured bf16 GEMM peak;
- ``corpus``     a synthetic 224 px corpus written as tar shards (make-synthetic, copied to many clips,
  make-shards), built in the background while the two steps above use the GPU;
- ``train_e2e``  ``train pretrain`` from those shards with decord in DataLoader workers, same setting:
  samples/s and the data-wait fraction (the trainer's per-step ``data_wait``: time blocked on the
  loader / step time) over the second half of the steps, after compilation and the prefetched batches;
- ``eval_itm``   ``bench eval itm`` (original re-ranking vs the offloaded path);
- ``kernels``    ``bench kernels`` (Triton vs SDPA vs math attention).

Goals reported against: MFU >= 50% for 1-frame pretraining; data-wait < 10% end to end; the data path
keeping up with 1,500 samples/s. ``--dry`` runs every step at CPU size (tiny model, few steps,
``DS_ACCELERATOR=cpu``, the Triton interpreter) and writes the same report, whose goals then read "not
measured".
"""
import argparse
import datetime
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET

from .errors import ConfigError, SingularityError
from .fileio import atomic_write, write_json

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable
GOALS = dict(mfu=0.50, data_wait=0.10, samples_per_s=1500.0)
PACKAGES = ["torch", "deepspeed", "transformers", "timm", "triton", "decord", "av", "omegaconf", "webdataset",
            "ijson", "nvidia-dali-cuda130", "pytest"]

# Sizes: one H200 (16 CPU cores), or the CPU dry run. Budgets in seconds: on the GPU the steps in turn
# take at most 420 s, the corpus beside the first two, and no step starts or runs past 470 s.
SIZES = {
    "gpu": dict(overlay=[], batch=256, bench=["--steps", "10", "--warmup", "3"], compile=True,
                train_steps=100, workers=min(14, max(2, (os.cpu_count() or 4) - 2)), distinct=200, res=224,
                shard_size="8MB", eval=[], kernels=[], total=470,
                # bench_train: build + GEMM peak + ~1 min of compilation + 13 steps; kernels: Triton
                # compiles each shape's forward and backward first
                budget=dict(gpu_tests=40, bench_train=130, corpus=100, train_e2e=150, eval_itm=40,
                            kernels=60)),
    # compile=False: inductor takes minutes on 2 busy cores; the GPU run compiles (as docs/benchmarks.md)
    "dry": dict(overlay=["tiny"], batch=4, bench=["--steps", "2", "--warmup", "1"], compile=False,
                train_steps=6, workers=2, distinct=18, res=224, shard_size="100KB",
                eval=["--n", "32", "--frames", "2", "--k", "10"], kernels=["--reps", "1"], total=1200,
                budget=dict(gpu_tests=180, bench_train=300, corpus=120, train_e2e=300, eval_itm=120,
                            kernels=180)),
}


def _free_port() -> str:
    from .dist import free_port
    return str(free_port())


def _versions() -> dict:
    import importlib.metadata
    out = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def environment(dry: bool) -> dict:
    """What ran where: the GPU (nvidia-smi), CPU flags that decide precision, Python, packages, commit."""
    env = dict(mode="dry run on CPU" if dry else "GPU", python=platform.python_version(),
               cpu_count=os.cpu_count(), machine=platform.machine(), packages=_versions())
    env["missing_packages"] = [k for k, v in env["packages"].items() if v is None]
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
        env["gpus"] = [line.strip() for line in smi.stdout.splitlines() if line.strip()]
    except (OSError, subprocess.TimeoutExpired):
        env["gpus"] = []
    try:
        flags = open("/proc/cpuinfo").read().split("flags", 2)[1].split("\n", 1)[0].split()
        env["cpu_flags"] = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
        env["cpu_model"] = re.search(r"model name\s*:\s*(.*)", open("/proc/cpuinfo").read()).group(1)
    except (OSError, IndexError, AttributeError):
        env["cpu_flags"], env["cpu_model"] = [], platform.processor()
    try:
        git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                             text=True)
        env["commit"] = git.stdout.strip()
    except OSError:  # no git there
        env["commit"] = ""
    env["commit"] = env["commit"] or "unknown (no .git: a copied working tree)"
    return env


# ---------------------------------------------------------------- what each step's files say

def junit_numbers(path: str) -> dict:
    """pytest's JUnit XML -> counts and the names of the tests that failed, errored or passed."""
    root = ET.parse(path).getroot()
    out = dict(passed=[], failed=[], errors=[], skipped=[], collection_errors=[])
    for c in root.iter("testcase"):
        kind = next((ch.tag for ch in c if ch.tag in ("failure", "error", "skipped")), None)
        if kind == "error" and not c.get("classname"):
            # a module that did not import there (a package only some tests use): its gpu tests, if any,
            # did not run, which the report says; it does not fail the step
            out["collection_errors"].append(c.get("name"))
            continue
        key = dict(failure="failed", error="errors", skipped="skipped").get(kind, "passed")
        out[key].append(f"{c.get('classname')}::{c.get('name')}")
    counts = {k: len(v) for k, v in out.items()}
    return dict(counts, **{f"{k}_tests": v for k, v in out.items() if v and k != "skipped"})


def history_numbers(path: str, batch: int) -> dict:
    """A run's ``history.jsonl`` -> throughput and data-wait fraction. Steady state = the second half of
    the steps: the first ones compile and then eat the batches the workers prefetched meanwhile."""
    with open(path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    if not records:
        raise ConfigError(f"{path}: no steps recorded")
    windows = [batch / r["samples_per_s"] for r in records]  # one rank, no accumulation: batch per step

    def sig(x):  # 4 significant digits: 1585.0 on a GPU, 0.7268 on a CPU
        return float(f"{x:.4g}")

    def over(lo):
        w = windows[lo:]
        return dict(samples_per_s=sig(batch * len(w) / sum(w)),
                    data_wait=round(sum(r["data_wait"] * x for r, x in zip(records[lo:], w)) / sum(w), 4))

    steady = over(len(records) // 2)
    return dict(steps=len(records), first_step_s=round(windows[0], 2), all_after_first=over(1)
                if len(records) > 1 else over(0), samples_per_s=steady["samples_per_s"],
                data_wait=steady["data_wait"], steady_steps=len(records) - len(records) // 2,
                memory_mb=round(max(r["memory_mb"] for r in records)),
                loss_last=round(records[-1]["loss"], 4),
                per_step=[dict(step=r["step"], samples_per_s=sig(r["samples_per_s"]),
                               data_wait=round(r["data_wait"], 4)) for r in records])


def kernel_numbers(path: str) -> dict:
    with open(path) as f:
        res = json.load(f)
    shapes = {}
    for r in res["rows"]:
        s = shapes.setdefault(r["shape"], {})
        if "error" in r:
            s[r["impl"]] = r["error"]
        else:
            s[r["impl"]] = dict(fwd_ms=r["fwd_ms"], fwd_bwd_ms=r["fwd_bwd_ms"], max_abs_err=r["max_abs_err"])
    return dict(hardware=res["hardware"], dtype=res["dtype"], shapes=shapes,
                errors=[f"{r['shape']}/{r['impl']}: {r['error']}" for r in res["rows"] if "error" in r])


def _json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


# ---------------------------------------------------------------- the steps

class Step:
    def __init__(self, name, title, cmd, budget, numbers, env=None, background=False, needs=None):
        self.name, self.title, self.cmd, self.budget = name, title, cmd, budget
        self.numbers, self.env, self.background, self.needs = numbers, env or {}, background, needs
        self.proc = self.log = self.started = self.ended = None


def plan(dry: bool, work: str) -> list:
    """The steps, in order, for the GPU or the CPU dry run."""
    s = SIZES["dry" if dry else "gpu"]
    b, ov = s["batch"], s["overlay"]
    # the best one-GPU setting measured so far (docs/benchmarks.md): ZeRO-0 (ZeRO-1/2 only add
    # partitioning on one device), amp_bf16, compile, batch 256
    train_args = [f"batch_size.video={b}", f"batch_size.image={b}", "max_txt_l.video=32", "ds_config=zero0",
                  "precision=amp_bf16", f"compile={s['compile']}"]
    corpus = os.path.join(work, "corpus")
    clips = b * (s["train_steps"] + 2)  # one epoch covers every step: no worker restart mid-run
    shards = os.path.join(corpus, "shards")
    run_dir = os.path.join(work, "train")
    build = ("import json, os, sys, time; t = time.time(); "
             "from singularity_ds.data.stream_benchmark import build_corpus; "
             "a = sys.argv[1:]; build_corpus(a[0], int(a[1]), int(a[2]), int(a[3]), a[4], int(a[5])); "
             "idx = json.load(open(os.path.join(a[0], 'shards', 'index.json'))); "
             "json.dump(dict(clips=idx['samples'], distinct=int(a[2]), res=int(a[3]), "
             "shards=len(idx['shards']), "
             "mib=round(sum(x['bytes'] for x in idx['shards']) / 2 ** 20, 1), "
             "seconds=round(time.time() - t, 1)), "
             "open(os.path.join(a[0], 'corpus.json'), 'w'))")
    bench_train_json = os.path.join(work, "bench_train.json")
    eval_json, kernels_json = os.path.join(work, "eval_itm.json"), os.path.join(work, "kernels.json")
    junit = os.path.join(work, "junit.xml")
    # only the files that use the marker: collecting the whole suite takes a minute on 2 cores, and a
    # module importing a package the GPU machine lacks would be an error unrelated to these tests
    tests_dir = os.path.join(REPO, "tests")
    gpu_files = sorted(os.path.join("tests", f) for f in os.listdir(tests_dir) if f.startswith("test_")
                       and f.endswith(".py") and "mark.gpu" in open(os.path.join(tests_dir, f)).read()) \
        if os.path.isdir(tests_dir) else []
    return [
        Step("gpu_tests", "`pytest -m gpu`",
             [PY, "-m", "pytest", "-q", "-m", "gpu", *(gpu_files or ["tests"]),
              "--continue-on-collection-errors", "-p", "no:cacheprovider", f"--junitxml={junit}"],
             s["budget"]["gpu_tests"], lambda: junit_numbers(junit)),
        Step("bench_train", f"`bench train pretrain` amp_bf16{' + compile' if s['compile'] else ''}",
             [PY, "-m", "singularity_ds", "bench", "train", "pretrain", *ov, *train_args, *s["bench"],
              "--json", bench_train_json],
             s["budget"]["bench_train"], lambda: _json(bench_train_json)),
        Step("corpus", "synthetic 224 px shard corpus (make-synthetic + make-shards)",
             [PY, "-c", build, corpus, str(clips), str(s["distinct"]), str(s["res"]), s["shard_size"],
              str(s["workers"])],
             s["budget"]["corpus"], lambda: _json(os.path.join(corpus, "corpus.json")), background=True),
        Step("train_e2e", f"`train pretrain` from the shards, decord workers"
                          f"{', compile' if s['compile'] else ''}",
             [PY, "-m", "singularity_ds", "train", "pretrain", *ov, *train_args,
              f"train_file=[[{os.path.join(shards, 'index.json')},null,video]]",
              f"num_workers={s['workers']}", "video_input.reader=decord", f"max_steps={s['train_steps']}",
              "scheduler.epochs=1", "log_freq=10", f"output_dir={run_dir}", "overwrite=True"],
             s["budget"]["train_e2e"], lambda: history_numbers(os.path.join(run_dir, "history.jsonl"), b),
             needs="corpus"),
        Step("eval_itm", "`bench eval itm`",
             [PY, "-m", "singularity_ds", "bench", "eval", "itm", *s["eval"], "--json", eval_json],
             s["budget"]["eval_itm"], lambda: _json(eval_json)),
        Step("kernels", "`bench kernels`",
             [PY, "-m", "singularity_ds", "bench", "kernels", *s["kernels"], "--json", kernels_json],
             s["budget"]["kernels"], lambda: kernel_numbers(kernels_json),
             env={"TRITON_INTERPRET": "1"} if dry else {}),
    ]


def _start(step: Step, base_env: dict, logs: str):
    step.log = os.path.join(logs, f"{step.name}.log")
    env = dict(base_env, **step.env, MASTER_PORT=_free_port())
    step.started = time.monotonic()
    with open(step.log, "w") as log:
        log.write("$ " + " ".join(step.cmd) + "\n")
        log.flush()
        # a process group of its own: a timeout ends the step with everything it started (loader workers
        # too). Not a new session: the device machine ends a command's leftovers except new sessions.
        step.proc = subprocess.Popen(step.cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                     preexec_fn=os.setpgrp)

    def note_end():  # a background step's own time, not the time until it is waited for
        step.proc.wait()
        step.ended = time.monotonic()
    threading.Thread(target=note_end, daemon=True).start()


def _stop(proc):
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=10)
            return
        except subprocess.TimeoutExpired:
            continue


def _error_line(log: str) -> str:
    """The line that says why a step failed: the project's one-line error, else the last line (a
    traceback's exception)."""
    lines = [line.strip() for line in open(log, errors="replace").read().splitlines() if line.strip()]
    ours = [line for line in lines if line.startswith("singularity-ds: error:")]
    return (ours or lines or ["(no output)"])[-1][:500]


def _finish(step: Step, deadline: float) -> dict:
    """Wait for a started step until its budget or ``deadline`` runs out; -> its result."""
    timeout = max(0.0, min(step.started + step.budget, deadline) - time.monotonic())
    try:
        rc = step.proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        _stop(step.proc)
        rc = None
    time.sleep(0.05)  # let note_end record the exit
    seconds = round((step.ended or time.monotonic()) - step.started, 1)
    res = dict(name=step.name, title=step.title, command=" ".join(step.cmd), budget_s=step.budget,
               seconds=seconds)
    if rc is None:
        res = dict(res, status="timeout", error=f"stopped after {seconds:.0f} s (budget {step.budget} s); "
                                                f"last line: {_error_line(step.log)}")
        try:  # the end-to-end run records every step as it goes: what it did before the stop still counts
            return dict(res, numbers=step.numbers(), error=res["error"] + "; numbers from what it did")
        except (OSError, ValueError, KeyError, ET.ParseError, SingularityError):
            return res
    if rc != 0:
        return dict(res, status="failed", exit_code=rc, error=_error_line(step.log))
    try:
        numbers = step.numbers()
    except (OSError, ValueError, KeyError, ET.ParseError, SingularityError) as e:
        return dict(res, status="failed", exit_code=0, error=f"finished but its results are unreadable: {e}")
    status = "ok"
    if step.name == "gpu_tests" and (numbers["failed"] or numbers["errors"]):
        status = "failed"
    if step.name == "kernels" and numbers["errors"]:
        status = "failed"
    return dict(res, status=status, numbers=numbers)


def run_steps(steps, dry: bool, work: str, total: float, progress=True) -> list:
    """Run the steps (background ones start first and are joined before the step that needs them); each
    result is recorded whatever happened to the others."""
    from tqdm import tqdm
    logs = os.path.join(work, "logs")
    os.makedirs(logs, exist_ok=True)
    base = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join(
        p for p in [REPO, os.environ.get("PYTHONPATH", "")] if p))
    base.pop("RANK", None)  # each step is a fresh single-rank run (dist.rank_env fills the rest)
    if dry:
        base["DS_ACCELERATOR"] = "cpu"
    start = time.monotonic()
    deadline = start + total
    results = {}
    for step in steps:
        if step.background:
            _start(step, base, logs)
    bar = tqdm(total=len(steps), desc="gpu-check", unit="step", disable=not progress)

    def stopped(signum, frame):
        raise _Stopped(signal.Signals(signum).name)

    previous = signal.signal(signal.SIGTERM, stopped)
    try:
        _run_all(steps, results, base, logs, deadline, total, bar)
    except (_Stopped, KeyboardInterrupt) as e:  # a killed check still reports what it has
        why = f"the check was stopped ({e or 'Ctrl-C'})"
        for step in steps:
            running = step.proc is not None and step.proc.poll() is None
            if running:
                _stop(step.proc)
            if step.name not in results:
                results[step.name] = dict(name=step.name, title=step.title, command=" ".join(step.cmd),
                                          budget_s=step.budget, status="stopped" if running else "not run",
                                          seconds=round(time.monotonic() - step.started, 1) if running else 0,
                                          error=why)
    finally:
        signal.signal(signal.SIGTERM, previous)
    bar.close()
    return [results[s.name] for s in steps]


class _Stopped(Exception):
    pass


def _run_all(steps, results, base, logs, deadline, total, bar):
    for step in steps:
        bar.set_postfix_str(step.name)
        skip = None
        if step.needs and results.get(step.needs, {}).get("status") != "ok":
            skip = f"needs step {step.needs}, which did not finish"
        elif not step.background and deadline - time.monotonic() < 5:
            skip = f"the total budget ({total:.0f} s) was spent"
        if skip:
            results[step.name] = dict(name=step.name, title=step.title, command=" ".join(step.cmd),
                                      budget_s=step.budget, seconds=0, status="not run", error=skip)
        else:
            if not step.background:  # background steps started first and are waited for here
                _start(step, base, logs)
            results[step.name] = _finish(step, deadline)
        bar.update(1)


# ---------------------------------------------------------------- the report

def goals(results: list, dry: bool) -> list:
    """The issue's GPU goals against what was measured (on a dry run: not measured)."""
    by = {r["name"]: r.get("numbers") or {} for r in results}
    rows = [("MFU, 1-frame pretraining (bench train, amp_bf16 + compile, batch 256)", ">= 50%",
             by.get("bench_train", {}).get("mfu"), lambda v: v >= GOALS["mfu"], lambda v: f"{100 * v:.1f}%"),
            ("data-wait fraction, end-to-end train pretrain (steady state)", "< 10%",
             by.get("train_e2e", {}).get("data_wait"), lambda v: v < GOALS["data_wait"],
             lambda v: f"{100 * v:.1f}%"),
            ("end-to-end samples/s: the data path keeps up with 1,500 samples/s", ">= 1500",
             by.get("train_e2e", {}).get("samples_per_s"), lambda v: v >= GOALS["samples_per_s"],
             lambda v: f"{v:.0f}")]
    out = []
    for goal, target, value, met, fmt in rows:
        shown = "-" if value is None else fmt(value)
        verdict = ("not measured (dry run on CPU)" if dry else "not measured (step failed or not run)"
                   if value is None else "yes" if met(value) else "no")
        out.append(dict(goal=goal, target=target, measured=value, shown=shown, met=verdict))
    return out


def _summary(r: dict) -> str:
    """The numbers of a step in one table cell (the JSON itself if a benchmark's output changed shape)."""
    n = r.get("numbers")
    if not n:
        return r.get("error", "")
    try:
        return _cell(r["name"], n)
    except (KeyError, TypeError):
        return json.dumps({k: v for k, v in n.items() if not isinstance(v, (list, dict))})[:400]


def _cell(name: str, n: dict) -> str:
    if name == "gpu_tests":
        return (f"{n['passed']} passed, {n['failed']} failed, {n['errors']} errors, {n['skipped']} skipped"
                + (f"; modules that did not import: {', '.join(n['collection_errors_tests'])}"
                   if n["collection_errors"] else ""))
    if name == "bench_train":
        return (f"{n['samples_per_s']} samples/s, MFU {100 * n['mfu']:.1f}% "
                f"(peak {n['peak_tflops']} TFLOP/s), "
                f"step {n['step_s_median']} s (fwd {n['forward_s']} / bwd {n['backward_s']} / opt "
                f"{n['optimizer_s']}), {n['peak_memory_gib']} GiB, {n['device']}")
    if name == "corpus":
        return (f"{n['clips']} clips ({n['distinct']} distinct, {n['res']} px) in {n['shards']} shards, "
                f"{n['mib']} MiB")
    if name == "train_e2e":
        return (f"{n['samples_per_s']} samples/s, data-wait {100 * n['data_wait']:.1f}% over the last "
                f"{n['steady_steps']} of {n['steps']} steps (all after the first: "
                f"{n['all_after_first']['samples_per_s']} samples/s, "
                f"{100 * n['all_after_first']['data_wait']:.1f}%); first step {n['first_step_s']} s")
    if name == "eval_itm":  # one result per setting (frames12, few_tokens)
        return "; ".join(f"{setting} {r['texts']}x{r['videos']}, {r['frames']} frames: original "
                         f"{r['original_s']} s, offloaded {r['offload_s']} s ({r['speedup']}x), stage 1 "
                         f"{r['stage1_s']} s" for setting, r in n.items())
    if name == "kernels":
        cells = []
        for shape, impls in n["shapes"].items():
            t, sd = impls.get("triton"), impls.get("sdpa")
            if isinstance(t, dict) and isinstance(sd, dict):
                cells.append(f"{shape} fwd {t['fwd_ms']}/{sd['fwd_ms']} ms")
        return "triton/sdpa: " + "; ".join(cells)
    return json.dumps(n)[:300]


def markdown(report: dict) -> str:
    env, lines = report["environment"], []
    dry = report["dry"]
    lines.append(f"# GPU check, {report['started']}")
    lines.append("")
    if dry:
        lines.append("**Dry run on CPU** (`DS_ACCELERATOR=cpu`, tiny model, few steps, Triton interpreter): "
                     "it proves the script and the report; **no GPU number here is measured**.")
    else:
        lines.append(f"GPU: {', '.join(env['gpus']) or 'none found by nvidia-smi'}.")
    lines.append("")
    lines.append(f"Commit {env['commit']}; Python {env['python']}, {env['cpu_count']} CPUs "
                 f"({env['cpu_model']}; flags {' '.join(env['cpu_flags']) or 'none of avx2/avx512'}); "
                 f"packages: "
                 + ", ".join(f"{k} {v}" for k, v in env["packages"].items() if v)
                 + (f"; **missing: {', '.join(env['missing_packages'])}**" if env["missing_packages"] else "")
                 + ".")
    lines.append(f"Total {report['seconds']:.0f} s (budget {report['budget_s']:.0f} s).")
    lines += ["", "| step | status | s / budget | numbers |", "|---|---|---:|---|"]
    for r in report["steps"]:
        cell = _summary(r).replace("|", "/")
        lines.append(f"| {r['name']}: {r['title']} | {r['status']} | {r['seconds']:.0f} / {r['budget_s']} "
                     f"| {cell} |")
    lines += ["", "## Goals", "", "| goal | target | measured | met |", "|---|---|---:|---|"]
    for g in report["goals"]:
        lines.append(f"| {g['goal']} | {g['target']} | {g['shown']} | {g['met']} |")
    failed = [r for r in report["steps"] if r["status"] != "ok"]
    if failed:
        lines += ["", "## What failed", ""]
        lines += [f"- **{r['name']}** ({r['status']}): {r.get('error', '')}" for r in failed]
    lines += ["", "## Commands", ""]
    lines += [f"- {r['name']}: `{r['command']}`" for r in report["steps"]]
    lines += ["", "Every step's output: `gpu_check.log`; all numbers: `gpu_check.json`; the end-to-end run "
                  "per step: `gpu_check.png`."]
    return "\n".join(lines) + "\n"


def plot(numbers: dict, path: str, title: str):
    """samples/s and data-wait per step of the end-to-end run."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    steps = [p["step"] for p in numbers["per_step"]]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(steps, [p["samples_per_s"] for p in numbers["per_step"]], color="tab:blue")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("samples/s", color="tab:blue")
    ax2 = ax.twinx()
    ax2.plot(steps, [100 * p["data_wait"] for p in numbers["per_step"]], color="tab:red")
    ax2.axhline(100 * GOALS["data_wait"], color="tab:red", ls=":", lw=1)
    ax2.set_ylabel("data wait, % of the step", color="tab:red")
    ax.axvspan(steps[len(steps) // 2] - 0.5, steps[-1] + 0.5, color="0.9", zorder=0, label="steady state")
    ax.legend(loc="upper left", fontsize=8, frameon=False)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(report: dict, out: str, logs: str = None) -> dict:
    """``gpu_check.json``, ``gpu_check.md``, ``gpu_check.png`` (when the end-to-end run finished) and the
    steps' outputs in one ``gpu_check.log`` (few files, easy to copy off a node). -> paths."""
    os.makedirs(out, exist_ok=True)
    report["goals"] = goals(report["steps"], report["dry"])
    paths = dict(json=write_json(report, os.path.join(out, "gpu_check.json")),
                 md=atomic_write(os.path.join(out, "gpu_check.md"), markdown(report)))
    e2e = next((r for r in report["steps"] if r["name"] == "train_e2e" and r.get("numbers")), None)
    if e2e:
        paths["png"] = os.path.join(out, "gpu_check.png")
        plot(e2e["numbers"], paths["png"], ("dry run, CPU: " if report["dry"] else "")
             + f"train pretrain from shards: {e2e['numbers']['samples_per_s']} samples/s, data-wait "
               f"{100 * e2e['numbers']['data_wait']:.1f}% (steady)")
    if logs:
        parts = []
        for r in report["steps"]:
            f = os.path.join(logs, f"{r['name']}.log")
            text = open(f, errors="replace").read() if os.path.isfile(f) else "(not run)\n"
            parts.append(f"===== {r['name']} ({r['status']}, {r['seconds']} s) =====\n{text}")
        paths["log"] = atomic_write(os.path.join(out, "gpu_check.log"), "\n".join(parts))
    return paths


def run(dry: bool, out: str, work: str = None, keep: bool = False, only=None, progress=True) -> dict:
    mode = SIZES["dry" if dry else "gpu"]
    if not dry:
        import torch
        if not torch.cuda.is_available():
            raise ConfigError("no CUDA device: run `make gpu-check DRY=1` for the CPU dry run")
    work = work or tempfile.mkdtemp(prefix="sds-gpu-check-")
    os.makedirs(work, exist_ok=True)
    started = datetime.datetime.now(datetime.timezone.utc)
    t0 = time.monotonic()
    steps = plan(dry, work)
    if only:
        unknown = set(only) - {s.name for s in steps}
        if unknown:
            raise ConfigError(f"--only {' '.join(sorted(unknown))}: no such step; the steps are "
                              f"{', '.join(s.name for s in steps)}")
        steps = [s for s in steps if s.name in only or s.name == "corpus" and "train_e2e" in only]
    env = environment(dry)
    results = run_steps(steps, dry, work, mode["total"], progress)
    report = dict(started=started.strftime("%Y-%m-%d %H:%M UTC"), dry=dry, environment=env,
                  budget_s=mode["total"], seconds=round(time.monotonic() - t0, 1), steps=results)
    paths = write_report(report, out, os.path.join(work, "logs"))
    if not keep:
        shutil.rmtree(work, ignore_errors=True)
    report["paths"] = paths
    return report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m singularity_ds.gpu_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry", action="store_true", help="every step at CPU size, without a GPU")
    p.add_argument("--out", default="gpu-check", help="report folder (on the device machine: $OUT)")
    p.add_argument("--work", help="scratch folder (corpus, runs); default: a new one in /tmp, removed at "
                                  "the end")
    p.add_argument("--keep", action="store_true", help="keep the scratch folder")
    p.add_argument("--only", nargs="+", help="run only these steps (train_e2e brings corpus)")
    args = p.parse_args(argv)
    try:
        report = run(args.dry, args.out, args.work, args.keep, args.only)
    except SingularityError as e:
        print(f"singularity-ds: error: {e}", file=sys.stderr)
        return 2
    print(open(report["paths"]["md"]).read())
    print("report: " + ", ".join(report["paths"].values()))
    return 0 if all(r["status"] == "ok" for r in report["steps"]) else 1


if __name__ == "__main__":
    sys.exit(main())
