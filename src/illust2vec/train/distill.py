"""A distilled run (`i2v distill`) as it trains: a student learning a teacher's outputs from its soft-target cache
(`formats/teacher.py`), measured by how well it agrees with the teacher on held-out images.

The cache is a dataset whose labels are the teacher's decisions and whose samples also carry the teacher's
probabilities (the loader's `teacher:HEAD` targets). Training replaces the usual loss with the distillation loss:
binary cross-entropy against the teacher's probabilities for sigmoid heads, and for softmax heads (the rating) the
cross-entropy between the teacher's distribution and the student's (KL divergence up to a constant).

Validation runs as in every run, so `val/general/mAP` is the student's mAP against the teacher's decisions and
`val/character/top1` how often the student's first character is one the teacher decided. Then the student's
thresholds are matched to the teacher's decisions on the held-out images (F1, `evaluation/calibration.py`), and
`val/agreement/HEAD/f1` is each head's F1 at them (`.../f1_at_teacher`: at the teacher's own thresholds, none
chosen on these images); `val/agreement/character/top1` and `val/agreement/rating/accuracy`
repeat the top-1 figures under the same prefix. The matched thresholds are saved per epoch
(`RUN/agreement/epoch-NNN.json`), where `i2v export` takes them from.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import UserError
from ..evaluation.calibration import calibrate
from ..evaluation.evaluator import Predictions
from ..evaluation.metrics import has_top_k, precision_recall_f1, topk_accuracy
from ..formats import teacher as cache
from ..formats.bundle import Thresholds
from ..formats.dataset import Dataset
from ..models.tagger import create_tagger, default_heads
from ..util import storage

SELECT_BY = "agreement/general/f1"  # i2v distill's default --select-by


@dataclass
class Distillation:
    """What a distilled run adds to the training loop (see the module's doc)."""

    info: cache.TeacherInfo
    names: dict[str, tuple[str, ...]]  # head -> its tag names, in column order
    activations: dict[str, str]  # the student's
    thresholds: Thresholds | None = None  # the last validation's, matched to the teacher
    figures: dict[str, float] = field(default_factory=dict)

    @property
    def teacher(self) -> Thresholds:
        """The teacher's thresholds."""
        return self.info.teacher_thresholds()

    def loss(self, logits: dict[str, torch.Tensor], targets: dict) -> tuple[torch.Tensor, dict[str, float]]:
        """The distillation loss over every head, and each head's part for logging."""
        total, parts = None, {}
        for head, x in logits.items():
            teacher = targets[cache.TARGET + head].float().clamp(0, 1)
            if self.activations[head] == "softmax":
                q = teacher / teacher.sum(dim=1, keepdim=True).clamp(min=1e-6)
                term = -(q * F.log_softmax(x, dim=1)).sum(dim=1).mean()
            else:
                term = F.binary_cross_entropy_with_logits(x, teacher)
            parts[head] = term.detach()
            total = term if total is None else total + term
        if total is None:
            raise ValueError("distillation needs at least one head")
        return total, dict(zip(parts, torch.stack(list(parts.values())).tolist(), strict=True))

    def metrics(self, preds: Predictions) -> dict[str, float]:
        """Agreement with the teacher's decisions: thresholds matched to them, each head's F1 at those, and the
        top-1 figures."""
        matched = calibrate(preds, self.names, "f1", per_tag=False)
        self.thresholds = Thresholds(matched.heads, matched.tags, "f1 against the teacher's decisions (distill)")
        out = {}
        for head, p in preds.probs.items():
            t = preds.targets[head]
            if t.ndim == 1:  # rating: the student's arg-max is the teacher's
                known = t >= 0
                out[f"agreement/{head}/accuracy"] = (
                    float((p[known].argmax(axis=1) == t[known]).mean()) if known.any() else float("nan")
                )
                continue
            prf = precision_recall_f1(p, t, self.thresholds.heads.get(head, 0.5))
            out[f"agreement/{head}/f1"] = prf["micro_f1"]
            out[f"agreement/{head}/macro_f1"] = prf["macro_f1"]
            # At the teacher's own threshold: no threshold chosen on these images (matching one is mildly optimistic).
            at_teacher = precision_recall_f1(p, t, self.teacher.heads.get(head, 0.5))
            out[f"agreement/{head}/f1_at_teacher"] = at_teacher["micro_f1"]
            if has_top_k(head, self.activations[head]):
                out[f"agreement/{head}/top1"] = float(topk_accuracy(p, t, 1))
        self.figures = out
        return out

    def save(self, run: Path, epoch: int) -> None:
        """This epoch's matched thresholds and figures, for `i2v export`."""
        if self.thresholds is not None:
            cache.write_agreement(run, epoch, self.thresholds, self.figures)


def prepare(ds: Dataset, activations: dict[str, str]) -> Distillation:
    """The distillation of a run whose data is a teacher cache; any other data set is refused."""
    root = ds.root
    info = cache.read_identity(Path(root)) if storage.is_local(root) else None
    if info is None:
        where = storage.display(root)
        raise UserError(f"{where}: not a teacher cache (no {cache.IDENTITY}); i2v distill makes one")
    names = {h: ds.vocab.head_names(h) for h in ds.vocab.heads}
    return Distillation(info, names, dict(activations))


def run_entries(d: Distillation | None) -> dict:
    """What a distilled run's config.json says about its teacher."""
    if d is None:
        return {}
    i = d.info
    return {"distill": {"teacher": i.source, "kind": i.kind, "weights": i.weights, "image_size": i.image_size}}


def student_softmax(info: cache.TeacherInfo) -> tuple[str, ...]:
    """The student's softmax heads besides rating: those the teacher has."""
    return tuple(h for h, a in info.activations.items() if a == "softmax" and h != "rating")


def check_student(arch: str, size: int, model: dict | None = None) -> None:
    """A student that cannot take `size` (a fixed-size ViT, a size below what the backbone downsamples): one line,
    before the teacher pass. A tiny forward pass of random weights, on the CPU."""
    try:
        net = create_tagger(arch, image_size=size, heads=default_heads({"rating": 4, "general": 2}), **(model or {}))
        net.eval()
        with torch.no_grad():
            out = net(torch.zeros(1, 3, size, size))
        if not all(np.isfinite(v.numpy()).all() for v in out.values()):
            raise ValueError("its outputs are not finite")
    except UserError:
        raise
    except Exception as e:  # timm's and torch's own errors: an input the backbone cannot take
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"--student {arch} cannot take --size {size}: {why}") from None
