"""The lock file (requirements.lock): the exact set of packages `make install` puts in the venv.

It is the frozen venv that `make test-latest` built from setup.py's ranges (the newest releases they
allow) and then tested; `make lock` writes it from there. Plain pip, no lock tool: the lock is a
requirements file of NAME==VERSION lines that `pip install --no-deps -r` installs as it is, and this
script checks it against setup.py and against a venv. Run by make with the venv's Python, except
`platform`, which runs before the venv exists and so uses nothing outside the standard library.

  lockfile.py check SETUP LOCK    setup.py's requirements (extras too) are all locked, within their ranges
  lockfile.py platform LOCK       this Python and platform are the ones the lock was made for
  lockfile.py extra LOCK          installed packages the lock does not have (make install removes them)
  lockfile.py verify LOCK         this venv holds exactly the lock, and `pip check` passes
  lockfile.py diff LOCK           how this venv differs from the lock, one package a line
  lockfile.py write LOCK          freeze this venv into LOCK
"""
import ast
import datetime
import os
import re
import sys
import sysconfig

OWN = "singularity-ds"  # the project itself (installed editable), never locked
HEADER = """\
# The exact packages `make install` installs (transitive ones and the sdists' build backends included).
# Written by `make lock` from the venv that `make test-latest` built from setup.py's ranges and tested;
# do not edit by hand. `make lint` checks it against setup.py.
# platform: {tag} {plat}
# made: {date}
"""
# `pip check` lines that are known to be false: decord 0.6.0's wheel (the only one on PyPI for Linux) names
# cp36-cp36m in its WHEEL file though it is a CPython 3 extension that imports and decodes on 3.11
PIP_CHECK_KNOWN = {"decord 0.6.0 is not supported on this platform"}
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)$")


def normalize(name: str) -> str:
    """PEP 503: PyYAML, pyyaml and py_yaml are one project."""
    return re.sub(r"[-_.]+", "-", name).lower()


def here() -> tuple:
    """-> ("cp311", "linux_x86_64"): the interpreter and platform a lock is made for."""
    return (f"cp{sys.version_info[0]}{sys.version_info[1]}",
            sysconfig.get_platform().replace("-", "_").replace(".", "_"))


def header(tag: str, plat: str) -> str:
    return HEADER.format(tag=tag, plat=plat, date=datetime.date.today().isoformat())


def lock_lines(path) -> list:
    """-> [(line number, text)] of the lock's requirement lines."""
    out = []
    for n, line in enumerate(open(path).read().splitlines(), 1):
        line = line.strip()
        if line and not line.startswith("#"):
            out.append((n, line))
    return out


def read_lock(path) -> dict:
    """-> {normalized name: version}; a line that is not NAME==VERSION is a SystemExit naming it."""
    pins = {}
    for n, line in lock_lines(path):
        m = PIN.match(line)
        if not m:
            raise SystemExit(f"{path}:{n}: {line!r} is not an exact pin NAME==VERSION; run `make lock`")
        pins[normalize(m.group(1))] = m.group(2)
    return pins


def lock_platform(path) -> tuple:
    for line in open(path):
        if line.startswith("# platform:"):
            tag, plat = line.split(":", 1)[1].split()
            return tag, plat
    raise SystemExit(f"{path}: no '# platform:' line; run `make lock`")


def platform_mismatch(path, tag: str, plat: str):
    """-> None where (tag, plat) is the lock's, else the one line that says what to do."""
    want = lock_platform(path)
    if want == (tag, plat):
        return None
    return (f"{path} was made for {want[0]} on {want[1]}, this Python is {tag} on {plat}: install with "
            f"PYTHON=python{want[0][2]}.{want[0][3:]} make install, or make a lock for this machine "
            "(make test-latest, then make lock)")


def setup_requirements(path) -> list:
    """-> [(where, requirement string)] from setup.py's ``install_requires`` and every extra, read from its
    syntax tree (literals only: setup.py is not run)."""
    tree = ast.parse(open(path).read(), str(path))
    call = next(node for node in ast.walk(tree) if isinstance(node, ast.Call)
                and getattr(node.func, "id", getattr(node.func, "attr", None)) == "setup")
    kw = {k.arg: ast.literal_eval(k.value) for k in call.keywords
          if k.arg in ("install_requires", "extras_require")}
    out = [("install_requires", r) for r in kw.get("install_requires", [])]
    for extra, reqs in kw.get("extras_require", {}).items():
        out += [(f"extras_require[{extra!r}]", r) for r in reqs]
    return out


def check(setup, lock) -> list:
    """-> one line per disagreement: a requirement of setup.py missing from the lock, or locked at a
    version outside its range (requirements whose marker is false here are skipped); [] when they agree."""
    from packaging.requirements import Requirement
    from packaging.version import Version
    try:
        pins = read_lock(lock)
    except SystemExit as e:
        return [str(e)]
    errors = []
    for where, text in setup_requirements(setup):
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate():
            continue
        name = normalize(req.name)
        if name not in pins:
            errors.append(f"{lock}: {req.name} (setup.py {where}: {text}) is missing; run `make lock`")
        elif not req.specifier.contains(Version(pins[name]), prereleases=True):
            errors.append(f"{lock}: {req.name}=={pins[name]} is outside setup.py's range {req.name}"
                          f"{req.specifier} ({where}); run `make lock` or change the range")
    return errors


def _dists() -> dict:
    """-> {normalized name: (name as the package spells it, version)} of this interpreter's environment,
    less the project itself."""
    from importlib.metadata import distributions
    out = {}
    for dist in distributions():
        name = dist.metadata["Name"]
        if name and normalize(name) != OWN:
            out[normalize(name)] = (name, dist.version)
    return out


def installed() -> dict:
    """-> {normalized name: version} of this environment, less the project itself."""
    return {k: version for k, (_, version) in _dists().items()}


def pip_check() -> list:
    """-> the lines of `pip check` in this environment (a requirement missing or at a version outside its
    range), less the known false ones."""
    import subprocess
    out = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True)
    lines = [line.strip() for line in (out.stdout + out.stderr).splitlines() if line.strip()]
    return [line for line in lines if line not in PIP_CHECK_KNOWN and not line.startswith("No broken")]


def differences(locked: dict, have: dict) -> list:
    """-> "name locked -> installed" for every package whose version differs, sorted by name."""
    out = []
    for name in sorted(set(locked) | set(have)):
        a, b = locked.get(name), have.get(name)
        if a != b:
            out.append(f"{name} {a or '(not locked)'} -> {b or '(not installed)'}")
    return out


def freeze() -> str:
    """This environment as lock lines, with the names as the packages spell them."""
    return "".join(f"{name}=={version}\n" for _, (name, version) in sorted(_dists().items()))


def main(argv) -> int:
    cmd, *args = argv
    if cmd == "check":
        errors = check(*args)
        for e in errors:
            print(e, file=sys.stderr)
        return 2 if errors else 0
    if cmd == "platform":
        line = platform_mismatch(args[0], *here())
        if line:
            print(f"make install: {line}", file=sys.stderr)
            return 2
        return 0
    if cmd == "extra":
        locked = read_lock(args[0])
        print(" ".join(name for name in sorted(installed()) if name not in locked))
        return 0
    if cmd == "verify":
        diff = differences(read_lock(args[0]), installed())
        if diff:
            print(f"make install: the venv differs from {args[0]}: " + ", ".join(diff), file=sys.stderr)
            return 2
        problems = pip_check()
        if problems:
            print(f"make install: `pip check` in the venv: {'; '.join(problems)} ({args[0]} is incomplete or "
                  "inconsistent: run `make test-latest`, then `make lock`)", file=sys.stderr)
            return 2
        return 0
    if cmd == "diff":
        diff = differences(read_lock(args[0]) if os.path.isfile(args[0]) else {}, installed())
        print(f"{len(diff)} packages differ from {args[0]} (locked -> newest allowed by setup.py):")
        for line in diff:
            print(f"  {line}")
        return 0
    if cmd == "write":
        with open(args[0], "w") as f:
            f.write(header(*here()) + freeze())
        print(f"wrote {args[0]} ({len(installed())} packages)")
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
