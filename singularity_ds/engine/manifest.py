"""What a checkpoint folder holds: each file's size and sha256, written when the checkpoint is saved
and checked before it is resumed.

A shard cut short (a node killed while copying, a full disk, a truncated rsync) otherwise surfaces as
DeepSpeed's ``PytorchStreamReader failed reading zip archive`` without a file name; with the manifest
the damaged file is named before DeepSpeed reads anything, and ``resume=auto`` can fall back to an
older intact checkpoint. sha256 runs at ~1.5 GB/s per core (hardware SHA); the files are hashed in
parallel threads (hashlib releases the GIL), so a checkpoint costs about one extra read of its files.
"""
import json
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

from ..fileio import sha256, write_json

MANIFEST = "manifest.json"


def _files(folder: str, skip=()) -> list:
    """Regular files under ``folder`` as sorted relative paths."""
    out = []
    for root, _, names in os.walk(folder):
        for name in names:
            rel = os.path.relpath(os.path.join(root, name), folder)
            if rel not in skip:
                out.append(rel)
    return sorted(out)


def _hash_all(folder: str, names) -> list:
    with ThreadPoolExecutor(max(1, min(8, len(names)))) as pool:
        return list(pool.map(lambda n: sha256(os.path.join(folder, n)), names))


def write_manifest(folder: str, skip=()) -> dict:
    """Record every file under ``folder`` (but ``skip`` and the manifest itself) in its ``manifest.json``."""
    names = _files(folder, skip=set(skip) | {MANIFEST})
    digests = _hash_all(folder, names)
    files = {n: dict(size=os.path.getsize(os.path.join(folder, n)), sha256=d) for n, d in zip(names, digests)}
    write_json(dict(files=files), os.path.join(folder, MANIFEST))
    return files


def has_manifest(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, MANIFEST))


def check_manifest(folder: str) -> Optional[str]:
    """``None`` when every file the manifest lists is there with its size and sha256, else what is wrong,
    naming the file. Sizes are compared first (a cut-short file is found without hashing anything)."""
    path = os.path.join(folder, MANIFEST)
    try:
        with open(path) as f:
            files = json.load(f)["files"]
        items = [(n, int(e["size"]), str(e["sha256"])) for n, e in files.items()]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return f"{path} is unreadable ({type(e).__name__})"
    for name, size, _ in items:
        file = os.path.join(folder, name)
        if not os.path.isfile(file):
            return f"{file} is missing"
        actual = os.path.getsize(file)
        if actual != size:
            return f"{file} is {actual} bytes, the manifest says {size} (cut short or overwritten)"
    digests = _hash_all(folder, [n for n, _, _ in items])
    for (name, _, expected), actual in zip(items, digests):
        if actual != expected:
            return (f"{os.path.join(folder, name)}: its sha256 differs from the manifest (corrupted after it "
                    f"was saved)")
    return None
