"""The WD taggers' interface as a module: NHWC BGR images in 0..255 in, probabilities in the vocabulary's order out.

Both the torch backend and the ONNX export run these modules, so the two backends compute the same function. The
WD ONNX taggers take float32 NHWC images with values 0..255 in BGR order (the image composited onto white, padded to a
white square and resized with bicubic) and give one output of probabilities of the rating, general and character
tags (selected_tags.csv); tools written for them read the first output. `WDOutputs`, what the ONNX file holds, gives
that first output, then one output per other head (copyright, artist: extra_tags.csv), then the pooled feature
vector, which is ours (for `extract_feature` and similar-image search).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..formats.bundle import WD_HEADS
from .tagger import TaggerNet


def _to_nchw_rgb(x: Tensor) -> Tensor:
    """[B, H, W, 3] BGR -> [B, 3, H, W] RGB (a view: channels-last memory, which convolutions take as they are)."""
    return x.permute(0, 3, 1, 2).flip(1)


class WDInterface(nn.Module):
    """Our tagger behind the WD interface: probabilities of every output (each head's own activation), concatenated
    in head order (which is selected_tags.csv's order), and the feature vector."""

    def __init__(self, tagger: TaggerNet):
        super().__init__()
        self.tagger = tagger

    def heads(self, x: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        """Each head's probabilities, and the feature vector, of an NHWC BGR batch."""
        features = self.tagger.forward_features(_to_nchw_rgb(x))
        pooled = self.tagger.forward_head(features, pre_logits=True)
        logits = self.tagger.forward_head(features)
        return self.tagger.activate({k: v.float() for k, v in logits.items()}), pooled.float()

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        probs, pooled = self.heads(x)
        return torch.cat([probs[h.name] for h in self.tagger.cfg.heads], dim=1), pooled


class WDOutputs(nn.Module):
    """What the ONNX file computes: the WD heads' probabilities (rating, general, character, concatenated: output 0,
    what WD front ends read), then each other head's (copyright, artist) as an output of its own, then the feature
    vector. Their concatenation is `WDInterface`'s probabilities.

    With `input_size` other than the model's, the file takes images of that size and resizes them to the model's
    inside the graph (bicubic, antialiased): for front ends that fix the size (kohya's tagger feeds 448 px)."""

    def __init__(self, tagger: TaggerNet, input_size: int | None = None):
        super().__init__()
        self.interface = WDInterface(tagger)
        self.wd = [h.name for h in tagger.cfg.heads if h.name in WD_HEADS]
        self.extra = [h.name for h in tagger.cfg.heads if h.name not in WD_HEADS]
        self.size = tagger.cfg.image_size
        self.input_size = input_size or self.size

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        if self.input_size != self.size:
            nchw = F.interpolate(x.permute(0, 3, 1, 2), size=(self.size, self.size), mode="bicubic", antialias=True)
            x = nchw.clamp(0, 255).permute(0, 2, 3, 1)
        probs, pooled = self.interface.heads(x)
        return torch.cat([probs[h] for h in self.wd], dim=1), *(probs[h] for h in self.extra), pooled


class TimmWD(nn.Module):
    """A WD tagger v3 timm snapshot (one classifier over every tag, sigmoid) behind the same interface.

    Those models take BGR: SmilingWolf trained them on BGR images, and the reference script for the timm snapshots
    (wdv3_timm.py) normalises RGB with the config's mean and std, then reorders the channels to BGR
    (`inputs[:, [2, 1, 0]]`) before the forward pass. So the NHWC BGR batch is only permuted to NCHW here, never
    flipped, and each channel is normalised with the mean and std of the RGB channel it came from.
    """

    def __init__(self, model: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.model = model
        # The config's mean and std are listed R, G, B; the input's channels are B, G, R.
        mean_t = torch.tensor(mean, dtype=torch.float32).flip(0).view(1, 3, 1, 1)
        std_t = torch.tensor(std, dtype=torch.float32).flip(0).view(1, 3, 1, 1)
        self.register_buffer("scale", 1.0 / (255.0 * std_t), persistent=False)
        self.register_buffer("shift", -mean_t / std_t, persistent=False)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = torch.addcmul(self.shift, x.permute(0, 3, 1, 2).to(self.scale.dtype), self.scale)
        features = self.model.forward_features(x)
        pooled = self.model.forward_head(features, pre_logits=True)
        # The full head rather than get_classifier()(pooled): some timm heads do more than one Linear.
        return self.model.forward_head(features).float().sigmoid(), pooled.float()
