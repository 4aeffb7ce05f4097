"""What a fresh machine gets: nothing at the repo root shadows an installed module, commands started from
the root work, and the lock check (``.ci/lockfile.py``) finds what disagrees with setup.py. ``make lint`` runs
that check on the repo's own lock; no test here does, because ``make test-latest`` runs these tests in a venv
whose set differs from the lock on purpose."""
import importlib.metadata
import importlib.util
import json
import subprocess
import sys

import pytest

from conftest import REPO

spec = importlib.util.spec_from_file_location("lockfile", REPO / ".ci" / "lockfile.py")
lockfile = importlib.util.module_from_spec(spec)
spec.loader.exec_module(lockfile)

# Run in a child started in the repo root, as `python -m singularity_ds` and `python -m pytest` are: its
# sys.path[0] is the root. -> the top-level names there that `import NAME` would take from the root
# (modules and regular packages; a folder without __init__.py is a namespace portion, which an installed
# module or package of the same name wins over), each with the distributions that install that name.
PROBE = """
import importlib.metadata, json, os
installed = importlib.metadata.packages_distributions()
own = {"singularity_ds"}
names = {}
for entry in sorted(os.listdir(".")):
    if entry.endswith(".py"):
        name = entry[:-3]
    elif os.path.isfile(os.path.join(entry, "__init__.py")):
        name = entry
    else:
        continue
    if name.isidentifier() and name not in own and name in installed:
        names[name] = sorted(set(installed[name]))
print(json.dumps(names))
"""


def root_collisions():
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def test_nothing_at_the_root_shadows_an_installed_module():
    assert root_collisions() == {}, ("these top-level entries of the repo shadow installed modules "
                                     "for anything started in the root (make them non-packages)")


def test_import_kernels_from_the_root_gets_the_installed_package():
    """transformers 5.25 imports Hugging Face's `kernels`: started in the root, `import kernels` must find
    that package where it is installed, never the design's top-level kernels/ folder, while
    singularity_ds.kernels stays the one implementation (the folder holds links to its files)."""
    code = "import importlib.util; s = importlib.util.find_spec('kernels'); print(s and s.origin)"
    origin = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                            check=True).stdout.strip()
    if "kernels" in importlib.metadata.packages_distributions():
        assert origin.endswith("__init__.py") and not origin.startswith(str(REPO / "kernels")), origin
    else:  # nothing installed under that name: the folder is a namespace portion, with no code run
        assert origin in ("None", ""), origin
    ours = REPO / "singularity_ds" / "kernels" / "attention.py"
    assert (REPO / "kernels" / "attention.py").resolve() == ours


def test_python_m_train_from_the_root(corpus, tmp_path):
    """One optimizer step of `python -m singularity_ds train` started in the repo root: the form the demo's
    stages, `deepspeed --module singularity_ds` and pytest share (the root is on sys.path)."""
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "singularity_ds", "train", "pretrain", "tiny",
         str(corpus / "configs" / "pretrain.yaml"), "image_res=32", "batch_size.video=4",
         "batch_size.image=4", "num_workers=0", "max_steps=1", "log_freq=1", f"output_dir={out}"],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert (out / "train.log").is_file()


# --- the lock and setup.py ------------------------------------------------------------------------------

SETUP = '''
from setuptools import setup
setup(name="x", install_requires=["torch==2.14.1", "numpy>=2", "pyyaml>=6"],
      extras_require={"dev": ["pytest>=8"],
                      "gpu": ["nvidia-dali-cuda130>=2.0; platform_machine == 'x86_64'"]})
'''


def write(tmp_path, setup=SETUP, lock="torch==2.14.1\nnumpy==2.4.6\nPyYAML==6.0.4\npytest==9.2.0\n"
          "nvidia-dali-cuda130==2.4.0\n"):
    (tmp_path / "setup.py").write_text(setup)
    (tmp_path / "requirements.lock").write_text(lockfile.header("cp311", "linux_x86_64") + lock)
    return tmp_path / "setup.py", tmp_path / "requirements.lock"


def test_lock_check_names_what_disagrees(tmp_path):
    setup, lock = write(tmp_path)
    assert lockfile.check(setup, lock) == []
    # a locked version outside its range, a requirement missing from the lock (extras count)
    setup, lock = write(tmp_path, lock="torch==2.14.0\nnumpy==2.4.6\nPyYAML==6.0.4\n"
                                       "nvidia-dali-cuda130==2.4.0\n")
    assert lockfile.check(setup, lock) == [
        f"{lock}: torch==2.14.0 is outside setup.py's range torch==2.14.1 (install_requires); "
        "run `make lock` or change the range",
        f"{lock}: pytest (setup.py extras_require['dev']: pytest>=8) is missing; run `make lock`",
    ]
    # names compare normalised (PyYAML / pyyaml, typing_extensions / typing-extensions)
    setup, lock = write(tmp_path, lock="torch==2.14.1\nnumpy==2.4.6\npyyaml==6.0.4\npytest==9.2.0\n"
                                       "nvidia_dali_cuda130==2.4.0\n")
    assert lockfile.check(setup, lock) == []
    # a lock line that is not an exact pin
    setup, lock = write(tmp_path, lock="torch==2.14.1\nnumpy>=2\npyyaml==6.0.4\npytest==9.2.0\n"
                                       "nvidia-dali-cuda130==2.4.0\n")
    n = lock.read_text().splitlines().index("numpy>=2") + 1
    assert lockfile.check(setup, lock) == [f"{lock}:{n}: 'numpy>=2' is not an exact pin NAME==VERSION; "
                                           "run `make lock`"]


def test_venv_differences_from_the_lock(tmp_path):
    _, lock = write(tmp_path)
    installed = {"torch": "2.14.1", "numpy": "2.5.0", "pyyaml": "6.0.4", "pytest": "9.2.0", "rich": "15.0.0"}
    assert lockfile.differences(lockfile.read_lock(lock), installed) == [
        "numpy 2.4.6 -> 2.5.0", "nvidia-dali-cuda130 2.4.0 -> (not installed)", "rich (not locked) -> 15.0.0"]


def test_lock_platform_is_checked(tmp_path):
    _, lock = write(tmp_path)
    assert lockfile.platform_mismatch(lock, "cp311", "linux_x86_64") is None
    assert lockfile.platform_mismatch(lock, "cp312", "linux_x86_64") == (
        f"{lock} was made for cp311 on linux_x86_64, this Python is cp312 on linux_x86_64: install with "
        "PYTHON=python3.11 make install, or make a lock for this machine (make test-latest, then make lock)")


@pytest.mark.parametrize("name", ["kernels", "ds_configs"])
def test_design_folders_at_the_root_are_not_packages(name):
    """The design's top-level folders hold links into the package, never an __init__.py (which would make
    them importable under their name from the root, as kernels/ was: transformers 5.25's `kernels`)."""
    folder = REPO / name
    assert folder.is_dir() and not folder.is_symlink()
    assert not (folder / "__init__.py").exists()
    assert sorted(p.name for p in folder.iterdir() if p.is_symlink())


def test_pip_check_names_a_broken_requirement(tmp_path, monkeypatch):
    """`make install`'s venv check: a package whose requirement is not installed is named (here a fake
    distribution put on the path); decord's false platform line is not."""
    dist = tmp_path / "fake_pkg-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: fake-pkg\nVersion: 1.0\n"
                                   "Requires-Dist: no-such-package>=1\n")
    (dist / "RECORD").write_text("")
    assert lockfile.pip_check() == []
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    assert lockfile.pip_check() == ["fake-pkg 1.0 requires no-such-package, which is not installed."]
