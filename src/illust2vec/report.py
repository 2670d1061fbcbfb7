"""The demo's report: one self-contained HTML page (pictures inlined) with every stage's results.

Training curves, a table of metrics per category, example images with their predicted and true tags, and
similar-image results. Pictures are inlined as data URIs so the page can be mailed or archived as one file.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from .util.images import load_rgb

THUMB = 160


@dataclass(frozen=True)
class Stage:
    """One stage's line in the report: its name, how long it took, and what it did."""

    name: str
    seconds: float
    facts: Mapping[str, object]


@dataclass(frozen=True)
class Example:
    """A tagged held-out image: what the model said and what the board knows."""

    image: Path
    predicted: Mapping[str, Mapping[str, float]]  # head -> tag -> score (above threshold)
    truth: Mapping[str, Sequence[str]]  # head -> tags


@dataclass(frozen=True)
class Neighbours:
    """A similar-image query: the query and its nearest images, each with a label (its character, say)."""

    query: Path
    label: str
    results: Sequence[tuple[Path, float, str]]  # (image, score, label)


@dataclass
class Report:
    title: str
    stages: list[Stage] = field(default_factory=list)
    curves: Path | None = None
    metrics: Mapping[str, Mapping[str, float | None]] = field(default_factory=dict)  # head -> name -> value
    examples: list[Example] = field(default_factory=list)
    neighbours: list[Neighbours] = field(default_factory=list)
    figures: Mapping[str, str] = field(default_factory=dict)  # headline numbers, e.g. "precision@10 (character)"
    notes: list[str] = field(default_factory=list)


def _data_uri(image: Image.Image, fmt: str = "JPEG") -> str:
    buf = io.BytesIO()
    image.save(buf, fmt, **({"quality": 85} if fmt == "JPEG" else {}))
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


def _thumb(path: Path, size: int = THUMB) -> str:
    image = load_rgb(Path(path).read_bytes(), shrink_to=size)
    image.thumbnail((size, size))
    return _data_uri(image)


def _fact(v: object) -> str:
    if isinstance(v, Mapping):
        return ", ".join(f"{n} {k}" for k, n in v.items() if n)
    return str(v)


def _fmt(v: float | None) -> str:
    return "" if v is None else f"{v:.3f}"


METRIC_COLUMNS = (
    ("mAP", "mAP"),
    ("f1", "F1"),
    ("precision", "precision"),
    ("recall", "recall"),
    ("threshold", "threshold"),
    ("threshold_p_eq_r", "P = R at"),
    ("top1", "top-1"),
    ("accuracy", "accuracy"),
)

CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; padding: 0 1em; }
h1 { font-size: 1.6em; } h2 { margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: .5em 0; } td, th { padding: .25em .7em; border-bottom: 1px solid #eee; }
th { text-align: left; background: #f6f6f6; } td.n { text-align: right; font-variant-numeric: tabular-nums; }
.examples { display: grid; grid-template-columns: repeat(auto-fill, minmax(320px, 1fr)); gap: 1em; }
.example { display: flex; gap: .7em; border: 1px solid #e4e4e4; border-radius: 6px; padding: .5em; }
.example img { width: 140px; height: 140px; object-fit: contain; background: #fafafa; }
.tag { display: inline-block; margin: 1px; padding: 0 .35em; border-radius: 3px; font-size: 12px; }
.hit { background: #d8f3dc; } .miss { background: #ffe3e3; } .extra { background: #fff3bf; }
.row { display: flex; gap: .4em; align-items: flex-start; margin: .6em 0; }
.cell { width: 108px; font-size: 11px; text-align: center; }
.cell img { width: 100px; height: 100px; object-fit: contain; background: #fafafa; border: 1px solid #eee; }
.cell.same img { border: 2px solid #2b8a3e; } .cell.query img { border: 2px solid #1c7ed6; }
.figures { display: flex; gap: 1em; flex-wrap: wrap; }
.figure { background: #f1f3f5; padding: .5em 1em; border-radius: 6px; }
.figure b { display: block; font-size: 1.4em; }
"""


def render(report: Report) -> str:
    """The report as an HTML page."""
    e = html.escape
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{e(report.title)}</title>"]
    parts.append(f"<style>{CSS}</style></head><body><h1>{e(report.title)}</h1>")
    if report.figures:
        parts.append("<div class='figures'>")
        parts += [f"<div class='figure'><b>{e(v)}</b>{e(k)}</div>" for k, v in report.figures.items()]
        parts.append("</div>")
    parts.append("<h2>Stages</h2><table><tr><th>stage</th><th>time</th><th>what it did</th></tr>")
    for s in report.stages:
        facts = "; ".join(f"{k}: {_fact(v)}" for k, v in s.facts.items())
        parts.append(f"<tr><td>{e(s.name)}</td><td class='n'>{s.seconds:.1f} s</td><td>{e(facts)}</td></tr>")
    parts.append("</table>")
    if report.curves is not None and Path(report.curves).exists():
        curves = _data_uri(Image.open(report.curves).convert("RGB"), "PNG")
        parts.append(f"<h2>Training curves</h2><img src='{curves}' style='max-width:100%'>")
    if report.metrics:
        parts.append("<h2>Metrics per category (held-out validation split)</h2><table><tr><th>category</th>")
        parts += [f"<th>{e(label)}</th>" for _, label in METRIC_COLUMNS]
        parts.append("</tr>")
        for head, values in report.metrics.items():
            cells = "".join(f"<td class='n'>{_fmt(values.get(key))}</td>" for key, _ in METRIC_COLUMNS)
            parts.append(f"<tr><td>{e(head)}</td>{cells}</tr>")
        parts.append("</table>")
    if report.examples:
        parts.append(
            "<h2>Tagged held-out images</h2><p><span class='tag hit'>predicted and true</span> "
            "<span class='tag extra'>predicted, not in the board's tags</span> "
            "<span class='tag miss'>true, not predicted</span></p><div class='examples'>"
        )
        for ex in report.examples:
            parts.append(f"<div class='example'><img src='{_thumb(ex.image)}'><div>")
            for head, predicted in ex.predicted.items():
                truth = set(ex.truth.get(head, ()))
                if head == "rating":
                    top = max(predicted, key=predicted.get) if predicted else ""
                    cls = "hit" if top in truth else "extra"
                    parts.append(f"<div><b>rating</b> <span class='tag {cls}'>{e(top)}</span></div>")
                    continue
                tags = [
                    f"<span class='tag {'hit' if t in truth else 'extra'}'>{e(t)} {s:.2f}</span>"
                    for t, s in predicted.items()
                ]
                tags += [f"<span class='tag miss'>{e(t)}</span>" for t in sorted(truth - set(predicted))]
                parts.append(f"<div><b>{e(head)}</b> {''.join(tags)}</div>")
            parts.append(f"<div style='font-size:11px;color:#888'>{e(Path(ex.image).name)}</div></div></div>")
        parts.append("</div>")
    if report.neighbours:
        parts.append(
            "<h2>Similar images</h2><p>Each row: a query (blue) and its nearest images by feature vector; a green "
            "frame marks a neighbour with the query's character.</p>"
        )
        for n in report.neighbours:
            parts.append(f"<div class='row'><div class='cell query'><img src='{_thumb(n.query, 100)}'>")
            parts.append(f"<br>{e(n.label)}</div>")
            for path, score, label in n.results:
                same = " same" if n.label in label.split() else ""
                parts.append(f"<div class='cell{same}'><img src='{_thumb(path, 100)}'><br>{e(label)} {score:.2f}</div>")
            parts.append("</div>")
    if report.notes:
        parts.append("<h2>Notes</h2><ul>" + "".join(f"<li>{e(n)}</li>" for n in report.notes) + "</ul>")
    parts.append("</body></html>")
    return "".join(parts)


def write_report(report: Report, path: Path) -> Path:
    path = Path(path)
    path.write_text(render(report), encoding="utf-8")
    return path
