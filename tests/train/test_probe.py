"""--probe-new: the new rows of an extended model are fitted by logistic regression on the original's features
before training; the original's rows are never touched."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from rich.console import Console

from illust2vec.evaluation.vocab_map import VocabMap
from illust2vec.formats.dataset import open_dataset
from illust2vec.formats.vocab import Vocab, tag_id
from illust2vec.train import extend, probe
from illust2vec.train.config import TrainConfig
from illust2vec.train.init import last_linear, merge_vocab


def test_fit_rows_separates_what_the_features_say_and_works_on_raw_features():
    """Two tags, each a direction in features of very different scales: the rows, applied to the raw features,
    rank every positive above every negative, and do what the regression on standardized features does."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 6, generator=g) * torch.tensor([1.0, 100.0, 0.01, 1.0, 5.0, 1.0]) + 3
    y = torch.stack([(x[:, 1] > 3).float(), (x[:, 2] + 0.01 * x[:, 0] > 3.03).float()], 1)
    w, b = probe.fit_rows(x, y, 1e-4)
    logits = x @ w.T + b
    for j in range(2):
        pos, neg = logits[y[:, j] == 1, j], logits[y[:, j] == 0, j]
        assert len(pos) > 50 and len(neg) > 50
        assert pos.min() > neg.max() - 1.0  # separable up to the L2 pull
        assert ((logits[:, j] > 0).float() == y[:, j]).float().mean() > 0.97
    strong, _ = probe.fit_rows(x, y, 1e-1)
    assert (strong * x.std(0)).norm() < (w * x.std(0)).norm()  # a stronger L2, smaller rows


@pytest.fixture
def extension(synth_run, new_build):
    ds = open_dataset(new_build)
    cfg = TrainConfig(data=str(new_build), out="unused", init=str(synth_run), workers=0)
    model, ext = extend.prepare(cfg, ds, synth_run / "unused", False, torch.device("cpu"), None)
    return model, ext, ds


def test_the_new_rows_are_fitted_and_the_original_s_rows_untouched(extension):
    model, ext, ds = extension
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fitted = probe.probe_new_rows(model, ext, ds, torch.device("cpu"), 0, Console(quiet=True))
    assert fitted and set(fitted) <= {"general", "character", "copyright", "artist"}
    after = model.state_dict()
    for name, head in model.heads.items():
        layer = last_linear(head)
        new = torch.as_tensor(~ext.old.known[name])
        w, b = f"heads.{name}.{layer}.weight", f"heads.{name}.{layer}.bias"
        assert torch.equal(after[w][~new], before[w][~new]) and torch.equal(after[b][~new], before[b][~new])
        if name in fitted:
            assert fitted[name] == int(new.sum())
            assert (after[w][new] != 0).any(dim=1).all()  # every new row has weights now, not just its prior
    for key in before:  # the backbone, BatchNorm statistics included, is as it was
        if not key.startswith("heads."):
            assert torch.equal(after[key], before[key]), key


def test_probed_rows_already_tell_the_new_tags_apart(extension):
    """On DATA's validation posts, the new rows rank the posts carrying each new tag above the rest far better after
    the probe than at the prior (where every post scores the same)."""
    from illust2vec.evaluation.evaluator import PredictOptions, predict_split
    from illust2vec.evaluation.metrics import mean_average_precision

    model, ext, ds = extension

    def new_map() -> float:
        preds = predict_split(model, ds, "val", torch.device("cpu"), PredictOptions(workers=0), None, ext.transform())
        probs, targets = [], []
        for head, cols in probe.new_columns(ext, ext.activations).items():
            probs.append(preds.probs[head][:, cols])
            targets.append(preds.targets[head][:, cols])
        p, t = np.concatenate(probs, 1), np.concatenate(targets, 1)
        seen = t.sum(0) > 0
        assert seen.sum() >= 5, seen.sum()  # enough new tags on the validation posts to mean something
        return mean_average_precision(p[:, seen], t[:, seen])

    at_prior = new_map()
    probe.probe_new_rows(model, ext, ds, torch.device("cpu"), 0, None)
    after = new_map()
    assert after > at_prior + 0.1, (at_prior, after)


def test_probe_new_is_a_setting_that_is_checked():
    assert TrainConfig(data="d", out="o", init="m").probe_new is None
    with pytest.raises(Exception, match="probe_new must be true, false or null"):
        TrainConfig(data="d", out="o", init="m", probe_new="yes")


def test_by_default_the_probe_runs_when_a_tenth_of_data_s_posts_show_the_original_s_characters():
    """DATA of new characters alone: no probe (its rows would never see an old character as a negative), even when
    it shares a generic series tag ("original") with the original; DATA built with a sample of the old board: the
    probe; a few old characters beside the new ones (crossovers) are not such a sample; the setting overrides."""

    def vocab(chars, series=()):
        names = list(chars) + list(series)
        cats = [4] * len(chars) + [3] * len(series)
        return Vocab(tuple(tag_id(n) for n in names), tuple(names), tuple(cats), (1,) * len(names))

    original = vocab(["a", "b"], series=["original", "old_series"])
    cases = (  # DATA's vocabulary, its training counts per head, its training posts, the default
        (vocab(["new"], series=["original", "new_series"]), {"character": [100], "copyright": [30, 70]}, 100, False),
        (vocab(["b", "new"], series=["new_series"]), {"character": [45, 100], "copyright": [100]}, 150, True),
        (vocab(["b", "new"], series=["new_series"]), {"character": [5, 100], "copyright": [100]}, 100, False),
    )
    for data, counts, samples, auto in cases:
        merged = merge_vocab(original, data, "union")
        ext = SimpleNamespace(data=VocabMap.between(merged, data), old=VocabMap.between(merged, original))
        assert probe.wanted(None, ext, counts, samples) is auto, (data.names, counts)
        assert probe.wanted(True, ext, counts, samples) is True and probe.wanted(False, ext, counts, samples) is False
