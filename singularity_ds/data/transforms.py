"""The original's image/video transforms, applied to uint8 (T, C, H, W) clips.

Train: RandomResizedCrop(image_res, scale=(0.5, 1.0), bicubic) + horizontal flip (``random_flip``) --
one tensor op per clip, so every frame gets the same crop and flip -- then [0, 1] and normalisation.
Test: resize to (image_res, image_res), bicubic. Normalisation as the original: (0.5, 0.5, 0.5) for BEiT
and ViT, ImageNet statistics for DeiT; a timm tower's mean, std and interpolation are its own
(``pretrained_cfg``), the rest of the pipeline the same. Resizing uses ``antialias=False``: the original
ran these transforms on uint8 tensors with a torchvision that did not antialias tensors, and its
checkpoints saw such frames.
"""
import torch
from torchvision import transforms
from torchvision.transforms import InterpolationMode

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def normalization(vit_type: str):
    if vit_type == "deit":
        return IMAGENET
    if vit_type in ("beit", "vit"):
        return HALF
    raise ValueError(f"unknown vit_type {vit_type!r}")


class ToFloat:
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x.float().div(255.0)


def pixel_statistics(config):
    """(mean, std, interpolation) of the config's vision tower: the original's for beit / vit / deit
    (bicubic), the timm tower's ``pretrained_cfg`` for vit_type=timm (:mod:`..timm_hub`)."""
    if config.vit_type == "timm":
        from ..timm_hub import resolve
        tower = resolve(config)
        return tower.mean, tower.std, tower.interpolation
    return (*normalization(config.vit_type), "bicubic")


def build_transform(image_res: int, vit_type: str = "beit", train: bool = True, flip: bool = True,
                    stats=None):
    """``flip`` (config ``random_flip``): False keeps the flip step at p=0, so it still draws its random
    number and every other draw of an epoch stays where it was. ``stats``: (mean, std, interpolation)
    (:func:`pixel_statistics`) instead of ``vit_type``'s."""
    mean, std, interpolation = stats or (*normalization(vit_type), "bicubic")
    mode = InterpolationMode(interpolation)
    if train:
        resize = [transforms.RandomResizedCrop(image_res, scale=(0.5, 1.0),
                                               interpolation=mode, antialias=False),
                  transforms.RandomHorizontalFlip(p=0.5 if flip else 0.0)]
    else:
        resize = [transforms.Resize((image_res, image_res), interpolation=mode, antialias=False)]
    return transforms.Compose(resize + [ToFloat(), transforms.Normalize(mean, std)])
