"""`i2v train`: the training loop, in plain sight (schedule, forward and loss, backward and clip, log, checkpoint).

`fit` sets the run up (train/setup.py), then `train_epochs` reads top to bottom: train an epoch, validate it with the
one evaluator, pick the best, checkpoint, and hand the row to the run's logbook.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field

import torch
from rich.console import Console
from rich.progress import Progress

from ..errors import UserError
from ..evaluation.evaluator import Predictions, PredictOptions, compute_metrics, predict_split
from ..formats import run as run_dir
from ..formats.loader import BadSamples, LoaderConfig, make_loader
from ..util.progress import progress_bar
from . import distributed
from .config import TrainConfig
from .logbook import Logbook
from .losses import multitask_loss
from .setup import Context, TrainState, run_config, seed_everything, setup_run


@dataclass(frozen=True)
class TrainSummary:
    """How a run ended: the best epoch by `select_by` and its value, epochs done, and the last epoch's row."""

    run: str
    best_epoch: int | None
    select_by: str  # the metric's full name, e.g. "val/general/mAP"
    best: float | None
    epochs: int
    last: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


def get_lr(step: int, total: int, warmup: int, base: float, floor: float) -> float:
    """Linear warm-up to `base` over `warmup` steps, then a cosine down to `floor` at step `total`."""
    if warmup > 0 and step < warmup:
        return base * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + 0.5 * (base - floor) * (1 + math.cos(math.pi * progress))


def fit(cfg: TrainConfig, resume: bool = False, console: Console | None = None) -> TrainSummary:
    """Train (or resume) a run; returns a summary with the best epoch and its metrics."""
    console = console or Console(stderr=True)
    d = distributed.setup(cfg.device)
    finished = False
    try:
        state, ctx = setup_run(cfg, resume, console, d)
        if d.enabled and d.main:
            console.print(distributed.describe(d, cfg.out))
        summary = train_epochs(state, ctx)
        finished = True
        return summary
    finally:
        distributed.teardown(d, finished)


def train_epochs(state: TrainState, ctx: Context) -> TrainSummary:
    """Epochs until `cfg.epochs`: train, validate, select, checkpoint, log."""
    cfg, main = ctx.cfg, ctx.dist.main
    book = Logbook(ctx.run, ctx.console, enabled=main, title=f"{cfg.arch or state.model.cfg.name} on {ctx.ds.name}")
    # An extended run's vocabulary is the merged one, not the dataset's.
    book.start(run_config(ctx, state.model), ctx.extension.vocab if ctx.extension else ctx.ds.vocab_file)
    with progress_bar(ctx.console, disable=not main) as progress:
        while state.epoch < cfg.epochs:
            t0 = time.perf_counter()
            # Each epoch's randomness comes from the seed and the epoch alone: a resumed run repeats it exactly.
            seed_everything(cfg.seed * 1_000_003 + state.epoch)
            row = {"epoch": state.epoch + 1, **train_one_epoch(state, ctx, progress if main else None)}
            row.update(validate(state, ctx))
            row["lr"] = state.optimizer.param_groups[-1]["lr"]  # the heads' (the backbone's may be scaled)
            row["seconds"] = time.perf_counter() - t0
            state.epoch += 1
            if cfg.select_key not in row:
                raise UserError(f"--select-by {cfg.select_by}: no such metric; some are: {', '.join(list(row)[:8])}")
            if _better(cfg, row[cfg.select_key], state.best):
                state.best, state.best_epoch = row[cfg.select_key], state.epoch
            state.history.append(row)
            if main:
                run_dir.save_checkpoint(ctx.run, state.epoch, state.model, state.optimizer, state.checkpoint_state())
                if ctx.distillation is not None:
                    ctx.distillation.save(ctx.run, state.epoch)
            book.epoch(state.history, state.best_epoch, cfg.select_key)
    last = state.history[-1] if state.history else {}
    summary = TrainSummary(str(ctx.run), state.best_epoch, cfg.select_key, state.best, state.epoch, last)
    book.finish(summary.as_dict())
    return summary


def _better(cfg: TrainConfig, value: float, best: float | None) -> bool:
    if value != value:  # NaN never wins
        return False
    if best is None:
        return True
    return value < best if cfg.select_key.endswith("loss") else value > best


def _batches(ctx: Context, epoch: int, bad: BadSamples) -> Iterator:
    """This epoch's training batches: the loader once, or, under DDP, exactly steps_per_epoch batches on every rank.
    Samples that cannot be read are skipped and counted in `bad`; past `max_bad_samples` the run stops."""
    cfg = ctx.cfg
    loader_cfg = LoaderConfig(batch_size=cfg.batch_size, workers=cfg.workers, seed=cfg.seed)
    if not ctx.dist.enabled and cfg.max_steps_per_epoch is None:
        batches = iter(make_loader(ctx.ds, "train", loader_cfg, train=True, epoch=epoch, bad=bad))
    else:
        # Every rank must take the same number of steps or DDP waits forever: repeat the rank's shards if needed.
        passes = (
            make_loader(ctx.ds, "train", loader_cfg, train=True, epoch=epoch * 1000 + i, bad=bad)
            for i in itertools.count()
        )
        batches = itertools.islice(itertools.chain.from_iterable(passes), ctx.steps_per_epoch)
    for batch in batches:
        check_bad_samples(bad, cfg.max_bad_samples, "training")
        yield batch
    check_bad_samples(bad, cfg.max_bad_samples, "training")


def check_bad_samples(bad: BadSamples, limit: int, what: str) -> None:
    """A UserError once more samples than `limit` could not be read: the data is broken, not a sample or two."""
    if bad.count > limit:
        raise UserError(
            f"{bad.count} {what} samples could not be read this epoch, more than --max-bad-samples {limit}; "
            f"the first: {bad.first}"
        )


def train_one_epoch(state: TrainState, ctx: Context, progress: Progress | None) -> dict[str, float]:
    """One pass over the training split; returns the epoch's mean training losses."""
    cfg, net, device = ctx.cfg, ctx.net, ctx.dist.device
    net.train()
    sums: dict[str, float] = {}
    seen, t0, bad = 0, time.perf_counter(), BadSamples()
    bar = progress.add_task(f"epoch {state.epoch + 1}", total=ctx.steps_per_epoch, info="") if progress else None
    for images, targets in _batches(ctx, state.epoch, bad):
        # Schedule: the learning rate is a pure function of the step.
        lr = get_lr(state.step, ctx.total_steps, ctx.warmup_steps, cfg.lr, cfg.lr * cfg.min_lr_ratio)
        for group in state.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)  # --backbone-lr-scale
        # Forward and loss (mixed precision where it pays: bf16 on a GPU).
        images = images.to(device, non_blocking=True)
        if ctx.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        targets = {k: v.to(device, non_blocking=True) for k, v in targets.items()}
        original = None
        if ctx.extension is not None:  # --init: the model's input size and vocabulary; the original model's outputs
            images, targets, original = ctx.extension.batch(images, targets)
        with torch.autocast(device.type, dtype=getattr(torch, ctx.autocast)) if ctx.autocast else nullcontext():
            logits = net(images)
        logits = {k: v.float() for k, v in logits.items()}
        if ctx.distillation is not None:  # i2v distill: the teacher's probabilities as targets
            loss, parts = ctx.distillation.loss(logits, targets)
        else:
            loss, parts = multitask_loss(logits, targets, ctx.activations, cfg.loss, ctx.weights, ctx.pairs)
        if ctx.extension is not None:  # learning without forgetting: the original's outputs as soft targets
            loss, parts = ctx.extension.keep(logits, original, targets, loss, parts)
        # Backward and clip.
        state.optimizer.zero_grad(set_to_none=True)
        if ctx.scaler is not None:
            ctx.scaler.scale(loss).backward()
            ctx.scaler.unscale_(state.optimizer)
        else:
            loss.backward()
        if cfg.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.clip_grad)
        if ctx.scaler is not None:
            ctx.scaler.step(state.optimizer)
            ctx.scaler.update()
        else:
            state.optimizer.step()
        state.step += 1
        # Logging.
        n = images.shape[0]
        seen += n
        sums["loss"] = sums.get("loss", 0.0) + float(loss.detach()) * n
        for k, v in parts.items():
            sums[k] = sums.get(k, 0.0) + float(v) * n
        if progress is not None:
            rate = seen * ctx.dist.world / (time.perf_counter() - t0)
            progress.update(bar, advance=1, info=f"loss {sums['loss'] / seen:.4f}  {rate:.0f} img/s  lr {lr:.2e}")
    if progress is not None:
        progress.remove_task(bar)
    out = {
        f"train/{k}" if k == "loss" else f"train/{k}/loss" if "/" not in k else f"train/{k}": v / max(1, seen)
        for k, v in sums.items()
    }
    out = {k: distributed.mean_over_ranks(ctx.dist, v, seen) for k, v in out.items()}
    out["train/images_per_s"] = seen * ctx.dist.world / (time.perf_counter() - t0)
    out["train/bad_samples"] = float(bad.count)  # this rank's, skipped (see formats.loader.BadSamples)
    return out


def validate(state: TrainState, ctx: Context, split: str = "val") -> dict[str, float]:
    """The split's named metrics (see `evaluation.evaluator.compute_metrics`), prefixed with the split's name, at
    the config's threshold; under DDP, over every rank's predictions."""
    cfg = ctx.cfg
    opts = PredictOptions(cfg.batch_size, cfg.workers, autocast=ctx.autocast, channels_last=ctx.channels_last)
    # The bare model, not the DDP wrapper: ranks may hold different numbers of validation batches, and DDP's forward
    # would wait for the others at every batch.
    ext = ctx.extension  # --init: batches moved into the model's vocabulary, figures for old and new tags too
    preds = predict_split(state.model, ctx.ds, split, ctx.dist.device, opts, transform=ext and ext.transform())
    bad = preds.bad_samples
    if bad > cfg.max_bad_samples:
        raise UserError(
            f"{bad} {split} samples could not be read this epoch, more than --max-bad-samples {cfg.max_bad_samples}"
        )
    arrays = {**{f"p:{k}": v for k, v in preds.probs.items()}, **{f"t:{k}": v for k, v in preds.targets.items()}}
    gathered = distributed.gather_arrays(ctx.dist, arrays)
    preds = Predictions(
        {k[2:]: v for k, v in gathered.items() if k.startswith("p:")},
        {k[2:]: v for k, v in gathered.items() if k.startswith("t:")},
    )
    pairs = ctx.pairs["general"].cpu().numpy() if "general" in ctx.pairs else None
    if ext is not None:
        metrics = ext.metrics(preds, ctx.activations, cfg.threshold, pairs)
    else:
        metrics = compute_metrics(preds, ctx.activations, {h: cfg.threshold for h in ctx.activations}, pairs)
    if ctx.distillation is not None:  # agreement with the teacher, at thresholds matched to its decisions
        metrics.update(ctx.distillation.metrics(preds))
    return {**{f"{split}/{k}": v for k, v in metrics.items()}, f"{split}/bad_samples": float(bad)}


__all__ = ["TrainSummary", "fit", "get_lr", "train_epochs", "train_one_epoch", "validate"]
