"""The model card (``README.md``) of a model folder: YAML front matter the Hub reads, then what a
user needs: metrics, learner layout, preprocessing, how to use it, the training config, the license."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

__all__ = ["TAGS", "read_card_metadata", "render_card"]

TAGS = ["gce", "metric-learning", "image-retrieval", "image-feature-extraction", "pytorch", "safetensors"]
#: Metrics shown as percentages, in this order; the counts after them as integers.
_SCORES = ("nmi", "f1", "map@r", "r_precision")
_COUNTS = ("num_queries", "num_classes", "excluded_queries")


def render_card(meta: dict[str, Any], *, repo_hint: str = "ORG/NAME") -> str:
    """The README.md text for a model folder whose ``config.json`` holds ``meta``."""
    from huggingface_hub import ModelCardData

    data = ModelCardData(
        library_name="gce",
        license=meta["license"],
        tags=TAGS,
        pipeline_tag="image-feature-extraction",
    )
    k, dim = meta["num_learners"], meta["embedding_dim"]
    cfg = meta["config"]
    model = cfg["model"]
    parts = [
        f"---\n{data.to_yaml()}\n---",
        f"# {meta['name']}",
        (
            f"An image embedding model trained with [gce](https://pypi.org/project/gce-dml/) (Group Channel-wise"
            f" Ensembles): a {model['backbone']} trunk and a `{model['head']}` head whose {dim}-dimensional embedding"
            f" is {k} learners of {dim // k} dimensions, each L2-normalised. The cosine similarity of two embeddings"
            f" (the mean of the learners' cosines) ranks images of the same class first."
        ),
        "## Metrics",
        _metrics(meta.get("metrics"), cfg["data"]),
        "## Learner layout",
        f"K = {k} learners x {dim // k} dimensions = D = {dim}. Learner k owns dimensions"
        f" `[k*{dim // k}, (k+1)*{dim // k})` of the embedding; each slice has unit length.\n\n"
        "| learner | dimensions |\n|---|---|\n"
        + "\n".join(f"| {i} | {a}-{b - 1} |" for i, (a, b) in enumerate(meta["learner_slices"])),
        "## Preprocessing",
        _preprocessing(meta["preprocessing"]),
        "## Use it",
        _usage(repo_hint),
        "## Training config",
        (
            "The full config of the run (`config` in `config.json`; `gce train` with it trains the model again):\n\n"
            f"```yaml\n{yaml.safe_dump(cfg, sort_keys=False).rstrip()}\n```"
        ),
        "## Files",
        (
            f"- `model.safetensors`: the weights (sha256 `{meta['weights']['sha256']}`)\n"
            "- `config.json`: the training config, preprocessing, learner slices, model id, gce version\n"
            "- `README.md`: this card"
        ),
        "## License",
        _license(meta["license"]),
        f"Model id `{meta['model_id']}`; saved by gce {meta['gce_version']} from `{meta['source']}`.",
    ]
    return "\n\n".join(parts) + "\n"


def _metrics(metrics: dict[str, Any] | None, data: dict[str, Any]) -> str:
    if not metrics:
        return "No metrics were recorded with this file (a run's `final_metrics.json` describes its `model.pt`)."
    rows = [
        (key, f"{100 * value:.2f}") for key, value in metrics.items() if key.startswith("recall@") and value is not None
    ]
    rows += [(key, f"{100 * metrics[key]:.2f}") for key in _SCORES if metrics.get(key) is not None]
    rows += [(key, f"{metrics[key]:,}") for key in _COUNTS if metrics.get(key) is not None]
    table = "| metric | value |\n|---|---|\n" + "\n".join(f"| {key} | {value} |" for key, value in rows)
    return (
        f"On the test split of `{data['dataset']}` (`{data['root']}`, split options"
        f" `{json.dumps(data.get('options') or {}, sort_keys=True)}`), scores in percent:\n\n{table}"
    )


def _preprocessing(pre: dict[str, Any]) -> str:
    return (
        f"1. decode as {pre['color']} ({pre['alpha']});\n"
        f"2. resize the short side to {pre['resize_short_side']} pixels, centre-crop {pre['center_crop']} x"
        f" {pre['center_crop']};\n"
        f"3. scale to {pre['scale']}, subtract mean {pre['mean']}, divide by std {pre['std']};\n"
        f"4. a {pre['layout']} batch goes into the model."
    )


def _usage(repo: str) -> str:
    return (
        "```bash\npip install 'gce-dml[hub]'\n"
        f"gce embed --checkpoint hf://{repo} --images photos/ --out embeddings/\n"
        f"gce index build embeddings/ --out index/\n"
        f"gce search query.jpg --index index/ --checkpoint hf://{repo}\n```\n\n"
        "```python\nimport gce\n\n"
        f'embedder = gce.Embedder.from_checkpoint("hf://{repo}")\n'
        'vectors = embedder.embed_paths(["a.jpg", "b.jpg"])  # N x D float32, learner slices unit length\n```\n\n'
        "A local copy of this folder works the same way: `--checkpoint path/to/folder`."
    )


def _license(name: str) -> str:
    if name == "unknown":
        return (
            "Not stated by whoever saved it (`gce model save --license`). The weights carry the terms of the"
            " data they were trained on and of any pretrained backbone."
        )
    return f"`{name}`. The weights also carry the terms of the data they were trained on."


def read_card_metadata(path: Path) -> dict[str, Any]:
    """The front matter of a model card (empty when it has none or is unreadable)."""
    from huggingface_hub.repocard import metadata_load

    try:  # metadata_load reads the file only (ModelCard.load would ask the Hub for a missing one)
        return metadata_load(path) or {}
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError):
        return {}
