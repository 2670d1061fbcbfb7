"""Training curves as a picture: one panel per metric, one line per category, as the seed's README showed."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402 (the backend must be chosen first)

# Panels in reading order; a metric nobody logged is left out.
PANELS = ("loss", "mAP", "f1", "precision", "recall", "accuracy", "top1", "top5", "contradictions")


def plot_curves(history: list[dict], path: Path, best_epoch: int | None = None, title: str = "") -> None:
    """Draw `history` (one dict of named metrics per epoch, keys like "val/general/mAP") to `path`."""
    series: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for row in history:
        epoch = row["epoch"]
        for key, value in row.items():
            parts = key.split("/")
            if len(parts) < 2 or not isinstance(value, int | float) or value != value:  # skip NaN
                continue
            metric = parts[-1]
            if metric not in PANELS:
                continue
            label = "/".join(parts[:-1])  # e.g. val/general, train
            series.setdefault(metric, {}).setdefault(label, []).append((epoch, float(value)))
    panels = [p for p in PANELS if p in series]
    if not panels:
        return
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
    for ax, metric in zip(axes.flat, panels, strict=False):
        for label, points in sorted(series[metric].items()):
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, marker="o", markersize=3, label=label)
        if best_epoch is not None:
            ax.axvline(best_epoch, color="grey", linestyle="--", linewidth=1)
        ax.set_title(metric)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    tmp.replace(path)
