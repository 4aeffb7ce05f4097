"""QA evaluation: closed-set answer ranking (the model's ``rank_answer``) and the metrics.

- exact match (MSRVTT-QA, ActivityNet-QA): the top answer equals the annotated one;
- VQA accuracy (annotations with a list of 10 human answers): the official evaluator's rule -- for each
  of the 10 leave-one-out subsets, min(#matching humans / 3, 1), averaged -- after its answer
  normalisation (punctuation, number words, articles, common contractions);
- per ``question_type`` breakdown when annotated; questions none of whose answers is in the answer list
  are counted and reported (they can never be right).
Predictions are written as ``[{"question_id", "answer"}]`` (the VQA submission format).
"""
import re

import torch

from ..data.text import tokenize
from ..dist import all_gather, rank_world
from .broken import Reading, check_not_empty
from .features import shard_range

# ---------------------------------------------------------------------- the VQA evaluator's normalisation
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's",
    "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't", "shant": "shan't",
    "shed": "she'd", "shes": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "somebodys": "somebody's", "someones": "someone's", "somethings": "something's", "thats": "that's",
    "thered": "there'd", "therere": "there're", "theres": "there's", "theyd": "they'd", "theyll": "they'll",
    "theyre": "they're", "theyve": "they've", "wasnt": "wasn't", "wed": "we'd", "weve": "we've",
    "werent": "weren't", "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've",
    "whens": "when's", "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're",
    "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "yall": "y'all",
    "youd": "you'd", "youll": "you'll", "youre": "you're", "youve": "you've",
}
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
            "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">",
          "<", "@", "`", ",", "?", "!"]
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA = re.compile(r"(\d)(,)(\d)")


def normalize_answer(text: str) -> str:
    text = text.replace("\n", " ").replace("\t", " ").strip()
    out = text
    for p in _PUNCT:
        if (p + " " in text or " " + p in text) or _COMMA.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    out = _PERIOD.sub("", out)
    words = []
    for w in out.lower().split():
        w = _NUMBERS.get(w, w)
        if w not in _ARTICLES:
            words.append(_CONTRACTIONS.get(w, w))
    return " ".join(words)


def vqa_accuracy(pred: str, human_answers) -> float:
    """The official rule: mean over leave-one-out subsets of min(#humans agreeing / 3, 1)."""
    humans = [normalize_answer(a) for a in human_answers]
    pred = normalize_answer(pred)
    scores = []
    for i in range(len(humans)):
        others = humans[:i] + humans[i + 1:]
        scores.append(min(1.0, sum(a == pred for a in others) / 3.0))
    return sum(scores) / len(scores)


# ---------------------------------------------------------------------- evaluation loop
@torch.no_grad()
def evaluate_qa(model, dataset, answer_list, tokenizer, max_q_len: int, max_a_len: int, k_test: int = 128,
                ensemble: str = "concat", batch_size: int = 16, eos: str = "[SEP]",
                name: str = "evaluation set") -> dict:
    """-> {"accuracy", "metric", "per_type", "missing_answers", "questions" (evaluated), "skipped_questions",
    "skipped_media", "predictions"}. A broken video follows :mod:`.broken`: an error, or
    (``skip_broken_media_eval``) every question about it is dropped (counted in ``skipped_questions``) and
    its path listed in ``skipped_media``; the readable questions are batched as if the annotation file
    listed no others. ``name`` labels the set in errors."""
    if ensemble != "concat" and model.config.video_input.num_frames != 1:
        from ..errors import ConfigError
        raise ConfigError(f"eval_frame_ensemble={ensemble} needs a single-frame QA model "
                          f"(the original asserts video_input.num_frames == 1; "
                          f"this one has {model.config.video_input.num_frames})")
    check_not_empty(dataset, name)
    model.eval()
    param = next(model.parameters())
    a_ids, a_mask = tokenize(tokenizer, [f"{a} {eos}" for a in answer_list], max_a_len)
    a_ids, a_mask = a_ids.to(param.device), a_mask.to(param.device)
    rank, world = rank_world()
    local = []
    reading = Reading(dataset, shard_range(len(dataset), rank, world), batch_size)
    for batch in reading:
        media = torch.stack([item["media"] for _, item in batch]).to(param.device, param.dtype)
        q_ids, q_mask = tokenize(tokenizer, [item["question"] for _, item in batch], max_q_len)
        ids, _ = model.predict(media, q_ids.to(param.device), q_mask.to(param.device), a_ids, a_mask, k_test,
                               ensemble)
        local.extend((i, answer_list[int(ids[j, 0])]) for j, (i, _) in enumerate(batch))
    skipped = reading.settle(name, items="questions")
    preds = dict(p for part in all_gather(local) for p in part)
    return dict(score(dataset, preds, answer_list), skipped_questions=len(dataset) - len(preds),
                skipped_media=skipped)


def score(dataset, preds: dict, answer_list) -> dict:
    """Metrics of {dataset index: predicted answer string} against the annotations."""
    known = set(answer_list)
    total, per_type, missing, predictions, metric = 0.0, {}, 0, [], "exact_match"
    for i, pred in sorted(preds.items()):
        e = dataset.store[i]
        predictions.append({"question_id": e["question_id"], "answer": pred})
        gt = e.get("answer")
        if gt is None:
            continue
        if isinstance(gt, list):
            metric = "vqa_accuracy"
            acc = vqa_accuracy(pred, gt)
            missing += not any(a in known for a in gt)
        else:
            acc = float(pred == gt)
            missing += gt not in known
        total += acc
        qtype = e.get("question_type")
        if qtype is not None:
            n, s = per_type.get(qtype, (0, 0.0))
            per_type[qtype] = (n + 1, s + acc)
    scored = sum(1 for i in preds if dataset.store[i].get("answer") is not None)
    return dict(accuracy=round(100 * total / max(1, scored), 2), metric=metric, questions=len(preds),
                missing_answers=missing,
                per_type={t: round(100 * s / n, 2) for t, (n, s) in sorted(per_type.items())},
                predictions=predictions)
