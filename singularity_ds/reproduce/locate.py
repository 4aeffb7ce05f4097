"""Where a paper row's checkpoint and data are: the released archives extracted under a checkpoints folder
(``--checkpoints``, else ``$SL_EXP_DIR/ckpts``, else ``$SL_EXP_DIR``) and the original's data layout under
``SL_DATA_DIR`` (``anno_downstream/``, ``videos_images/``). Every miss is one line saying what to fetch.
"""
import glob
import os
import re
from typing import List, Optional

from ..errors import CheckpointError, ConfigError
from ..models.weights import safe_load, temporal_layers
from ..paper import Registry, Row

TEMPORAL_NAME = re.compile(r"temporal|4frm|tlayer", re.I)
CORPUS_NAME = re.compile(r"(?<![0-9])(5|17)m(?![a-z])", re.I)


def checkpoint_roots(checkpoints: Optional[str]) -> List[str]:
    if checkpoints:
        if not os.path.isdir(checkpoints):
            raise ConfigError(f"--checkpoints {checkpoints}: no such folder")
        return [checkpoints]
    exp = os.environ.get("SL_EXP_DIR")
    if not exp:
        raise ConfigError("reproduce: where are the released checkpoints? pass --checkpoints DIR (the folder "
                          "the archives were extracted in, e.g. DIR/pt/singularity_5m.pth) or set SL_EXP_DIR "
                          "(then $SL_EXP_DIR/ckpts is searched)")
    return [d for d in (os.path.join(exp, "ckpts"), exp) if os.path.isdir(d)] or [exp]


def data_root(data: Optional[str]) -> str:
    root = data or os.environ.get("SL_DATA_DIR")
    if not root:
        raise ConfigError("reproduce: where is the downstream data? pass --data DIR or set SL_DATA_DIR (the "
                          "folder holding anno_downstream/ and videos_images/, as the original's configs)")
    if not os.path.isdir(root):
        raise ConfigError(f"{'--data' if data else 'SL_DATA_DIR'} {root}: no such folder")
    return root


def _by_name(paths: List[str], folder: str, row: Row) -> List[str]:
    """The files whose path under the archive folder says the row's variant: temporal or not, and its
    corpus (5m / 17m; the file name's mention wins over a sub-folder's)."""
    out = []
    for p in paths:
        name = os.path.relpath(p, folder)
        corpus = CORPUS_NAME.findall(os.path.basename(name)) or CORPUS_NAME.findall(name)
        if bool(TEMPORAL_NAME.search(name)) == row.temporal and corpus and f"{corpus[-1]}m" == row.corpus:
            out.append(p)
    return out


def find_checkpoint(reg: Registry, row: Row, roots: List[str]) -> str:
    """The released checkpoint of ``row`` under ``roots``."""
    archive = reg.archives[row.archive]
    tarball = os.path.basename(archive["file"])
    known = archive.get("names", {}).get(row.variant)
    for root in roots:
        if known and os.path.isfile(os.path.join(root, known)):
            return os.path.join(root, known)
        folder = os.path.join(root, row.archive)
        if not os.path.isdir(folder):
            continue
        found = sorted(glob.glob(os.path.join(folder, "**", "*.pth"), recursive=True))
        hits = _by_name(found, folder, row)
        if len(hits) == 1:
            return hits[0]
        listed = ", ".join(os.path.relpath(p, folder) for p in found) or "no .pth file"
        raise CheckpointError(
            f"{row.id}: {'several' if hits else 'none'} of the checkpoints in {folder} ({listed}) "
            f"{'are' if hits else 'is'} named as the {row.model_name} one ({row.variant}: 'temporal' or not, "
            f"'{row.corpus}'); pass --checkpoint PATH")
    for root in roots:
        for candidate in (os.path.join(root, tarball), os.path.join(root, "ckpts", tarball)):
            if os.path.isfile(candidate):
                raise CheckpointError(f"{row.id}: {candidate} is not extracted: "
                                      f"tar -xzf {candidate} -C {root}")
    raise CheckpointError(f"{row.id}: no {row.archive}/ folder in {', '.join(roots)}: download "
                          f"{reg.archive_url(row.archive)} and extract it there, or pass --checkpoint PATH")


def state_keys(path: str) -> List[str]:
    """The state-dict keys of a checkpoint file or export folder, without reading the tensors where the
    format allows (memory-mapped ``.pth``, safetensors header)."""
    if os.path.isdir(path):
        from safetensors import safe_open

        from ..models.weights import WEIGHTS_NAME
        weights = os.path.join(path, WEIGHTS_NAME)
        if not os.path.isfile(weights):
            raise CheckpointError(f"{path}: a model folder needs {WEIGHTS_NAME}")
        with safe_open(weights, "pt") as f:
            return list(f.keys())
    ckpt = safe_load(path, mmap=True)
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise CheckpointError(f"{path}: expected a dict with a 'model' state dict (the original's format)")
    return list(ckpt["model"])


def check_variant(row: Row, path: str, keys: List[str]) -> int:
    """The checkpoint is the row's model: temporal weights exactly for Singularity-temporal, the answer
    decoder exactly for QA. -> its temporal layers."""
    layers = temporal_layers(keys)
    if row.temporal and not layers:
        raise CheckpointError(f"{row.id}: {path} has no temporal_vision_encoder.* weights: it is a "
                              f"1-frame Singularity checkpoint, and the row is {row.model_name}; pass the "
                              f"temporal one")
    if layers and not row.temporal:
        raise CheckpointError(f"{row.id}: {path} has a {layers}-layer temporal encoder: it is a "
                              f"Singularity-temporal checkpoint, and the row is {row.model_name}; pass the "
                              f"1-frame one (or the row {row.group}-temporal-{row.corpus})")
    decoder = any(k.startswith("text_decoder.") for k in keys)
    if row.task == "qa" and not decoder:
        raise CheckpointError(f"{row.id}: {path} has no answer decoder (text_decoder.*): not a QA "
                              f"checkpoint; the {row.archive} archive holds the QA ones")
    if row.task != "qa" and decoder:
        raise CheckpointError(f"{row.id}: {path} is a QA checkpoint (it has text_decoder.*); the row needs "
                              f"the {row.archive} archive's")
    return layers
