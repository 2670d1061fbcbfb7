"""The seed's architecture, i2v_vgg16: VGG16 convolution blocks, its low and high features, and its heads."""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import UserError

SEED_BACKBONE = "i2v_vgg16"
VGG16_BLOCKS = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))  # widths of each conv
SEED_WIDTH = 512
# Keras's BatchNormalization defaults, so that a converted Keras model gives the same outputs: its momentum 0.99 is the
# weight of the old running value, torch's momentum the weight of the new batch.
BN_EPS = 1e-3
BN_MOMENTUM = 0.01


def _batch_norm(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


class I2VVGG16(nn.Module):
    """The seed's backbone: VGG16's conv blocks 1-5, then its "low" and "high" features.

    Each VGG16 conv is 3x3 + ReLU, with max-pooling after each block. Then the low features: BatchNorm, Dropout
    (8x8x512 at 256 px); and the high features: Conv 3x3 512 with valid padding, BatchNorm, Dropout (6x6x512).
    The convolutions carry the names of the Keras seed's summary (`block1_conv1` ... `block5_conv3`), so a Keras weight
    converter maps layers by name. The high features' convolution has no activation: DESIGN.md names none and a Keras
    Conv2D without one is linear. Dropout is element-wise, as Keras's Dropout on a feature map.
    """

    def __init__(self, drop_rate: float = 0.5):
        super().__init__()
        self.conv_names: list[str] = []
        self.pool_names: list[str] = []
        channels = 3
        for b, widths in enumerate(VGG16_BLOCKS, start=1):
            for c, width in enumerate(widths, start=1):
                self.conv_names.append(f"block{b}_conv{c}")
                self.add_module(self.conv_names[-1], nn.Conv2d(channels, width, 3, padding=1))
                channels = width
            self.pool_names.append(f"block{b}_pool")
            self.add_module(self.pool_names[-1], nn.MaxPool2d(2))
        self.low_features = nn.Sequential(OrderedDict(bn=_batch_norm(SEED_WIDTH), drop=nn.Dropout(drop_rate)))
        self.high_features = nn.Sequential(
            OrderedDict(
                conv=nn.Conv2d(SEED_WIDTH, SEED_WIDTH, 3),
                bn=_batch_norm(SEED_WIDTH),
                drop=nn.Dropout(drop_rate),
            )
        )
        self.num_features = SEED_WIDTH

    def convs(self) -> list[nn.Conv2d]:
        """The 13 VGG16 convolutions in order (for loading ImageNet weights)."""
        return [getattr(self, name) for name in self.conv_names]

    def forward_features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The low (8x8 at 256 px) and high (6x6) feature maps; the heads read one or the other."""
        names = iter(self.conv_names)
        for widths, pool in zip(VGG16_BLOCKS, self.pool_names, strict=True):
            for _ in widths:
                x = F.relu(getattr(self, next(names))(x), inplace=True)
            x = getattr(self, pool)(x)
        low = self.low_features(x)
        return low, self.high_features(low)

    def forward_head(self, features: tuple[Tensor, Tensor], pre_logits: bool = False) -> Tensor:
        """The seed's feature vector: the global average of the high features. It has no classifier of its own."""
        return features[1].mean((2, 3))

    def pool_low(self, features: tuple[Tensor, Tensor]) -> Tensor:
        """The global average of the low features, which the general ("attribute") head reads."""
        return features[0].mean((2, 3))

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x), pre_logits=True)


def seed_head(name: str, in_features: int, hidden: int, classes: int, drop_rate: float) -> nn.Sequential:
    """One of the seed's heads, on a pooled feature vector.

    General ("attribute"): Dense hidden (ReLU) -> Dense N -> Dropout, so its dropout acts on the logits, as in the
    seed. Every other head (character, copyright; rating and artist when asked for): Dense hidden (ReLU) -> Dropout ->
    Dense N.
    """
    if hidden <= 0:
        raise UserError(f"the seed's heads have a hidden layer: head_hidden must be > 0, not {hidden}")
    fc1, fc2 = nn.Linear(in_features, hidden), nn.Linear(hidden, classes)
    act, drop = nn.ReLU(inplace=True), nn.Dropout(drop_rate)
    if name == "general":
        return nn.Sequential(OrderedDict(fc1=fc1, act=act, fc2=fc2, drop=drop))
    return nn.Sequential(OrderedDict(fc1=fc1, act=act, drop=drop, fc2=fc2))


def load_imagenet_vgg16(seed: I2VVGG16, vgg: nn.Module) -> None:
    """Copy an ImageNet VGG16's 13 convolutions into the seed's blocks, as the seed started from ImageNet VGG16.

    `vgg` is timm's `vgg16`, whose `features` hold torchvision's weights.
    """
    theirs = [m for m in vgg.features if isinstance(m, nn.Conv2d)]
    ours = seed.convs()
    shapes = [tuple(m.weight.shape) for m in theirs]
    if shapes != [tuple(m.weight.shape) for m in ours]:
        raise ValueError(f"not a VGG16: its convolutions have shapes {shapes}")
    with torch.no_grad():
        for dst, src in zip(ours, theirs, strict=True):
            dst.weight.copy_(src.weight)
            dst.bias.copy_(src.bias)
