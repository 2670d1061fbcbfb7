"""`i2v train`: the training loop, in plain sight (schedule, forward and loss, backward and clip, log, checkpoint)."""

from __future__ import annotations

import csv
import itertools
import json
import logging
import math
import random
import shutil
import time
from collections.abc import Iterable, Iterator
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ..formats.dataset import Dataset, open_dataset
from ..formats.loader import LoaderConfig, make_loader
from ..errors import UserError
from ..formats.shards import iter_samples
from ..models import create_tagger, default_heads
from ..models.tagger import PRESETS, TaggerConfig, TaggerNet
from ..util.cores import cores
from . import distributed
from .checkpoints import list_checkpoints, load_checkpoint, save_checkpoint
from .losses import LossConfig, cooccurrence, exclusive_pairs, multitask_loss, tag_weights
from .metrics import head_metrics, topk_accuracy
from .plots import plot_curves

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a training run; saved as the run's config.json."""

    data: str
    out: str
    arch: str = "i2v_small"
    epochs: int = 10
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 0.05
    warmup: float = 0.2  # epochs of linear warm-up before the cosine decay
    min_lr_ratio: float = 0.02  # the cosine ends at lr * min_lr_ratio
    clip_grad: float = 1.0  # max gradient norm; 0 turns clipping off
    workers: int = field(default_factory=lambda: default_workers())  # loader processes: one core is the model's
    seed: int = 0
    select_by: str = "general/mAP"  # the validation metric that picks the best epoch (higher is better; loss: lower)
    threshold: float = 0.5  # for precision, recall and F1 during training; `i2v evaluate` calibrates its own
    amp: str = "auto"  # auto: bf16 on a GPU, off on the CPU; or bf16, fp16, off
    channels_last: str = "auto"  # auto: on a GPU
    pretrained: bool = False
    freeze: str | None = None  # None keeps the preset's (the seed freezes through block4_conv1)
    global_pool: str | None = None  # timm's pooling ("avg", "max", "catavgmax", ...); None keeps the preset's
    softmax: tuple[str, ...] | None = None  # heads with softmax; None keeps the preset's
    rating_head: bool | None = None  # None keeps the preset's (all but the seed's have one)
    loss: LossConfig = field(default_factory=LossConfig)
    sync_bn: bool = True  # SyncBatchNorm across processes under DDP
    device: str = "auto"
    max_steps_per_epoch: int | None = None  # cut epochs short (tests, benchmarks)
    prior_init: bool = True  # start each head's output bias at its tags' frequency in the training split

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> TrainConfig:
        d = dict(d)
        d["loss"] = LossConfig(**{k: tuple(map(tuple, v)) if k == "head_weights" else v for k, v in d["loss"].items()})
        d["softmax"] = tuple(d["softmax"]) if d.get("softmax") is not None else None
        return cls(**d)

    @property
    def select_key(self) -> str:
        return self.select_by if self.select_by.startswith("val/") else f"val/{self.select_by}"


def default_workers() -> int:
    """Loader processes: every core but one, which the training step needs for itself (at most 8). On 2 cores,
    one worker keeps the model fed at 0.95 of in-memory speed where two gave 0.85 (`python -m bench train`)."""
    return max(1, min(8, cores() - 1))


def get_lr(step: int, total: int, warmup: int, base: float, floor: float) -> float:
    """Linear warm-up to `base` over `warmup` steps, then a cosine down to `floor` at step `total`."""
    if warmup > 0 and step < warmup:
        return base * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + 0.5 * (base - floor) * (1 + math.cos(math.pi * progress))


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


@dataclass
class Context:
    """Fixed for the run: devices, precision, schedule lengths, loss extras, the dataset."""

    cfg: TrainConfig
    ds: Dataset
    dist: distributed.Dist
    net: torch.nn.Module  # the model as trained (DDP-wrapped under torchrun)
    activations: dict[str, str]
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    autocast: str | None  # bf16 / fp16 / None
    channels_last: bool
    weights: dict[str, torch.Tensor]
    pairs: dict[str, torch.Tensor]
    scaler: torch.amp.GradScaler | None
    console: Console


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


def _general_blocks(ds: Dataset, split: str = "train", size: int = 4096) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(multi-hot general labels, has exactly one character) over a split in blocks of `size` rows: one pass over the
    shards' JSON members, and memory bounded by the block, not the data set (a dense matrix of millions of posts by
    thousands of tags would not fit). Always at least one block, empty for an empty split."""
    n = len(ds.vocab.heads["general"])
    general, single, sent = [], [], False
    for _, files in iter_samples([Path(p) for p in ds.shards(split)], exts=("json",)):
        labels = json.loads(files["json"])["labels"]
        row = np.zeros(n, dtype=np.float32)
        row[labels.get("general", [])] = 1
        general.append(row)
        single.append(len(labels.get("character", [])) == 1)
        if len(general) == size:
            yield torch.from_numpy(np.stack(general)), torch.tensor(single)
            general, single, sent = [], [], True
    if general or not sent:
        block = np.stack(general) if general else np.zeros((0, n), np.float32)
        yield torch.from_numpy(block), torch.tensor(single, dtype=torch.bool)


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
        n = torch.tensor(counts[h.name], dtype=torch.float64)
        if h.activation == "softmax":
            bias = torch.log((n + 1) / (n.sum() + len(n)))  # smoothed class frequencies
        else:
            p = ((n + 0.5) / (samples + 1)).clamp(1e-4, 1 - 1e-4)
            bias = torch.log(p / (1 - p))
        linears[-1].bias.copy_(bias.to(linears[-1].bias.dtype))


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


def contradiction_rate(probs: np.ndarray, single: np.ndarray, pairs: np.ndarray, threshold: float) -> float:
    """Fraction of single-character images on which two mutually exclusive general tags (two hair colours, two eye
    colours: pairs never seen together in training) are both predicted at `threshold`; NaN without such images."""
    pred = (probs[single] >= threshold).astype(np.float32)
    if not len(pred):
        return float("nan")
    both = (pred @ pairs.astype(np.float32)) * pred  # > 0 where a predicted tag has a predicted exclusive partner
    return float((both.sum(axis=1) > 0).mean())


def _to(device: torch.device, images: torch.Tensor, targets: dict, channels_last: bool):
    images = images.to(device, non_blocking=True)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, {k: v.to(device, non_blocking=True) for k, v in targets.items()}


def _batches(ctx: Context, epoch: int) -> Iterator:
    """This epoch's training batches: the loader once, or, under DDP, exactly steps_per_epoch batches on every rank."""
    cfg = ctx.cfg
    loader_cfg = LoaderConfig(batch_size=cfg.batch_size, workers=cfg.workers, seed=cfg.seed)
    if not ctx.dist.enabled and cfg.max_steps_per_epoch is None:
        return iter(make_loader(ctx.ds, "train", loader_cfg, train=True, epoch=epoch))
    # Every rank must take the same number of steps or DDP waits forever: repeat the rank's shards if needed.
    passes = (make_loader(ctx.ds, "train", loader_cfg, train=True, epoch=epoch * 1000 + i) for i in itertools.count())
    return itertools.islice(itertools.chain.from_iterable(passes), ctx.steps_per_epoch)


def train_one_epoch(state: TrainState, ctx: Context, progress: Progress | None) -> dict[str, float]:
    """One pass over the training split; returns the epoch's mean training losses."""
    cfg, net = ctx.cfg, ctx.net
    net.train()
    sums: dict[str, float] = {}
    seen, t0 = 0, time.perf_counter()
    bar = progress.add_task(f"epoch {state.epoch + 1}", total=ctx.steps_per_epoch, info="") if progress else None
    for images, targets in _batches(ctx, state.epoch):
        # Schedule: the learning rate is a pure function of the step.
        lr = get_lr(state.step, ctx.total_steps, ctx.warmup_steps, cfg.lr, cfg.lr * cfg.min_lr_ratio)
        for group in state.optimizer.param_groups:
            group["lr"] = lr
        # Forward and loss (mixed precision where it pays: bf16 on a GPU).
        images, targets = _to(ctx.dist.device, images, targets, ctx.channels_last)
        amp = (
            torch.autocast(ctx.dist.device.type, dtype=getattr(torch, ctx.autocast)) if ctx.autocast else nullcontext()
        )
        with amp:
            logits = net(images)
        logits = {k: v.float() for k, v in logits.items()}
        loss, parts = multitask_loss(logits, targets, ctx.activations, cfg.loss, ctx.weights, ctx.pairs)
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
    return out


@torch.no_grad()
def predict(
    model: TaggerNet,
    batches: Iterable,
    device: torch.device,
    channels_last: bool,
    autocast: str | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Probabilities and targets per head over some batches, as numpy arrays."""
    model.eval()
    probs: dict[str, list] = {}
    targets_out: dict[str, list] = {}
    for images, targets in batches:
        images, targets = _to(device, images, targets, channels_last)
        amp = torch.autocast(device.type, dtype=getattr(torch, autocast)) if autocast else nullcontext()
        with amp:
            logits = model(images)
        for head, p in model.activate({k: v.float() for k, v in logits.items()}).items():
            probs.setdefault(head, []).append(p.cpu().numpy())
            targets_out.setdefault(head, []).append(targets[head].cpu().numpy())
    return ({k: np.concatenate(v) for k, v in probs.items()}, {k: np.concatenate(v) for k, v in targets_out.items()})


def evaluate(state: TrainState, ctx: Context, split: str = "val") -> dict[str, float]:
    """Named metrics of every head on a split (loss, accuracy, precision, recall, F1, mAP, top-k)."""
    cfg = ctx.cfg
    loader = make_loader(ctx.ds, split, LoaderConfig(batch_size=cfg.batch_size, workers=cfg.workers), train=False)
    # The bare model, not the DDP wrapper: ranks may hold different numbers of validation batches, and DDP's forward
    # would wait for the others at every batch.
    probs, targets = predict(state.model, loader, ctx.dist.device, ctx.channels_last, ctx.autocast)
    for head, n in ((h.name, h.classes) for h in state.model.cfg.heads):  # a rank whose share of shards was empty
        if head not in probs:
            probs[head] = np.zeros((0, n), np.float32)
            targets[head] = np.zeros((0,), np.int64) if head == "rating" else np.zeros((0, n), np.float32)
    gathered = distributed.gather_arrays(
        ctx.dist, {**{f"p:{k}": v for k, v in probs.items()}, **{f"t:{k}": v for k, v in targets.items()}}
    )
    probs = {k[2:]: v for k, v in gathered.items() if k.startswith("p:")}
    targets = {k[2:]: v for k, v in gathered.items() if k.startswith("t:")}
    out: dict[str, float] = {}
    total_loss = 0.0
    for head, p in probs.items():
        t = targets[head]
        loss = _head_loss(p, t, ctx.activations[head])
        out[f"{split}/{head}/loss"] = loss
        total_loss += loss
        for name, value in head_metrics(head, p, t, ctx.activations[head], cfg.threshold):
            out[f"{split}/{name}"] = float(value)
        if head in ("character", "copyright", "artist") and f"{split}/{head}/top1" not in out:
            # Top-1 is the figure people quote for characters, whatever the head's activation.
            out[f"{split}/{head}/top1"] = float(topk_accuracy(p, t, 1))
            out[f"{split}/{head}/top5"] = float(topk_accuracy(p, t, 5))
    pairs = ctx.pairs.get("general")
    if pairs is not None and "general" in probs and "character" in targets and ctx.activations["general"] == "sigmoid":
        single = targets["character"].sum(axis=1) == 1
        rate = contradiction_rate(probs["general"], single, pairs.cpu().numpy(), cfg.threshold)
        out[f"{split}/general/contradictions"] = rate
    out[f"{split}/loss"] = total_loss
    return out


def _head_loss(p: np.ndarray, t: np.ndarray, activation: str) -> float:
    """The head's validation loss from probabilities (cross-entropy for softmax heads and ratings, BCE otherwise)."""
    eps = 1e-7
    if t.ndim == 1:  # rating: class indices, -1 unknown
        keep = t >= 0
        return float(-np.log(np.clip(p[keep, t[keep]], eps, 1)).mean()) if keep.any() else float("nan")
    if activation == "softmax":
        rows = t.sum(1) > 0
        if not rows.any():
            return float("nan")
        q = t[rows] / t[rows].sum(1, keepdims=True)
        return float(-(q * np.log(np.clip(p[rows], eps, 1))).sum(1).mean())
    p = np.clip(p, eps, 1 - eps)
    return float(-(t * np.log(p) + (1 - t) * np.log(1 - p)).mean())


def _better(cfg: TrainConfig, value: float, best: float | None) -> bool:
    if value != value:  # NaN never wins
        return False
    if best is None:
        return True
    return value < best if cfg.select_key.endswith("loss") else value > best


def write_metrics(run: Path, history: list[dict]) -> None:
    """metrics.csv: one row per epoch, one column per metric (rewritten whole, atomically)."""
    keys = list(dict.fromkeys(k for row in history for k in row))
    tmp = run / "metrics.csv.tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        for row in history:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    tmp.replace(run / "metrics.csv")


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def prepare_run(cfg: TrainConfig, resume: bool) -> tuple[Path, list[int]]:
    """Check the run directory: a new run needs an empty one, --resume needs the same config."""
    run = Path(cfg.out)
    done = list_checkpoints(run)
    saved = run / "config.json"
    if resume:
        if not saved.exists():
            raise UserError(f"{run}: nothing to resume (no config.json)")
        old = json.loads(saved.read_text())["train"]
        # May change between sessions: more epochs, other machines, a moved run or dataset (its vocabulary is checked).
        keep = {"epochs", "workers", "device", "max_steps_per_epoch", "out", "data"}
        new = json.loads(json.dumps(cfg.to_json()))  # compare as JSON: tuples come back as lists
        differs = sorted(k for k in old if k not in keep and old[k] != new.get(k))
        if differs:
            raise UserError(f"{run}: --resume with other settings than the run's ({', '.join(differs)})")
    elif done or saved.exists():
        raise UserError(f"{run} already holds a run; add --resume to continue it or choose another --out")
    return run, done


def fit(cfg: TrainConfig, resume: bool = False, console: Console | None = None) -> dict:
    """Train (or resume) a run; returns a summary with the best epoch and its metrics."""
    console = console or Console(stderr=True)
    d = distributed.setup(cfg.device)
    try:
        return _fit(cfg, resume, console, d)
    finally:
        distributed.teardown(d)


def _fit(cfg: TrainConfig, resume: bool, console: Console, d: distributed.Dist) -> dict:
    ds = open_dataset(Path(cfg.data))
    run, done = prepare_run(cfg, resume) if d.main else (Path(cfg.out), list_checkpoints(Path(cfg.out)))
    saved = run / "config.json"
    saved_cfg = json.loads(saved.read_text()) if resume and saved.exists() else None
    if saved_cfg and saved_cfg["vocab_hash"] != ds.vocab.hash:
        raise UserError(f"{run} was trained on another vocabulary than {cfg.data}'s")
    _seed_everything(cfg.seed)
    sizes = {h: len(ix) for h, ix in ds.vocab.heads.items()}
    heads = model_heads(cfg, sizes)
    overrides = {"heads": heads, "image_size": ds.image_size}
    if cfg.freeze is not None:
        overrides["freeze"] = cfg.freeze
    if cfg.global_pool is not None:
        overrides["global_pool"] = cfg.global_pool
    try:
        if done and saved_cfg:  # resuming: the run's own architecture, even if its preset has changed since
            model = create_tagger(TaggerConfig.from_dict(saved_cfg["model"])).to(d.device)
        else:
            model = create_tagger(cfg.arch, pretrained=cfg.pretrained, **overrides).to(d.device)
    except ValueError as e:  # an unknown preset or timm name, a bad --freeze or --global-pool: the user's to fix
        raise UserError(str(e)) from e
    if cfg.prior_init and not done:
        init_head_priors(model, ds.tag_counts("train"), ds.samples("train"))
    cuda = d.device.type == "cuda"
    channels_last = cfg.channels_last == "on" or (cfg.channels_last == "auto" and cuda)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    autocast = {"auto": "bfloat16" if cuda else None, "bf16": "bfloat16", "fp16": "float16", "off": None}[cfg.amp]
    net: torch.nn.Module = model
    if d.enabled:
        if cfg.sync_bn and cuda:  # SyncBatchNorm runs on GPUs only; on the CPU each process keeps its own statistics
            net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)
        net = torch.nn.parallel.DistributedDataParallel(net, device_ids=[d.device.index] if cuda else None)
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]  # biases and norms: no weight decay
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr
    )
    per_rank = ds.samples("train") // d.world
    steps = max(1, per_rank // cfg.batch_size if d.enabled else math.ceil(per_rank / cfg.batch_size))
    if cfg.max_steps_per_epoch is not None:
        steps = min(steps, cfg.max_steps_per_epoch)
    activations = {h.name: h.activation for h in model.cfg.heads}
    weights, pairs = loss_extras(cfg, ds, activations)
    weights = {k: v.to(d.device) for k, v in weights.items()}
    pairs = {k: v.to(d.device) for k, v in pairs.items()}
    ctx = Context(
        cfg=cfg,
        ds=ds,
        dist=d,
        net=net,
        activations=activations,
        steps_per_epoch=steps,
        total_steps=steps * cfg.epochs,
        warmup_steps=int(cfg.warmup * steps),
        autocast=autocast,
        channels_last=channels_last,
        weights=weights,
        pairs=pairs,
        scaler=torch.amp.GradScaler() if autocast == "float16" else None,
        console=console,
    )
    state = TrainState(model, optimizer)
    if done:
        saved = load_checkpoint(run, done[-1], model, optimizer)
        state.epoch, state.step = saved["epoch"], saved["step"]
        state.best, state.best_epoch, state.history = saved["best"], saved["best_epoch"], saved["history"]
        if d.main:
            console.print(f"resuming {run} after epoch {state.epoch}")
    if d.main:
        run.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(ds.root / ds.info.vocab, run / "selected_tags.csv")
        config = {
            "train": cfg.to_json(),
            "model": model.cfg.to_dict(),
            "dataset": str(ds.root),
            "vocab_hash": ds.vocab.hash,
            "image_size": ds.image_size,
            # What "auto" resolved to on this machine: the precision and layout the run actually trained with.
            "runtime": {
                "device": str(d.device),
                "world_size": d.world,
                "autocast": autocast,
                "channels_last": channels_last,
                "sync_bn": bool(d.enabled and cfg.sync_bn and cuda),
            },
        }
        (run / "config.json").write_text(json.dumps(config, indent=1))
    writer = _tensorboard(run) if d.main else None
    columns = [
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
    ]
    with Progress(*columns, console=console, disable=not d.main) as progress:
        while state.epoch < cfg.epochs:
            t0 = time.perf_counter()
            # Each epoch's randomness comes from the seed and the epoch alone: a resumed run repeats it exactly.
            _seed_everything(cfg.seed * 1_000_003 + state.epoch)
            row = {"epoch": state.epoch + 1, **train_one_epoch(state, ctx, progress if d.main else None)}
            row.update(evaluate(state, ctx))
            row["lr"] = state.optimizer.param_groups[0]["lr"]
            row["seconds"] = time.perf_counter() - t0
            state.epoch += 1
            value = row.get(cfg.select_key, float("nan"))
            if cfg.select_key not in row:
                raise UserError(f"--select-by {cfg.select_by}: no such metric; some are: {', '.join(list(row)[:8])}")
            if _better(cfg, value, state.best):
                state.best, state.best_epoch = value, state.epoch
            state.history.append(row)
            if d.main:
                save_checkpoint(
                    run,
                    state.epoch,
                    model,
                    optimizer,
                    {"step": state.step, "best": state.best, "best_epoch": state.best_epoch, "history": state.history},
                )
                write_metrics(run, state.history)
                plot_curves(state.history, run / "curves.png", state.best_epoch, title=f"{cfg.arch} on {ds.root.name}")
                if writer is not None:
                    for k, v in row.items():
                        if isinstance(v, float) and k != "epoch":
                            writer.add_scalar(k, v, state.epoch)
                    writer.flush()
                console.print(_epoch_line(row, cfg.select_key), highlight=False)
    if writer is not None:
        writer.close()
    summary = {
        "run": str(run),
        "best_epoch": state.best_epoch,
        "select_by": cfg.select_key,
        "best": state.best,
        "epochs": state.epoch,
        "last": state.history[-1] if state.history else {},
    }
    if d.main:
        (run / "best.json").write_text(json.dumps(summary, indent=1))
    return summary


def _epoch_line(row: dict, select_key: str) -> str:
    keys = ["train/loss", "val/loss", "val/general/mAP", "val/character/top1", "val/character/mAP", select_key]
    shown = ", ".join(f"{k} {row[k]:.4f}" for k in dict.fromkeys(keys) if k in row)
    return f"epoch {row['epoch']}: {shown} ({row['seconds']:.0f} s, {row.get('train/images_per_s', 0):.0f} img/s)"


def _tensorboard(run: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is in the train extra; without it the CSV and the picture remain
        log.warning("tensorboard is not installed; writing metrics.csv and curves.png only")
        return None
    return SummaryWriter(str(run / "tb"))


__all__ = ["TrainConfig", "TrainState", "fit", "get_lr"]
