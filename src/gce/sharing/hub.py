"""The Hugging Face Hub: a model folder fetched into (or found in) its cache, or pushed to it.

Every failure is one line naming the repository: no network, ``HF_HUB_OFFLINE`` with nothing
cached, an unknown repo or revision, no token. ``huggingface_hub`` does the work (its cache layout,
its progress bars, its fallback to the cache when the Hub cannot be reached).
"""

from __future__ import annotations

import os
from pathlib import Path

from gce.errors import CheckpointError, GceError
from gce.extras import require_extra
from gce.sharing.names import CARD, CONFIG, WEIGHTS, HubReference

__all__ = ["hub_cache", "offline", "push", "snapshot"]

_TRUE = {"1", "ON", "YES", "TRUE"}
_LOGIN = "log in with `hf auth login` or set HF_TOKEN"


def offline() -> bool:
    """``HF_HUB_OFFLINE`` as it is now (huggingface_hub reads it once, at its import)."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").upper() in _TRUE


def hub_cache() -> str:
    """The Hub's cache folder as the environment names it now (``HF_HUB_CACHE``, else ``HF_HOME/hub``)."""
    from huggingface_hub import constants

    if os.environ.get("HF_HUB_CACHE"):
        return os.path.expanduser(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return os.path.join(os.path.expanduser(os.environ["HF_HOME"]), "hub")
    return str(constants.HF_HUB_CACHE)


def snapshot(reference: HubReference) -> Path:
    """The local folder of ``reference``: downloaded into the Hub's cache, or the cached copy when
    offline (``HF_HUB_OFFLINE``) or when the Hub cannot be reached."""
    require_extra("hub")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    cache, no_network = hub_cache(), offline()
    try:
        folder = snapshot_download(
            reference.repo_id,
            revision=reference.revision,
            cache_dir=cache,
            local_files_only=no_network,
            allow_patterns=[CONFIG, WEIGHTS, CARD],
        )
    except LocalEntryNotFoundError:
        why = "HF_HUB_OFFLINE is set" if no_network else "the Hub cannot be reached"
        raise CheckpointError(
            f"{reference}: {why} and the Hugging Face cache ({cache}) holds no copy of it; fetch it once online"
        ) from None
    except RevisionNotFoundError:
        raise CheckpointError(f"{reference}: the Hub has no revision {reference.revision!r} of it") from None
    except RepositoryNotFoundError:
        raise CheckpointError(f"{reference}: no such model on the Hub (a private or gated one: {_LOGIN})") from None
    except HfHubHTTPError as exc:
        raise CheckpointError(f"{reference}: the Hub answered {_first_line(exc)}") from None
    except HFValidationError as exc:
        raise CheckpointError(f"{reference}: {_first_line(exc)}") from None
    except OSError as exc:  # the cache cannot be written (read-only, disk full)
        raise CheckpointError(f"{reference}: cannot fetch it into {cache} ({exc.strerror or exc})") from None
    return Path(folder)


def push(folder: Path, repo_id: str, *, private: bool, message: str) -> str:
    """Upload the model folder's files to the Hub repository ``repo_id`` (created if new); its URL."""
    require_extra("hub")
    from huggingface_hub import HfApi

    where = f"{HubReference(repo_id)}"
    if offline():
        raise GceError(f"cannot push to {where}: HF_HUB_OFFLINE is set")
    api = HfApi()
    try:
        url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(
            folder_path=folder,
            repo_id=repo_id,
            repo_type="model",
            allow_patterns=[CONFIG, WEIGHTS, CARD],
            commit_message=message,
        )
    except Exception as exc:
        raise GceError(f"cannot push to {where}: {_push_problem(exc)}") from None
    return str(url)


def _push_problem(exc: Exception) -> str:
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError

    if isinstance(exc, LocalTokenNotFoundError):
        return f"no Hugging Face token ({_LOGIN})"
    if isinstance(exc, HfHubHTTPError):
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status in (401, 403):
            return f"the Hub refused the token (HTTP {status}; {_LOGIN} with write access)"
        return f"the Hub answered {_first_line(exc)}"
    if isinstance(exc, ConnectionError) or _is_transport_error(exc):
        return f"the Hub cannot be reached ({type(exc).__name__}: {_first_line(exc)})"
    return f"{type(exc).__name__}: {_first_line(exc)}"


def _is_transport_error(exc: Exception) -> bool:
    """A connection or timeout error of the HTTP client huggingface_hub uses (httpx or its fork)."""
    return any(cls.__name__ in ("TransportError", "ConnectError", "TimeoutException") for cls in type(exc).__mro__)


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__
