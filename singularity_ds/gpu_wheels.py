"""Carry the Python packages that the lent GPU machine lacks as wheels, in loads that fit one device call.

That machine (one H200, Python 3.12, its own PyTorch; no package registry) has torch, transformers,
timm, scipy, matplotlib, tensorboard, pytest, ... but not DeepSpeed, decord, PyAV, OmegaConf, ijson,
WebDataset or DALI. A device call carries the working tree and at most 64 MiB, so the wheels are packed
into *loads* of at most ``--load-mib``; a wheel larger than a load (DALI's, ~200 MB) is cut into parts
carried by consecutive calls and joined (and checked against its SHA-256) on the machine. Parts live
in ``/tmp`` there between calls, so the calls must follow each other while the machine is warm.

Here (registry access; wheels for CPython 3.12 manylinux x86-64, the versions installed in this venv):

    python -m singularity_ds.gpu_wheels prepare [--dali] [--dir .whl] [--load-mib 58]

prints the device calls to make, in order. There, every load but the last:

    python3 -m singularity_ds.gpu_wheels receive .whl/load1 /tmp/sds-wheels

and the last one installs everything and runs the check (docs/gpu-check.md):

    python3 -m singularity_ds.gpu_wheels install .whl/load3 /tmp/sds-wheels --target /tmp/site
    PYTHONPATH=/tmp/site:$PWD python3 -m singularity_ds.gpu_check --out $OUT

Standard library only: it runs there before anything is installed.
"""
import argparse
import hashlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys

from .errors import ConfigError, SingularityError
from .fileio import write_json

# The project's requirements (setup.py) and their own requirements that the GPU machine's image does not
# hold (its package list: the device notes, read 2026-11-17). Versions: those installed here.
BASE = ["deepspeed", "hjson", "pydantic", "pydantic-core", "annotated-types", "typing-inspection",
        "decord", "av", "omegaconf", "ijson", "webdataset", "braceexpand"]
# `[dali]`: DALI and what it imports. nvimgcodec's image-codec extras (nvjpeg, nvjpeg2k, nvtiff) are left
# out: video decoding does not use them, and each adds tens of MB.
DALI = ["nvidia-dali-cuda130", "nvidia-nvimgcodec-cu13", "nvidia-libnvcomp-cu13", "astunparse", "gast",
        "optree", "nvtx", "makefun", "libcst"]
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64",
             "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"]
MANIFEST = "wheels.json"
MIB = 2 ** 20


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def pinned(names) -> list:
    """``NAME==VERSION`` for each, the version installed in this environment (what the tests ran with)."""
    out = []
    for name in names:
        try:
            out.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            raise ConfigError(f"{name} is not installed here, so there is no version to carry; "
                              f"run `make install` first") from None
    return out


def fetch(requirement: str, dest: str, python: str = "3.12") -> str:
    """One wheel for CPython ``python`` on manylinux x86-64 into ``dest``; a package published only as
    source (DeepSpeed) is built here and must come out pure Python (``py3-none-any``). -> its path."""
    before = set(os.listdir(dest))
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    cmd = pip + ["download", "--no-deps", "--only-binary=:all:", "--python-version", python,
                 "--implementation", "cp", "-d", dest, requirement]
    for p in PLATFORMS:
        cmd[cmd.index("-d"):cmd.index("-d")] = ["--platform", p]
    got = subprocess.run(cmd, capture_output=True, text=True)
    if got.returncode:  # no binary wheel: build one from the source distribution
        got = subprocess.run(pip + ["wheel", "--no-deps", "-w", dest, requirement], capture_output=True,
                             text=True)
        if got.returncode:
            raise ConfigError(f"{requirement}: no wheel for CPython {python} manylinux x86-64, and building "
                              f"one failed: {(got.stderr.strip().splitlines() or ['?'])[-1]}")
    new = sorted(set(os.listdir(dest)) - before)
    name, version = requirement.split("==")
    stem = f"{name.replace('-', '_').lower()}-{version}-"
    match = [f for f in os.listdir(dest) if f.lower().startswith(stem) and f.endswith(".whl")]
    if not match:
        raise ConfigError(f"{requirement}: pip reported success but left no wheel in {dest} ({new})")
    path = os.path.join(dest, sorted(match)[-1])
    built = got.args[len(pip)] == "wheel"
    if built and not path.endswith("-py3-none-any.whl"):
        raise ConfigError(f"{requirement}: built {os.path.basename(path)} here, which is not pure Python and "
                          f"would not run on the GPU machine's CPython {python}")
    return path


def pack(groups, out_dir: str, load_bytes: int) -> dict:
    """Pack wheel files into load folders ``out_dir/load1``, ``load2``, ... of at most ``load_bytes`` each.

    ``groups``: lists of wheel paths, packed in order, each group starting a new load (so the first loads
    hold the DALI group and the last ones the base group: calls without DALI carry only those). A wheel
    over ``load_bytes`` is cut into parts ``NAME.partKofN``. Every load folder holds the manifest
    (``wheels.json``: each wheel's size, SHA-256 and parts with their loads). -> the manifest."""
    if os.path.isdir(out_dir):
        for d in os.listdir(out_dir):
            if d.startswith("load"):
                shutil.rmtree(os.path.join(out_dir, d))
    manifest = {"load_bytes": load_bytes, "loads": [], "wheels": {}}
    for group in groups:
        items = []  # (size, wheel name, part index or None, byte offset)
        for path in group:
            name, size = os.path.basename(path), os.path.getsize(path)
            parts = max(1, -(-size // load_bytes))
            manifest["wheels"][name] = dict(size=size, sha256=sha256(path), parts=[])
            for k in range(parts):
                offset = k * load_bytes
                items.append((min(load_bytes, size - offset), path, k if parts > 1 else None, parts, offset))
        loads = []  # first fit, largest first: [free bytes, [items]]
        for item in sorted(items, key=lambda it: -it[0]):
            target = next((ld for ld in loads if ld[0] >= item[0]), None)
            if target is None:
                target = [load_bytes, []]
                loads.append(target)
            target[0] -= item[0]
            target[1].append(item)
        for _, members in loads:
            manifest["loads"].append([])
            number = len(manifest["loads"])
            folder = os.path.join(out_dir, f"load{number}")
            os.makedirs(folder, exist_ok=True)
            for size, path, k, parts, offset in members:
                name = os.path.basename(path)
                file = name if k is None else f"{name}.part{k + 1}of{parts}"
                with open(path, "rb") as src, open(os.path.join(folder, file), "wb") as dst:
                    src.seek(offset)
                    dst.write(src.read(size))
                manifest["loads"][-1].append(file)
                if k is not None:
                    manifest["wheels"][name]["parts"].append(
                        dict(file=file, load=number, size=size, sha256=sha256(os.path.join(folder, file))))
    for name, w in manifest["wheels"].items():
        w["parts"].sort(key=lambda p: int(p["file"].rsplit(".part", 1)[1].split("of")[0]))
    for number in range(1, len(manifest["loads"]) + 1):
        write_json(manifest, os.path.join(out_dir, f"load{number}", MANIFEST))
    return manifest


def receive(load_dir: str, staging: str) -> list:
    """Keep one carried load for the next calls: copy its files into ``staging`` (outside the repository,
    which the next call replaces). -> the files copied."""
    if not os.path.isfile(os.path.join(load_dir, MANIFEST)):
        raise ConfigError(f"{load_dir}: no {MANIFEST}; name this load folder in the call's `carry`")
    os.makedirs(staging, exist_ok=True)
    files = sorted(os.listdir(load_dir))
    for f in files:
        shutil.copyfile(os.path.join(load_dir, f), os.path.join(staging, f))
    return files


def assemble(dirs, out_dir: str) -> list:
    """Every wheel of the manifest, whole and checked, in ``out_dir``, from the loads found in ``dirs``
    (carried load folders or a staging folder): parts are joined in order. -> the wheel paths. A missing
    or damaged part is one error naming it and the load that carries it."""
    manifest = None
    for d in dirs:
        if os.path.isfile(os.path.join(d, MANIFEST)):
            with open(os.path.join(d, MANIFEST)) as f:
                manifest = json.load(f)
            break
    if manifest is None:
        raise ConfigError(f"no {MANIFEST} in {', '.join(dirs)}: carry a load folder made by "
                          f"`gpu_wheels prepare`")

    def find(file):
        return next((os.path.join(d, file) for d in dirs if os.path.isfile(os.path.join(d, file))), None)

    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for name, w in manifest["wheels"].items():
        out = os.path.join(out_dir, name)
        if not w["parts"]:
            src = find(name)
            if src is None:
                load = next(i + 1 for i, files in enumerate(manifest["loads"]) if name in files)
                raise ConfigError(f"{name}: not here; it travels in load{load} (carry .whl/load{load})")
            if os.path.abspath(src) != os.path.abspath(out):
                shutil.copyfile(src, out)
        else:
            missing = [p for p in w["parts"] if find(p["file"]) is None]
            if missing:
                raise ConfigError(f"{name}: {len(missing)} of {len(w['parts'])} parts missing ("
                                  + ", ".join(f"{p['file']} from load{p['load']}" for p in missing)
                                  + "); receive those loads in earlier calls on the same warm machine")
            with open(out + ".tmp", "wb") as dst:
                for p in w["parts"]:
                    src = find(p["file"])
                    if os.path.getsize(src) != p["size"] or sha256(src) != p["sha256"]:
                        raise ConfigError(f"{src}: part damaged in transit (size or SHA-256 differs from "
                                          f"load{p['load']}'s); carry that load again")
                    with open(src, "rb") as f:
                        shutil.copyfileobj(f, dst, 1 << 22)
            os.replace(out + ".tmp", out)
        if os.path.getsize(out) != w["size"] or sha256(out) != w["sha256"]:
            raise ConfigError(f"{out}: SHA-256 differs from the wheel prepared here; carry its load(s) again")
        paths.append(out)
    return paths


def install(dirs, target: str) -> list:
    """Assemble the wheels and install them into ``target`` (no index, no dependencies: the manifest
    lists every one needed). -> the wheel paths."""
    wheels = assemble(dirs, os.path.join(os.path.dirname(os.path.abspath(target)), "sds-wheels-joined"))
    got = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                          "--no-compile", "--no-cache-dir", "--upgrade", "--target", target, *wheels],
                         capture_output=True, text=True)
    if got.returncode:
        last = (got.stderr.strip().splitlines() or ["?"])[-1]
        raise ConfigError(f"pip install into {target} failed: {last}")
    return wheels


def tree_bytes(root: str) -> int:
    """Bytes of the working tree a device call sends (tracked and untracked-but-not-ignored files)."""
    got = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                         capture_output=True)
    files = [f for f in got.stdout.decode().split("\0") if f]
    return sum(os.path.getsize(os.path.join(root, f)) for f in files if os.path.isfile(os.path.join(root, f)))


def calls(manifest: dict, wheel_dir: str, staging: str = "/tmp/sds-wheels",
          target: str = "/tmp/site") -> list:
    """The device calls, in order: (carry, command). All but the last keep their load in ``staging``; the
    last installs every wheel and runs the GPU check."""
    out, n = [], len(manifest["loads"])
    for i in range(1, n + 1):
        load = f"{wheel_dir}/load{i}"
        if i < n:
            cmd = f"python3 -m singularity_ds.gpu_wheels receive {load} {staging}"
        else:
            cmd = (f"python3 -m singularity_ds.gpu_wheels install {load} {staging} --target {target} && "
                   f"PYTHONPATH={target}:$PWD PYTHONUNBUFFERED=1 python3 -m singularity_ds.gpu_check "
                   f"--out $OUT")
        out.append(([load], cmd))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m singularity_ds.gpu_wheels", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    pr = sub.add_parser("prepare", help="here: download/build the wheels and pack them into loads")
    pr.add_argument("--dir", default=".whl", help="wheel folder in the repository (ignored by git)")
    pr.add_argument("--dali", action="store_true", help="also DALI and its dependencies (~200 MB: 4+ loads)")
    pr.add_argument("--load-mib", type=float, default=58.0,
                    help="most MiB per load; with the working tree it must stay under a call's 64 MiB")
    pr.add_argument("--python", default="3.12", help="the GPU machine's Python")
    rc = sub.add_parser("receive", help="there: keep a carried load for the next calls")
    rc.add_argument("load")
    rc.add_argument("staging", nargs="?", default="/tmp/sds-wheels")
    ins = sub.add_parser("install", help="there: join the parts, check SHA-256, pip install --target")
    ins.add_argument("dirs", nargs="+", help="the carried load folder and the staging folder")
    ins.add_argument("--target", default="/tmp/site")
    args = p.parse_args(argv)
    try:
        if args.what == "prepare":
            root = os.getcwd()
            tree = tree_bytes(root)
            load_bytes = int(args.load_mib * MIB)
            if tree + load_bytes > 64 * MIB:
                raise ConfigError(f"--load-mib {args.load_mib:g} + the working tree's {tree / MIB:.1f} MiB "
                                  f"is over a device call's 64 MiB; pass --load-mib {63 - tree / MIB:.0f} "
                                  f"or less")
            cache = os.path.join(args.dir, "all")
            os.makedirs(cache, exist_ok=True)
            groups = [[fetch(r, cache, args.python) for r in pinned(DALI)]] if args.dali else []
            groups.append([fetch(r, cache, args.python) for r in pinned(BASE)])
            manifest = pack(groups, args.dir, load_bytes)
            sizes = [sum(os.path.getsize(os.path.join(args.dir, f"load{i + 1}", f)) for f in files)
                     for i, files in enumerate(manifest["loads"])]
            print(f"{len(manifest['wheels'])} wheels in {len(sizes)} load(s) of "
                  + ", ".join(f"{s / MIB:.1f}" for s in sizes)
                  + f" MiB (+ the working tree, {tree / MIB:.1f} MiB); the device calls, back to back on a "
                    f"warm machine:")
            for i, (carry, cmd) in enumerate(calls(manifest, args.dir), 1):
                print(f"  {i}. carry={json.dumps(carry)} command: {cmd}")
        elif args.what == "receive":
            files = receive(args.load, args.staging)
            print(f"kept {len(files)} files of {args.load} in {args.staging}: {', '.join(files)}")
        else:
            wheels = install(args.dirs, args.target)
            print(f"installed {len(wheels)} wheels into {args.target}")
    except SingularityError as e:
        print(f"singularity-ds: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
