"""`TrainConfig`: everything that decides a training run, checked when it is made, saved as the run's config.json."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import UserError
from ..formats.categories import HEAD_ORDER
from ..formats.dataset import VERIFY
from ..models.tagger import TaggerConfig
from ..util import storage
from ..util.cores import cores
from .losses import LossConfig

AMP = ("auto", "bf16", "fp16", "off")
SWITCH = ("auto", "on", "off")
DEVICES = ("auto", "cuda", "cpu")
# TaggerConfig fields a run does not override: the preset or timm name gives the backbone, the dataset the image
# size, and the vocabulary (with `softmax` and `rating_head`) the heads.
NOT_OVERRIDDEN = ("name", "backbone", "heads", "image_size", "backbone_args")
VOCAB_MODES = ("union", "data")  # --init: the model's tags and the data's, or the data's alone
# --init's model overrides: the rest (pooling, head layout, normalisation) would change the model being extended.
INIT_OVERRIDES = ("freeze", "drop_rate")
# Fields that config.json's "train" held before TaggerConfig overrides moved into `model`.
_OLD_MODEL_FIELDS = ("freeze", "global_pool")


def default_workers() -> int:
    """Loader processes: every core but one, which the training step needs for itself (at most 8). On 2 cores,
    one worker keeps the model fed at 0.95 of in-memory speed where two gave 0.85 (`python -m bench train`)."""
    return max(1, min(8, cores() - 1))


def model_override_fields() -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(TaggerConfig) if f.name not in NOT_OVERRIDDEN)


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a training run; saved as the run's config.json."""

    data: str
    out: str
    arch: str | None = None  # None: i2v_small, or with `init` the init model's own architecture
    epochs: int = 10
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 0.05
    warmup: float = 0.2  # epochs of linear warm-up before the cosine decay
    min_lr_ratio: float = 0.02  # the cosine ends at lr * min_lr_ratio
    clip_grad: float = 1.0  # max gradient norm; 0 turns clipping off
    workers: int = field(default_factory=lambda: default_workers())  # loader processes: one core is the model's
    seed: int = 0
    select_by: str = "general/mAP"  # the validation metric that picks the best epoch (higher is better; loss: lower)
    threshold: float = 0.5  # for precision, recall and F1 during training; `i2v evaluate` calibrates its own
    amp: str = "auto"  # auto: bf16 on a GPU, off on the CPU; or bf16, fp16, off
    channels_last: str = "auto"  # auto: on a GPU
    pretrained: bool = False
    # TaggerConfig fields that replace the preset's: freeze (the seed freezes through block4_conv1), global_pool
    # (timm's pooling: "avg", "max", "catavgmax", ...), drop_rate, head_hidden, mean, std. {}: the preset's own.
    model: Mapping[str, Any] = field(default_factory=dict)
    softmax: tuple[str, ...] | None = None  # heads with softmax; None keeps the preset's
    rating_head: bool | None = None  # None keeps the preset's (all but the seed's have one)
    loss: LossConfig = field(default_factory=LossConfig)
    sync_bn: bool = True  # SyncBatchNorm across processes under DDP
    device: str = "auto"
    max_steps_per_epoch: int | None = None  # cut epochs short (tests, benchmarks)
    prior_init: bool = True  # start each head's output bias at its tags' frequency in the training split
    # Samples that cannot be read (a member cut short, a corrupt image) are skipped and counted; past this many in
    # one epoch's training (or validation) the run stops with one line. 0: stop at the first.
    max_bad_samples: int = 100
    verify: str = "auto"  # shards against dataset.json before training: auto, sizes or checksums (formats.dataset)
    # Extending a trained tagger (train/init.py): a run (RUN or RUN@EPOCH), a bundle, a WD tagger v3 timm snapshot
    # or a Hugging Face repo id. Its architecture, input size, normalisation and heads' rows carry over.
    init: str | None = None
    vocab: str = "union"  # with init: the init model's tags plus the data's (union), or the data's alone (data)
    freeze_backbone: bool = False  # train the heads only
    backbone_lr_scale: float | None = None  # the backbone's learning rate over the heads'; None: 0.1 with init, else 1
    # With init: weight of the original model's outputs for its own tags as soft targets (learning without
    # forgetting); None: 1 with init, else 0 (no original model to keep).
    keep_old: float | None = None
    # With init: fit the new tags' rows by logistic regression on the original's features before training
    # (train/probe.py); None: when a tenth of DATA's posts show the original's characters (probe.py).
    probe_new: bool | None = None
    # i2v distill: `data` is a teacher's soft-target cache (formats/teacher.py); the student learns the teacher's
    # probabilities and is measured by its agreement with the teacher (train/distill.py).
    distill: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "model", dict(self.model))
        if self.softmax is not None:
            object.__setattr__(self, "softmax", tuple(self.softmax))
        if self.arch is None and self.init is None:
            object.__setattr__(self, "arch", "i2v_small")
        if self.backbone_lr_scale is None:
            object.__setattr__(self, "backbone_lr_scale", 0.1 if self.init else 1.0)
        if self.keep_old is None:
            object.__setattr__(self, "keep_old", 1.0 if self.init else 0.0)
        if isinstance(self.loss, Mapping):  # from JSON
            try:
                object.__setattr__(self, "loss", LossConfig(**self.loss))
            except TypeError as e:
                raise UserError(f"loss: {e}") from None
        _check(self)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> TrainConfig:
        """The config `to_json` wrote, also the shape runs wrote before `model` held the TaggerConfig overrides
        (freeze and global_pool beside the other fields)."""
        d = dict(d)
        model = dict(d.pop("model", {}))
        for name in _OLD_MODEL_FIELDS:
            if name in d:
                value = d.pop(name)
                if value is not None:
                    model[name] = value
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise UserError(f"config.json: unknown training settings {', '.join(unknown)}")
        return cls(**d, model=model)

    @property
    def select_key(self) -> str:
        return self.select_by if self.select_by.startswith("val/") else f"val/{self.select_by}"


def _check(cfg: TrainConfig) -> None:
    """One line naming the field, for the first setting that cannot work."""
    for name in ("data", "out", "arch", "select_by", "init"):
        if name in ("arch", "init") and getattr(cfg, name) is None:
            continue
        if not isinstance(getattr(cfg, name), str) or not getattr(cfg, name):
            raise UserError(f"{name} must be a non-empty string, not {getattr(cfg, name)!r}")
    if storage.is_remote(cfg.out):  # the data may be a URL; the run directory is a local folder
        raise UserError(f"out: the run directory must be a local folder, not {storage.display(cfg.out)}")
    for name, allowed in (("amp", AMP), ("channels_last", SWITCH), ("device", DEVICES), ("verify", VERIFY)):
        if getattr(cfg, name) not in allowed:
            raise UserError(f"{name} must be one of {', '.join(allowed)}, not {getattr(cfg, name)!r}")
    for name, low in (("epochs", 1), ("batch_size", 1), ("workers", 0), ("seed", 0), ("max_bad_samples", 0)):
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise UserError(f"{name} must be an integer of at least {low}, not {value!r}")
    if cfg.max_steps_per_epoch is not None and (
        not isinstance(cfg.max_steps_per_epoch, int) or cfg.max_steps_per_epoch < 1
    ):
        raise UserError(f"max_steps_per_epoch must be at least 1 (or None), not {cfg.max_steps_per_epoch!r}")
    for name in ("lr", "weight_decay", "warmup", "clip_grad"):
        value = getattr(cfg, name)
        if not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
            raise UserError(f"{name} must be a number of at least 0, not {value!r}")
    for name in ("min_lr_ratio", "threshold"):
        if not isinstance(getattr(cfg, name), int | float) or not 0 <= getattr(cfg, name) <= 1:
            raise UserError(f"{name} must be in [0, 1], not {getattr(cfg, name)!r}")
    allowed = model_override_fields()
    unknown = sorted(set(cfg.model) - set(allowed))
    if unknown:
        raise UserError(f"model overrides {', '.join(unknown)} are not among {', '.join(allowed)}")
    wrong = sorted(set(cfg.softmax or ()) - set(HEAD_ORDER))
    if wrong:
        raise UserError(f"softmax: unknown heads {', '.join(wrong)}; heads are {', '.join(HEAD_ORDER)}")
    if not isinstance(cfg.loss, LossConfig):
        raise UserError(f"loss must be a LossConfig, not {type(cfg.loss).__name__}")
    _check_init(cfg)


def _check_init(cfg: TrainConfig) -> None:
    """The settings of extending a model (`init`), and those that --init decides itself."""
    for name in ("backbone_lr_scale", "keep_old"):
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
            raise UserError(f"{name} must be a number of at least 0, not {value!r}")
    if cfg.vocab not in VOCAB_MODES:
        raise UserError(f"vocab must be one of {', '.join(VOCAB_MODES)}, not {cfg.vocab!r}")
    if not isinstance(cfg.distill, bool):
        raise UserError(f"distill must be true or false, not {cfg.distill!r}")
    if cfg.distill and cfg.init is not None:
        raise UserError("distill: a student starts from its architecture (or --pretrained), not from --init")
    if cfg.probe_new is not None and not isinstance(cfg.probe_new, bool):
        raise UserError(f"probe_new must be true, false or null (auto), not {cfg.probe_new!r}")
    if not isinstance(cfg.freeze_backbone, bool):
        raise UserError(f"freeze_backbone must be true or false, not {cfg.freeze_backbone!r}")
    if cfg.init is None:
        if cfg.keep_old:
            raise UserError("keep_old needs init: it keeps the outputs of the model that --init names")
        if cfg.vocab != "union":
            raise UserError("vocab needs init: without it the vocabulary is the data's")
        return
    taken = [name for name, value in (("pretrained", cfg.pretrained), ("softmax", cfg.softmax)) if value]
    taken += ["rating_head"] if cfg.rating_head is not None else []
    taken += [f"model {k}" for k in cfg.model if k not in INIT_OVERRIDES]
    if taken:
        raise UserError(f"init: {', '.join(taken)} come from the init model, not from options")
