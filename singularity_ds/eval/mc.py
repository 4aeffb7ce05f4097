"""Multiple-choice retrieval (MSRVTT-MC), as the original's ``retrieval_mc``: each option caption is
fused with the video, the ITM class-1 logit scores it (frame ensembles as in retrieval), and the
highest-scoring option is the prediction. Videos are split across ranks. A broken video follows
:mod:`.broken`: an error, or (``skip_broken_media_eval``) its question is dropped and its path listed."""
import torch

from ..data.text import tokenize
from ..dist import all_gather, rank_world
from .broken import Reading, check_not_empty
from .features import shard_range
from .retrieval import check_ensemble, itm_scores_shared, text_fusion_state, videos_cross_kv


@torch.no_grad()
def evaluate_mc(model, dataset, tokenizer, max_txt_l: int, ensemble: str = "concat", num_frames_test: int = 1,
                name: str = "evaluation set") -> dict:
    """-> {"accuracy" (%), "videos" (evaluated), "skipped_media" (broken paths left out),
    "predictions": [{video, options, answer, pred, scores}]}; ``name`` labels the set in errors."""
    check_ensemble(model, ensemble, num_frames_test)
    check_not_empty(dataset, name)
    model.eval()
    param = next(model.parameters())
    rank, world = rank_world()
    predictions = []
    reading = Reading(dataset, shard_range(len(dataset), rank, world))
    for [(i, item)] in reading:
        media = item["media"][None].to(param.device, param.dtype)
        if ensemble == "concat":
            clips = model.encode_image(media)[0]             # (1, T*L, D)
        else:
            clips = model.encode_frames(media)[0][0]         # (T, L, D)
        video_kv = videos_cross_kv(model, clips)
        ids, mask = tokenize(tokenizer, item["captions"], max_txt_l)
        ids, mask = ids.to(param.device), mask.to(param.device)
        state = text_fusion_state(model, model.encode_text(ids, mask)[0], mask)
        options = torch.arange(len(ids))
        scores = itm_scores_shared(model, state, mask, video_kv, options, torch.zeros_like(options), ensemble,
                                   clips=clips.shape[0]).float().cpu()
        predictions.append(dict(video=dataset.path(i), options=item["captions"], answer=int(item["answer"]),
                                pred=int(scores.argmax()), scores=[round(float(s), 5) for s in scores]))
    skipped = reading.settle(name, items="videos")
    predictions = [p for part in all_gather(predictions) for p in part]
    accuracy = 100.0 * sum(p["pred"] == p["answer"] for p in predictions) / len(predictions)
    return dict(accuracy=round(accuracy, 2), videos=len(predictions), skipped_media=skipped,
                predictions=predictions)
