"""Train and test image pipelines."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from gce.data.transforms import IMAGENET_MEAN, IMAGENET_STD, test_transform, train_transform


def steps(transform: T.Compose) -> list[type]:
    return [type(t) for t in transform.transforms]


def test_train_transform_steps_and_output():
    transform = train_transform(32)
    assert steps(transform) == [T.RandomResizedCrop, T.RandomHorizontalFlip, T.ToTensor, T.Normalize]
    assert transform.transforms[0].scale == (0.16, 1.0)
    out = transform(Image.new("RGB", (50, 40), (124, 116, 104)))
    assert out.shape == (3, 32, 32)
    assert out.abs().max() < 0.05  # ImageNet-mean grey normalises to about zero
    assert steps(train_transform(32, hflip=False, scale=(0.5, 1.0)))[1] is T.ToTensor


def test_test_transform_default_resize_ratio():
    transform = test_transform(224)
    assert steps(transform) == [T.Resize, T.CenterCrop, T.ToTensor, T.Normalize]
    assert transform.transforms[0].size == 256
    assert transform(Image.new("RGB", (300, 400))).shape == (3, 224, 224)
    assert test_transform(64).transforms[0].size == 73


def test_test_transform_explicit_resize_keeps_whole_image():
    image = Image.new("RGB", (64, 64), (255, 255, 255))
    image.putpixel((0, 0), (0, 0, 0))  # a corner pixel survives only without a border crop
    out = test_transform(64, resize_to=64)(image)
    expected = (torch.tensor(0.0) - IMAGENET_MEAN[0]) / IMAGENET_STD[0]
    assert torch.isclose(out[0, 0, 0], expected, atol=1e-4)
    with pytest.raises(ValueError, match="resize_to"):
        test_transform(64, resize_to=32)


def test_flip_only_training_transform_keeps_the_whole_image():
    import torch
    from PIL import Image

    from gce.data.transforms import train_transform

    image = Image.new("RGB", (40, 40), (255, 0, 0))
    image.paste((0, 0, 255), (0, 0, 40, 4))  # a blue band at the top that a crop could cut off
    tf = train_transform(32, random_crop=False, hflip=True)
    for seed in range(5):
        torch.manual_seed(seed)
        out = tf(image)
        assert out.shape == (3, 32, 32)
        assert out[2, 0].mean() > out[0, 0].mean()  # the top row is still blue
