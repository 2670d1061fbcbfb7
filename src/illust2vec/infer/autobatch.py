"""`--batch-size auto` (`i2v tag`, `i2v embed`) and `--max-batch auto` (`i2v serve`): the batch size, chosen by
timing the model where it runs.

On a GPU it is GPU_BATCH. On a CPU the best batch size depends on the model, its input size, the backend and how
many cores are free: ConvNeXt-base at 448 px ran 2.74 images/s at batch 1 and 2.10 at 8 (onnxruntime, 2 cores,
issue 18), while a small model at 96 px gains from batching. So `AutoBatch` tries the sizes CANDIDATES in turn,
smallest first, each on TRIALS batches, and keeps the one that took the least time per image (a larger size must
be at least MARGIN faster than a smaller one to be preferred: it costs memory and latency). It stops climbing at
the first size slower than the best so far.

In `i2v tag` and `i2v embed` the timed batches are the job's first batches: real work whose results are kept, so
no image is run twice and none is lost; the trial costs only the time lost to the sizes that lost (well under a
second at 448 px). What is timed is the call that runs the model on a batch and writes its results, with the
decoding threads running beside it as they do for the rest of the job. `i2v serve` times the same sizes on blank
images at start-up (`measure`), since requests come one at a time. The choice is not cached between runs: it
depends on the machine's load as much as on the model, and measuring costs almost nothing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .backends import OnnxBackend, TorchBackend

log = logging.getLogger(__name__)

AUTO = "auto"
GPU_BATCH = 32  # --batch-size auto on a GPU
CANDIDATES = (1, 2, 4, 8, 16, 32)  # the sizes tried on a CPU, in this order
TRIALS = 2  # batches timed at each size; the fastest counts (the first at a new size pays for its allocations)
MARGIN = 0.05  # a larger batch is kept only if at least this much faster per image than the best smaller one


def _now() -> float:
    return time.perf_counter()


@dataclass
class AutoBatch:
    """Chooses a batch size by timing batches of the sizes `candidates`, in turn.

    Ask `size()` for the size of the next batch, run it, and `record` its size and seconds; once `chosen` is set,
    `size()` returns it for good. `clock` is injectable (tests); the caller times with it.
    """

    candidates: tuple[int, ...] = CANDIDATES
    trials: int = TRIALS
    margin: float = MARGIN
    clock: Callable[[], float] = _now
    timings: dict[int, list[float]] = field(default_factory=dict)  # size -> seconds per image of each timed batch
    chosen: int | None = None

    def size(self) -> int:
        """The size of the next batch: the one being timed, or the one chosen."""
        if self.chosen is not None:
            return self.chosen
        return self.candidates[len(self.timings) - 1] if self.timings else self.candidates[0]

    def record(self, n: int, seconds: float) -> None:
        """A batch of `n` images took `seconds` (a batch of another size than asked, the job's last, is ignored)."""
        if self.chosen is not None or n != self.size():
            return
        self.timings.setdefault(n, []).append(seconds / n)
        if len(self.timings[n]) < self.trials:
            return
        best = self.best()
        last = n == self.candidates[-1]
        if best != n or last:  # slower than the best so far (climbing further would not help), or no size left
            self.chosen = best
            log.info("--batch-size auto: %d (%s)", best, self.describe())
        else:
            self.timings[self.candidates[len(self.timings)]] = []

    def best(self) -> int:
        """The fastest size per image timed so far, a larger one only when MARGIN faster than every smaller one."""
        cost = {n: min(t) for n, t in self.timings.items() if len(t) >= self.trials}
        best = min(cost)
        for n in sorted(cost):
            if cost[n] < cost[best] * (1 - self.margin):
                best = n
        return best

    def describe(self) -> str:
        """Each size timed and its best time per image: "1: 0.412 s, 2: 0.455 s per image"."""
        done = {n: min(t) for n, t in self.timings.items() if t}
        return ", ".join(f"{n}: {s:.3g} s" for n, s in done.items()) + " per image"


def on_gpu(backend: Any) -> bool:
    """Whether a backend runs on a GPU (one of another kind, such as a test's stand-in, counts as a CPU)."""
    if isinstance(backend, OnnxBackend):
        return backend.session.get_providers()[0] == "CUDAExecutionProvider"
    return isinstance(backend, TorchBackend) and str(backend.device).startswith("cuda")


def resolve_batch_size(requested: int | str, tagger: Any) -> int | AutoBatch:
    """--batch-size as the engine takes it: a number as it is; `auto` GPU_BATCH on a GPU, the batch size of an ONNX
    file that fixes one, and on a CPU an `AutoBatch` that times the job's first batches."""
    if requested != AUTO:
        return int(requested)
    if on_gpu(tagger.backend):
        return GPU_BATCH
    fixed = getattr(tagger.backend, "fixed_batch", None)
    return fixed if fixed else AutoBatch()


def measure(tagger: Any, requested: int | str = AUTO) -> int:
    """The batch size as a number (`i2v serve --max-batch`): `auto` on a CPU times `tagger.run` on blank images of
    each candidate size, as `AutoBatch` does with a job's first batches. A size at which the model fails (out of
    memory, say) ends the climb at the best size before it (1 if none ran: the failure then shows on requests)."""
    chooser = resolve_batch_size(requested, tagger)
    if not isinstance(chooser, AutoBatch):
        return chooser
    clock = chooser.clock
    blank = np.full((chooser.candidates[-1], tagger.image_size, tagger.image_size, 3), 255.0, np.float32)
    while chooser.chosen is None:
        n = chooser.size()
        t0 = clock()
        try:
            tagger.run(blank[:n])
        except Exception as e:  # noqa: BLE001 - out of memory at a large size, say: keep what ran
            timed = [m for m, t in chooser.timings.items() if len(t) >= chooser.trials]
            chosen = chooser.best() if timed else 1
            log.warning("--max-batch auto: the model failed at batch %d (%s); max batch %d", n, e, chosen)
            return chosen
        chooser.record(n, clock() - t0)
    return chooser.chosen
