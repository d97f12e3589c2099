"""Tiny dataset trees in the official layouts, written into a test's tmp_path.

Images are 8x8 (JPEG unless the suffix says otherwise), each class a distinct colour.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import scipy.io
from PIL import Image


def write_image(path: Path, color: tuple[int, int, int] = (200, 30, 30), size: tuple[int, int] = (8, 8)) -> Path:
    """An RGB image at ``path``; the format follows the suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def write_noise(path: Path, side: int = 32, seed: int = 0) -> Path:
    """A random-noise image (large enough that cutting its tail leaves valid headers)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (side, side, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def truncate(path: Path, keep: float = 0.6) -> Path:
    """Cut a file to ``keep`` of its size, as an interrupted download would."""
    size = path.stat().st_size
    with open(path, "r+b") as handle:
        handle.truncate(int(size * keep))
    return path


def color_of(index: int) -> tuple[int, int, int]:
    return ((index * 53) % 256, (index * 97) % 256, (index * 151) % 256)


def make_cub(base: Path, class_ids=(1, 2, 3, 101, 102), per_class: int = 2, nested: bool = False) -> Path:
    """CUB_200_2011 layout; returns the folder to pass as root (``base`` itself if ``nested``)."""
    root = base / "CUB_200_2011" if nested else base
    classes, images, labels = [], [], []
    image_id = 0
    for class_id in class_ids:
        folder = f"{class_id:03d}.Bird_{class_id}"
        classes.append(f"{class_id} {folder}")
        for k in range(per_class):
            image_id += 1
            relative = f"{folder}/Bird_{class_id}_{k:04d}.jpg"
            write_image(root / "images" / relative, color_of(class_id))
            images.append(f"{image_id} {relative}")
            labels.append(f"{image_id} {class_id}")
    (root / "classes.txt").write_text("\n".join(classes) + "\n")
    (root / "images.txt").write_text("\n".join(images) + "\n")
    (root / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    # Present in the release but not used by the DML split: its presence must not matter.
    (root / "train_test_split.txt").write_text("\n".join(f"{i} 1" for i in range(1, image_id + 1)) + "\n")
    return base if nested else root


def make_cars(root: Path, class_ids=(1, 2, 98, 99, 196), per_class: int = 2) -> Path:
    """``cars_annos.mat`` (struct array ``annotations`` + cell ``class_names``) and ``car_ims/``."""
    fields = ["relative_im_path", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "test"]
    records = []
    for class_id in class_ids:
        for k in range(per_class):
            relative = f"car_ims/{len(records) + 1:06d}.jpg"
            write_image(root / relative, color_of(class_id))
            records.append((relative, 1, 2, 7, 7, class_id, k % 2))
    annotations = np.zeros((1, len(records)), dtype=[(f, object) for f in fields])
    for i, record in enumerate(records):
        for field, value in zip(fields, record, strict=True):
            annotations[0, i][field] = np.array([[value]], dtype=np.uint8) if field != "relative_im_path" else value
    names = np.empty((1, 196), dtype=object)
    for class_id in range(1, 197):
        names[0, class_id - 1] = f"Maker Model {class_id} 2012"
    scipy.io.savemat(root / "cars_annos.mat", {"annotations": annotations, "class_names": names})
    return root


SOP_HEADER = "image_id class_id super_class_id path"


def make_sop(root: Path, train_classes=(1, 2, 3), test_classes=(4, 5), per_class: int = 2) -> Path:
    """``Ebay_train.txt`` / ``Ebay_test.txt`` and ``<super>_final/<class>_<k>.JPG`` images."""
    image_id = 0
    for file_name, classes in (("Ebay_train.txt", train_classes), ("Ebay_test.txt", test_classes)):
        lines = [SOP_HEADER]
        for class_id in classes:
            super_id = 1 + class_id % 2
            folder = ["bicycle_final", "chair_final"][super_id - 1]
            for k in range(per_class):
                image_id += 1
                relative = f"{folder}/{1000 + class_id}_{k}.JPG"
                write_image(root / relative, color_of(class_id))
                lines.append(f"{image_id} {class_id} {super_id} {relative}")
        (root / file_name).write_text("\n".join(lines) + "\n")
    return root


def make_inshop(root: Path, release_layout: bool = False) -> Path:
    """``list_eval_partition.txt`` (count, header, space-padded rows) and ``img/...`` images.

    Items 1-2 train; items 3-4 test with query and gallery images of each; item 5 test with one
    query and one gallery image. With ``release_layout`` the files go to Eval/ and Img/.
    """
    rows = []
    plan = {
        1: ["train", "train"],
        2: ["train", "train", "train"],
        3: ["query", "gallery", "gallery"],
        4: ["query", "query", "gallery"],
        5: ["gallery", "query"],
    }
    image_root = root / "Img" if release_layout else root
    for item, statuses in plan.items():
        for k, status in enumerate(statuses):
            name = f"img/WOMEN/Dresses/id_{item:08d}/{k + 1:02d}_{k + 1}_front.jpg"
            write_image(image_root / name, color_of(item))
            rows.append(f"{name:<60}id_{item:08d}      {status}")
    partition = root / "Eval" / "list_eval_partition.txt" if release_layout else root / "list_eval_partition.txt"
    partition.parent.mkdir(parents=True, exist_ok=True)
    partition.write_text(f"{len(rows)}\nimage_name item_id evaluation_status\n" + "\n".join(rows) + "\n")
    return root


def make_folder(root: Path, classes=("ant", "bee", "cat", "dog", "eel", "fox"), per_class: int = 2) -> Path:
    """``root/<class>/<image>.jpg``."""
    for c, name in enumerate(classes):
        for k in range(per_class):
            write_image(root / name / f"{k}.jpg", color_of(c))
    return root


def make_emoji_cache(cache: Path, table: dict[str, list[str]]) -> Path:
    """A fake ``node_modules`` holding ``table[vendor]`` file stems (PNG 64 px, fluent3d WebP 16 px).

    Images are RGBA with a transparent border so compositing onto white is visible.
    """
    from gce.data.emoji import PACKAGES, vendor_image_dir

    for vendor, stems in table.items():
        package, version, _, extension = PACKAGES[vendor]
        (cache / "node_modules" / package).mkdir(parents=True, exist_ok=True)
        (cache / "node_modules" / package / "package.json").write_text(
            f'{{"name": "{package}", "version": "{version}"}}'
        )
        folder = vendor_image_dir(cache, vendor)
        folder.mkdir(parents=True, exist_ok=True)
        side = 16 if vendor == "fluent3d" else 64
        for i, stem in enumerate(stems):
            image = Image.new("RGBA", (side, side), (0, 0, 0, 0))
            image.paste((*color_of(i + 1), 255), (side // 4, side // 4, 3 * side // 4, 3 * side // 4))
            image.save(folder / f"{stem}{extension}")
    return cache
