"""The typed experiment configuration: one pydantic section per part of a run.

Every option of a run lives here; nothing is read from global argument objects. Validation
happens when a config is made, before any work starts, and every error is one line naming the
offending key. Importing this module loads no torch.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
    model_validator,
)

from gce.config.checks import check_experiment
from gce.config.model_checks import check_image_size, check_model_config
from gce.config.vocabulary import (
    PROXY_LOSSES,
    BackboneName,
    BalanceBy,
    BlockKind,
    DatasetName,
    Distance,
    EvalBackend,
    Head,
    InputMixing,
    LearnerData,
    LossName,
    Mining,
    OptimizerName,
    Pooling,
    SchedulerName,
    StrategyName,
    TrackerName,
)

# Each vocabulary is defined once, in gce.config.vocabulary (torch-free), as the Literal type pydantic
# validates against (an unknown value is a one-line error naming the valid ones).


class _Section(BaseModel):
    # extra="forbid" turns a typo in a YAML key into an error instead of a silently ignored option.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Section):
    dataset: DatasetName = Field(description="cub, cars196, sop, inshop, folder, csv or emoji")
    root: str = Field(description="dataset root folder (csv: the CSV file)")
    image_size: int = Field(224, ge=8)
    test_resize: int | None = Field(None, ge=8, description="resize before the centre crop; default size*256/224")
    random_crop: bool = Field(True, description="RandomResizedCrop in training (else resize + centre crop)")
    crop_scale: tuple[float, float] = (0.16, 1.0)
    hflip: bool = True
    workers: int = Field(2, ge=0)
    skip_bad: bool = False
    verify_images: bool = True
    val_fraction: float = Field(0.0, ge=0.0, lt=1.0, description="share of train classes held out for validation")
    options: dict[str, Any] = Field(default_factory=dict, description="extra loader options (test_fraction, seed ...)")


class ModelConfig(_Section):
    backbone: BackboneName = "resnet50"
    head: Head = "gce"
    num_learners: int = Field(4, ge=1)
    embedding_dim: int = Field(512, ge=1)
    pretrained: bool = True
    freeze_bn: bool = True
    pooling: Pooling = "avg+max"
    block_channels: int | None = Field(None, ge=1)
    input_mixing: InputMixing = "grouped"
    # Issue 14: shape of the group channel-wise block, and learner-owned trunk layers.
    block: BlockKind = Field("conv3x3", description="gce head: grouped layers of the block")
    block_residual: bool = Field(False, description="gce head: ReLU(trunk features + block output)")
    grouped_trunk_layers: int = Field(0, ge=0, description="last trunk layers each learner owns a copy of (0: shared)")
    weights: str | None = Field(
        None,
        description="a local state-dict file (.pth/.pt/.safetensors, torchvision or timm format) the pretrained "
        "weights come from instead of the torchvision/timm download; loaded strictly",
    )

    @model_serializer(mode="wrap")
    def _leave_out_unset_weights(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # Unset, model.weights is left out of every dump (config.yaml, checkpoints, the model id of
        # gce.Embedder), so those of configs without it stay byte for byte what they were before it.
        data: dict[str, Any] = handler(self)
        if self.weights is None:
            data.pop("weights", None)
        return data

    @model_validator(mode="after")
    def _check_shapes(self) -> ModelConfig:
        # The model's own check (learner slices, block channels, grouped input): one place, run
        # here so a bad combination fails when the config loads, naming the model.* keys.
        check_model_config(self)
        return self


class MetaClassConfig(_Section):
    strategy: StrategyName = "class_proxy"
    update_every: int = Field(2, ge=1, description="epochs between meta-class refreshes")
    balanced: bool = True
    balance_by: BalanceBy = "classes"
    redraw: bool = False
    warm_start: bool = Field(True, description="class_proxy: refresh k-means from the previous groups")
    learner_data: LearnerData = Field(
        "subset",
        description="subset: learner k trains on its meta-class subset with class labels; "
        "all: every learner sees all data, labelled by its own meta-classes",
    )
    num_metaclasses: int = Field(16, ge=2, description="learner_data=all: meta-classes per learner")


class LossConfig(_Section):
    name: LossName = Field("triplet", description="the loss each learner trains with (gce.losses.registry)")
    margin: float = Field(0.1, gt=0.0, description="triplet: margin; proxy_anchor: margin delta")
    mining: Mining = Field("semihard", description="triplet only")
    distance: Distance = Field("euclidean", description="triplet only (the other losses use cosine similarity)")
    full_embedding_weight: float = Field(0.0, ge=0.0)
    # The other losses' settings, pytorch-metric-learning's defaults (the papers' values).
    proxy_anchor_alpha: float = Field(32.0, gt=0.0, description="proxy_anchor: scale alpha")
    temperature: float = Field(0.05, gt=0.0, description="normalized_softmax: softmax temperature")
    arcface_margin: float = Field(28.6, gt=0.0, lt=180.0, description="arcface: additive angular margin, degrees")
    arcface_scale: float = Field(64.0, gt=0.0, description="arcface: logit scale")
    ms_alpha: float = Field(2.0, gt=0.0, description="multi_similarity: weight of positive pairs")
    ms_beta: float = Field(50.0, gt=0.0, description="multi_similarity: weight of negative pairs")
    ms_base: float = Field(0.5, description="multi_similarity: similarity offset lambda")
    ms_epsilon: float = Field(0.1, ge=0.0, description="multi_similarity: the miner's pair margin")
    proxy_lr_multiplier: float = Field(
        100.0, gt=0.0, description="proxy losses: the proxies' learning rate is optim.lr x this"
    )
    proxy_warm_start: bool = Field(
        False, description="proxy losses: set the proxies to the class proxies at every meta-class refresh"
    )

    @model_validator(mode="after")
    def _check_proxies(self) -> LossConfig:
        if self.proxy_warm_start and self.name not in PROXY_LOSSES:
            raise ValueError(
                f"loss.proxy_warm_start=true needs a loss with proxies ({', '.join(PROXY_LOSSES)}); "
                f"loss.name={self.name} has none"
            )
        return self


class SamplerConfig(_Section):
    classes_per_batch: int = Field(16, ge=2)
    samples_per_class: int = Field(4, ge=1)
    batches_per_epoch: int | None = Field(None, ge=1, description="default: train images // batch size")


class OptimConfig(_Section):
    name: OptimizerName = "adam"
    lr: float = Field(1e-4, gt=0.0, description="head learning rate")
    backbone_lr: float | None = Field(None, gt=0.0, description="default: same as lr")
    weight_decay: float = Field(1e-4, ge=0.0)
    momentum: float = Field(0.9, ge=0.0)
    scheduler: SchedulerName = "none"
    step_size: int = Field(10, ge=1)
    gamma: float = Field(0.1, gt=0.0)
    grad_clip: float | None = Field(None, gt=0.0)


class TrainConfig(_Section):
    epochs: int = Field(15, ge=1)
    finetune_epochs: int = Field(0, ge=0, description="extra epochs on the full embedding with all data")
    seed: int = 0
    device: str = "cpu"
    out_dir: str = "runs/default"
    eval_test_every: int = Field(1, ge=0, description="report test metrics every N epochs (0: only at the end)")
    amp: bool = Field(False, description="CUDA: bf16 autocast for the model's forward (loss and mining stay fp32)")
    num_threads: int | None = Field(None, ge=1, description="torch CPU threads (default: torch's choice)")
    dist_timeout_s: float = Field(
        1800.0,
        gt=0.0,
        description="multi-process runs: seconds a collective may wait for the other ranks before the job fails",
    )
    sync_bn: bool = Field(
        False,
        description="multi-process runs: synchronise the trunk's trainable BatchNorm "
        "(needs model.freeze_bn: false); the head's is always synchronised",
    )
    channels_last: bool = Field(False, description="channels-last memory format for the model and its input")
    compile: bool = Field(False, description="torch.compile the model for training")
    trackers: list[TrackerName] = Field(
        default_factory=lambda: list[TrackerName](["tensorboard"]),
        description="experiment trackers mirroring metrics.jsonl (tensorboard, mlflow); [] writes metrics.jsonl only",
    )
    mlflow_uri: str | None = Field(
        None, description="mlflow tracker: tracking URI (default sqlite:///<out_dir>/mlflow.db, a local store)"
    )

    @field_validator("trackers")
    @classmethod
    def _each_tracker_once(cls, names: list[str]) -> list[str]:
        twice = sorted({name for name in names if names.count(name) > 1})
        if twice:
            raise ValueError(f"lists {', '.join(twice)} more than once")
        return names


class EvalConfig(_Section):
    batch_size: int = Field(128, ge=1)
    recall_ks: list[Annotated[int, Field(ge=1)]] | None = None
    clustering: bool = True
    backend: EvalBackend = "torch"


class ExperimentConfig(_Section):
    name: str = "experiment"
    data: DataConfig
    model: ModelConfig = Field(default_factory=ModelConfig)
    metaclass: MetaClassConfig = Field(default_factory=MetaClassConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    sampler: SamplerConfig = Field(default_factory=SamplerConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @model_validator(mode="after")
    def _check_combinations(self) -> ExperimentConfig:
        m = self.model
        if self.metaclass.strategy == "none" and m.num_learners != 1:
            raise ValueError(
                f"metaclass.strategy=none is the single-metric baseline and needs model.num_learners=1 "
                f"(got {m.num_learners})"
            )
        if self.metaclass.strategy != "none" and m.num_learners == 1:
            raise ValueError("model.num_learners=1 needs metaclass.strategy=none")
        if self.metaclass.learner_data == "all" and self.metaclass.strategy not in ("class_proxy", "random"):
            raise ValueError(
                f"metaclass.learner_data=all relabels whole classes and needs metaclass.strategy class_proxy "
                f"or random (got {self.metaclass.strategy})"
            )
        if self.train.sync_bn and m.freeze_bn:
            raise ValueError(
                "train.sync_bn=true needs model.freeze_bn=false (frozen BatchNorm layers use their "
                "running statistics and have nothing to synchronise)"
            )
        check_image_size(m.backbone, self.data.image_size)  # a ViT's patch grid tiles the image
        lo, hi = self.data.crop_scale
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError(f"data.crop_scale={list(self.data.crop_scale)} must satisfy 0 < min <= max <= 1")
        return self

    @model_validator(mode="after")
    def _check_edges(self) -> ExperimentConfig:
        check_experiment(self)  # seeds, limits, sizes: see gce.config.checks
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")
