"""An offline install for machines that cannot reach the package index (cluster nodes behind a firewall,
air-gapped sites): every wheel the lock needs, for a target Python and platform, in one folder.

On a machine with the index (``make wheelhouse``):

    python -m singularity_ds.wheelhouse build OUT [--python 3.11] [--platform manylinux_2_28_x86_64]
        [--only NAME ...] [--exclude NAME ...] [--part-size 2GB]

downloads each locked ``NAME==VERSION`` (``requirements.lock``) as a binary wheel for that Python and
platform, builds the pure-Python ones published only as source (DeepSpeed), adds singularity-ds's own
wheel, and writes ``OUT/requirements.txt`` (exactly those pins) and ``OUT/wheels.json`` (each wheel's
size and SHA-256). ``--only`` / ``--exclude`` take a subset (a node image that has its own PyTorch builds
the rest). ``--part-size`` splits the wheels into folders ``OUT/part1``, ``part2``, ... of at most that
size (for media or transfers with a size limit); a wheel larger than a part is cut into pieces, joined
and checked on the node. Each folder carries this file (standard library only), so on the node:

    python3 OUT/wheelhouse.py install OUT [--target DIR]          # or: PART1 PART2 ... (every part)

joins what was split, checks every wheel's SHA-256, and runs ``pip install --no-index --no-deps`` of
exactly the locked set (into the active environment, or ``--target DIR``).
"""
import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys

MANIFEST = "wheels.json"
PLATFORM = "manylinux_2_28_x86_64"
# the manylinux tags a manylinux_2_28 x86-64 node also runs (pip wants each spelled out)
OLDER = ["manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
         "manylinux2010_x86_64", "manylinux1_x86_64"]
SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMG]?i?B)?\s*$", re.I)
UNITS = {"": 1, "b": 1, "kb": 10 ** 3, "mb": 10 ** 6, "gb": 10 ** 9, "kib": 2 ** 10, "mib": 2 ** 20,
         "gib": 2 ** 30}


class WheelhouseError(Exception):
    """One line for the user (this file runs on nodes where singularity_ds is not installed yet)."""


def parse_size(text: str) -> int:
    m = SIZE.match(str(text))
    if not m or (m.group(2) or "").lower() not in UNITS or float(m.group(1)) <= 0:
        raise WheelhouseError(f"--part-size {text!r}: expected a size like 700MB, 2GB or 58MiB")
    return int(float(m.group(1)) * UNITS[(m.group(2) or "").lower()])


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def read_lock(path: str) -> list:
    """``NAME==VERSION`` lines of the lock (comments and blanks skipped)."""
    if not os.path.isfile(path):
        raise WheelhouseError(f"{path}: no such lock file (make lock writes it)")
    pins = []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            if "==" not in line:
                raise WheelhouseError(f"{path}: line {i}: {line!r} is not NAME==VERSION")
            pins.append(line)
    return pins


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def select(pins: list, only=(), exclude=()) -> list:
    names = {_norm(p.split("==")[0]): p for p in pins}
    for n in list(only) + list(exclude):
        if _norm(n) not in names:
            listed = ", ".join(sorted(names))[:300]
            raise WheelhouseError(f"{n}: not in the lock (its packages: {listed} ...)")
    keep = [_norm(n) for n in only] or list(names)
    return [names[n] for n in keep if n not in {_norm(e) for e in exclude}]


def fetch(requirement: str, dest: str, python: str, platform: str, pip_args=()) -> str:
    """One wheel of ``requirement`` for CPython ``python`` on ``platform`` into ``dest``; a package published
    only as source is built here and must come out pure Python. -> its path."""
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    plats = [platform] + (OLDER if platform == PLATFORM else [])
    cmd = pip + ["download", "--no-deps", "--only-binary=:all:", "--python-version", python,
                 "--implementation", "cp", *[a for p in plats for a in ("--platform", p)], "-d", dest,
                 *pip_args, requirement]
    got = subprocess.run(cmd, capture_output=True, text=True)
    built = False
    if got.returncode:  # no binary wheel: build one from the source distribution
        got = subprocess.run(pip + ["wheel", "--no-deps", "-w", dest, *pip_args, requirement],
                             capture_output=True, text=True)
        built = True
        if got.returncode:
            raise WheelhouseError(f"{requirement}: no wheel for CPython {python} {platform}, and building "
                                  f"one failed: {(got.stderr.strip().splitlines() or ['?'])[-1]}")
    name, version = requirement.split("==")
    stem = f"{name.replace('-', '_').lower()}-{version}-"
    match = sorted(f for f in os.listdir(dest) if f.lower().startswith(stem) and f.endswith(".whl"))
    if not match:
        raise WheelhouseError(f"{requirement}: pip reported success but left no wheel in {dest}")
    path = os.path.join(dest, match[-1])
    if built and not path.endswith("-none-any.whl"):
        raise WheelhouseError(f"{requirement}: built {os.path.basename(path)} here, which is not pure Python "
                              f"and would not run on CPython {python} {platform}")
    return path


def pack(wheels: list, out_dir: str, part_bytes: int) -> dict:
    """Split wheel files into folders ``out_dir/part1``, ``part2``, ... of at most ``part_bytes`` each
    (first fit, largest first). A wheel over ``part_bytes`` is cut into pieces ``NAME.pieceKofN``. Every
    folder holds the manifest (each wheel's size, SHA-256 and pieces with their parts) and this file.
    -> the manifest."""
    for d in os.listdir(out_dir) if os.path.isdir(out_dir) else ():
        if d.startswith("part"):
            shutil.rmtree(os.path.join(out_dir, d))
    manifest = {"part_bytes": part_bytes, "parts": [], "wheels": {}}
    items = []  # (bytes, path, piece index or None, pieces, offset)
    for path in wheels:
        name, size = os.path.basename(path), os.path.getsize(path)
        pieces = max(1, -(-size // part_bytes))
        manifest["wheels"][name] = dict(size=size, sha256=sha256(path), pieces=[])
        for k in range(pieces):
            offset = k * part_bytes
            items.append((min(part_bytes, size - offset), path, k if pieces > 1 else None, pieces, offset))
    bins = []  # [free bytes, [items]]
    for item in sorted(items, key=lambda it: -it[0]):
        target = next((b for b in bins if b[0] >= item[0]), None)
        if target is None:
            target = [part_bytes, []]
            bins.append(target)
        target[0] -= item[0]
        target[1].append(item)
    for number, (_, members) in enumerate(bins, 1):
        folder = os.path.join(out_dir, f"part{number}")
        os.makedirs(folder, exist_ok=True)
        manifest["parts"].append([])
        for size, path, k, pieces, offset in members:
            name = os.path.basename(path)
            file = name if k is None else f"{name}.piece{k + 1}of{pieces}"
            with open(path, "rb") as src, open(os.path.join(folder, file), "wb") as dst:
                src.seek(offset)
                dst.write(src.read(size))
            manifest["parts"][-1].append(file)
            if k is not None:
                manifest["wheels"][name]["pieces"].append(
                    dict(file=file, part=number, size=size, sha256=sha256(os.path.join(folder, file))))
    for w in manifest["wheels"].values():
        w["pieces"].sort(key=lambda p: int(p["file"].rsplit(".piece", 1)[1].split("of")[0]))
    for number in range(1, len(bins) + 1):
        with open(os.path.join(out_dir, f"part{number}", MANIFEST), "w") as f:
            json.dump(manifest, f, indent=1)
    return manifest


def _write_beside(manifest: dict, folder: str, requirements: list):
    with open(os.path.join(folder, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=1)
    with open(os.path.join(folder, "requirements.txt"), "w") as f:
        f.write("\n".join(requirements) + "\n")
    shutil.copyfile(os.path.abspath(__file__), os.path.join(folder, "wheelhouse.py"))


def build(out_dir: str, lock: str, python: str, platform: str, only=(), exclude=(), part_size=None,
          own: str = None, pip_args=()) -> dict:
    """The wheelhouse: the selected locked wheels (and ``own``, a folder holding singularity-ds's
    setup.py, built as a wheel) in ``out_dir``, or split into parts. -> the manifest."""
    pins = select(read_lock(lock), only, exclude)
    os.makedirs(out_dir, exist_ok=True)
    cache = os.path.join(out_dir, "wheels")
    os.makedirs(cache, exist_ok=True)
    from tqdm import tqdm  # here, on the machine with the index (tqdm is a dependency of the package)
    wheels = [fetch(r, cache, python, platform, pip_args) for r in tqdm(pins, desc="wheels", unit="wheel")]
    requirements = list(pins)
    if own:
        got = subprocess.run([sys.executable, "-m", "pip", "-q", "wheel", "--no-deps", "--no-build-isolation",
                              "-w", cache, own], capture_output=True, text=True)
        if got.returncode:
            raise WheelhouseError(f"building the singularity-ds wheel from {own} failed: "
                                  f"{(got.stderr.strip().splitlines() or ['?'])[-1]}")
        mine = sorted(f for f in os.listdir(cache) if f.startswith("singularity_ds-"))[-1]
        wheels.append(os.path.join(cache, mine))
        requirements.append(f"singularity-ds=={mine.split('-')[1]}")
    if part_size:
        manifest = pack(wheels, out_dir, parse_size(part_size))
        shutil.rmtree(cache)
        for number in range(1, len(manifest["parts"]) + 1):
            _write_beside(manifest, os.path.join(out_dir, f"part{number}"), requirements)
    else:
        manifest = {"parts": [], "wheels": {os.path.basename(w): dict(size=os.path.getsize(w),
                                                                     sha256=sha256(w), pieces=[])
                                            for w in wheels}}
        _write_beside(manifest, cache, requirements)
        for f in os.listdir(cache):
            os.replace(os.path.join(cache, f), os.path.join(out_dir, f))
        os.rmdir(cache)
    return manifest


def assemble(dirs, out_dir: str) -> list:
    """Every wheel of the manifest, whole and checked, in ``out_dir``, from the folders ``dirs`` (the
    wheelhouse, or all its parts): pieces joined in order. A missing or damaged piece or wheel is one
    error naming it and the part that carries it. -> the wheel paths."""
    manifest = None
    for d in dirs:
        if os.path.isfile(os.path.join(d, MANIFEST)):
            with open(os.path.join(d, MANIFEST)) as f:
                manifest = json.load(f)
            break
    if manifest is None:
        raise WheelhouseError(f"no {MANIFEST} in {', '.join(dirs)}: pass the wheelhouse folder (or its "
                              f"parts) that `wheelhouse build` wrote")

    def find(file):
        return next((os.path.join(d, file) for d in dirs if os.path.isfile(os.path.join(d, file))), None)

    def carrier(file):
        return next((f"part{i + 1}" for i, files in enumerate(manifest["parts"]) if file in files), None)

    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for name, w in manifest["wheels"].items():
        out = os.path.join(out_dir, name)
        if not w["pieces"]:
            src = find(name)
            if src is None:
                where = carrier(name)
                hint = f"; it is in {where}: pass every part" if where else ""
                raise WheelhouseError(f"{name}: not in {', '.join(dirs)}{hint}")
            if os.path.abspath(src) != os.path.abspath(out):
                shutil.copyfile(src, out)
        else:
            missing = [p for p in w["pieces"] if find(p["file"]) is None]
            if missing:
                raise WheelhouseError(f"{name}: {len(missing)} of {len(w['pieces'])} pieces missing ("
                                      + ", ".join(f"{p['file']} from part{p['part']}" for p in missing)
                                      + "); pass every part folder")
            with open(out + ".tmp", "wb") as dst:
                for p in w["pieces"]:
                    src = find(p["file"])
                    if os.path.getsize(src) != p["size"] or sha256(src) != p["sha256"]:
                        raise WheelhouseError(f"{src}: damaged (size or SHA-256 differs from what "
                                              f"part{p['part']} was written with); copy that part again")
                    with open(src, "rb") as f:
                        shutil.copyfileobj(f, dst, 1 << 22)
            os.replace(out + ".tmp", out)
        if os.path.getsize(out) != w["size"] or sha256(out) != w["sha256"]:
            raise WheelhouseError(f"{out}: SHA-256 differs from the wheel the wheelhouse was built with; "
                                  f"copy it again")
        paths.append(out)
    return paths


def install(dirs, target: str = None, joined: str = None) -> list:
    """Join and check the wheels, then ``pip install --no-index --no-deps`` exactly the locked set.
    -> the wheel paths."""
    joined = joined or (dirs[0] if len(dirs) == 1 and not _split(dirs[0]) else
                        os.path.join(os.path.dirname(os.path.abspath(dirs[0])), "wheelhouse-joined"))
    wheels = assemble(dirs, joined)
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-cache-dir", *wheels]
    if target:
        cmd[4:4] = ["--target", target, "--upgrade"]
    got = subprocess.run(cmd, capture_output=True, text=True)
    if got.returncode:
        raise WheelhouseError(f"pip install{' into ' + target if target else ''} failed: "
                              f"{(got.stderr.strip().splitlines() or ['?'])[-1]}")
    return wheels


def _split(folder: str) -> bool:
    try:
        with open(os.path.join(folder, MANIFEST)) as f:
            return bool(json.load(f)["parts"])
    except (OSError, ValueError, KeyError):
        return False


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m singularity_ds.wheelhouse", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    b = sub.add_parser("build", help="with the index: the locked wheels for a target Python and platform")
    b.add_argument("out", metavar="OUT")
    b.add_argument("--lock", default="requirements.lock")
    b.add_argument("--python", default=f"{sys.version_info.major}.{sys.version_info.minor}",
                   help="the node's Python (default: this one's)")
    b.add_argument("--platform", default=PLATFORM, help=f"the node's wheel platform tag (default {PLATFORM})")
    b.add_argument("--only", nargs="+", default=[], metavar="NAME", help="only these locked packages")
    b.add_argument("--exclude", nargs="+", default=[], metavar="NAME",
                   help="leave these out (e.g. torch, when the node has its own)")
    b.add_argument("--part-size", metavar="SIZE", help="split into folders of at most SIZE (700MB, 2GB)")
    b.add_argument("--no-own", action="store_true", help="leave out singularity-ds's own wheel")
    b.add_argument("--find-links", metavar="DIR", help="take wheels from DIR too (a local mirror)")
    b.add_argument("--no-index", action="store_true", help="only --find-links, no package index")
    j = sub.add_parser("join", help="on the node: join and check the wheels of every part into one folder")
    j.add_argument("dirs", nargs="+", metavar="DIR")
    j.add_argument("--out", required=True)
    i = sub.add_parser("install", help="on the node: join, check, pip install --no-index the locked set")
    i.add_argument("dirs", nargs="+", metavar="DIR", help="the wheelhouse folder, or every part folder")
    i.add_argument("--target", help="install into this folder (PYTHONPATH) instead of the environment")
    args = p.parse_args(argv)
    try:
        if args.what == "build":
            pip_args = (["--find-links", args.find_links] if args.find_links else []) + (
                ["--no-index"] if args.no_index else [])
            own = None if args.no_own else os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
            m = build(args.out, args.lock, args.python, args.platform, args.only, args.exclude,
                      args.part_size, own, pip_args)
            total = sum(w["size"] for w in m["wheels"].values())
            where = (f"{len(m['parts'])} part folders {args.out}/part1..{len(m['parts'])}" if m["parts"]
                     else args.out)
            print(f"{len(m['wheels'])} wheels, {total / 2 ** 20:.1f} MiB, for CPython {args.python} "
                  f"{args.platform} in {where}; on the node: python3 {args.out}/"
                  + ("part1/" if m["parts"] else "") + "wheelhouse.py install "
                  + (" ".join(f"{args.out}/part{k + 1}" for k in range(len(m["parts"]))) if m["parts"]
                     else args.out))
        elif args.what == "join":
            print(f"joined {len(assemble(args.dirs, args.out))} wheels into {args.out}")
        else:
            wheels = install(args.dirs, args.target)
            print(f"installed {len(wheels)} wheels" + (f" into {args.target}" if args.target else ""))
    except WheelhouseError as e:
        print(f"wheelhouse: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
