"""`i2v train --init MODEL`: the trained tagger to extend, loaded as our `TaggerNet`, and the extended model.

MODEL is one of our runs (its best epoch, or `RUN@EPOCH`), one of our bundles, a WD tagger v3 timm snapshot
(config.json with timm's "architecture", model.safetensors, selected_tags.csv) or a Hugging Face repo id of either.
A WD snapshot's one classifier over every tag becomes our heads (its rows split by category) and its first
convolution is reordered to take RGB, as our taggers do (WD's were trained on BGR), so it computes the same function.

The extended model's vocabulary is MODEL's plus DATA's (`union`, matched by name and category) or DATA's alone
(`data`). A tag in both keeps its row of the head; a new tag's row starts at zero weights and a bias at its training
frequency (the prior initialisation), so the model predicts it at that frequency on any image until it learns; a
dropped tag's row is removed; a category new to the model gets a new head. Everything else is copied.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import UserError
from ..evaluation.vocab_map import VocabMap
from ..formats import run as run_dir
from ..formats.bundle import Thresholds, is_bundle, open_bundle, read_thresholds
from ..formats.categories import CATEGORY_NAMES, HEAD_ORDER
from ..formats.vocab import Vocab, read_vocab
from ..models.tagger import HeadConfig, TaggerConfig, TaggerNet, create_tagger, default_heads, load_tagger
from .losses import prior_bias

WD_FILES = ("config.json", "model.safetensors", "selected_tags.csv")


@dataclass(frozen=True)
class InitModel:
    """The model to extend: the tagger (CPU, eval mode), its vocabulary, its thresholds, and where it came from."""

    model: TaggerNet
    vocab: Vocab
    thresholds: Thresholds
    source: dict  # {"model": what --init named, "kind": run, bundle, wd or hub, "path": ..., "epoch": ...}


def load_init(spec: str) -> InitModel:
    """The model that `--init` names: a run directory (or RUN@EPOCH), a bundle, a WD snapshot or a hub id."""
    base, at, epoch = spec.rpartition("@")
    if at and Path(base).is_dir():
        return _load_run(Path(base), epoch, spec)
    path = Path(spec)
    if path.is_dir():
        return _load_dir(path, spec, "dir")
    if path.exists():
        raise UserError(f"--init {spec}: a model is a directory (a run, a bundle or a WD tagger v3 snapshot)")
    parts = spec.split("/")
    if len(parts) == 2 and all(parts) and not spec.startswith((".", "~")):
        return _load_dir(_download(spec), spec, "hub")
    raise UserError(f"--init {spec}: no such run, bundle or WD tagger snapshot (nor a Hugging Face repo id)")


def _load_dir(path: Path, spec: str, how: str) -> InitModel:
    if (path / run_dir.CONFIG).is_file() and (path / run_dir.CHECKPOINTS).is_dir():
        return _load_run(path, "best", spec)
    if is_bundle(path):
        info = open_bundle(path)  # checks the vocabulary against the config's hash
        model = load_tagger(info.config["model"], info.weights_path)
        kind = "hub" if how == "hub" else "bundle"
        return InitModel(model, info.vocab, info.thresholds, {"model": spec, "kind": kind, "path": str(path)})
    if (path / "config.json").is_file():
        model, vocab = load_wd_snapshot(path)
        kind = "hub" if how == "hub" else "wd"
        thresholds = read_thresholds(path / "thresholds.json")
        return InitModel(model, vocab, thresholds, {"model": spec, "kind": kind, "path": str(path), "format": "wd"})
    raise UserError(f"--init {spec}: not a model: expected a run, a bundle or a WD tagger v3 snapshot ({path})")


def _load_run(run: Path, epoch: str, spec: str) -> InitModel:
    """One epoch of one of our runs, checked: its vocabulary is the one its config names."""
    run_dir.check_epoch(epoch)
    n = run_dir.resolve_epoch(run, epoch)
    config = run_dir.read_config(run)
    vocab = read_vocab(run_dir.vocab_path(run))
    if vocab.hash != config.get("vocab_hash"):
        raise UserError(f"--init {spec}: {run_dir.vocab_path(run)} is not the vocabulary the run was trained on")
    try:
        model = load_tagger(config["model"], run_dir.weights_path(run, n))
    except KeyError as e:
        raise UserError(f"--init {spec}: the run's config.json lacks {e}") from None
    thresholds = read_thresholds(run_dir.eval_dir(run, n) / "thresholds.json")
    return InitModel(model, vocab, thresholds, {"model": spec, "kind": "run", "path": str(run), "epoch": n})


def _download(repo_id: str) -> Path:
    """A hub repository's config, tags, thresholds and safetensors weights (never a pickle), through the cache."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise UserError(f"--init {repo_id}: downloading needs huggingface_hub: pip install 'illust2vec[hub]'") from None
    try:
        return Path(snapshot_download(repo_id, allow_patterns=[*WD_FILES, "thresholds.json"]))
    except Exception as e:  # network errors, a missing or gated repository: one line
        raise UserError(f"--init {repo_id}: no such directory, and the Hub download failed ({e})") from None


def load_wd_snapshot(root: Path) -> tuple[TaggerNet, Vocab]:
    """A WD tagger v3 timm snapshot as our tagger: the same backbone (timm, with the snapshot's model_args), the
    classifier's rows split into heads by category, the first convolution reordered from BGR to RGB input."""
    import timm
    from safetensors.torch import load_file

    missing = [name for name in WD_FILES if not (root / name).is_file()]
    if missing:
        raise UserError(f"{root}: a WD tagger snapshot needs {', '.join(WD_FILES)}; missing {', '.join(missing)}")
    try:
        cfg = json.loads((root / "config.json").read_text())
        arch = cfg["architecture"]
        pcfg = cfg.get("pretrained_cfg") or {}
        size = int(pcfg.get("input_size", [3, 448, 448])[-1])
        mean, std = tuple(pcfg.get("mean", (0.5, 0.5, 0.5))), tuple(pcfg.get("std", (0.5, 0.5, 0.5)))
        model_args = {k: v for k, v in dict(cfg.get("model_args") or {}).items() if k != "num_classes"}
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{root}/config.json: not a timm model config ({type(e).__name__}: {e})") from None
    if not timm.is_model(arch):
        raise UserError(f"{root}: timm {timm.__version__} has no architecture {arch!r} (a newer timm may)")
    vocab = read_vocab(root / "selected_tags.csv")
    try:
        full = timm.create_model(arch, pretrained=False, num_classes=len(vocab), **model_args)
        full.load_state_dict(load_file(root / "model.safetensors"), strict=True)
    except (OSError, RuntimeError, ValueError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{root}: model.safetensors does not fit {arch} with {len(vocab)} tags ({first})") from None
    classifier = full.get_classifier()
    if not isinstance(classifier, nn.Linear):
        raise UserError(f"{root}: {arch}'s classifier is not one linear layer; it cannot be split into heads")
    prefix = next(name for name, m in full.named_modules() if m is classifier) + "."
    weights = {f"backbone.{k}": v for k, v in full.state_dict().items() if not k.startswith(prefix)}
    first = f"backbone.{full.pretrained_cfg.get('first_conv') or ''}.weight"
    if first not in weights:  # no first_conv named: the first 4-D weight that takes 3 channels
        first = next(k for k, v in weights.items() if v.ndim == 4 and v.shape[1] == 3)
    weights[first] = weights[first].flip(1)  # WD's models take BGR; ours RGB
    sizes = {h: len(rows) for h, rows in vocab.heads.items()}
    tcfg = TaggerConfig(
        name=arch, backbone=arch, image_size=size, heads=default_heads(sizes), mean=mean, std=std,
        backbone_args=model_args,
    )  # fmt: skip
    net = create_tagger(tcfg)
    for head, rows in vocab.heads.items():
        index = torch.tensor(rows)
        weights[f"heads.{head}.fc.weight"] = classifier.weight.detach()[index].clone()
        weights[f"heads.{head}.fc.bias"] = classifier.bias.detach()[index].clone()
    missing_keys, unexpected = net.load_state_dict(weights, strict=False)
    if missing_keys or unexpected:
        raise UserError(f"{root}: cannot rebuild {arch} as a tagger ({missing_keys[:3]}, {unexpected[:3]})")
    return net.eval(), vocab


# The extended model


def merge_vocab(old: Vocab, data: Vocab, mode: str) -> Vocab:
    """The extended model's vocabulary: `union`, the old model's tags in its order and then, per head, DATA's tags
    it lacks (matched by name and category); `data`, DATA's tags alone. Rows go by head, as every vocabulary's."""
    if mode == "data":
        return data
    have = set(zip(old.names, old.categories, strict=True))
    rows = [(i, old) for i in range(len(old))]
    rows += [(i, data) for i in range(len(data)) if (data.names[i], data.categories[i]) not in have]
    rows.sort(key=lambda r: HEAD_ORDER.index(CATEGORY_NAMES[r[1].categories[r[0]]]))  # stable: old rows first
    columns = [tuple(getattr(v, f)[i] for i, v in rows) for f in ("tag_ids", "names", "categories", "counts")]
    return Vocab(*columns)


@dataclass(frozen=True)
class Rows:
    """How the extended vocabulary came from the old one: tags kept, new and dropped."""

    kept: int
    new: int
    dropped: int

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def count_rows(old: Vocab, vocab: Vocab) -> Rows:
    shared = VocabMap.between(vocab, old).shared
    return Rows(kept=shared, new=len(vocab) - shared, dropped=len(old) - shared)


def extend_model(
    init: InitModel,
    vocab: Vocab,
    data: Vocab,
    counts: dict[str, list[int]],
    samples: int,
    overrides: dict[str, Any],
) -> TaggerNet:
    """The init model with heads for `vocab`: every weight copied, each head's rows by tag (see the module's doc).

    Args:
        init: the model to extend.
        vocab: the extended vocabulary (`merge_vocab`).
        data: DATA's vocabulary.
        counts: DATA's training split's tag counts (head -> count per position in DATA's vocabulary).
        samples: DATA's training images.
        overrides: TaggerConfig fields to replace (freeze, drop_rate).
    """
    old = init.model
    acts = {h.name: h.activation for h in old.cfg.heads}
    fresh = {h: "softmax" if h == "rating" else "sigmoid" for h in vocab.heads}  # a new head's activation
    heads = tuple(HeadConfig(h, len(rows), acts.get(h, fresh[h])) for h, rows in vocab.heads.items())
    try:
        model = create_tagger(dataclasses.replace(old.cfg, heads=heads, **overrides))
    except (ValueError, TypeError) as e:
        raise UserError(f"--init: {e}") from e
    state = model.state_dict()
    theirs = old.state_dict()
    for key in state:
        if not key.startswith("heads.") and key in theirs:
            state[key] = theirs[key].clone()
    to_old = VocabMap.between(vocab, init.vocab)
    to_data = VocabMap.between(vocab, data)
    with torch.no_grad():
        for h in model.cfg.heads:
            _copy_head(old, h, state, theirs, last_linear(model.heads[h.name]), to_old.positions[h.name])
            prior = _prior(counts.get(h.name), samples, h.activation, to_data.positions[h.name])
            if prior is None:
                continue
            # New rows (all of a new head's) start at the prior; a tag the old model had keeps its bias.
            new = torch.as_tensor(to_old.positions[h.name] < 0) if h.name in acts else torch.ones(h.classes).bool()
            bias = state[f"heads.{h.name}.{last_linear(model.heads[h.name])}.bias"]
            bias[new] = prior[new].to(bias.dtype)
    model.load_state_dict(state, strict=True)
    return model


def _copy_head(old: TaggerNet, h: HeadConfig, state: dict, theirs: dict, last: str, rows) -> None:
    """Copy one head's weights from the old model: the shared layers whole, the output layer `last`'s rows by tag
    (new rows: zero weights; their biases are set by the caller)."""
    if h.name not in {x.name for x in old.cfg.heads}:
        return  # a new head: as created, and its biases at the prior
    prefix = f"heads.{h.name}."
    rows_t = torch.as_tensor(rows)
    have = rows_t >= 0
    for key in [k for k in state if k.startswith(prefix)]:
        if key.startswith(f"{prefix}{last}."):
            row = torch.zeros_like(state[key])
            row[have] = theirs[key][rows_t[have]].to(row.dtype)
            state[key] = row
        elif key in theirs:
            state[key] = theirs[key].clone()


def last_linear(head: nn.Module) -> str:
    """The name of a head's output layer (its last Linear), e.g. "fc" or "fc2"."""
    return [name for name, m in head.named_modules() if isinstance(m, nn.Linear)][-1]


def _prior(counts, samples: int, activation: str, positions) -> torch.Tensor | None:
    """Each row's prior bias from DATA's counts (rows DATA lacks: the prior of a tag never seen), or None."""
    if counts is None:
        return None
    bias = prior_bias(list(counts) + [0], samples, activation)  # the extra entry: a tag never seen
    index = torch.as_tensor(positions).clone()
    index[index < 0] = len(counts)
    return bias[index]


def check_arch(arch: str | None, model: TaggerNet) -> None:
    """--arch with --init: refused unless it names the init model's architecture (its preset or its backbone)."""
    if arch is not None and arch not in (model.cfg.name, model.cfg.backbone):
        raise UserError(
            f"--arch {arch}: the model comes from --init, which is {model.cfg.name} ({model.cfg.backbone}); "
            "leave --arch out or give that"
        )
