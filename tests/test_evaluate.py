"""Stage 5, `i2v evaluate`: its files, its figures against a direct computation on the same predictions, the epoch
it picks, and one-line errors for bad inputs."""

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from illust2vec.errors import UserError
from illust2vec.evaluate import EvalConfig, evaluate_run
from illust2vec.evaluation.evaluator import PredictOptions, predict_split, run_dataset
from illust2vec.formats.run import eval_dir, read_config, resolve_epoch, weights_path
from illust2vec.models import load_tagger

I2V = [sys.executable, "-m", "illust2vec.cli"]


@pytest.fixture
def run_copy(synth_run, tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(synth_run, out, ignore=shutil.ignore_patterns("tb", "curves.png"))
    return out


def direct(p: np.ndarray, t: np.ndarray, threshold: float) -> dict:
    """Micro P, R, F1 and the mean of per-tag F1 over labelled tags, counted by hand."""
    pred, pos = p >= threshold, t > 0.5
    tp, fp, fn = (pred & pos).sum(), (pred & ~pos).sum(), (~pred & pos).sum()
    labelled = pos.any(axis=0)
    per_tag_f1 = [
        2 * (pred[:, j] & pos[:, j]).sum() / (pred[:, j].sum() + pos[:, j].sum()) for j in np.flatnonzero(labelled)
    ]
    return {
        "precision": tp / (tp + fp),
        "recall": tp / (tp + fn),
        "f1": 2 * tp / (2 * tp + fp + fn),
        "macro_f1": float(np.mean(per_tag_f1)),
    }


def direct_ap(scores: np.ndarray, positive: np.ndarray) -> float:
    """Average precision as sklearn defines it: the precision at each positive's score, averaged."""
    return float(np.mean([positive[scores >= v].sum() / (scores >= v).sum() for v in scores[positive]]))


def test_evaluate_writes_its_files_and_its_figures_are_right(run_copy):
    report = evaluate_run(EvalConfig(str(run_copy), workers=0))
    out = Path(report.out)
    assert out == eval_dir(run_copy, 2) and report.epoch == 2  # "best" of this run
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "per_tag.csv", "thresholds.json"]
    metrics = json.loads((out / "metrics.json").read_text())
    thresholds = json.loads((out / "thresholds.json").read_text())
    assert metrics["heads"] == report.heads and metrics["config"]["epoch"] == "best"
    assert metrics["loss"] == pytest.approx(sum(h["loss"] for h in report.heads.values()))
    assert set(metrics["heads"]) == {"rating", "general", "character", "copyright"}

    # The same predictions, counted by hand.
    ds = run_dataset(run_copy, None)
    model = load_tagger(read_config(run_copy)["model"], weights_path(run_copy, 2))
    preds = predict_split(model, ds, "val", torch.device("cpu"), PredictOptions(workers=0))
    probs, targets = preds.probs, preds.targets
    assert len(targets["general"]) == ds.samples("val") == metrics["heads"]["general"]["images"]
    for head in ("general", "character"):
        got, p, t = metrics["heads"][head], probs[head], targets[head]
        assert got["threshold"] == thresholds["heads"][head]
        for key, value in direct(p, t, got["threshold"]).items():
            assert got[key] == pytest.approx(value, abs=1e-9), (head, key)
        labelled = np.flatnonzero(t.sum(axis=0) > 0)
        assert got["mAP"] == pytest.approx(np.mean([direct_ap(p[:, j], t[:, j] > 0.5) for j in labelled]), abs=1e-9)
        assert got["positives"] == int(t.sum())
        # The threshold where precision equals recall: as many predicted as labelled, give or take ties.
        at = direct(p, t, got["threshold_p_eq_r"])
        assert got["precision_at_p_eq_r"] == pytest.approx(at["precision"])
        assert got["recall_at_p_eq_r"] == pytest.approx(at["recall"])
        assert abs(at["precision"] - at["recall"]) < 0.05
        # The calibrated threshold maximises micro F1 over every threshold a score offers (to the 1e-4 grid).
        best = max(direct(p, t, v)["f1"] for v in np.unique(p[t > 0.5]))
        assert got["f1"] >= best - 0.01
        # The figures training writes into metrics.csv, by the same names.
        assert got["accuracy"] == pytest.approx(((p >= got["threshold"]) == (t > 0.5)).mean())
        eps = 1e-7
        q = np.clip(p.astype(np.float64), eps, 1 - eps)
        if head == "general":
            assert got["loss"] == pytest.approx(-(t * np.log(q) + (1 - t) * np.log(1 - q)).mean())
    rating = metrics["heads"]["rating"]
    known = targets["rating"] >= 0
    assert rating["accuracy"] == pytest.approx((probs["rating"][known].argmax(1) == targets["rating"][known]).mean())
    assert set(metrics["heads"]["character"]) >= {"top1", "top5"}

    # per_tag.csv: every tag once; support is its number of positives in the split.
    with open(out / "per_tag.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["tag"] for r in rows] == list(ds.vocab.names)
    general = [r for r in rows if r["head"] == "general"]
    assert [int(r["support"]) for r in general] == targets["general"].sum(axis=0).astype(int).tolist()
    for j, r in enumerate(general):
        if int(r["support"]):
            assert float(r["ap"]) == pytest.approx(
                direct_ap(probs["general"][:, j], targets["general"][:, j] > 0.5), abs=1e-4
            )
            assert float(r["threshold"]) == thresholds["heads"]["general"]
        else:
            assert r["ap"] == "" and r["recall"] == ""
    ratings = [r for r in rows if r["head"] == "rating"]
    assert [int(r["support"]) for r in ratings] == np.bincount(targets["rating"][known], minlength=4).tolist()
    assert thresholds["tags"] == {} and thresholds["method"].startswith("f1 on val of run epoch 2")


def test_per_tag_thresholds(run_copy):
    report = evaluate_run(EvalConfig(str(run_copy), epoch="last", per_tag=True, workers=0))
    thresholds = json.loads((Path(report.out) / "thresholds.json").read_text())
    with open(Path(report.out) / "per_tag.csv", newline="") as f:
        rows = {(r["head"], r["tag"]): r for r in csv.DictReader(f)}
    labelled = {tag for (head, tag), r in rows.items() if head != "rating" and int(r["support"]) > 0}
    assert set(thresholds["tags"]) == labelled  # one per tag with a positive; the rest keep their head's
    assert len(set(thresholds["tags"].values())) > 3
    for (head, tag), r in rows.items():
        if head != "rating":
            assert float(r["threshold"]) == pytest.approx(
                thresholds["tags"].get(tag, thresholds["heads"][head]), abs=1e-4
            )


def test_epochs_best_last_and_numbers(run_copy):
    assert resolve_epoch(run_copy, "best") == resolve_epoch(run_copy, "last") == 2
    assert resolve_epoch(run_copy, "1") == resolve_epoch(run_copy, 1) == 1
    best = json.loads((run_copy / "best.json").read_text())
    (run_copy / "best.json").write_text(json.dumps({**best, "best_epoch": 1}))
    assert resolve_epoch(run_copy, "best") == 1 and resolve_epoch(run_copy, "last") == 2
    assert evaluate_run(EvalConfig(str(run_copy), workers=0)).epoch == 1
    assert (eval_dir(run_copy, 1) / "metrics.json").exists()
    with pytest.raises(UserError, match="no checkpoint for epoch 7; there are 1, 2"):
        resolve_epoch(run_copy, "7")
    with pytest.raises(UserError, match="--epoch takes a number, best or last, not 'newest'"):
        resolve_epoch(run_copy, "newest")


def test_bad_inputs_are_one_line_errors(run_copy, synth_build, tmp_path):
    with pytest.raises(UserError, match="no such run directory"):
        evaluate_run(EvalConfig(str(tmp_path / "nope")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no checkpoints"):
        evaluate_run(EvalConfig(str(tmp_path / "empty")))
    with pytest.raises(UserError, match="has no 'holdout' split \\(it has train, val, test\\)"):
        evaluate_run(EvalConfig(str(run_copy), split="holdout", workers=0))
    with pytest.raises(UserError, match="--mode must be one of f1, pr_equal"):
        evaluate_run(EvalConfig(str(run_copy), mode="best", workers=0))
    with pytest.raises(UserError, match="no dataset.json"):
        evaluate_run(EvalConfig(str(run_copy), data=str(tmp_path), workers=0))

    # A dataset built with another vocabulary (one tag renamed): refused before any image is read.
    from illust2vec.formats.vocab import read_vocab

    other = tmp_path / "other"
    other.mkdir()
    info = json.loads((synth_build / "dataset.json").read_text())
    tags = (synth_build / info["vocab"]).read_text().replace(",1girl,", ",one_girl,", 1)
    (other / info["vocab"]).write_text(tags)
    info["vocab_hash"] = read_vocab(other / info["vocab"]).hash
    (other / "dataset.json").write_text(json.dumps(info))
    with pytest.raises(UserError, match="has another vocabulary than the run"):
        evaluate_run(EvalConfig(str(run_copy), data=str(other), workers=0))
    assert not (run_copy / "eval").exists()


def test_the_evaluate_command(run_copy, tmp_path):
    args = ["evaluate", str(run_copy), "--epoch", "1", "--split", "test", "--workers", "0", "--json"]
    r = subprocess.run([*I2V, *args], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)  # stdout: the report alone
    assert report["epoch"] == 1 and report["split"] == "test" and report["out"] == str(eval_dir(run_copy, 1))
    lines = r.stderr.splitlines()
    header = next(line.split() for line in lines if line.startswith("head"))
    assert header == ["head", "P", "R", "F1", "macroF1", "mAP", "thr", "P=R@", "top1", "acc"]
    rows = {line.split()[0]: line.split()[1:] for line in lines if line.split()[:1] in (["general"], ["character"])}
    figures = report["heads"]["general"]
    assert rows["general"][:3] == [f"{figures[k]:.3f}" for k in ("precision", "recall", "f1")]
    assert len(rows["character"]) == 9  # every figure, none cut short
    r = subprocess.run([*I2V, "evaluate", str(run_copy), "--epoch", "9"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.strip() == f"error: {run_copy}: no checkpoint for epoch 9; there are 1, 2"
