"""Datasets: robust image decoding, benchmark and custom loaders, the emoji builder, transforms."""

from gce.data.cars196 import load_cars196
from gce.data.csvdata import load_csv
from gce.data.cub import load_cub
from gce.data.datasets import DATASETS, dataset_options, load_dataset
from gce.data.emoji import build_emoji_dataset, load_emoji
from gce.data.folder import load_folder
from gce.data.images import (
    IMAGE_EXTENSIONS,
    ImageDataset,
    check_image,
    check_records,
    load_rgb,
    scan_images,
    to_rgb,
)
from gce.data.inshop import load_inshop
from gce.data.records import DatasetSplits, ImageRecords
from gce.data.sop import load_sop
from gce.data.transforms import IMAGENET_MEAN, IMAGENET_STD, test_transform, train_transform

__all__ = [
    "DATASETS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "DatasetSplits",
    "ImageDataset",
    "ImageRecords",
    "build_emoji_dataset",
    "check_image",
    "check_records",
    "dataset_options",
    "load_cars196",
    "load_csv",
    "load_cub",
    "load_dataset",
    "load_emoji",
    "load_folder",
    "load_inshop",
    "load_rgb",
    "load_sop",
    "scan_images",
    "test_transform",
    "to_rgb",
    "train_transform",
]
