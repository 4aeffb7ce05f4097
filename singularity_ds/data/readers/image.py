"""Images, through PIL: the media of image corpora (and VQA)."""
import numpy as np
import torch

from ...errors import MediaError
from .base import check_file, decoder_input


def load_image(path: str) -> torch.Tensor:
    """An image as uint8 (1, C, H, W), RGB."""
    from PIL import Image, UnidentifiedImageError
    check_file(path)
    try:
        with Image.open(decoder_input(path)) as im:
            arr = np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError) as e:
        raise MediaError(path, f"not a readable image ({e})") from None
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).unsqueeze(0)
