"""Frame sampling, the original's ``get_frame_indices``: which frames of a ``vlen``-frame video a clip
reads. Every reader decodes the indices computed here, so they all read the same frames from a seed.

``rand`` draws one frame per equal segment (with the original's sorted-permutation fallback for very
short videos), ``middle`` takes each segment's middle, ``uniform`` is an alias of ``middle``, ``fpsX``
samples sequentially at X frames per second; short videos repeat the last index.
"""
import random
from typing import List

import numpy as np

SAMPLE_TYPES = ("rand", "middle", "uniform", "fpsX")


def get_frame_indices(num_frames: int, vlen: int, sample: str = "rand", input_fps: float = 1.0,
                      max_num_frames: int = -1, rng: random.Random = None) -> List[int]:
    """Frame indices exactly as the original samples them (``rng`` replaces Python's global
    ``random`` for ``rand``; its fallback uses a numpy generator seeded from ``rng``)."""
    if vlen <= 0:
        raise ValueError("video has no frames")
    rng = rng or random.Random()
    if sample in ("rand", "middle", "uniform"):
        acc = min(num_frames, vlen)
        edges = np.linspace(0, vlen, acc + 1).astype(int)
        ranges = [(int(edges[i]), int(edges[i + 1]) - 1) for i in range(acc)]
        if sample == "rand":
            if all(b > a for a, b in ranges):  # the original's random.choice(range(a, b)): b excluded
                idx = [rng.choice(range(a, b)) for a, b in ranges]
            else:  # a segment too short to draw from: sorted random subset, as the original
                perm = np.random.default_rng(rng.getrandbits(32)).permutation(vlen)[:acc]
                idx = sorted(int(i) for i in perm)
        else:
            idx = [(a + b) // 2 for a, b in ranges]
        if len(idx) < num_frames:  # pad with the last frame
            idx = idx + [idx[-1]] * (num_frames - len(idx))
        return idx
    if sample.startswith("fps"):
        try:
            output_fps = float(sample[3:])
        except ValueError:
            raise ValueError(f"sample type {sample!r}: expected fps<float>, e.g. fps0.5") from None
        duration = vlen / input_fps
        delta = 1 / output_fps
        seconds = np.arange(delta / 2, duration + delta / 2, delta)
        idx = [int(i) for i in np.around(seconds * input_fps).astype(int) if i < vlen]
        if max_num_frames > 0:
            idx = idx[:max_num_frames]
        return idx
    raise ValueError(f"unknown sample type {sample!r}; expected one of rand, middle, uniform, fps<X>")
