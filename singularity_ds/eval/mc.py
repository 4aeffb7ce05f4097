"""Multiple-choice retrieval (MSRVTT-MC), as the original's ``retrieval_mc``: each option caption is
fused with the video, the ITM class-1 logit scores it (frame ensembles as in retrieval), and the
highest-scoring option is the prediction. Videos are split across ranks."""
import torch

from ..data.text import tokenize
from ..dist import all_gather, rank_world
from .features import shard_range
from .retrieval import check_ensemble, itm_scores_cached, video_cross_kv


@torch.no_grad()
def evaluate_mc(model, dataset, tokenizer, max_txt_l: int, ensemble: str = "concat", num_frames_test: int = 1):
    """-> (accuracy in %, predictions: [{video, options, answer, pred, scores}])."""
    check_ensemble(model, ensemble, num_frames_test)
    model.eval()
    param = next(model.parameters())
    rank, world = rank_world()
    predictions = []
    for i in shard_range(len(dataset), rank, world):
        item = dataset[i]
        if item["media"] is None:
            raise RuntimeError(f"MC media {dataset.path(i)} could not be read")
        media = item["media"][None].to(param.device, param.dtype)
        if ensemble == "concat":
            clips = model.encode_image(media)[0]             # (1, T*L, D)
        else:
            clips = model.encode_frames(media)[0][0]         # (T, L, D)
        video_kv = video_cross_kv(model, clips)
        ids, mask = tokenize(tokenizer, item["captions"], max_txt_l)
        ids, mask = ids.to(param.device), mask.to(param.device)
        scores = itm_scores_cached(model, model.encode_text(ids, mask)[0], mask, video_kv, ensemble).float().cpu()
        predictions.append(dict(video=dataset.path(i), options=item["captions"], answer=int(item["answer"]),
                                pred=int(scores.argmax()), scores=[round(float(s), 5) for s in scores]))
    predictions = [p for part in all_gather(predictions) for p in part]
    accuracy = 100.0 * sum(p["pred"] == p["answer"] for p in predictions) / max(1, len(predictions))
    return round(accuracy, 2), predictions
