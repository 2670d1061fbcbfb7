"""`i2v show`: one image beside bars of its top tags per category, optionally with a Grad-CAM heat map for one tag.

The bars are the seed's notebook picture: horizontal bars with the score, tags grouped by category, each category's
threshold drawn, tags at or above it highlighted. The scores come from `infer.tagger.Tagger`, exactly as `i2v tag`
computes them; the heat map needs the torch weights of an illust2vec bundle.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..errors import UserError
from ..formats.bundle import Labels, is_bundle, open_bundle
from ..util.images import BadImage
from .preprocess import prepare, read_image
from .tagger import Tagger
from .thresholds import Selection, resolve

DISPLAY = 512  # longer side of the picture in the figure, in pixels (at least twice the model's input)
# Colours of the bars: above the threshold (the tags `i2v tag` reports) and below it.
ABOVE, BELOW = "#2a7ab9", "#c9c9c9"


@dataclass(frozen=True)
class ShowConfig:
    """What `i2v show` draws: which image, with which model, into which file."""

    image: Path
    model: Path
    out: Path
    explain: str | None = None  # a tag to overlay a Grad-CAM heat map for
    top: int = 10  # bars per category (rating: all its classes)
    selection: Selection = Selection()  # thresholds, as `i2v tag` takes them
    backend: str = "auto"  # for the scores; the heat map always runs torch
    device: str = "auto"

    def __post_init__(self) -> None:
        for name in ("image", "model", "out"):
            object.__setattr__(self, name, Path(getattr(self, name)))
        if not isinstance(self.top, int) or self.top < 1:
            raise UserError(f"--top must be at least 1, not {self.top!r}")
        if not isinstance(self.selection, Selection):
            raise UserError(f"ShowConfig.selection: a Selection, not {type(self.selection).__name__}")
        _pyplot()
        from matplotlib.backend_bases import FigureCanvasBase

        formats = FigureCanvasBase.get_supported_filetypes()
        suffix = self.out.suffix.lower().lstrip(".")
        if suffix not in formats:
            raise UserError(
                f"--out {self.out}: unknown picture format {suffix!r}; use one of {', '.join(sorted(formats))}"
            )


@dataclass(frozen=True)
class Bar:
    """One tag's bar: its score, the threshold it is held to, and whether it passes (as `i2v tag` would report it)."""

    tag: str
    score: float
    threshold: float | None  # None: rating, which has no threshold (its classes sum to one)
    above: bool


@dataclass(frozen=True)
class TagRef:
    """Where a tag sits in a model's output: its head, its position in that head, and in the whole output."""

    tag: str
    head: str
    position: int
    index: int


def choose_bars(
    tagger: Tagger, probs: np.ndarray, top: int = 10, selection: Selection | None = None
) -> dict[str, list[Bar]]:
    """One image's probabilities -> head -> the `top` highest-scoring tags as Bars, highest first.

    Rating shows all its classes and highlights the one with the highest score (what the WD taggers report). For the
    other heads `above` comes from `Tagger.select`, so the highlighted tags are exactly those `i2v tag` prints.
    """
    selection = selection or Selection()
    selected = tagger.select(probs, selection)
    thresholds = head_thresholds(tagger, probs, selection)
    out: dict[str, list[Bar]] = {}
    for head, scores in tagger.scores(probs).items():
        items = list(scores.items())
        if head == "rating":
            out[head] = [Bar(t, s, None, i == 0) for i, (t, s) in enumerate(items)]
        else:
            out[head] = [Bar(t, s, thresholds[head].get(t), t in selected[head]) for t, s in items[:top]]
    return out


def head_thresholds(tagger: Tagger, probs: np.ndarray, selection: Selection) -> dict[str, dict[str, float]]:
    """Head -> tag -> the threshold `Tagger.select` holds it to (for drawing; select decides what passes)."""
    labels = tagger.labels
    resolved = resolve(labels.heads, labels.names, probs, tagger.thresholds, selection)
    return {
        head: {labels.names[i]: float(t) for i, t in zip(labels.heads[head], th.tags, strict=True)}
        for head, th in resolved.items()
    }


def find_tag(labels: Labels, tag: str) -> TagRef:
    """A tag by name (spaces for underscores accepted, as Illustration2Vec wrote tags); an unknown one is a UserError
    naming the closest tags of the vocabulary."""
    names = list(labels.names)
    for name in (tag, tag.strip().replace(" ", "_")):
        if name in names:
            index = names.index(name)
            for head, ix in labels.heads.items():
                if index in ix:
                    return TagRef(name, head, ix.index(index), index)
    close = difflib.get_close_matches(tag.replace(" ", "_"), names, n=5, cutoff=0.6)
    hint = f"; close matches: {', '.join(close)}" if close else f" ({len(names)} tags; none close)"
    raise UserError(f"--explain {tag!r}: not in the model's vocabulary{hint}")


def load_model(bundle: Path, device: str = "cpu") -> Any:
    """A bundle's weights in our tagger module (torch), in eval mode, for Grad-CAM."""
    try:
        import torch  # noqa: F401
    except ImportError:
        raise UserError("--explain needs torch: pip install 'illust2vec[infer]'") from None
    from ..util.device import resolve_device
    from .tagger import bundle_model

    if not is_bundle(Path(bundle)):
        raise UserError(f"{bundle}: --explain needs an illust2vec bundle (i2v export), for its torch weights")
    return bundle_model(open_bundle(Path(bundle))).to(resolve_device(device))


def gradcam(model: Any, image: Image.Image, head: str, position: int, input_size: int) -> np.ndarray:
    """Grad-CAM (Selvaraju et al., 2017) of one tag: where in `image` the evidence for its logit lies.

    The gradient of the tag's logit with respect to the last feature map the tag's head reads, averaged over space,
    weighs that map's channels; their ReLU'd sum, upsampled to the model's input square and cropped back to the
    image (the WD recipe pads to a white square), is the map. Timm backbones: the backbone's last map. The seed
    (i2v_vgg16): its high features for character and copyright, its low features for general tags, the map each
    head pools (a general tag's logit does not depend on the high features, so their gradient would be zero).

    Written here rather than taken from pytorch-grad-cam, because our tagger already splits `forward_features` from
    `forward_head` (timm's contract): the map is a tensor we hold, so no hooks and no target-layer lookup are needed,
    and the multi-head dict output and the seed's two maps would each need an adapter there.

    Args:
        model: our tagger module (`models.tagger.TaggerNet`, or anything with its `forward_features`/`forward_head`),
            in eval mode.
        image: an RGB PIL image.
        head, position: the tag (see `find_tag`).
        input_size: the model's input side in pixels.

    Returns:
        [H, W] float32 in 0..1, the image's height and width; all zero where the map is flat (nothing, or
        everything alike, speaks for the tag).
    """
    import torch
    import torch.nn.functional as F

    device = next(model.parameters()).device
    x = torch.from_numpy(np.ascontiguousarray(prepare(image, input_size)[:, :, ::-1]))  # BGR -> RGB, HWC
    x = x.permute(2, 0, 1)[None].to(device)
    with torch.no_grad():  # the backbone needs no graph: the gradient stops at the feature map
        features = model.forward_features(x)
    if isinstance(features, tuple):  # the seed: (low, high)
        k = 0 if head == "general" else 1
        fmap = features[k].detach().requires_grad_()
        features = tuple(fmap if i == k else f for i, f in enumerate(features))
    else:
        fmap = features = features.detach().requires_grad_()
    if fmap.ndim != 4:
        raise UserError(f"--explain needs a convolutional feature map; this backbone gives {tuple(fmap.shape)} tokens")
    nhwc = getattr(getattr(model, "backbone", None), "output_fmt", "NCHW") == "NHWC"  # swin and others
    with torch.enable_grad():
        logit = model.forward_head(features)[head][0, position]
        (grad,) = torch.autograd.grad(logit, fmap)
    fmap, grad = (fmap.detach().permute(0, 3, 1, 2), grad.permute(0, 3, 1, 2)) if nhwc else (fmap.detach(), grad)
    cam = F.relu((grad.mean((2, 3), keepdim=True) * fmap).sum(1, keepdim=True)).float()
    w, h = image.size
    side = max(w, h)
    cam = F.interpolate(cam, size=(side, side), mode="bilinear", align_corners=False)[0, 0]
    top, left = (side - h) // 2, (side - w) // 2  # prepare() pastes the image centred on the square
    cam = cam[top : top + h, left : left + w].cpu().numpy()
    # Scaled to 0..1 over the image, as the Grad-CAM paper's code and pytorch-grad-cam do; a flat map says nothing.
    low, high = float(cam.min()), float(cam.max())
    flat = high - low <= 1e-6 * max(high, 1e-12)
    return (np.zeros_like(cam) if flat else (cam - low) / (high - low)).astype(np.float32)


@dataclass(frozen=True)
class ShowResult:
    """What `show` drew: the bars, and the explained tag with its score when asked for."""

    out: Path
    bars: dict[str, list[Bar]]
    explained: TagRef | None = None
    explained_score: float | None = None


def show(cfg: ShowConfig) -> ShowResult:
    """Tag one image and draw it beside its bars (and a Grad-CAM overlay for `cfg.explain`) into `cfg.out`."""
    tagger = Tagger.load(cfg.model, backend=cfg.backend, device=cfg.device)
    try:
        picture = read_image(cfg.image)  # in full: draft mode would show it at twice the model's input size
    except BadImage as e:
        raise UserError(f"{cfg.image}: {e}") from None
    ref = find_tag(tagger.labels, cfg.explain) if cfg.explain else None
    model = load_model(cfg.model, cfg.device) if ref is not None else None  # fails early on a WD model
    probs = tagger.predict([cfg.image])[0]  # from the file, as `i2v tag` reads it
    bars = choose_bars(tagger, probs, cfg.top, cfg.selection)
    # The heat map is computed on the picture as shown: shrunk no further than twice the model's input, it gives the
    # model the same input as the full image, within the tolerance the torch and ONNX backends agree to.
    picture.thumbnail((max(DISPLAY, 2 * tagger.image_size),) * 2, Image.Resampling.BICUBIC)
    cam = gradcam(model, picture, ref.head, ref.position, tagger.image_size) if ref is not None else None
    score = float(probs[ref.index]) if ref is not None else None
    title = f"{Path(cfg.image).name}  ·  {Path(cfg.model).name}"
    draw(picture, bars, cfg.out, title, cam, f"Grad-CAM: {ref.tag} ({score:.2f})" if ref else None)
    return ShowResult(cfg.out, bars, ref, score)


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise UserError("i2v show needs matplotlib: pip install matplotlib (or 'illust2vec[train]')") from None
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def draw(
    picture: Image.Image,
    bars: Mapping[str, list[Bar]],
    out: Path,
    title: str = "",
    cam: np.ndarray | None = None,
    cam_label: str | None = None,
) -> None:
    """The figure: the picture (under the heat map, if given) on the left, one bar panel per head on the right."""
    plt = _pyplot()
    heads = [h for h in bars if bars[h]]
    rows = [len(bars[h]) + 1.5 for h in heads]  # room for each panel's title
    fig = plt.figure(figsize=(11, max(5.5, 0.24 * sum(rows) + 1)), dpi=100)
    grid = fig.add_gridspec(len(heads), 2, width_ratios=(1.2, 1), height_ratios=rows, wspace=0.3, hspace=0.6, top=0.93)
    ax = fig.add_subplot(grid[:, 0])
    ax.imshow(np.asarray(picture))
    if cam is not None:
        ax.imshow(
            cam,
            cmap="jet",
            alpha=0.45,
            vmin=0.0,
            vmax=1.0,
            extent=(-0.5, picture.width - 0.5, picture.height - 0.5, -0.5),
        )
        ax.set_title(cam_label or "Grad-CAM", fontsize=11)
    ax.set_axis_off()
    for row, head in enumerate(heads):
        _draw_head(fig.add_subplot(grid[row, 1]), head, bars[head])
    if title:
        fig.suptitle(title, fontsize=11)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, bbox_inches="tight")
    plt.close(fig)


def _draw_head(ax: Any, head: str, bars: list[Bar]) -> None:
    y = np.arange(len(bars))
    scores = [b.score for b in bars]
    ax.barh(y, scores, color=[ABOVE if b.above else BELOW for b in bars], height=0.75)
    ax.set_yticks(y, [b.tag for b in bars], fontsize=8)
    ax.invert_yaxis()  # highest first, at the top
    ax.set_xlim(0, 1.12)
    ax.tick_params(axis="x", labelsize=7)
    for i, b in enumerate(bars):
        ax.text(b.score + 0.01, i, f"{b.score:.3f}", va="center", fontsize=7)
    limits = {b.threshold for b in bars if b.threshold is not None}
    label = head
    if len(limits) == 1:  # one threshold for the head: a line across the panel
        (t,) = limits
        ax.axvline(t, color="#d62728", linestyle="--", linewidth=1)
        label += f"  (threshold {t:.2f})"
    else:  # per-tag thresholds: a tick on each bar
        for i, b in enumerate(bars):
            if b.threshold is not None:
                ax.plot([b.threshold] * 2, [i - 0.45, i + 0.45], color="#d62728", linewidth=1.2)
    ax.set_title(label, loc="left", fontsize=10)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
