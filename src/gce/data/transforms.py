"""The standard deep-metric-learning image pipelines (ImageNet statistics)."""

from __future__ import annotations

from torchvision import transforms as T

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: RandomResizedCrop area range used by most DML code bases (e.g. the MS-Loss and ProxyAnchor ones).
DEFAULT_CROP_SCALE = (0.16, 1.0)
#: Test images are resized to ``image_size * 256 / 224`` before the centre crop (256 -> 224).
TEST_RESIZE_RATIO = 256 / 224


def normalize() -> T.Normalize:
    return T.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD)


def train_transform(
    image_size: int,
    *,
    scale: tuple[float, float] = DEFAULT_CROP_SCALE,
    hflip: bool = True,
    random_crop: bool = True,
) -> T.Compose:
    """RandomResizedCrop(image_size, scale) + optional horizontal flip + tensor + normalisation.

    ``random_crop=False`` replaces the crop by Resize + CenterCrop (flips only), for small images
    that are already centred and at the training size (emoji).
    """
    if random_crop:
        steps: list = [T.RandomResizedCrop(image_size, scale=tuple(scale))]
    else:
        steps = [T.Resize(image_size), T.CenterCrop(image_size)]
    if hflip:
        steps.append(T.RandomHorizontalFlip())
    steps += [T.ToTensor(), normalize()]
    return T.Compose(steps)


def test_transform(image_size: int, *, resize_to: int | None = None) -> T.Compose:
    """Resize the short side to ``resize_to``, centre-crop ``image_size``, tensor, normalisation.

    ``resize_to`` defaults to ``round(image_size * 256 / 224)`` (Resize(256) + CenterCrop(224) at
    224 px). Pass ``resize_to=image_size`` for images already at the training size (emoji at
    64 px), where the usual border crop would only cut off content.
    """
    resize = round(image_size * TEST_RESIZE_RATIO) if resize_to is None else int(resize_to)
    if resize < image_size:
        raise ValueError(f"resize_to ({resize}) must be at least image_size ({image_size})")
    return T.Compose([T.Resize(resize), T.CenterCrop(image_size), T.ToTensor(), normalize()])


# Its name would make pytest collect it wherever it is imported. (mypy does not model function attributes.)
test_transform.__test__ = False  # type: ignore[attr-defined]
