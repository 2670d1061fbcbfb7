"""Dynamic batching: requests that arrive together share one forward pass.

Each request submits one prepared image and awaits its row of the result. A single loop takes whatever is
waiting (up to `max_batch`), waiting at most `max_wait_ms` after the oldest request for others to join, and runs
the forward pass in a worker thread so the event loop keeps accepting uploads meanwhile. While one pass runs,
new requests queue up and form the next batch: the busier the server, the larger its batches.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger(__name__)

Forward = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray | None]]


@dataclass
class BatchStats:
    """What the batcher has done: how many passes, how many images, the largest batch, sizes seen."""

    batches: int = 0
    images: int = 0
    max_batch: int = 0
    sizes: dict[int, int] = field(default_factory=dict)  # batch size -> passes of that size

    def add(self, n: int) -> None:
        self.batches += 1
        self.images += n
        self.max_batch = max(self.max_batch, n)
        self.sizes[n] = self.sizes.get(n, 0) + 1

    def to_json(self) -> dict:
        mean = self.images / self.batches if self.batches else 0.0
        return {"batches": self.batches, "images": self.images, "largest_batch": self.max_batch, "mean_batch": mean}


@dataclass
class _Item:
    x: np.ndarray
    future: asyncio.Future
    arrived: float


class Batcher:
    """Groups single-image requests into batches for `forward` ([N, ...] -> (probs [N, T], features [N, D] | None)).

    Use from one event loop: `await batcher.submit(x)` returns `(probs_row, features_row | None)`. The loop starts on
    the first submit (or `start()`), and `stop()` ends it. Forward passes run one at a time in one worker thread:
    the model is one, and on a CPU its own threads already use every core.
    """

    def __init__(self, forward: Forward, max_batch: int = 32, max_wait_ms: float = 5.0):
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.forward = forward
        self.max_batch = max_batch
        self.max_wait = max(0.0, max_wait_ms) / 1000
        self.stats = BatchStats()
        self._pending: list[_Item] = []
        self._arrived: asyncio.Event | None = None
        self._full: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="i2v-forward")

    def start(self) -> None:
        if self._task is None or self._task.done():
            self._arrived, self._full = asyncio.Event(), asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._run(), name="i2v-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for item in self._pending:
            if not item.future.done():
                item.future.set_exception(RuntimeError("the server is shutting down"))
        self._pending.clear()
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def submit(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """One prepared image -> its probabilities and feature vector, computed in a batch with its neighbours."""
        self.start()
        loop = asyncio.get_running_loop()
        item = _Item(x, loop.create_future(), loop.time())
        self._pending.append(item)
        self._arrived.set()
        if len(self._pending) >= self.max_batch:
            self._full.set()
        return await item.future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._arrived.wait()
            # Wait for company, counted from the oldest request: those that queued during the last pass go at once.
            while len(self._pending) < self.max_batch:
                left = self._pending[0].arrived + self.max_wait - loop.time()
                if left <= 0:
                    break
                self._full.clear()
                try:
                    # An Event, not Queue.get, under the timeout: a timed-out wait loses nothing.
                    await asyncio.wait_for(self._full.wait(), left)
                except TimeoutError:
                    break
            items = self._pending[: self.max_batch]
            del self._pending[: self.max_batch]
            if not self._pending:
                self._arrived.clear()
                self._full.clear()
            items = [it for it in items if not it.future.done()]  # a client that went away needs no answer
            if items:
                await self._pass(loop, items)

    async def _pass(self, loop: asyncio.AbstractEventLoop, items: list[_Item]) -> None:
        batch = np.stack([it.x for it in items])
        t0 = time.perf_counter()
        try:
            probs, feats = await loop.run_in_executor(self._executor, self.forward, batch)
        except Exception as e:  # the pass failed: every request in it gets the error, the loop goes on
            log.exception("forward pass of %d images failed", len(items))
            for it in items:
                if not it.future.done():
                    it.future.set_exception(e)
            return
        self.stats.add(len(items))
        log.debug("batch of %d in %.1f ms", len(items), 1000 * (time.perf_counter() - t0))
        for i, it in enumerate(items):
            if not it.future.done():
                it.future.set_result((probs[i], None if feats is None else feats[i]))
