"""Training throughput: the small preset fed by the real loader vs the same batches held in memory; the seed's rate.

The loader runs its worker processes (`--workers`, default: `i2v train`'s, cores - 1) beside the training step, as in
`i2v train`. A ratio near 1 says the loader keeps up. `--gpu` runs the same on CUDA with bf16 and channels-last.
"""

import argparse
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from bench.quality import prepare
from illust2vec.formats.dataset import open_dataset
from illust2vec.formats.loader import LoaderConfig, make_loader
from illust2vec.models import create_tagger
from illust2vec.train.config import TrainConfig, default_workers
from illust2vec.train.losses import LossConfig, multitask_loss
from illust2vec.train.setup import model_heads


def steps_per_second(model, batches, device, bf16: bool, channels_last: bool) -> float:
    """Train on the batches (an iterable, consumed as it goes); images per second after the first two steps."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    acts = {h.name: h.activation for h in model.cfg.heads}
    n, t0 = 0, None
    for i, (images, targets) in enumerate(batches):
        if i == 2:
            if device.type == "cuda":
                torch.cuda.synchronize()
            n, t0 = 0, time.perf_counter()
        images = images.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        targets = {k: v.to(device, non_blocking=True) for k, v in targets.items()}
        with torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext():
            logits = model(images)
        loss, _ = multitask_loss({k: v.float() for k, v in logits.items()}, targets, acts, LossConfig())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        n += images.shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize()
    return n / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench train")
    parser.add_argument("--posts", type=int, default=1000)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--workers", type=int, default=default_workers(), help="loader processes (train's default)")
    parser.add_argument("--gpu", action="store_true", help="CUDA, bf16, channels-last; adds the 448 px base preset")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if args.gpu else "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        ds = open_dataset(prepare(Path(tmp), args.posts, args.size))
        sizes = {h: len(ix) for h, ix in ds.vocab.heads.items()}
        cfg = LoaderConfig(batch_size=args.batch_size, workers=args.workers)

        def real():
            loader = make_loader(ds, "train", cfg, train=True)
            for i, batch in enumerate(loader):
                if i >= args.batches:
                    return
                yield batch

        held = list(real())
        results = []
        for arch in ["i2v_small", "i2v_vgg16", *(["i2v_convnext_base"] if args.gpu else [])]:
            heads = model_heads(TrainConfig(data=str(ds.root), out=str(Path(tmp) / "run"), arch=arch), sizes)
            size = 448 if arch == "i2v_convnext_base" else 256 if arch == "i2v_vgg16" else args.size
            model = create_tagger(arch, heads=heads, image_size=size).to(device)
            cl = args.gpu
            if cl:
                model = model.to(memory_format=torch.channels_last)
            if size != args.size:  # the in-memory batches, scaled to the preset's size
                full = [(x, t) for x, t in held if len(x) == args.batch_size]  # full batches: one shape throughout
                batches = [(torch.nn.functional.interpolate(x.float(), size=size).to(torch.uint8), t) for x, t in full]
                results.append((arch, size, None, steps_per_second(model, batches, device, args.gpu, cl)))
                continue
            mem = steps_per_second(model, held, device, args.gpu, cl)
            model = create_tagger(arch, heads=heads, image_size=size).to(device)
            results.append((arch, size, steps_per_second(model, real(), device, args.gpu, cl), mem))
    print(f"train on {device.type}{' (bf16, channels-last)' if args.gpu else ''}, batch {args.batch_size}:")
    for arch, size, loader_rate, mem_rate in results:
        if loader_rate is None:
            print(f"  {arch} at {size} px: {mem_rate:.1f} images/s (batches in memory)")
        else:
            print(
                f"  {arch} at {size} px: real loader {loader_rate:.1f} images/s vs in memory {mem_rate:.1f} "
                f"images/s: ratio {loader_rate / mem_rate:.2f}"
            )


if __name__ == "__main__":
    main()
