"""Retrieval evaluation for callers who hold tensors instead of an annotation file and a tokenizer:

    from singularity_ds.eval import evaluate_tensors
    res = evaluate_tensors(model, videos, input_ids, attention_mask)   # text i describes video i
    res["itm"]["img_r1"], res["topk"]["itm"]["t2i"]["index"][0]        # metrics, ranked lists

The tensors go through the evaluation's own code (:func:`.retrieval.evaluate`: the same feature
extraction, the same two-stage scoring, in memory or offloaded), wrapped as a set the evaluator reads.
"""
import numpy as np
import torch

from ..errors import ConfigError
from .metrics import as_list
from .retrieval import evaluate


class TensorSet:
    """``videos`` (N, T, 3, H, W) or images (N, 3, H, W), preprocessed as the model expects, and the
    ground truth: ``txt2img[t]`` (one media index or a list), ``img2txt[v]`` (list). ``text`` stands for
    the texts (their row numbers: the evaluator reads only their count and order)."""
    skip_broken = False

    def __init__(self, videos: torch.Tensor, num_texts: int, txt2img, img2txt):
        self.videos = videos if videos.dim() == 5 else videos.unsqueeze(1)
        self.text = list(range(num_texts))
        self.txt2img, self.img2txt = txt2img, img2txt

    def __len__(self):
        return self.videos.shape[0]

    def __getitem__(self, i):
        return dict(media=self.videos[i])


def ground_truth(num_videos: int, num_texts: int, txt2img=None, img2txt=None):
    """``txt2img`` as given (a sequence or dict: text -> media index or list of them), or text i <-> video i
    when the counts are equal; ``img2txt`` derived from it when not given."""
    if txt2img is None:
        if num_texts != num_videos:
            raise ConfigError(f"evaluate_tensors: {num_texts} texts and {num_videos} videos: pass txt2img "
                              f"(for each text, the index of its video, or a list of them)")
        txt2img = list(range(num_texts))
    txt2img = {t: txt2img[t] for t in range(num_texts)}
    for t, gt in txt2img.items():
        bad = [g for g in as_list(gt) if not 0 <= int(g) < num_videos]
        if bad:
            raise ConfigError(f"evaluate_tensors: txt2img[{t}] = {gt} names no video "
                              f"(there are {num_videos})")
    if img2txt is None:
        img2txt = {v: [] for v in range(num_videos)}
        for t, gt in txt2img.items():
            for v in as_list(gt):
                img2txt[int(v)].append(t)
    img2txt = {v: img2txt[v] for v in range(num_videos)}
    lonely = [v for v, gt in img2txt.items() if not as_list(gt)]
    if lonely:
        raise ConfigError(f"evaluate_tensors: video {lonely[0]} has no text ({len(lonely)} such); every "
                          f"video needs one as ground truth for the video-to-text metrics")
    return txt2img, img2txt


@torch.no_grad()
def evaluate_tensors(model, videos: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     txt2img=None, img2txt=None, k_test: int = 128, ensemble: str = "concat",
                     batch_size: int = 32, offload: bool = False, feature_store: str = None,
                     feature_dir: str = None, num_frames_test: int = None) -> dict:
    """:func:`.retrieval.evaluate` over tensors: ``videos`` (N_v, T, 3, H, W), ``input_ids`` /
    ``attention_mask`` (N_t, L) as the model's tokenizer gives them (:func:`singularity_ds.data.tokenize`).
    Returns the same dict ("itm", "itc" metrics, "topk" ranked lists, "scores" or "stats")."""
    if input_ids.shape != attention_mask.shape or input_ids.dim() != 2:
        raise ConfigError(f"evaluate_tensors: input_ids {tuple(input_ids.shape)} and attention_mask "
                          f"{tuple(attention_mask.shape)} must be the same (texts, length) shape")
    if videos.dim() not in (4, 5):
        raise ConfigError(f"evaluate_tensors: videos must be (N, T, 3, H, W) or (N, 3, H, W), got "
                          f"{tuple(videos.shape)}")
    txt2img, img2txt = ground_truth(videos.shape[0], input_ids.shape[0], txt2img, img2txt)
    dataset = TensorSet(videos, input_ids.shape[0], txt2img, img2txt)

    def text_inputs(rows):
        rows = torch.as_tensor(np.asarray(rows, dtype=np.int64))
        return input_ids[rows], attention_mask[rows]

    return evaluate(model, dataset, None, None, k_test=k_test, ensemble=ensemble, batch_size=batch_size,
                    offload=offload, feature_store=feature_store, feature_dir=feature_dir,
                    num_frames_test=num_frames_test or dataset.videos.shape[1], name="evaluate_tensors",
                    text_inputs=text_inputs)
