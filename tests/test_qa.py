"""QA model against the original's outputs (../shared/reference/singularity_tiny_qa), and its init."""
import pytest
import torch

from conftest import reference
from singularity_ds.models import SingularityQA, load_model

TOL = 1e-4


@pytest.fixture(scope="module")
def qa_ref():
    path = reference("singularity_tiny_qa")
    return dict(path=path, inputs=torch.load(path / "inputs.pt", weights_only=True),
                expected=torch.load(path / "expected.pt", weights_only=True))


def qa_inputs(x):
    """Question ids and mask, answer ids and mask of the fixture's inputs."""
    return (x["question_input_ids"], x["question_attention_mask"], x["answer_input_ids"],
            x["answer_attention_mask"])


def close(a, b, name):
    assert a.shape == b.shape, (name, a.shape, b.shape)
    assert torch.allclose(a.float(), b.float(), atol=TOL, rtol=TOL), \
        (name, (a.float() - b.float()).abs().max())


def by_id(ids, values):
    """{answer index: value} per row: first-stage ties (answers 2 and 3) may come in either order."""
    return [dict(zip(r.tolist(), v.tolist())) for r, v in zip(ids, values)]


def test_qa_checkpoint_reproduces_the_original(qa_ref):
    model = load_model(str(qa_ref["path"] / "checkpoint.pth"))
    assert isinstance(model, SingularityQA) and not hasattr(model, "itm_head")
    assert model.vision_encoder.pooler is None
    x, e = qa_ref["inputs"], qa_ref["expected"]
    q_ids, q_am, a_ids, a_am = qa_inputs(x)
    b, a = q_ids.shape[0], a_ids.shape[0]
    with torch.no_grad():
        close(model.encode_frames(x["video"])[0], e["frame_embeds"], "frame_embeds")
        image_embeds = model.encode_image(x["video"])[0]
        close(image_embeds, e["image_embeds"], "image_embeds")
        states = model.encode_question(image_embeds, q_ids, q_am)
        close(states, e["question_states"], "question_states")
        close(model.text_encoder.text(q_ids, q_am), e["question_text_states"], "question_text_states")
        start = model.decoder_logits(torch.full((b, 1), 101), torch.ones(b, 1, dtype=torch.long), states,
                                     q_am)[:, 0]
        close(start, e["start_logits"], "start_logits")
        first = model.first_token_probs(states, q_am, 101).index_select(1, a_ids[:, 1])
        close(first, e["answer_first_token_probs"], "answer_first_token_probs")
        seq = torch.stack([model.answer_nll(a_ids, a_am, states[i:i + 1].expand(a, -1, -1),
                                            q_am[i:i + 1].expand(a, -1))
                           for i in range(b)])
        close(seq, e["all_answer_seq_loss"], "all_answer_seq_loss")
        close(first.log() - seq, e["all_answer_log_prob_sum"], "all_answer_log_prob_sum")
        top_ids, top_probs = model.rank_answer(states, q_am, a_ids, a_am, int(x["k_test"]))
        assert torch.equal(top_ids, e["topk_ids"])
        close(top_probs, e["topk_probs"], "topk_probs")
        assert torch.equal(top_ids[:, 0], e["pred_answer_idx"])
        ids, probs = model.predict(x["video"], q_ids, q_am, a_ids, a_am, int(x["k_test"]))
        assert torch.equal(ids, e["topk_ids"]) and torch.allclose(probs, e["topk_probs"], atol=TOL)
        # training loss: several weighted answers per question
        loss = model.qa_loss(x["video"], q_ids, q_am, x["train_answer_input_ids"],
                             x["train_answer_attention_mask"], x["train_weights"], x["train_k"])
        assert loss.item() == pytest.approx(e["train_loss"].item(), abs=TOL)
        rep = torch.as_tensor(x["train_k"])
        logits = model.decoder_logits(x["train_answer_input_ids"], x["train_answer_attention_mask"],
                                      states.repeat_interleave(rep, 0), q_am.repeat_interleave(rep, 0))
        close(logits, e["train_answer_logits"], "train_answer_logits")


@pytest.mark.parametrize("how", ["mean", "max", "lse"])
def test_qa_late_frame_ensembles_reproduce_the_original(qa_ref, how):
    model = load_model(str(qa_ref["path"] / "checkpoint.pth"), **{"video_input.num_frames": 1})
    x, e = qa_ref["inputs"], qa_ref["expected"]
    q_ids, q_am, a_ids, a_am = qa_inputs(x)
    with torch.no_grad():
        late = model.question_states(x["video"], q_ids, q_am, ensemble=how)
        close(late, e["late_question_states"], "late_question_states")
        ids, probs = model.rank_answer_ensemble(late, q_am, a_ids, a_am, int(x["k_test"]), how)
    assert torch.equal(ids, e[f"{how}_topk_ids"]) and torch.equal(ids[:, 0], e[f"{how}_pred_answer_idx"])
    close(probs, e[f"{how}_topk_probs"], f"{how}_topk_probs")


def test_batched_ranking_equals_one_answer_at_a_time(qa_ref):
    model = load_model(str(qa_ref["path"] / "checkpoint.pth"))
    x = qa_ref["inputs"]
    q_ids, q_am, a_ids, a_am = qa_inputs(x)
    with torch.no_grad():
        states = model.question_states(x["video"], q_ids, q_am)
        ids, probs = model.rank_answer(states, q_am, a_ids, a_am, 4)
        for i in range(q_ids.shape[0]):
            scores = {}
            for j in ids[i].tolist():  # each candidate decoded alone, first-token softmax from its own pass
                logits = model.decoder_logits(a_ids[j:j + 1], a_am[j:j + 1], states[i:i + 1],
                                              q_am[i:i + 1])[0]
                logp = torch.log_softmax(logits.float(), -1)
                n = int(a_am[j].sum())
                tokens = sum(logp[t, a_ids[j, t + 1]] for t in range(n - 1))
                # the first token counted twice, as the original
                scores[j] = (logp[0, a_ids[j, 1]] + tokens).item()
            ref = torch.softmax(torch.tensor([scores[j] for j in ids[i].tolist()]), 0)
            assert torch.allclose(probs[i], ref, atol=1e-5)


def test_qa_model_from_pretraining_checkpoint_maps_fusion_layers_into_the_decoder(tiny_ref):
    ckpt = torch.load(tiny_ref["path"] / "checkpoint.pth", weights_only=True)
    pre = ckpt["model"]
    fusion = ckpt["config"]["bert_config_dict"]["fusion_layer"] if "bert_config_dict" in ckpt["config"] else 2
    model = load_model(str(tiny_ref["path"] / "checkpoint.pth"), qa=True)
    assert isinstance(model, SingularityQA)
    own = model.state_dict()
    n = ckpt["config"]["bert_config_dict"]["num_hidden_layers"]
    assert len(model.text_decoder.bert.encoder.layer) == n - fusion
    for layer in range(fusion, n):  # text tower fusion layer -> decoder layer (layer - fusion)
        for name in ("attention.self.query.weight", "crossattention.self.key.weight", "output.dense.weight"):
            src = pre[f"text_encoder.bert.encoder.layer.{layer}.{name}"].float()
            assert torch.equal(own[f"text_decoder.bert.encoder.layer.{layer - fusion}.{name}"], src)
            # the encoder keeps all
            assert torch.equal(own[f"text_encoder.bert.encoder.layer.{layer}.{name}"], src)
    for name in ("embeddings.word_embeddings.weight", "embeddings.LayerNorm.bias"):
        assert torch.equal(own[f"text_decoder.bert.{name}"], pre[f"text_encoder.bert.{name}"].float())
    assert torch.equal(own["text_decoder.cls.predictions.transform.dense.weight"],
                       pre["text_encoder.cls.predictions.transform.dense.weight"].float())


def test_decoder_with_the_wrong_number_of_layers_is_a_clear_error(qa_ref, tmp_path):
    from singularity_ds.errors import CheckpointError
    ckpt = torch.load(qa_ref["path"] / "checkpoint.pth", weights_only=True)
    extra = {k.replace("encoder.layer.0.", "encoder.layer.1."): v for k, v in ckpt["model"].items()
             if k.startswith("text_decoder.bert.encoder.layer.0.")}
    torch.save({"model": {**ckpt["model"], **extra}, "config": ckpt["config"]}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError,
                       match="text_decoder: the checkpoint has 2 decoder layers, this model 1"):
        load_model(str(tmp_path / "bad.pth"))


# ---------------------------------------------------------------------- metrics
def test_vqa_accuracy_and_normalisation_by_hand():
    from singularity_ds.eval.qa import normalize_answer, vqa_accuracy
    assert normalize_answer("Two dogs!") == "2 dogs"
    assert normalize_answer("the red one.") == "red 1"
    assert normalize_answer("dont know") == "don't know"
    assert normalize_answer("1,000") == "1000"
    humans = ["yes"] * 3 + ["no"] * 7
    # each leave-one-out subset of 9: 'yes' matches 2 humans (when a 'yes' is left out) or 3 otherwise
    assert vqa_accuracy("yes", humans) == pytest.approx((3 * (2 / 3) + 7 * 1.0) / 10)
    assert vqa_accuracy("Yes.", humans) == vqa_accuracy("yes", humans)
    assert vqa_accuracy("no", humans) == 1.0
    assert vqa_accuracy("maybe", humans) == 0.0
    assert vqa_accuracy("two", ["2"] * 2 + ["3"] * 8) == pytest.approx((2 * (1 / 3) + 8 * (2 / 3)) / 10)


class _Store(list):
    pass


class _Set:
    def __init__(self, entries):
        self.store = _Store(entries)


def test_exact_match_per_type_and_questions_without_a_known_answer():
    from singularity_ds.eval.qa import score
    ds = _Set([{"question_id": 1, "answer": "red", "question_type": "color"},
               {"question_id": 2, "answer": "left", "question_type": "motion"},
               {"question_id": 3, "answer": "purple", "question_type": "color"},   # not in the answer list
               {"question_id": 4, "answer": ["yes"] * 10}])
    res = score(ds, {0: "red", 1: "right", 2: "red", 3: "yes"}, ["red", "left", "right", "yes"])
    assert res["missing_answers"] == 1 and res["questions"] == 4
    assert res["accuracy"] == 50.0 and res["per_type"] == {"color": 50.0, "motion": 0.0}
    assert res["metric"] == "vqa_accuracy"  # a list of human answers switches to the VQA rule
    assert res["predictions"][1] == {"question_id": 2, "answer": "right"}


def test_late_ensemble_needs_a_single_frame_qa_model(qa_ref):
    from singularity_ds.errors import ConfigError
    from singularity_ds.eval.qa import evaluate_qa
    model = load_model(str(qa_ref["path"] / "checkpoint.pth"))  # trained with 4 frames
    with pytest.raises(ConfigError, match=r"single-frame QA model .*num_frames == 1; this one has 4\)"):
        evaluate_qa(model, None, ["yes"], None, 12, 5, ensemble="max")


def test_eval_qa_cli_on_the_synthetic_corpus(corpus, tmp_path):
    import json

    from singularity_ds.cli import main
    from singularity_ds.config import load_config
    from singularity_ds.models.weights import plain_config
    qa_yaml = str(corpus / "configs" / "qa.yaml")
    cfg = load_config(["qa_msrvtt", "tiny", qa_yaml], ["image_res=32", "max_q_len=16", "max_a_len=6"])
    cfg.task = "train_qa"
    torch.manual_seed(0)
    model = SingularityQA(cfg)
    torch.save({"model": model.state_dict(), "config": plain_config(cfg)}, tmp_path / "qa.pth")
    out = tmp_path / "out"
    assert main(["eval", "qa", "qa_msrvtt", qa_yaml, str(tmp_path / "qa.pth"), "image_res=32", "max_q_len=16",
                 "max_a_len=6", "k_test=4", "video_input.num_frames_test=2", f"output_dir={out}"]) == 0
    res = json.loads((out / "eval_qa.json").read_text())["test"]
    predictions = json.loads((out / "qa_test.json").read_text())
    answers = set(json.loads((corpus / "anno" / "qa_answers.json").read_text()))
    test = {e["question_id"]: e for e in json.loads((corpus / "anno" / "qa_test.json").read_text())}
    assert sorted(p["question_id"] for p in predictions) == sorted(test) and res["questions"] == len(test)
    assert all(p["answer"] in answers for p in predictions) and res["missing_answers"] == 0
    # exact match, overall and per question type, recomputed from the predictions
    right = {p["question_id"]: p["answer"] == test[p["question_id"]]["answer"] for p in predictions}
    assert res["accuracy"] == round(100 * sum(right.values()) / len(right), 2)
    per_type = {}
    for qid, ok in right.items():
        per_type.setdefault(test[qid]["question_type"], []).append(ok)
    assert set(per_type) == {"appearance", "motion"}
    assert res["per_type"] == {t: round(100 * sum(oks) / len(oks), 2) for t, oks in per_type.items()}
