"""The names a config may use for each choice, defined once and importable without torch.

The modules that implement a choice import its names from here (and their tests check that every
name here has an implementation), so the config schema validates a YAML file without loading the
ML stack: ``gce --help`` and reading a config stay fast.
"""

from __future__ import annotations

from typing import Literal, get_args

__all__ = [
    "BACKBONE_CHANNELS",
    "BACKBONE_NAMES",
    "BALANCE_BY",
    "BLOCK_KINDS",
    "DISTANCES",
    "EMOJI_PACKAGES",
    "EVAL_BACKENDS",
    "HEADS",
    "INDEX_TYPES",
    "INPUT_MIXING_MODES",
    "LEARNER_DATA",
    "MINING_TYPES",
    "OPTIMIZERS",
    "POOLING_MODES",
    "SCHEDULERS",
    "STRATEGY_NAMES",
    "Distance",
    "EvalBackend",
    "Mining",
]

#: Trunk name -> channels of its last feature map (what the embedding head receives).
BACKBONE_CHANNELS: dict[str, int] = {"resnet18": 512, "resnet50": 2048, "googlenet": 1024, "mobilenet_v2": 1280}
BACKBONE_NAMES: tuple[str, ...] = tuple(BACKBONE_CHANNELS)

#: Embedding heads: the group channel-wise block, and the dense layer split between learners.
HEADS: tuple[str, ...] = ("gce", "linear_split")
POOLING_MODES: tuple[str, ...] = ("avg", "max", "avg+max")
INPUT_MIXING_MODES: tuple[str, ...] = ("grouped", "shared")
BLOCK_KINDS: tuple[str, ...] = ("conv3x3", "bottleneck", "none")

#: How classes are split between the learners ("none": the single-metric baseline).
STRATEGY_NAMES: tuple[str, ...] = ("class_proxy", "random", "samples", "none")
BALANCE_BY: tuple[str, ...] = ("classes", "images")
LEARNER_DATA: tuple[str, ...] = ("subset", "all")

Mining = Literal["semihard", "hard", "all"]
Distance = Literal["euclidean", "cosine"]
MINING_TYPES: tuple[str, ...] = get_args(Mining)
DISTANCES: tuple[str, ...] = get_args(Distance)

OPTIMIZERS: tuple[str, ...] = ("adam", "adamw", "sgd")
SCHEDULERS: tuple[str, ...] = ("none", "cosine", "step")

#: Search index types: exact (flat) and approximate (faiss IVF, HNSW, IVF-PQ).
INDEX_TYPES: tuple[str, ...] = ("flat", "ivf", "hnsw", "ivfpq")

#: The emoji benchmark's vendors: vendor -> (npm package, version, image folder inside it, file extension).
EMOJI_PACKAGES: dict[str, tuple[str, str, str, str]] = {
    "apple": ("emoji-datasource-apple", "16.0.0", "img/apple/64", ".png"),
    "google": ("emoji-datasource-google", "16.0.0", "img/google/64", ".png"),
    "twitter": ("emoji-datasource-twitter", "16.0.0", "img/twitter/64", ".png"),
    "facebook": ("emoji-datasource-facebook", "16.0.0", "img/facebook/64", ".png"),
    "fluent3d": ("@lobehub/fluent-emoji-3d", "1.1.0", "assets", ".webp"),
}

#: Exact kNN back ends of the evaluation.
EvalBackend = Literal["torch", "faiss"]
EVAL_BACKENDS: tuple[str, ...] = get_args(EvalBackend)
