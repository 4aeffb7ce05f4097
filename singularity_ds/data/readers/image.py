"""Images, through PIL: the media of image corpora (and VQA)."""
import numpy as np
import torch

from ...errors import MediaError
from .base import check_file, decoder_input

# the file endings read as images wherever a medium's type is not declared (folders, tars of the field's
# tools); everything else is a video
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}


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
