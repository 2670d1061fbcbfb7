"""Setting up a training run: the data, the model, precision, DDP, the optimizer, the loss's extras, and resume.

`setup_run` returns the two things the loop needs: the `TrainState` that changes as training goes, and the
`Context` fixed for the run.
"""

from __future__ import annotations

import itertools
import json
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

from ..errors import UserError
from ..formats import run as run_dir
from ..formats.dataset import Dataset, open_dataset
from ..models import create_tagger, default_heads
from ..models.tagger import PRESETS, TaggerConfig, TaggerNet
from . import distill, distributed, extend, probe
from .config import TrainConfig
from .losses import cooccurrence, exclusive_pairs, prior_bias, tag_weights

# Settings that may change between the sessions of one run: more epochs, other machines, a moved run or dataset (its
# vocabulary is checked).
RESUMABLE_CHANGES = ("epochs", "workers", "device", "max_steps_per_epoch", "out", "data", "max_bad_samples", "verify")


@dataclass
class TrainState:
    """What changes as training goes: the model, its optimizer, where we are, and what happened so far."""

    model: TaggerNet
    optimizer: torch.optim.Optimizer
    epoch: int = 0  # epochs completed
    step: int = 0
    best: float | None = None
    best_epoch: int | None = None
    history: list[dict] = field(default_factory=list)

    def checkpoint_state(self) -> dict:
        return {"step": self.step, "best": self.best, "best_epoch": self.best_epoch, "history": self.history}


@dataclass
class Context:
    """Fixed for the run: where it writes, devices, precision, schedule lengths, loss extras, the dataset."""

    cfg: TrainConfig
    run: Path
    ds: Dataset
    dist: distributed.Dist
    net: torch.nn.Module  # the model as trained (DDP-wrapped under torchrun)
    activations: dict[str, str]
    steps_per_epoch: int
    autocast: str | None  # bfloat16 / float16 / None
    channels_last: bool
    weights: dict[str, torch.Tensor]
    pairs: dict[str, torch.Tensor]
    scaler: torch.amp.GradScaler | None
    console: Console
    extension: extend.Extension | None = None  # i2v train --init: the original model and the merged vocabulary
    distillation: distill.Distillation | None = None  # i2v distill: the teacher's soft targets, agreement figures

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.cfg.epochs

    @property
    def warmup_steps(self) -> int:
        return int(self.cfg.warmup * self.steps_per_epoch)


def setup_run(cfg: TrainConfig, resume: bool, console: Console, d: distributed.Dist) -> tuple[TrainState, Context]:
    """Open the dataset, check the run directory, build (or rebuild) the model, choose precision, wrap it for DDP,
    make the optimizer, and restore the latest checkpoint when resuming."""
    ds = open_dataset(cfg.data)  # a directory or a URL, whose shards the loader streams
    # Shards cut short or changed since the build are named now, not hours into the run.
    ds.check_shards([s for s in ("train", "val") if s in ds.info.splits], cfg.verify)
    # Rank 0 alone reads the run directory (on several nodes, the others may not see it) and tells the rest.
    run, done, saved = distributed.on_main(d, lambda: _run_plan(cfg, resume))
    if saved and saved.get("data_vocab_hash", saved["vocab_hash"]) != ds.vocab.hash:
        raise UserError(f"{run} was trained on another vocabulary than {cfg.data}'s")
    seed_everything(cfg.seed)
    ext = None
    if cfg.init:  # extending a trained model (train/extend.py): its weights, its rows of the heads, kept beside
        model, ext = extend.prepare(cfg, ds, run, bool(done), d.device, console if d.main else None)
        if d.main and not done:
            ext.save(run)
    else:  # resuming: the run's own architecture, even if its preset has changed since
        model = build_model(cfg, ds, saved["model"] if done and saved else None)
    model = model.to(d.device)
    if cfg.freeze_backbone:
        extend.freeze_backbone(model)
    if ext is not None and not done and d.main:  # under DDP, its wrap hands rank 0's rows to the other ranks
        _probe(cfg, ext, model, ds, d.device, console)
    if cfg.prior_init and not done and ext is None:
        init_head_priors(model, ds.tag_counts("train"), ds.samples("train"))
    autocast, channels_last = precision(cfg, d.device)
    if ext is not None:
        ext.autocast = autocast  # the original model runs at the same precision
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    activations = {h.name: h.activation for h in model.cfg.heads}
    weights, pairs = loss_extras(cfg, ds, activations)
    if ext is not None:
        weights, pairs = ext.model_space(weights, pairs)
    ctx = Context(
        cfg=cfg,
        run=run,
        ds=ds,
        dist=d,
        net=wrap_ddp(model, cfg, d),
        activations=activations,
        steps_per_epoch=steps_per_epoch(cfg, ds, d),
        autocast=autocast,
        channels_last=channels_last,
        weights={k: v.to(d.device) for k, v in weights.items()},
        pairs={k: v.to(d.device) for k, v in pairs.items()},
        scaler=torch.amp.GradScaler() if autocast == "float16" else None,
        console=console,
        extension=ext,
        distillation=distill.prepare(ds, activations) if cfg.distill else None,
    )
    state = TrainState(model, make_optimizer(model, cfg))
    if ext is not None:  # the heads' rows of the original's tags learn at the backbone's rate too
        ext.scale_old_rows(model, state.optimizer, cfg.backbone_lr_scale)
    if done:
        restored = distributed.on_main(d, lambda: run_dir.load_checkpoint(run, done[-1], model, state.optimizer))
        distributed.sync_state(d, model, state.optimizer)
        state.epoch, state.step = restored["epoch"], restored["step"]
        state.best, state.best_epoch, state.history = restored["best"], restored["best_epoch"], restored["history"]
        if d.main:
            console.print(f"resuming {run} after epoch {state.epoch}")
    return state, ctx


def _probe(cfg: TrainConfig, ext: extend.Extension, model: TaggerNet, ds: Dataset, device, console: Console) -> None:
    """--probe-new (train/probe.py): the new rows fitted on the original's features, when wanted."""
    if not probe.wanted(cfg.probe_new, ext, ds.tag_counts("train"), ds.samples("train")):
        return
    fitted = probe.probe_new_rows(model, ext, ds, device, cfg.workers, console)
    if fitted:
        rows = ", ".join(f"{n} {head}" for head, n in fitted.items())
        console.print(f"new rows fitted on the original's features (a linear probe): {rows}", highlight=False)


def _run_plan(cfg: TrainConfig, resume: bool) -> tuple[Path, list[int], dict | None]:
    """The run directory, its finished epochs and, resuming, its saved config.json."""
    run, done = prepare_run(cfg, resume)
    saved = run_dir.read_config(run) if resume and (run / run_dir.CONFIG).exists() else None
    return run, done, saved


def prepare_run(cfg: TrainConfig, resume: bool) -> tuple[Path, list[int]]:
    """Check the run directory: a new run needs an empty one, --resume needs the same config."""
    run = Path(cfg.out)
    done = run_dir.list_checkpoints(run)
    if resume:
        if not (run / run_dir.CONFIG).exists():
            raise UserError(f"{run}: nothing to resume (no config.json)")
        # Compared as JSON, both through TrainConfig: tuples come back as lists, and older runs kept another shape.
        old = json.loads(json.dumps(TrainConfig.from_json(run_dir.read_config(run)["train"]).to_json()))
        new = json.loads(json.dumps(cfg.to_json()))
        differs = sorted(k for k in old if k not in RESUMABLE_CHANGES and old[k] != new.get(k))
        if differs:
            raise UserError(f"{run}: --resume with other settings than the run's ({', '.join(differs)})")
    elif done or (run / run_dir.CONFIG).exists():
        raise UserError(f"{run} already holds a run; add --resume to continue it or choose another --out")
    return run, done


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def model_heads(cfg: TrainConfig, sizes: dict[str, int]) -> tuple:
    """The heads for this vocabulary, keeping the preset's choices (softmax heads, rating head) unless overridden."""
    preset = PRESETS.get(cfg.arch, {})
    preset_heads = {h.name if hasattr(h, "name") else h["name"]: h for h in preset.get("heads", ())}

    def activation(h) -> str:
        return h.activation if hasattr(h, "activation") else h["activation"]

    softmax = cfg.softmax
    if softmax is None:
        softmax = tuple(n for n, h in preset_heads.items() if n != "rating" and activation(h) == "softmax")
    rating = cfg.rating_head if cfg.rating_head is not None else (not preset_heads or "rating" in preset_heads)
    wanted = {h: n for h, n in sizes.items() if h != "rating" or rating}
    return default_heads(wanted, softmax=softmax)


def build_model(cfg: TrainConfig, ds: Dataset, saved: dict | None = None) -> TaggerNet:
    """The tagger of `cfg.arch` with heads for the dataset's vocabulary at its image size and `cfg.model`'s
    overrides; or, given the TaggerConfig a run saved, that one."""
    sizes = {h: len(ix) for h, ix in ds.vocab.heads.items()}
    try:
        if saved is not None:
            return create_tagger(TaggerConfig.from_dict(saved))
        heads = model_heads(cfg, sizes)
        return create_tagger(cfg.arch, pretrained=cfg.pretrained, heads=heads, image_size=ds.image_size, **cfg.model)
    except ValueError as e:  # an unknown preset or timm name, a bad --freeze or --global-pool: the user's to fix
        raise UserError(str(e)) from e


def precision(cfg: TrainConfig, device: torch.device) -> tuple[str | None, bool]:
    """(the autocast dtype's name or None, channels-last) that `auto` means on this device."""
    cuda = device.type == "cuda"
    channels_last = cfg.channels_last == "on" or (cfg.channels_last == "auto" and cuda)
    autocast = {"auto": "bfloat16" if cuda else None, "bf16": "bfloat16", "fp16": "float16", "off": None}[cfg.amp]
    return autocast, channels_last


def wrap_ddp(model: TaggerNet, cfg: TrainConfig, d: distributed.Dist) -> torch.nn.Module:
    """The model as trained: DDP-wrapped under torchrun (with SyncBatchNorm on GPUs), else itself."""
    if not d.enabled:
        return model
    net: torch.nn.Module = model
    cuda = d.device.type == "cuda"
    if cfg.sync_bn and cuda:  # SyncBatchNorm runs on GPUs only; on the CPU each process keeps its own statistics
        net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)
    return torch.nn.parallel.DistributedDataParallel(net, device_ids=[d.device.index] if cuda else None)


def make_optimizer(model: TaggerNet, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters, without weight decay on biases and norms; with a backbone learning rate
    scale other than 1 (`--backbone-lr-scale`), the backbone's groups carry it as "lr_scale" (the loop multiplies)."""
    scale = cfg.backbone_lr_scale
    parts = [(model, {})] if scale == 1 else [(model.backbone, {"lr_scale": scale}), (model.heads, {})]
    groups = []
    for part, extra in parts:
        params = [p for p in part.parameters() if p.requires_grad]
        decay = [p for p in params if p.ndim > 1]
        no_decay = [p for p in params if p.ndim <= 1]
        groups += [
            {"params": decay, "weight_decay": cfg.weight_decay, **extra},
            {"params": no_decay, "weight_decay": 0.0, **extra},
        ]
    return torch.optim.AdamW([g for g in groups if g["params"] or scale == 1], lr=cfg.lr)


def steps_per_epoch(cfg: TrainConfig, ds: Dataset, d: distributed.Dist) -> int:
    """Steps in an epoch: under DDP, full batches only, so that every rank takes the same number."""
    per_rank = ds.samples("train") // d.world
    steps = max(1, per_rank // cfg.batch_size if d.enabled else math.ceil(per_rank / cfg.batch_size))
    return steps if cfg.max_steps_per_epoch is None else min(steps, cfg.max_steps_per_epoch)


def run_config(ctx: Context, model: TaggerNet) -> dict:
    """The run's config.json: the training config, the model's, the dataset, and what "auto" resolved to."""
    cuda = ctx.dist.device.type == "cuda"
    return {
        "train": ctx.cfg.to_json(),
        "model": model.cfg.to_dict(),
        "dataset": str(ctx.ds.root),
        "vocab_hash": ctx.ds.vocab.hash,
        "image_size": ctx.ds.image_size,
        **extend.run_entries(ctx.extension, ctx.ds.vocab.hash),  # --init: the merged vocabulary's hash, and more
        **distill.run_entries(ctx.distillation),  # i2v distill: the teacher
        # What "auto" resolved to on this machine: the precision and layout the run actually trained with.
        "runtime": {
            "device": str(ctx.dist.device),
            "world_size": ctx.dist.world,
            "autocast": ctx.autocast,
            "channels_last": ctx.channels_last,
            "sync_bn": bool(ctx.dist.enabled and ctx.cfg.sync_bn and cuda),
        },
    }


def loss_extras(cfg: TrainConfig, ds: Dataset, activations: dict[str, str]) -> tuple[dict, dict]:
    """Per-tag frequency weights (when the loss asks for them) and the exclusive pairs of general tags."""
    weights, pairs = {}, {}
    if cfg.loss.frequency_weighting:
        counts = ds.tag_counts("train")
        for head, act in activations.items():
            if head != "rating" and act == "sigmoid":
                weights[head] = tag_weights(counts[head], cfg.loss.frequency_alpha)
    if "general" in activations:
        # Found even when the penalty is off: validation counts contradictions (`general/contradictions`) either way.
        pairs["general"] = general_exclusive_pairs(ds)
    return weights, pairs


@torch.no_grad()
def init_head_priors(model: TaggerNet, counts: dict[str, list[int]], samples: int) -> None:
    """Set each head's output bias so that the untrained model predicts every tag at its frequency in the training
    split: logit(p) for sigmoid heads, log(p) for softmax heads (the prior initialisation of RetinaNet's focal loss
    paper). A zero bias predicts every tag at 0.5 (sigmoid), and the first steps are spent pulling thousands of rare
    tags down instead of learning what tells them apart."""
    for h in model.cfg.heads:
        linears = [m for m in model.heads[h.name].modules() if isinstance(m, torch.nn.Linear)]
        if h.name not in counts or not linears or linears[-1].bias is None:
            continue
        bias = prior_bias(counts[h.name], samples, h.activation)
        linears[-1].bias.copy_(bias.to(linears[-1].bias.dtype))


def _general_blocks(ds: Dataset, split: str = "train", size: int = 4096) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(multi-hot general labels, has exactly one character) over a split in blocks of `size` rows: one pass over the
    shards' JSON members, and memory bounded by the block, not the data set (a dense matrix of millions of posts by
    thousands of tags would not fit). Always at least one block, empty for an empty split."""
    n = len(ds.vocab.heads["general"])
    general, single, sent = [], [], False
    for sample in ds.labels(split):
        row = np.zeros(n, dtype=np.float32)
        row[sample.labels.get("general", [])] = 1
        general.append(row)
        single.append(len(sample.labels.get("character", [])) == 1)
        if len(general) == size:
            yield torch.from_numpy(np.stack(general)), torch.tensor(single)
            general, single, sent = [], [], True
    if general or not sent:
        block = np.stack(general) if general else np.zeros((0, n), np.float32)
        yield torch.from_numpy(block), torch.tensor(single, dtype=torch.bool)


def general_exclusive_pairs(ds: Dataset) -> torch.Tensor:
    """Pairs of general tags that never appear together on the training split's single-character posts."""
    # Only posts with one character: there, two hair colours are a contradiction, not two people.
    by_character = "character" in ds.vocab.heads
    rows = 0

    def counted(blocks):
        nonlocal rows
        for general, single in blocks:
            rows += int(single.sum()) if by_character else len(general)
            yield general, single

    if by_character:  # the two iterators advance in step, so tee holds one block at most
        blocks, masks = itertools.tee(counted(_general_blocks(ds)))
        cooc = cooccurrence((g for g, _ in blocks), (s for _, s in masks))
    else:
        cooc = cooccurrence(g for g, _ in counted(_general_blocks(ds)))
    # Counts over the same posts as the co-occurrences; `rows` rules out pairs that never met by chance alone.
    return exclusive_pairs(cooc, cooc.diagonal(), rows=rows)
