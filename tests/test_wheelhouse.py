"""`make wheelhouse`: an offline install for nodes without the package index. The locked wheels for a
target Python and platform, optionally split into parts of a given size, joined and checked on the node,
installed with no index."""
import hashlib
import os
import subprocess
import sys

import pytest

from singularity_ds import wheelhouse
from singularity_ds.wheelhouse import WheelhouseError

KIB = 1024


def _digest(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def _files(tmp_path):
    """Three files standing in for wheels: 700 KiB (over a 256 KiB part: 3 pieces), 100 KiB, 20 KiB."""
    src = tmp_path / "all"
    src.mkdir()
    paths = []
    for name, size in [("big-1.0-py3-none-any.whl", 700 * KIB), ("mid-1.0-py3-none-any.whl", 100 * KIB),
                       ("small-1.0-py3-none-any.whl", 20 * KIB)]:
        (src / name).write_bytes(os.urandom(size))
        paths.append(str(src / name))
    return paths


def test_split_wheels_are_joined_with_their_checksums(tmp_path):
    big, mid, small = _files(tmp_path)
    manifest = wheelhouse.pack([big, mid, small], str(tmp_path / "wh"), 256 * KIB)
    assert [p["size"] for p in manifest["wheels"]["big-1.0-py3-none-any.whl"]["pieces"]] == [
        256 * KIB, 256 * KIB, 188 * KIB]
    parts = sorted(os.listdir(tmp_path / "wh"))
    assert parts == ["part1", "part2", "part3", "part4"]  # 256 | 256 | 188 + 20 | 100 (first fit)
    for part in parts:  # each folder within the size (the manifest beside)
        files = [f for f in os.listdir(tmp_path / "wh" / part) if f != wheelhouse.MANIFEST]
        assert sum(os.path.getsize(tmp_path / "wh" / part / f) for f in files) <= 256 * KIB
    out = wheelhouse.assemble([str(tmp_path / "wh" / p) for p in parts], str(tmp_path / "joined"))
    assert sorted(map(os.path.basename, out)) == sorted(map(os.path.basename, [big, mid, small]))
    for original in (big, mid, small):
        assert _digest(tmp_path / "joined" / os.path.basename(original)) == _digest(original)


def test_a_missing_or_damaged_piece_is_one_error_naming_it(tmp_path):
    big, mid, small = _files(tmp_path)
    manifest = wheelhouse.pack([big, mid, small], str(tmp_path / "wh"), 256 * KIB)
    missing = next(p for p in manifest["wheels"]["big-1.0-py3-none-any.whl"]["pieces"] if p["part"] == 2)
    dirs = [str(tmp_path / "wh" / p) for p in ("part1", "part3", "part4")]  # part2 was not copied
    with pytest.raises(WheelhouseError, match=rf"big-1.0-py3-none-any.whl: 1 of 3 pieces missing "
                                              rf"\({missing['file']} from part2\); pass every part folder"):
        wheelhouse.assemble(dirs, str(tmp_path / "joined"))
    dirs = [str(tmp_path / "wh" / p) for p in ("part1", "part2", "part3", "part4")]
    piece = tmp_path / "wh" / "part2" / missing["file"]
    data = bytearray(piece.read_bytes())
    data[1000] ^= 0xFF  # one flipped byte on the way
    piece.write_bytes(bytes(data))
    with pytest.raises(WheelhouseError, match=rf"{piece}: damaged .*; copy that part again"):
        wheelhouse.assemble(dirs, str(tmp_path / "joined"))


def _tiny_project(root, name):
    (root / name).mkdir(parents=True)
    (root / name / name).mkdir()
    (root / name / name / "__init__.py").write_text("VALUE = 42\n")
    (root / name / "setup.py").write_text(f"from setuptools import setup\nsetup(name='{name}', "
                                          f"version='1.0', packages=['{name}'])\n")
    return root / name


@pytest.mark.slow
def test_build_from_a_lock_then_install_on_a_node_with_no_index(tmp_path):
    """A lock of two packages from a local mirror (--find-links --no-index: no traffic), split into parts,
    then the copied wheelhouse.py installs them into a folder with no index at all."""
    mirror = tmp_path / "mirror"
    for name in ("alpha_pkg", "beta_pkg"):
        subprocess.run([sys.executable, "-m", "pip", "-q", "wheel", "--no-deps", "--no-build-isolation", "-w",
                        str(mirror), str(_tiny_project(tmp_path / "src", name))], check=True)
    lock = tmp_path / "requirements.lock"
    lock.write_text("# made by hand for the test\nalpha-pkg==1.0\nbeta-pkg==1.0\n")
    out = tmp_path / "wh"
    rc = wheelhouse.main(["build", str(out), "--lock", str(lock), "--find-links", str(mirror), "--no-index",
                          "--no-own", "--part-size", "1KB"])
    assert rc == 0
    parts = sorted(os.listdir(out))
    assert len(parts) >= 2 and all(p.startswith("part") for p in parts)
    assert (out / "part1" / "requirements.txt").read_text() == "alpha-pkg==1.0\nbeta-pkg==1.0\n"
    # on the node: the copied script, standard library only, no index
    target = tmp_path / "site"
    got = subprocess.run([sys.executable, str(out / "part1" / "wheelhouse.py"), "install",
                          *[str(out / p) for p in parts], "--target", str(target)],
                         capture_output=True, text=True, cwd=tmp_path)
    assert got.returncode == 0, got.stderr
    assert got.stdout.strip() == f"installed 2 wheels into {target}"
    check = subprocess.run([sys.executable, "-c", "import alpha_pkg, beta_pkg; print(alpha_pkg.VALUE)"],
                           env={**os.environ, "PYTHONPATH": str(target)}, capture_output=True, text=True)
    assert check.stdout.strip() == "42"


def test_bad_input_is_one_line(tmp_path, capsys):
    assert wheelhouse.main(["build", str(tmp_path / "o"), "--lock", str(tmp_path / "none.lock")]) == 2
    assert capsys.readouterr().err.strip() == (f"wheelhouse: error: {tmp_path / 'none.lock'}: no such lock "
                                               "file (make lock writes it)")
    lock = tmp_path / "r.lock"
    lock.write_text("alpha==1.0\n")
    assert wheelhouse.main(["build", str(tmp_path / "o"), "--lock", str(lock), "--only", "gamma"]) == 2
    assert capsys.readouterr().err.strip().startswith("wheelhouse: error: gamma: not in the lock")
    assert wheelhouse.main(["install", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == (f"wheelhouse: error: no wheels.json in {tmp_path}: pass "
                                               "the wheelhouse folder (or its parts) that `wheelhouse build` "
                                               "wrote")
    with pytest.raises(WheelhouseError, match="--part-size '2 parsecs'"):
        wheelhouse.parse_size("2 parsecs")
