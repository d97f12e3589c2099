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
    "BACKBONE_PATCH",
    "BALANCE_BY",
    "BLOCK_KINDS",
    "DATASET_NAMES",
    "DISTANCES",
    "EMOJI_PACKAGES",
    "EVAL_BACKENDS",
    "HEADS",
    "INDEX_TYPES",
    "INPUT_MIXING_MODES",
    "LEARNER_DATA",
    "LOSS_NAMES",
    "MINING_TYPES",
    "OPTIMIZERS",
    "POOLING_MODES",
    "PROXY_LOSSES",
    "RUNTIME_CHOICES",
    "RUNTIME_NAMES",
    "SCHEDULERS",
    "STRATEGY_NAMES",
    "TRACKER_NAMES",
    "BackboneName",
    "BalanceBy",
    "BlockKind",
    "DatasetName",
    "Distance",
    "EvalBackend",
    "Head",
    "InputMixing",
    "LearnerData",
    "LossName",
    "Mining",
    "OptimizerName",
    "Pooling",
    "RuntimeName",
    "SchedulerName",
    "StrategyName",
    "TrackerName",
]

#: Dataset loaders: the four benchmarks, a folder per class, a CSV list, the emoji benchmark.
DatasetName = Literal["cub", "cars196", "sop", "inshop", "folder", "csv", "emoji"]
DATASET_NAMES: tuple[str, ...] = get_args(DatasetName)

# Each choice is a Literal type (what the config schema and mypy check) and its names as a tuple.
#: Trunks: torchvision's under their torchvision names, timm's as ``timm/<timm model name>`` (the
#: prefix says where the architecture and its pretrained weights come from; torchvision has a
#: ConvNeXt-T too). The timm ones need the ``timm`` extra.
BackboneName = Literal[
    "resnet18",
    "resnet50",
    "googlenet",
    "mobilenet_v2",
    "timm/convnext_tiny",
    "timm/vit_small_patch16_224",
    "timm/vit_small_patch14_dinov2",
]
BACKBONE_NAMES: tuple[str, ...] = get_args(BackboneName)
#: Trunk name -> channels of its last feature map (what the embedding head receives), for the
#: torch-free config checks; tests/models checks it against each built trunk (timm's num_features).
BACKBONE_CHANNELS: dict[str, int] = {
    "resnet18": 512,
    "resnet50": 2048,
    "googlenet": 1024,
    "mobilenet_v2": 1280,
    "timm/convnext_tiny": 768,
    "timm/vit_small_patch16_224": 384,
    "timm/vit_small_patch14_dinov2": 384,
}
#: Vision transformers -> their patch size: the image size must be a multiple of it (the patch
#: tokens become the feature map's grid).
BACKBONE_PATCH: dict[str, int] = {"timm/vit_small_patch16_224": 16, "timm/vit_small_patch14_dinov2": 14}

#: Embedding heads: the group channel-wise block, and the dense layer split between learners.
Head = Literal["gce", "linear_split"]
HEADS: tuple[str, ...] = get_args(Head)
Pooling = Literal["avg", "max", "avg+max"]
POOLING_MODES: tuple[str, ...] = get_args(Pooling)
InputMixing = Literal["grouped", "shared"]
INPUT_MIXING_MODES: tuple[str, ...] = get_args(InputMixing)
BlockKind = Literal["conv3x3", "bottleneck", "none"]
BLOCK_KINDS: tuple[str, ...] = get_args(BlockKind)

#: How classes are split between the learners ("none": the single-metric baseline).
StrategyName = Literal["class_proxy", "random", "samples", "none"]
STRATEGY_NAMES: tuple[str, ...] = get_args(StrategyName)
BalanceBy = Literal["classes", "images"]
BALANCE_BY: tuple[str, ...] = get_args(BalanceBy)
LearnerData = Literal["subset", "all"]
LEARNER_DATA: tuple[str, ...] = get_args(LearnerData)

#: The loss each learner trains with (gce.losses.registry holds one factory per name).
LossName = Literal["triplet", "proxy_anchor", "normalized_softmax", "multi_similarity", "arcface"]
LOSS_NAMES: tuple[str, ...] = get_args(LossName)
#: The losses with learnable class proxies (parameters trained with the model, checkpointed).
PROXY_LOSSES: tuple[str, ...] = ("proxy_anchor", "normalized_softmax", "arcface")
Mining = Literal["semihard", "hard", "all"]
Distance = Literal["euclidean", "cosine"]
MINING_TYPES: tuple[str, ...] = get_args(Mining)
DISTANCES: tuple[str, ...] = get_args(Distance)

OptimizerName = Literal["adam", "adamw", "sgd"]
OPTIMIZERS: tuple[str, ...] = get_args(OptimizerName)
SchedulerName = Literal["none", "cosine", "step"]
SCHEDULERS: tuple[str, ...] = get_args(SchedulerName)

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

#: Inference runtimes that embed preprocessed images (gce.retrieval.runtimes holds one factory per name);
#: ``auto`` picks one of them at start-up.
RuntimeName = Literal["torch", "onnx"]
RUNTIME_NAMES: tuple[str, ...] = get_args(RuntimeName)
RUNTIME_CHOICES: tuple[str, ...] = ("auto", *RUNTIME_NAMES)

#: Experiment trackers that mirror a run's metrics.jsonl (gce.training.trackers holds one factory per name).
TrackerName = Literal["tensorboard", "mlflow"]
TRACKER_NAMES: tuple[str, ...] = get_args(TrackerName)
