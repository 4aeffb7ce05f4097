"""``singularity-ds export CHECKPOINT --hf OUT``: the folder loads back with identical outputs, its towers
load with transformers, and the model card carries the run's metrics."""
import json

import pytest
import torch
from transformers import AutoTokenizer, BeitModel, BertModel

from conftest import tiny_config
from singularity_ds.cli import main
from singularity_ds.data import build_tokenizer, tokenize
from singularity_ds.models import Singularity, load_model
from singularity_ds.models.weights import export


def outputs(model, video, ids, mask):
    with torch.no_grad():
        tokens, pooled = model.encode_image(video)
        text, text_pooled = model.encode_text(ids, mask)
        itm = model.itm_logits(text, mask, tokens)
        return [tokens, pooled, text, text_pooled, itm, model.project_image(pooled),
                model.project_text(text_pooled)]


def test_export_hf_round_trips_from_a_run_folder(tmp_path, capsys):
    torch.manual_seed(0)
    run = tmp_path / "run"
    model = Singularity(tiny_config(image_res=32, task="train_ret", **{"loss_weight.mlm": 0})).eval()
    with torch.no_grad():  # away from the init, so that a wrongly loaded tensor shows
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    export(model, str(run / "export"))
    (run / "config.yaml").write_text("task: train_ret\n")
    keys = [(d, k) for d in ("img", "txt") for k in (1, 5, 10)]
    metrics = {"motion": {"itm": {f"{d}_r{k}": 10.0 * k + (d == "txt") for d, k in keys},
                          "itc": {f"{d}_r{k}": 5.0 * k for d, k in keys}}}
    (run / "eval_final.json").write_text(json.dumps(metrics))
    out = tmp_path / "hf"
    assert main(["export", str(run), "--hf", str(out)]) == 0

    tok = build_tokenizer()
    ids, mask = tokenize(tok, ["a red square moves from left to right", "a blue circle"], 16)
    video = torch.randn(2, 1, 3, 32, 32)
    again = load_model(str(out))
    for a, b in zip(outputs(model, video, ids, mask), outputs(again, video, ids, mask)):
        assert torch.equal(a, b)
    # the towers with transformers: the vision tower's tokens / pooled output, the text-only layers
    beit = BeitModel.from_pretrained(out / "vision_encoder").eval()
    frames = video[:, 0]
    with torch.no_grad():
        ours_tokens, ours_pooled = model.vision_encoder(frames)
        ref = beit(pixel_values=frames)
    assert torch.allclose(ours_tokens, ref.last_hidden_state, atol=1e-5)
    assert torch.allclose(ours_pooled, ref.pooler_output, atol=1e-5)
    # the tokens the model uses: the card's layer_norm over last_hidden_state, weights from the folder
    from safetensors.torch import load_file
    ln = load_file(out / "vision_encoder" / "vision_layernorm.safetensors")
    with torch.no_grad():
        used = model.encode_frames(video)[0][:, 0]
    normed = torch.nn.functional.layer_norm(ref.last_hidden_state, (ln["weight"].shape[0],), ln["weight"],
                                            ln["bias"], 1e-12)
    assert torch.allclose(used, normed, atol=1e-5)
    assert "torch.nn.functional.layer_norm(last_hidden_state, (width,), weight, bias, 1e-12)" in (
        out / "README.md").read_text()
    bert = BertModel.from_pretrained(out / "text_encoder", add_pooling_layer=False).eval()
    assert bert.config.num_hidden_layers == model.text_encoder.config.fusion_layer == 2
    hf_ids = AutoTokenizer.from_pretrained(out / "text_encoder")(["a blue circle"]).input_ids[0]
    assert hf_ids == [i for i in ids[1].tolist() if i] + [102]  # transformers' BERT adds [SEP] (card says)
    ours_tok = build_tokenizer(str(out / "text_encoder"))
    assert torch.equal(tokenize(ours_tok, ["a blue circle"], 16)[0], ids[1:])
    with torch.no_grad():
        ours = model.encode_text(ids, mask)[0]
        ref = bert(input_ids=ids, attention_mask=mask).last_hidden_state
    real = mask.bool()
    assert torch.allclose(ours[real], ref[real], atol=1e-5)
    # the model card: task, how to load, the run's metrics
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: singularity-ds\n") and "# Singularity (train_ret)" in card
    assert "| motion | ITM | 10.00 | 50.00 | 100.00 | 11.00 | 51.00 | 101.00 |" in card
    assert "| motion | ITC | 5.00 | 25.00 | 50.00 | 5.00 | 25.00 | 50.00 |" in card
    assert 'model = load_model("PATH")' in card
    assert json.loads((out / "eval_results.json").read_text()) == metrics
    # a folder that holds something already is refused, nothing in it touched
    capsys.readouterr()
    assert main(["export", str(run), "--hf", str(out)]) == 2
    assert f"{out}: exists and is not empty" in capsys.readouterr().err


def test_export_hf_of_an_original_checkpoint(tiny_ref, tmp_path):
    pth = tiny_ref["path"] / "checkpoint.pth"
    out = tmp_path / "hf"
    assert main(["export", str(pth), "--hf", str(out)]) == 0
    inp = tiny_ref["inputs"]
    original, again = load_model(str(pth)), load_model(str(out))
    for a, b in zip(outputs(original, inp["video"], inp["input_ids"], inp["attention_mask"]),
                    outputs(again, inp["video"], inp["input_ids"], inp["attention_mask"])):
        assert torch.equal(a, b)
    card = (out / "README.md").read_text()
    assert "4 training frame(s)" in card and "a 1-layer temporal encoder" in card
    assert "No evaluation results were found" in card
    # the fixture's text_encoder names bert-base-uncased (30522 ids) but its embeddings hold 512: no tokenizer
    assert sorted(p.name for p in (out / "text_encoder").iterdir()) == ["config.json", "model.safetensors"]


def reference_state(path):
    from singularity_ds.models.weights import safe_load
    return safe_load(str(path / "checkpoint.pth"))["model"]


@pytest.mark.parametrize("fixture", ["singularity_tiny", "singularity_tiny_qa"])
def test_export_original_is_the_original_codes_own_layout(fixture, tmp_path, capsys):
    """The references were saved by the original code (A: its pretraining model, B: its QA model): our
    `export --original` of the model loaded from each gives back exactly its keys, shapes and values
    (the buffers and the tied MLM output layer included), so the original's load_state_dict finds what
    it saved."""
    from conftest import reference
    ref = reference(fixture)
    out = tmp_path / "model.pth"
    assert main(["export", str(ref / "checkpoint.pth"), "--original", str(out)]) == 0
    ours, theirs = torch.load(out, weights_only=True)["model"], reference_state(ref)
    assert sorted(ours) == sorted(theirs)
    for k, v in theirs.items():
        assert ours[k].shape == v.shape and torch.equal(ours[k].to(v.dtype), v), k
    assert main(["export", str(ref / "checkpoint.pth"), "--original", str(out)]) == 2  # never overwritten
    assert f"{out}: exists" in capsys.readouterr().err


def test_export_original_of_a_retrieval_model_uses_the_bertmodel_layout(tmp_path):
    """A retrieval model (no MLM head): `text_encoder.*` as the original's model_retrieval (a BertModel),
    no `text_encoder.bert.*` (which the original's evaluate path would leave unloaded, silently) and no MLM
    head; loaded back here, the same outputs."""
    torch.manual_seed(0)
    model = Singularity(tiny_config(image_res=32, task="train_ret", **{"loss_weight.mlm": 0})).eval()
    assert not model.has_mlm_head
    export(model, str(tmp_path / "export"))
    out = tmp_path / "ret.pth"
    assert main(["export", str(tmp_path / "export"), "--original", str(out)]) == 0
    keys = set(torch.load(out, weights_only=True)["model"])
    own = {("text_encoder." + k[len("text_encoder.bert."):] if k.startswith("text_encoder.bert.") else k)
           for k in list(model.state_dict()) + [n for n, _ in model.named_buffers()]}
    assert keys == own and not [k for k in keys if k.startswith(("text_encoder.bert.", "text_encoder.cls."))]
    assert "text_encoder.embeddings.position_ids" in keys
    tok = build_tokenizer()
    ids, mask = tokenize(tok, ["a red square moves from left to right"], 16)
    video = torch.randn(1, 1, 3, 32, 32)
    for a, b in zip(outputs(model, video, ids, mask), outputs(load_model(str(out)), video, ids, mask)):
        assert torch.equal(a, b)
