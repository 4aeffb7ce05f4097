"""``singularity-ds export CHECKPOINT --hf OUT``: a model folder to publish (e.g. on the Hugging Face Hub).

CHECKPOINT is a run folder (its ``export/``), an export folder, or an original ``.pth``. OUT gets:

- ``model.safetensors`` + ``config.json``: the whole model, loadable with ``load_model(OUT)`` (the export
  format: :func:`.models.weights.export`, architectures inlined);
- ``vision_encoder/``: the vision tower as a transformers BEiT / ViT folder (``BeitModel.from_pretrained``
  gives the tower's tokens and pooled output); for BEiT also ``vision_layernorm.safetensors``, the
  LayerNorm the model applies to those tokens (the card says how); a timm tower in timm's own Hub layout
  (``timm.create_model("local-dir:...", pretrained=True)``, or ``timm_model=`` that folder in a new run);
- ``text_encoder/``: the text-only BERT layers ``[0, fusion_layer)`` as a transformers ``BertModel`` folder
  with the tokenizer the model was trained with (the fusion layers need cross-attention inside an
  encoder, which transformers' BERT does not offer: they stay in the whole-model folder only);
- ``README.md``: a model card (task, architecture, the run's metrics when its folder has them, how to
  load), and the source checkpoint's sha256.
"""
import glob
import json
import os

from .engine.manifest import sha256
from .errors import CheckpointError
from .fileio import atomic_write, write_json

METRIC_FILES = ("eval_final.json", "eval.json")  # train_ret's last evaluation; `eval`'s output
VISION_LAYERNORM = "vision_layernorm.safetensors"


def checkpoint_source(checkpoint: str):
    """-> (what load_model reads, the run folder whose metrics / config describe it, or None)."""
    if os.path.isdir(checkpoint) and os.path.isfile(os.path.join(checkpoint, "export", "config.json")):
        return os.path.join(checkpoint, "export"), checkpoint  # a run folder
    if os.path.isdir(checkpoint):
        parent = os.path.dirname(os.path.abspath(checkpoint))
        return checkpoint, parent if os.path.isfile(os.path.join(parent, "config.yaml")) else None
    if os.path.isfile(checkpoint):
        return checkpoint, os.path.dirname(os.path.abspath(checkpoint))
    raise CheckpointError(f"{checkpoint}: no such checkpoint (a run folder, an export folder or a .pth file)")


def run_metrics(run_dir: str):
    """(file name, {split: {"itm": {...}, "itc": {...}}}) of the run's last retrieval evaluation, or None."""
    if not run_dir:
        return None
    candidates = [os.path.join(run_dir, n) for n in METRIC_FILES]
    def epoch(path):
        n = os.path.basename(path)[len("eval_"):-len(".json")]
        return int(n) if n.isdigit() else -1

    epochs = sorted(glob.glob(os.path.join(run_dir, "eval_*.json")), key=epoch)
    for path in candidates + epochs[::-1]:
        try:
            with open(path) as f:
                res = json.load(f)
        except (OSError, ValueError):
            continue
        res = {split: r for split, r in res.items() if isinstance(r, dict) and "itm" in r and "itc" in r}
        if res:
            return os.path.basename(path), res
    return None


def export_towers(model, out: str) -> dict:
    """``vision_encoder/`` and ``text_encoder/`` transformers folders (see the module doc) -> their paths."""
    from safetensors.torch import save_file

    from .data.text import build_tokenizer
    from .models.arch import bert_config, vision_config

    def save(prefix, keep, config, folder):
        os.makedirs(folder, exist_ok=True)
        state = {k[len(prefix):]: v.detach().float().contiguous().cpu()
                 for k, v in model.state_dict().items() if k.startswith(prefix) and keep(k[len(prefix):])}
        save_file(state, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
        config.save_pretrained(folder)
        return folder

    cfg = model.config
    if model.vit_type == "timm":  # timm's own Hub layout: timm.create_model("local-dir:...") rebuilds it
        from timm.models import save_for_hf
        folder = os.path.join(out, "vision_encoder")
        save_for_hf(model.vision_encoder.model, folder, safe_serialization=True)
        towers = dict(vision_encoder=folder)
    else:
        towers = dict(vision_encoder=save("vision_encoder.", lambda k: True, vision_config(cfg),
                                          os.path.join(out, "vision_encoder")))
    if model.vision_layernorm is not None:  # BEiT: the LayerNorm the model puts on the tower's tokens
        norm = {k: v.detach().float().contiguous().cpu()
                for k, v in model.vision_layernorm.state_dict().items()}
        save_file(norm, os.path.join(towers["vision_encoder"], VISION_LAYERNORM), metadata={"format": "pt"})
    bert = bert_config(cfg)
    if bert.fusion_layer > 0:
        text = bert.to_dict()
        text.update(num_hidden_layers=bert.fusion_layer)
        for k in ("fusion_layer", "encoder_width"):
            text.pop(k, None)
        text_cfg = type(bert)(**{k: v for k, v in text.items() if k not in ("transformers_version",)})
        text_cfg.architectures = ["BertModel"]
        def text_only(key):  # embeddings and the layers below the first fusion layer
            return not key.startswith("encoder.layer.") or int(key.split(".")[2]) < bert.fusion_layer

        towers["text_encoder"] = save("text_encoder.bert.", text_only, text_cfg,
                                      os.path.join(out, "text_encoder"))
        try:
            tok = build_tokenizer(cfg.text_encoder)
        except ValueError:  # a tokenizer neither shipped nor local: the card names text_encoder
            tok = None
        if tok is not None and len(tok) <= bert.vocab_size:  # not one whose ids the embeddings lack
            tok.save_pretrained(towers["text_encoder"])
    return towers


def _metrics_table(metrics) -> list:
    if metrics is None:
        return ["No evaluation results were found next to the checkpoint (`eval_final.json` / `eval.json` "
                "of its run folder)."]
    source, res = metrics
    lines = [f"Retrieval recall (%) from the run's `{source}` (t2v: text-to-video, v2t: video-to-text; ITM: "
             "re-ranked, ITC: contrastive only):", "",
             "| split | scoring | t2v R@1 | t2v R@5 | t2v R@10 | v2t R@1 | v2t R@5 | v2t R@10 |",
             "|---|---|---|---|---|---|---|---|"]
    for split, r in res.items():
        for kind in ("itm", "itc"):
            m = r[kind]
            cells = [m[f"{d}_r{k}"] for d in ("img", "txt") for k in (1, 5, 10)]
            lines.append(f"| {split} | {kind.upper()} | " + " | ".join(f"{c:.2f}" for c in cells) + " |")
    return lines


def model_card(cfg, source: str, digest: str, metrics, towers: dict) -> str:
    timm_tower = cfg.vit_type == "timm"
    vision = (f"timm {cfg.timm_config_dict['architecture']}" if timm_tower
              else cfg.vit_type.upper() if cfg.vit_type != "beit" else "BEiT")
    vision_name = cfg.timm_model if timm_tower else cfg.vit_name_or_pretrained_path
    frames, test_frames = cfg.video_input.num_frames, cfg.video_input.num_frames_test
    temporal = (f"a {cfg.temporal_vision_encoder.num_layers}-layer temporal encoder"
                if cfg.temporal_vision_encoder.enable else "no temporal encoder")
    lines = [
        "---", "library_name: singularity-ds", "tags:",
        "- video-text-retrieval", "- singularity", "---", "",
        f"# Singularity ({cfg.task or 'retrieval'})", "",
        "A Singularity video-language model (Lei et al., *Revealing Single Frame Bias for Video-and-Language "
        "Learning*, ACL 2023): trained on few frames, evaluated on several. It scores text-video pairs "
        "with contrastive embeddings (ITC) and re-ranks the best candidates with a fusion encoder (ITM).", "",
        "## Model", "",
        f"- task: `{cfg.task}`; vision tower {vision} (`{vision_name}`) at "
        f"{cfg.image_res} px, {frames} training frame(s), {test_frames} at evaluation, {temporal}"
        f"{', temporal embeddings' if cfg.add_temporal_embed else ''}",
        f"- text tower: BERT (`{cfg.text_encoder}`), fusion (cross-attention) from layer "
        f"{model_fusion_layer(cfg)}; ITC embedding width {cfg.embed_dim}",
        f"- converted from `{os.path.basename(os.path.abspath(source))}` (sha256 `{digest}`)", "",
        "## Results", "", *_metrics_table(metrics), "",
        "## How to load", "",
        "```python",
        "from singularity_ds.models import load_model",
        "from singularity_ds.eval import evaluate_tensors",
        "model = load_model(\"PATH\")                      # this folder; the config is inside",
        "res = evaluate_tensors(model, videos, input_ids, attention_mask)   # videos (N, T, 3, H, W)",
        "```", "",
        "or from the command line: `singularity-ds eval ret CONFIG PATH`. The towers alone load with "
        f"{'timm and ' if timm_tower else ''}transformers:", "",
        "```python",
        "from transformers import AutoModel, AutoTokenizer",
    ]
    if timm_tower:
        lines += ["import timm",
                  "vision = timm.create_model(\"local-dir:PATH/vision_encoder\", pretrained=True)  # tokens: "
                  "vision.forward_features(x); pooled: vision.forward_head(tokens, pre_logits=True)"]
    else:
        lines += ["vision = AutoModel.from_pretrained(\"PATH/vision_encoder\")   # tokens and pooled output "
                  "per frame"]
    if "text_encoder" in towers:
        lines += ["text = AutoModel.from_pretrained(\"PATH/text_encoder\", add_pooling_layer=False)  "
                  "# the text-only layers",
                  "tok = AutoTokenizer.from_pretrained(\"PATH/text_encoder\")"]
    lines += ["```", ""]
    if cfg.vit_type == "beit":
        lines += ["The vision tower's `last_hidden_state` is its last layer *before* the LayerNorm the model "
                  "puts on the frame tokens (`vision_layernorm`, eps 1e-12, weights in "
                  f"`vision_encoder/{VISION_LAYERNORM}`): the tokens the fusion layers and ITM read are "
                  "`torch.nn.functional.layer_norm(last_hidden_state, (width,), weight, bias, 1e-12)`. "
                  "`pooler_output` is the vector the ITC projection reads, as it is.", ""]
    if "text_encoder" in towers:
        lines += ["The model was trained on `[CLS] text` without the trailing `[SEP]` transformers' BERT "
                  "tokenizer adds: drop it, or tokenise with `singularity_ds.data.build_tokenizer"
                  "(\"PATH/text_encoder\")`.", ""]
    lines += ["The ITC / ITM heads and the fusion layers need the whole model (`load_model`).", ""]
    return "\n".join(lines)


def model_fusion_layer(cfg) -> int:
    from .models.arch import bert_config
    return bert_config(cfg).fusion_layer


def export_hf(checkpoint: str, out: str) -> str:
    """Write the folder described in the module doc -> its path."""
    from .models import load_model
    from .models.weights import export

    source, run_dir = checkpoint_source(checkpoint)
    if os.path.isdir(out) and os.listdir(out):
        raise CheckpointError(f"{out}: exists and is not empty; export into a new folder")
    model = load_model(source)
    export(model, out)
    towers = export_towers(model, out)
    digest = sha256(os.path.join(source, "model.safetensors") if os.path.isdir(source) else source)
    metrics = run_metrics(run_dir)
    card = model_card(model.config, checkpoint, digest, metrics, towers)
    atomic_write(os.path.join(out, "README.md"), card)
    if metrics is not None:
        write_json(metrics[1], os.path.join(out, "eval_results.json"))
    return out
