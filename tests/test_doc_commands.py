"""The commands of the README and docs/ are tests: every line of a fenced ``bash`` block that starts with
``singularity-ds``, ``launchers/``, ``deepspeed``, ``sbatch`` or ``bash scripts/`` runs here, as pasted,
page by page in order (a page's later commands use what its earlier ones wrote), so a command that stops
working fails CI. ``export VAR=...`` lines set the page's environment; other lines (``make``, ``wget``)
are not run.

Each page runs with the README's setup (``SL_DATA_DIR``: the fake released tree, tests/release_tree.py;
``SL_EXP_DIR``: a fresh folder holding its ``ckpts``) in a fresh working directory. What is substituted,
and only this (sizes and paths):

- the exports' ``/data/singularity``, ``/exp/singularity``: the fake released tree's data; a fresh folder;
- ``singularity_17m.pth``, ``singularity_temporal_17m.pth``: the released tree's ``pt/`` files (with the
  reference checkpoints' tokenizer, ``text_encoder=...``, and ``image_res=32``); ``ckpt.pth``: its 5M one
  exported with that tokenizer (``embed`` and ``search`` take no config keys);
- ``my_corpora.yaml``: the synthetic corpus's overlay (``configs/pretrain.yaml``); ``...``: that overlay
  and a run folder of the line's own;
- ``my_videos/``, ``my_videos/beach.mp4``: the synthetic clips; one of them;
- ``results_2M_train.csv``, ``Train_GCC-training.tsv``: URL lists of the synthetic media on 127.0.0.1;
- ``/raw/...`` media; ``$SL_DATA_DIR/videos_images/X`` outputs: the synthetic media; a fresh folder;
- ``launchers/hostfile.example``: ``localhost slots=1`` + ``node2 slots=1``, each node started with
  ``--no_ssh`` (as on a cluster without ssh);
- ``sbatch`` resources: the test cluster's (``--nodes=2``, 1 task, no GPU, partition ``debug``);
- ``--workers``, ``--per-host``, ``--size``, ``--world``, ``--port``, ``--expected``, ``make-synthetic``'s
  sizes: small;
- a model without a checkpoint: ``tiny`` (a timm tower: small ``timm_model_args``, random, 28/32 px);
- steps, batches, frames at test, text length: ``max_steps=1``, batch 4, 2 frames, 16 tokens;
- a Hub tower (``hf-hub:NAME``): a small random one of its architecture on a local Hub (``HF_ENDPOINT``);
- ``--original /path/to/singularity``: ``$SINGULARITY_ORIGINAL`` (a clone; the line is skipped without).

The ``sbatch`` lines run on the session's 2-node SLURM cluster (tests/slurm_cluster.py), a test of their
own (skipped where SLURM is not installed).
"""
import functools
import http.server
import os
import re
import shlex
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from singularity_ds import cli

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
RUN = ("singularity-ds ", "launchers/", "deepspeed ", "sbatch ", "bash scripts/")
VENV_BIN = os.path.dirname(sys.executable)

TRAIN_SIZES = ["max_steps=1", "scheduler.epochs=1", "batch_size.video=4", "batch_size.image=4",
               "batch_size_test.video=8", "video_input.num_frames_test=2", "k_test=4", "max_txt_l=16",
               "num_workers=0"]
EVAL_SIZES = ["batch_size_test.video=8", "batch_size_test.image=8", "video_input.num_frames_test=2",
              "k_test=4", "max_txt_l=16", "num_workers=0"]
TIMM_SIZES = ["timm_model_args={embed_dim: 64, depth: 2, num_heads: 2}", "tower_init=random"]
FLAG_SIZES = {"--workers": "2", "--per-host": "2", "--size": "32", "--nodes": "2", "--world": "2"}
SYNTHETIC_SIZES = ["--num-clips", "24", "--size", "32", "--frames", "8", "--num-images", "8"]
SLURM_RESOURCES = ["--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1", "--partition=debug",
                   "--time=10", "--export=ALL"]


def shell_lines(page: Path):
    """(line number, command) of every line of the page's fenced bash blocks, continuations joined and
    trailing comments dropped."""
    text = page.read_text()
    out = []
    for m in re.finditer(r"^```(?:bash|sh)\n(.*?)^```", text, re.S | re.M):
        first = text[:m.start(1)].count("\n") + 1
        lines = m.group(1).split("\n")
        i = 0
        while i < len(lines):
            start, line = first + i, lines[i]
            while line.endswith("\\") and i + 1 < len(lines):
                i += 1
                line = line[:-1] + " " + lines[i].strip()
            i += 1
            line = re.split(r"\s+#\s", line)[0].strip()
            if line:
                out.append((start, line))
    return out


def commands(page: Path):
    return [(n, c) for n, c in shell_lines(page) if c.startswith(RUN) or c.startswith("export ")]


def pages_with(kind):
    return [p for p in PAGES if any(kind(c) for _, c in commands(p))]


def is_sbatch(c):
    return c.startswith("sbatch ")


def is_run(c):
    return c.startswith(RUN) and not is_sbatch(c)


# ---------------------------------------------------------------------------- the substitutions
class Serving:
    """A folder over HTTP on 127.0.0.1 (the URL lists' media)."""

    def __init__(self, folder):
        handler = functools.partial(Quiet, directory=str(folder))
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


class Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


class Page:
    """One page's run: its working directory, environment and the substituted commands."""

    def __init__(self, page, release, corpus, work, serving, export):
        self.page, self.release, self.corpus, self.work = page, release, corpus, work
        exp = work / "exp"
        exp.mkdir()
        os.symlink(release["ckpts"], exp / "ckpts")
        (work / "cwd").mkdir()
        self.cwd = work / "cwd"
        self.line = 0  # the page's line being run
        self.env = {"SL_DATA_DIR": release["data"], "SL_EXP_DIR": str(exp)}
        self.exports = {"/data/singularity": release["data"], "/exp/singularity": str(exp)}
        videos = sorted(os.listdir(corpus / "videos"))
        images = sorted(os.listdir(corpus / "images"))
        self.expected = {"video": len(videos), "image": len(images)}
        (self.cwd / "results_2M_train.csv").write_text(
            "videoid,contentUrl,duration,page_dir,name\n"
            + "".join(f"{i},{serving.url}/videos/{v},PT00H00M02S,syn,clip {v}\n"
                      for i, v in enumerate(videos)))
        (self.cwd / "Train_GCC-training.tsv").write_text(
            "".join(f"a picture {i}\t{serving.url}/images/{f}\n" for i, f in enumerate(images)))
        (work / "hostfile").write_text("localhost slots=1\nnode2 slots=1\n")
        pt = Path(release["ckpts"]) / "pt"
        self.paths = {
            "singularity_17m.pth": str(pt / "singularity_17m.pth"),
            "singularity_temporal_17m.pth": str(pt / "singularity_temporal_17m.pth"),
            "ckpt.pth": export,
            "my_corpora.yaml": str(corpus / "configs" / "pretrain.yaml"),
            "my_videos/": str(corpus / "videos") + "/",
            "my_videos/beach.mp4": str(corpus / "videos" / videos[0]),
            "/raw/MSRVTT/videos": str(corpus / "videos"), "/raw/DiDeMo": str(corpus / "videos"),
            "/raw/coco": str(corpus / "images"),
            "launchers/hostfile.example": str(work / "hostfile"),
        }

    def env_of(self):
        return dict(os.environ, **self.env)

    def export(self, line):
        for var in shlex.split(line[len("export "):]):
            name, value = var.split("=", 1)
            self.env[name] = self.exports.get(value, value)
            if name == "MASTER_PORT":  # a free one
                from singularity_ds.dist import free_port
                self.env[name] = str(free_port())

    def expand(self, token):
        token = self.paths.get(token, token)
        if token.startswith("$SL_DATA_DIR/videos_images/"):  # preprocess outputs: never into the tree
            return str(self.work / "media" / token.split("/", 2)[2])
        for var, value in self.env.items():
            token = token.replace(f"${var}", value)
        key = "pretrained_path="
        if token.startswith(key):
            token = key + self.paths.get(token[len(key):], token[len(key):])
        return token

    def argv(self, line):
        """The command's arguments, substituted."""
        words = [self.expand(w) for w in shlex.split(line)]
        out, i = [], 0
        while i < len(words):
            w = words[i]
            flag = w.split("=", 1)[0]
            if flag in FLAG_SIZES and "=" in w:
                out.append(f"{flag}={FLAG_SIZES[flag]}")
            elif flag in FLAG_SIZES and i + 1 < len(words):
                out += [w, FLAG_SIZES[flag]]
                i += 1
            elif w == "...":  # the rest a user fills in: the data, and a run folder of its own
                out += [self.paths["my_corpora.yaml"], f"output_dir=runs/line{self.line}"]
            elif w == "--expected":
                out += [w, str(self.expected["image" if "image" in line or "cc3m" in line else "video"])]
                i += 1
            else:
                out.append(w)
            i += 1
        return out

    def sized(self, args):
        """``args`` (from the sub-command on) at tiny size."""
        sub = args[0]
        released = any(a.startswith(self.release["ckpts"]) or "=" + self.release["ckpts"] in a for a in args)
        if sub == "make-synthetic":
            return args + SYNTHETIC_SIZES
        if sub == "serve":
            return args
        if sub in ("train", "bench", "doctor") or (sub == "eval" and released):
            at = 2 if sub in ("train", "doctor") else 3  # after the task (bench: after its kind and task)
            rest = list(args)
            timm = any(a.startswith("vit_type=timm") or a in ("clip_b16", "siglip_b16") for a in args)
            if released:
                rest += [self.release["text"]] + (["image_res=32"] if sub == "train" else [])
            elif "tiny" not in args and not any(a.startswith("pretrained_path=") for a in args):
                rest.insert(at, "tiny")
            if timm and not any(a.startswith("pretrained_path=") for a in args):  # else: the checkpoint's
                patch14 = any("patch14" in a for a in args)
                rest += TIMM_SIZES + [f"image_res={28 if patch14 else 32}"]
            if sub in ("train", "bench"):
                return rest + TRAIN_SIZES
            return rest + (EVAL_SIZES if sub == "eval" else [])
        if sub == "eval":
            return args + EVAL_SIZES
        if sub == "reproduce" and "--list" not in args:
            return args[:2] + [self.release["text"]] + args[2:]
        return args


def output_dir(args, env):
    """Where a train command writes its run (a relative one: under SL_EXP_DIR)."""
    given = [a.split("=", 1)[1] for a in args if a.startswith("output_dir=")]
    path = given[-1] if given else f"runs/{args[1]}"
    return path if os.path.isabs(path) else os.path.join(env["SL_EXP_DIR"], path)


def launcher_env(page, port):
    return dict(page.env_of(), DS_ACCELERATOR="cpu", MASTER_PORT=str(port), PYTHON=sys.executable,
                PATH=VENV_BIN + os.pathsep + os.environ.get("PATH", ""))


def run_launcher(page, line, port):
    """A ``deepspeed`` or ``launchers/`` line in processes of its own."""
    words = page.argv(line)
    env = launcher_env(page, port)
    if words[0] == "deepspeed":
        module = words.index("--module")
        head, args = words[1:module + 2], page.sized(words[module + 2:])
        launcher = os.path.join(VENV_BIN, "deepspeed")
        if "--hostfile" in head:  # each "node" starts its launcher (as without ssh); both meet at the master
            cmd = lambda rank: [launcher, *head[:head.index("--module")], "--no_ssh", "--node_rank",  # noqa
                                str(rank), "--master_addr", "127.0.0.1", "--master_port", str(port),
                                *head[head.index("--module"):], *args]
            other = subprocess.Popen(cmd(1), cwd=page.cwd, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
            out = subprocess.run(cmd(0), cwd=page.cwd, env=env, capture_output=True, text=True, timeout=400)
            other_out = other.communicate(timeout=300)[0]  # read as it runs: a full pipe would block it
            return out.returncode or other.returncode, out.stdout + out.stderr + other_out, args
        cmd = [launcher, "--master_port", str(port), *head, *args]
    else:  # launchers/local.sh N TASK ...
        args = page.sized(["train", *words[2:]])
        cmd = ["bash", str(ROOT / words[0]), words[1], *args[1:]]
    out = subprocess.run(cmd, cwd=page.cwd, env=env, capture_output=True, text=True, timeout=400)
    return out.returncode, out.stdout + out.stderr, args


def run_serve(page, args, port):
    """``serve``: up, its page answers, then stopped."""
    argv = [a if a != "8080" else str(port) for a in args]
    proc = subprocess.Popen([sys.executable, "-m", "singularity_ds", *argv], cwd=page.cwd, env=page.env_of(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as r:
                    return (0 if r.status == 200 and b"<html" in r.read().lower() else 1), ""
            except OSError:
                time.sleep(0.5)
        return 1, "serve did not answer on its port"
    finally:
        proc.terminate()
        out = proc.communicate(timeout=30)[0]
        if proc.returncode not in (0, -15):
            print(out[-3000:])


@pytest.fixture(scope="module")
def serving(corpus):
    s = Serving(corpus)
    yield s
    s.close()


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """A local Hub (tests/local_hub.py) holding the Hub towers the docs name (``hf-hub:NAME``), small and
    random, in timm's layout (their architecture is read from the Hub even with tower_init=random)."""
    import timm
    from timm.models import save_for_hf

    from local_hub import Hub
    repos = {}
    names = {n for page in PAGES for _, line in commands(page)
             for n in re.findall(r"hf-hub:([\w./-]+)", line)}
    for name in sorted(names):
        arch = name.split("/")[1].split(".")[0]
        folder = tmp_path_factory.mktemp("hub")
        save_for_hf(timm.create_model(arch, pretrained=False, num_classes=0, embed_dim=64, depth=2,
                                      num_heads=2, img_size=28), str(folder), safe_serialization=True)
        repos[name] = {f: (folder / f).read_bytes() for f in ("config.json", "model.safetensors")}
    Hub.repos = repos
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def run_with_hub(page, args, endpoint):
    """A command naming a Hub tower, in a process of its own (``huggingface_hub`` reads its endpoint and
    cache when imported) with ``HF_ENDPOINT`` at the local Hub."""
    env = {k: v for k, v in page.env_of().items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    from singularity_ds.dist import free_port
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(page.work / "hf"), HF_HUB_DISABLE_TELEMETRY="1",
               MASTER_PORT=str(free_port()))
    out = subprocess.run([sys.executable, "-m", "singularity_ds", *args], cwd=page.cwd, env=env,
                         capture_output=True, text=True, timeout=400)
    return out.returncode, out.stdout + out.stderr


@pytest.fixture(scope="module")
def released_export(release, tmp_path_factory):
    """``ckpt.pth``: the released pretraining checkpoint exported with the tokenizer it was made with (so
    ``embed`` and ``search``, which take no config keys, read its words)."""
    from singularity_ds.models import load_model
    from singularity_ds.models.weights import export
    folder = tmp_path_factory.mktemp("released_export") / "export"
    text = release["text"].split("=", 1)[1]
    model = load_model(os.path.join(release["ckpts"], "pt", "singularity_5m.pth"), text_encoder=text)
    export(model, str(folder))
    return str(folder)


def check(rc, output, where, line):
    assert rc == 0 and "Traceback" not in output, f"{where}: {line}\n{output[-4000:]}"


@pytest.mark.slow
@pytest.mark.multiproc
@pytest.mark.parametrize("page", pages_with(is_run), ids=lambda p: p.name)
def test_the_pages_commands_run_as_pasted(page, release, corpus, serving, released_export, hub, tmp_path,
                                          monkeypatch, capsys):
    from singularity_ds.dist import free_port
    run = Page(page, release, corpus, tmp_path, serving, released_export)
    monkeypatch.chdir(run.cwd)
    for name, value in run.env.items():
        monkeypatch.setenv(name, value)
    ran, skipped = 0, []
    for number, line in commands(page):
        where, run.line = f"{page.relative_to(ROOT)}:{number}", number
        if line.startswith("export "):
            run.export(line)
            for name, value in run.env.items():
                monkeypatch.setenv(name, value)
            continue
        if is_sbatch(line):
            continue
        if "--original" in line:
            original = os.environ.get("SINGULARITY_ORIGINAL")
            if not original:
                skipped.append(f"{where}: needs a clone of the original (SINGULARITY_ORIGINAL)")
                continue
            run.paths["/path/to/singularity"] = original
        if line.startswith(("deepspeed ", "launchers/")):
            rc, output, args = run_launcher(run, line, free_port())
        else:
            args = run.sized(run.argv(line)[1:])
            if args[0] == "serve":
                rc, output = run_serve(run, args, free_port())
            elif "hf-hub:" in line:
                rc, output = run_with_hub(run, args, hub)
            else:
                try:
                    rc = cli.main(args)
                except SystemExit as e:  # argparse's own
                    rc = e.code
                captured = capsys.readouterr()
                output = captured.out + captured.err
        if args[0] == "reproduce" and rc == 1 and "differs: " in output:
            rc = 0  # its exit status is the verdict: the tiny tree is not the paper's data
        check(rc, output, where, line)
        if args[0] == "train":  # the run's model is there
            export = os.path.join(output_dir(args, run.env), "export", "model.safetensors")
            assert os.path.isfile(export), f"{where}: {line}: no {export}"
        if args[0] == "train" and line.startswith(("deepspeed ", "launchers/")):  # every process a rank
            log = Path(output_dir(args, run.env), "train.log").read_text()
            assert "2 rank(s)" in log, f"{where}: {line}: {log[-2000:]}"
        ran += 1
    if skipped and not ran:
        pytest.skip("; ".join(skipped))
    assert ran


@pytest.mark.slow
@pytest.mark.multiproc
@pytest.mark.parametrize("where,line", [(f"{p.relative_to(ROOT)}:{n}", c) for p in pages_with(is_sbatch)
                                        for n, c in commands(p) if is_sbatch(c)])
def test_the_sbatch_commands_run_on_a_slurm_cluster(where, line, slurm, release, corpus, serving,
                                                    released_export, tmp_path):
    page = Page(ROOT / where.split(":")[0], release, corpus, tmp_path, serving, released_export)
    words = page.argv(line)[1:]
    script = next(i for i, w in enumerate(words) if w.startswith("launchers/"))
    flags, rest = words[:script], words[script + 1:]
    run_name, args = rest[0], page.sized(["train", *rest[1:]])
    job = slurm.sbatch([*flags, *SLURM_RESOURCES, str(ROOT / words[script]), run_name, *args[1:]],
                       cwd=str(page.cwd), env={**page.env, "MASTER_ADDR": "127.0.0.1",
                                               "PYTHON": sys.executable})
    state = slurm.wait(job, timeout=600)
    log = (page.cwd / f"singularity-ds-{job}.out").read_text()
    assert state == "COMPLETED", f"{where}: {line}\n{log[-4000:]}"
    run = Path(output_dir(["train", "", f"output_dir=runs/{run_name}"], page.env))  # as multinode.sh names it
    assert "2 rank(s)" in (run / "train.log").read_text() and (run / "export" / "model.safetensors").is_file()
