"""The tagger: a backbone (any timm model, or the seed's VGG16) with one head per tag category, built from a config."""

from __future__ import annotations

import dataclasses
import numbers
import os
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from timm.models import get_pretrained_cfg
from torch import Tensor, nn

from ..errors import UserError
from ..formats.categories import HEAD_ORDER
from ..formats.run import load_weights
from .seed import I2VVGG16, SEED_BACKBONE, SEED_WIDTH, load_imagenet_vgg16, seed_head

ACTIVATIONS = ("sigmoid", "softmax")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


@dataclass(frozen=True)
class HeadConfig:
    """One output head: a tag category, its number of tags and how its logits become probabilities."""

    name: str  # rating, general, character, copyright, artist
    classes: int
    activation: str  # "sigmoid" (multi-label) or "softmax" (single-label)

    def __post_init__(self) -> None:
        if self.name not in HEAD_ORDER:
            raise UserError(f"unknown head {self.name!r}: heads are {', '.join(HEAD_ORDER)}")
        if self.activation not in ACTIVATIONS:
            raise UserError(f"head {self.name!r}: activation {self.activation!r} is neither sigmoid nor softmax")
        if isinstance(self.classes, bool) or not isinstance(self.classes, numbers.Integral) or self.classes < 1:
            raise UserError(f"head {self.name!r}: classes must be a positive integer, not {self.classes!r}")
        object.__setattr__(self, "classes", int(self.classes))  # a numpy count would not survive JSON


@dataclass(frozen=True)
class TaggerConfig:
    """Everything needed to rebuild a tagger; saved as JSON in runs and bundles."""

    name: str  # preset name, or the timm model name for a plain backbone
    backbone: str  # "i2v_vgg16" (the seed's) or any timm model name
    image_size: int
    heads: tuple[HeadConfig, ...]  # output order: rating, general, character, copyright, artist (the vocabulary's)
    mean: tuple[float, float, float] = IMAGENET_MEAN  # on a 0..1 scale, RGB
    std: tuple[float, float, float] = IMAGENET_STD
    drop_rate: float = 0.0  # dropout in the heads (the seed: 0.5, also on its low and high features)
    freeze: str | None = None  # freeze every backbone parameter up to and including this module (seed: "block4_conv1")
    head_hidden: int = 0  # 0: one linear layer per head; >0: Linear(hidden) + ReLU + Linear (the seed: 512)
    global_pool: str = ""  # timm's pooling of the last feature map ("avg", "max", "avgmax", ...); "": the model's own
    # More keyword arguments for timm.create_model, as a WD tagger v3 snapshot's config.json gives them ("model_args":
    # class_token, fc_norm, act_layer, ...): they change the backbone's layout. {}: the model's own.
    backbone_args: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        # JSON and keyword overrides bring lists and dicts; the config keeps tuples and HeadConfigs, so that it
        # compares equal to the one it was saved from.
        try:
            heads = tuple(h if isinstance(h, HeadConfig) else HeadConfig(**h) for h in self.heads)
            object.__setattr__(self, "heads", heads)
            object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
            object.__setattr__(self, "std", tuple(float(v) for v in self.std))
            object.__setattr__(self, "backbone_args", dict(self.backbone_args))
        except (TypeError, ValueError) as e:  # a head that is not one, a mean that is no number
            raise UserError(f"{self.name}: heads, mean or std malformed ({e})") from None
        for attr, kind in (
            ("image_size", numbers.Integral),
            ("drop_rate", numbers.Real),
            ("head_hidden", numbers.Integral),
        ):
            value = getattr(self, attr)
            if isinstance(value, bool) or not isinstance(value, kind):
                raise UserError(f"{self.name}: {attr} must be a number, not {value!r}")
        names = [h.name for h in heads]
        if not names:
            raise UserError(f"{self.name}: a tagger needs at least one head")
        if names != sorted(set(names), key=HEAD_ORDER.index):
            raise UserError(f"{self.name}: heads {names} must be distinct and in the vocabulary's order {HEAD_ORDER}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise UserError(f"{self.name}: mean and std need three values (RGB), std positive")
        if self.image_size < 1:
            raise UserError(f"{self.name}: image_size must be positive, not {self.image_size}")
        if not 0.0 <= self.drop_rate < 1.0:
            raise UserError(f"{self.name}: drop_rate must be in [0, 1), not {self.drop_rate}")
        if self.head_hidden < 0:
            raise UserError(f"{self.name}: head_hidden must be >= 0, not {self.head_hidden}")

    def to_dict(self) -> dict:
        """The config as JSON-ready values (lists, not tuples)."""
        d = dataclasses.asdict(self)
        d["heads"] = [dict(h) for h in d["heads"]]
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TaggerConfig:
        """The config that `to_dict` wrote, also after a trip through JSON."""
        if not isinstance(d, Mapping):
            raise UserError(f"a tagger config is a JSON object of TaggerConfig's fields, not {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise UserError(f"unknown tagger config fields {unknown}; known: {sorted(known)}")
        try:
            return cls(**d)
        except TypeError as e:  # a missing field
            raise UserError(f"incomplete tagger config: {e}") from None


def default_heads(sizes: Mapping[str, int], softmax: Iterable[str] = ()) -> tuple[HeadConfig, ...]:
    """Heads for a vocabulary: sizes like {"rating": 4, "general": 60, "character": 20, ...}, returned in HEAD_ORDER.

    Rating is always softmax (a post has exactly one); heads named in `softmax` are softmax too (the seed's character
    and copyright), the rest sigmoid.
    """
    softmax = set(softmax)
    unknown = sorted((set(sizes) | softmax) - set(HEAD_ORDER))
    if unknown:
        raise UserError(f"unknown heads {unknown}: heads are {', '.join(HEAD_ORDER)}")
    softmax.add("rating")
    return tuple(
        HeadConfig(name, int(sizes[name]), "softmax" if name in softmax else "sigmoid")
        for name in HEAD_ORDER
        if name in sizes
    )


# The heads of a preset before a vocabulary sizes them; training replaces them with default_heads(vocabulary sizes).
WD_HEADS = default_heads({"rating": 4, "general": 512, "character": 512, "copyright": 512})
SEED_HEADS = default_heads({"general": 512, "character": 512, "copyright": 512}, softmax=("character", "copyright"))

# Preset name -> TaggerConfig fields (the name is the key). Mean and std are those of the weights that
# create_tagger(..., pretrained=True) loads, so that pretrained backbones see the inputs they were trained on.
PRESETS: dict[str, dict[str, Any]] = {
    # The seed exactly as DESIGN.md gives it: 256 px, dropout 0.5 wherever it had dropout, Dense 512 in each head,
    # blocks 1-3 and block4_conv1 frozen, no rating head. Its pretrained convolutions are torchvision's ImageNet
    # VGG16 (hence torch-style mean and std); a Keras converter sets the caffe-style ones of Keras's weights instead.
    "i2v_vgg16": dict(
        backbone=SEED_BACKBONE,
        image_size=256,
        heads=SEED_HEADS,
        drop_rate=0.5,
        freeze="block4_conv1",
        head_hidden=512,
    ),
    # Small and fast, for the CPU and the demo. On this 2-core CPU at 128 px, batch 64, fwd+bwd of the backbone:
    # mobilenetv3_small_100 560 img/s, regnetx_002 335, regnetx_004 222, ghostnet_100 152, mobilenetv3_large_100 143,
    # resnet10t 110, resnet18 97, efficientnet_b0 68, resnet14t 61. Trained on 4,000 synthetic-board images (AdamW,
    # cosine), val mAP general/character: resnet10t learns the most per epoch (0.67/0.53 after 4 epochs, 0.79/0.80
    # after 8, ~4.5 min), MobileNetV3-small the most per second (0.75/0.77 after 8 epochs at lr 5e-3 in 77 s,
    # 0.78/0.79 after 16 in 2.7 min); the RegNets and MobileNetV3-large did no better per epoch than it.
    # Short runs decided it: 1,500 posts at 96 px, 3 epochs, reach val general mAP / character top-1 of 0.51/0.57
    # with resnet10t and 0.32/0.30 with MobileNetV3-small (`python -m bench quality`); a tagger that needs ten
    # epochs before it shows anything is a poor default, so resnet10t it is.
    # Pooling: the average of the last map drowns a tag drawn in a few pixels (an eye colour, a small prop) in
    # the rest of the picture; the maximum keeps it. Concatenating both ("catavgmax", 1,024 features) beat either
    # alone on the short run, with the same speed (README, "Pooling").
    "i2v_small": dict(backbone="resnet10t", image_size=128, heads=WD_HEADS, global_pool="catavgmax"),
    # Base-size taggers at 448 px, as the WD v3 taggers.
    "i2v_convnext_base": dict(backbone="convnext_base", image_size=448, heads=WD_HEADS),
    "i2v_vit_base": dict(
        backbone="vit_base_patch16_224", image_size=448, heads=WD_HEADS, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)
    ),
}


def create_tagger(name_or_cfg: str | TaggerConfig, pretrained: bool = False, **overrides: Any) -> TaggerNet:
    """A preset name, any timm model name (used as the backbone with default heads), or a config; overrides replace
    fields (e.g. heads=..., image_size=...).

    Args:
        name_or_cfg: a key of PRESETS, a timm model name (`timm.list_models()`), or a TaggerConfig.
        pretrained: load the backbone's pretrained weights (timm's, downloaded on first use); heads start random.
        **overrides: TaggerConfig fields to replace, e.g. `heads=default_heads(sizes)` or `image_size=224`.
    """
    cfg = name_or_cfg if isinstance(name_or_cfg, TaggerConfig) else _named_config(name_or_cfg)
    unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(TaggerConfig)})
    if unknown:
        raise UserError(f"unknown tagger config fields {unknown}")
    return TaggerNet(dataclasses.replace(cfg, **overrides), pretrained=pretrained)


def load_tagger(config: Mapping[str, Any], weights: str | os.PathLike) -> TaggerNet:
    """A saved tagger, in eval mode on the CPU: its config as `TaggerConfig.to_dict` wrote it (the "model" entry of
    a run's or a bundle's config.json) and its weights file (safetensors, loaded strictly)."""
    model = create_tagger(TaggerConfig.from_dict(config))
    load_weights(Path(weights), model)
    return model.eval()


def _named_config(name: str) -> TaggerConfig:
    if name in PRESETS:
        return TaggerConfig(name=name, **PRESETS[name])
    if timm.is_model(name):
        # A plain timm model tags at the input size and normalisation of its default pretrained weights.
        pcfg = get_pretrained_cfg(name)
        size = pcfg.input_size[-1] if pcfg else 224
        mean, std = (pcfg.mean, pcfg.std) if pcfg else (IMAGENET_MEAN, IMAGENET_STD)
        return TaggerConfig(name=name, backbone=name, image_size=size, heads=WD_HEADS, mean=mean, std=std)
    raise UserError(
        f"unknown model {name!r}: neither a preset ({', '.join(PRESETS)}) nor a timm model name (timm.list_models())"
    )


class TaggerNet(nn.Module):
    """A backbone and one head per tag category, in `cfg.heads` order.

    It takes images as the loader yields them: NCHW RGB, uint8 or float in 0..255. It scales and normalises them
    itself with the config's mean and std, so the loader, export and inference never normalise.
    """

    def __init__(self, cfg: TaggerConfig, pretrained: bool = False):
        super().__init__()
        self.cfg = cfg
        self.is_seed = cfg.backbone == SEED_BACKBONE
        if self.is_seed:
            if cfg.global_pool:
                raise UserError(f"{cfg.name}: the seed pools as DESIGN.md gives it; global_pool is for timm backbones")
            if cfg.image_size < 96:
                raise UserError(f"{cfg.name}: the seed's valid 3x3 conv needs images of at least 96 px")
            self.backbone = I2VVGG16(cfg.drop_rate)
            if pretrained:
                load_imagenet_vgg16(self.backbone, timm.create_model("vgg16", pretrained=True))
            hidden = cfg.head_hidden
            heads = {h.name: seed_head(h.name, SEED_WIDTH, hidden, h.classes, cfg.drop_rate) for h in cfg.heads}
        elif timm.is_model(cfg.backbone):
            pcfg = get_pretrained_cfg(cfg.backbone)
            # Models whose input size is fixed (a ViT's position embeddings) are built for ours; timm resamples
            # pretrained position embeddings to match.
            sized = dict(cfg.backbone_args)
            if pcfg is not None and pcfg.fixed_input_size:
                sized["img_size"] = cfg.image_size
            if cfg.global_pool:
                sized["global_pool"] = cfg.global_pool
            try:
                self.backbone = timm.create_model(cfg.backbone, pretrained=pretrained, num_classes=0, **sized)
            except (AssertionError, ValueError, TypeError) as e:  # timm asserts on a pooling a model does not have
                if not cfg.global_pool:
                    raise
                raise UserError(
                    f"{cfg.name}: {cfg.backbone} does not take global_pool={cfg.global_pool!r} ({e})"
                ) from e
            heads = {h.name: _head(self.num_features, h.classes, cfg.head_hidden, cfg.drop_rate) for h in cfg.heads}
        else:
            raise UserError(
                f"{cfg.name}: unknown backbone {cfg.backbone!r}: neither {SEED_BACKBONE!r} nor a timm model name"
            )
        self.heads = nn.ModuleDict(heads)
        # (x / 255 - mean) / std as one multiply-add. Buffers follow the model's device and dtype; not persistent,
        # because the config, not the weights file, owns the normalisation.
        std = torch.tensor(cfg.std).view(1, 3, 1, 1)
        self.register_buffer("input_scale", 1.0 / (255.0 * std), persistent=False)
        self.register_buffer("input_shift", -torch.tensor(cfg.mean).view(1, 3, 1, 1) / std, persistent=False)
        if cfg.freeze:
            self._freeze(cfg.freeze)
            self.train()

    @property
    def num_features(self) -> int:
        """The size of the feature vector (`extract_feature`)."""
        # timm's pre-logits vector can be wider than its last feature map: a conv head after the pooling
        # (MobileNetV3: head_hidden_size), or a pooling that concatenates (catavgmax: feat_mult 2), which timm
        # before 1.0.31 does not count in head_hidden_size.
        mapped = self.backbone.num_features
        hidden = getattr(self.backbone, "head_hidden_size", mapped)
        if hidden != mapped:
            return hidden
        pool = getattr(self.backbone, "global_pool", None)
        return mapped * (pool.feat_mult() if hasattr(pool, "feat_mult") else 1)

    def normalize(self, x: Tensor) -> Tensor:
        """Images in 0..255 (uint8 or float) -> the backbone's normalised float input."""
        # Out of place, so a float input tensor is left as it was.
        return torch.addcmul(self.input_shift, x.to(self.input_scale.dtype), self.input_scale)

    def forward_features(self, x: Tensor) -> Any:
        """The backbone's features (a map or tokens; the seed: its low and high maps) of 0..255 images."""
        return self.backbone.forward_features(self.normalize(x))

    def forward_head(self, features: Any, pre_logits: bool = False) -> Tensor | dict[str, Tensor]:
        """pre_logits: the pooled feature vector [B, num_features]; otherwise head name -> logits [B, classes]."""
        pooled = self.backbone.forward_head(features, pre_logits=True)
        if pre_logits:
            return pooled
        if self.is_seed:
            low = self.backbone.pool_low(features)  # the seed's general ("attribute") head reads the low features
            return {name: head(low if name == "general" else pooled) for name, head in self.heads.items()}
        return {name: head(pooled) for name, head in self.heads.items()}

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """Logits per head, in cfg.heads order, of images NCHW RGB in 0..255."""
        return self.forward_head(self.forward_features(x))

    def extract_feature(self, x: Tensor) -> Tensor:
        """The feature vector [B, num_features] of images in 0..255, for similarity search."""
        return self.forward_head(self.forward_features(x), pre_logits=True)

    def activate(self, logits: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Probabilities from logits: each head's own activation."""
        act = {h.name: h.activation for h in self.cfg.heads}
        return {name: v.softmax(-1) if act[name] == "softmax" else v.sigmoid() for name, v in logits.items()}

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters that `freeze` left trainable (for the optimiser)."""
        return [p for p in self.parameters() if p.requires_grad]

    def train(self, mode: bool = True) -> TaggerNet:
        """Training mode, except that frozen BatchNorm layers stay in eval mode."""
        super().train(mode)
        if mode:
            # A frozen BatchNorm keeps its running statistics too, or fine-tuning would drift them. Found afresh each
            # time, so that it holds after SyncBatchNorm conversion (which keeps the same Parameter objects).
            for m in self.modules():
                params = list(m.parameters(recurse=False))
                if isinstance(m, _BATCH_NORMS) and params and not any(p.requires_grad for p in params):
                    m.eval()
        return self

    def _freeze(self, name: str) -> None:
        """Stop gradients for the backbone's parameters registered up to and including module `name`.

        `name` is as in `backbone.named_modules()`, with or without "backbone." in front.
        """
        target = name.removeprefix("backbone.")
        modules = list(self.backbone.named_modules())
        names = [n for n, _ in modules]
        if not target or target not in names:
            top = ", ".join(n for n, _ in self.backbone.named_children())
            raise UserError(f"freeze: {self.cfg.backbone} has no module {name!r}; its top-level modules: {top}")
        # named_modules goes in registration order, each module before its children: the target's subtree
        # is the run of names under it that follows it.
        end = names.index(target) + 1
        while end < len(names) and names[end].startswith(target + "."):
            end += 1
        for _, module in modules[:end]:
            for p in module.parameters(recurse=False):
                p.requires_grad_(False)


def _head(in_features: int, classes: int, hidden: int, drop_rate: float) -> nn.Sequential:
    """A head on the pooled feature vector: dropout, then one linear layer, or Linear(hidden) + ReLU + Linear."""
    if hidden == 0:
        return nn.Sequential(OrderedDict(drop=nn.Dropout(drop_rate), fc=nn.Linear(in_features, classes)))
    return nn.Sequential(
        OrderedDict(
            drop=nn.Dropout(drop_rate),
            fc1=nn.Linear(in_features, hidden),
            act=nn.ReLU(inplace=True),
            fc2=nn.Linear(hidden, classes),
        )
    )
