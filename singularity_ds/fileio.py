"""Files written whole or not at all: a temporary name, then an atomic rename; file checksums."""
import hashlib
import json
import os
from typing import Optional


def atomic_write(path: str, text: str) -> str:
    tmp = path + ".part"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)
    return path


def write_json(obj, path: str, indent: Optional[int] = 1) -> str:
    """``indent=None``: one line (compact)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    return atomic_write(path, json.dumps(obj, indent=indent))


def sha256(path: str, chunk: int = 1 << 22) -> str:
    """The file's SHA-256 (hex), read in 4 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
