"""``singularity-ds export CHECKPOINT --original OUT.pth``: a model trained here, in the checkpoint layout
the original Singularity code reads (``torch.load(path)["model"]`` in its ``setup_model``), so that its
``eval_ret.sh`` / ``eval_qa.sh`` evaluate it.

The layout is the one the original's model class for the checkpoint's task has:

- pretraining (``task=pretrain``, or a model with the MLM head: ``model_pretrain.Singularity``):
  ``text_encoder.bert.*`` and ``text_encoder.cls.*`` (``BertForMaskedLM``);
- retrieval (``model_retrieval.Singularity``, no MLM head): ``text_encoder.*`` (a ``BertModel``). Ours
  keep ``text_encoder.bert.*`` there, which the original's evaluate path (``evaluate=True``: no key
  renaming) would silently leave unloaded;
- QA (``model_qa.Singularity``): ``text_encoder.*`` for the question encoder, ``text_decoder.bert.*`` and
  ``text_decoder.cls.*`` for the answer decoder.

Every key the original's ``state_dict()`` holds is written, so its ``load_state_dict`` finds no key missing:
the buffers we do not persist (``position_ids``, ``relative_position_index``) and the MLM output layer
that the original ties to the word embeddings (``cls.predictions.decoder.weight`` / ``.bias``).
"""
import os

import torch

from .errors import CheckpointError


def original_state(model) -> dict:
    """-> the model's tensors under the original's key names for its task (see the module doc)."""
    state = dict(model.state_dict())
    state.update({k: b for k, b in model.named_buffers() if k not in state})  # non-persistent buffers
    for tower in ("text_encoder", "text_decoder"):
        head = f"{tower}.cls.predictions"
        if f"{head}.bias" in state:  # the tied output layer, as the original's state_dict lists it
            state[f"{head}.decoder.weight"] = state[f"{tower}.bert.embeddings.word_embeddings.weight"]
            state[f"{head}.decoder.bias"] = state[f"{head}.bias"]
    if "temp" in state:  # the original's is a 0-d parameter (torch.ones([]) * temp)
        state["temp"] = state["temp"].reshape(())
    if not model.has_mlm_head and model.config.get("task") != "pretrain":  # retrieval, QA: a BertModel
        bert = "text_encoder.bert."
        state = {("text_encoder." + k[len(bert):] if k.startswith(bert) else k): v
                 for k, v in state.items() if not k.startswith("text_encoder.cls.")}
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def export_original(checkpoint: str, out: str) -> str:
    """CHECKPOINT (a run folder, an export folder or a .pth) -> ``out``: ``{"model": ..., "config": ...}``
    as the original saves it (the config as a plain dict)."""
    from .hf_export import checkpoint_source
    from .models import load_model
    from .models.weights import plain_config
    if not out.endswith((".pth", ".pt")):
        raise CheckpointError(f"--original {out}: name the file to write, ending in .pth")
    if os.path.exists(out):
        raise CheckpointError(f"{out}: exists; export to a new file")
    source, _ = checkpoint_source(checkpoint)
    model = load_model(source)
    if model.vit_type == "timm":
        arch = model.vision_encoder.tower.architecture
        raise CheckpointError(f"{checkpoint}: its vision tower is timm's {arch}; "
                              f"the original code builds BEiT towers only, so it cannot load this model: use "
                              f"export --hf (timm's layout for the tower) instead")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    torch.save({"model": original_state(model), "config": plain_config(model.config)}, out + ".part")
    os.replace(out + ".part", out)
    return out
