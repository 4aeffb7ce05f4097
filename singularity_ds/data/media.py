"""What a dataset turns a media path and an item seed into.

- :class:`MediaSource`: the pixels -- one image or clip read and transformed, float (T, C, H, W)
  (images have T=1). Every random draw (frames, crop, flip) comes from the item's seed.
- :class:`ClipPlanner` (``video_input.dali_device``): a :class:`ClipPlan` instead -- the same frame
  indices, crop box and flip that a MediaSource would draw from that seed -- so that the main process
  decodes and augments the whole batch in one DALI graph (``data.readers.dali.clip_pipeline``).
"""
import random
from typing import NamedTuple

import torch
from torchvision import transforms

from .readers import frame_size, get_frame_indices, get_reader, load_image, read_frames


class MediaSource:
    """Reads + transforms one image or clip: ``source(path, seed)`` -> float (T, C, H, W)."""

    def __init__(self, media_type, transform, num_frames=1, sample_type="rand", reader="decord",
                 max_num_frames=-1):
        self.media_type, self.transform = media_type, transform
        self.num_frames, self.sample_type, self.max_num_frames = num_frames, sample_type, max_num_frames
        self.reader = get_reader(reader) if media_type == "video" else None

    def __call__(self, path: str, seed: int) -> torch.Tensor:
        if self.media_type == "image":
            raw = load_image(path)
        else:
            raw, _, _ = read_frames(path, self.num_frames, self.sample_type, self.reader,
                                    random.Random(seed), self.max_num_frames)
        with torch.random.fork_rng(devices=[]):  # the transform's draws come from this item's seed
            torch.manual_seed(seed)
            return self.transform(raw)


class ClipPlan(NamedTuple):
    """What to decode and how to augment one clip, for a batched decoder (DALI) in the main process."""
    path: str
    indices: list
    box: tuple   # (top, left, height, width) of the crop, the same for every frame
    flip: bool


class ClipPlanner:
    """Plans one clip: ``planner(path, seed)`` -> :class:`ClipPlan`, drawn as :class:`MediaSource` would
    draw them with the same transform (its RandomResizedCrop box and flip; the whole frame, unflipped,
    for a transform without them)."""

    media_type = "video"

    def __init__(self, transform, num_frames=1, sample_type="rand", reader="decord", max_num_frames=-1):
        self.transform = transform
        self.num_frames, self.sample_type, self.max_num_frames = num_frames, sample_type, max_num_frames
        self.reader = get_reader(reader)

    def __call__(self, path: str, seed: int) -> ClipPlan:
        frame_count, fps = self.reader.probe(path)
        indices = get_frame_indices(self.num_frames, frame_count, self.sample_type, fps, self.max_num_frames,
                                    random.Random(seed))
        height, width = frame_size(path)
        steps = {type(t): t for t in self.transform.transforms}
        if transforms.RandomResizedCrop not in steps:  # the evaluation transform resizes the whole frame
            return ClipPlan(path, indices, (0, 0, height, width), False)
        crop, hflip = steps[transforms.RandomResizedCrop], steps[transforms.RandomHorizontalFlip]
        with torch.random.fork_rng(devices=[]):  # the transform's own draws, in its order, from this seed
            torch.manual_seed(seed)
            box = crop.get_params(torch.empty(1, height, width), crop.scale, crop.ratio)
            flip = bool(torch.rand(1) < hflip.p)
        return ClipPlan(path, indices, tuple(box), flip)
