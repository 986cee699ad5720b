"""Micro-batching: concurrent /predict requests of one worker share onnxruntime calls.

A request's image joins a queue; one drain loop runs whatever has queued, up to
``max_batch_size`` images, in a single ``session.run`` off the event loop, while the next
requests queue behind it. An idle server adds no delay (a lone request runs at once, a batch of
one); under load the batches grow by themselves, as in TorchServe's batching with no wait.
An image that waited longer than ``max_latency_ms`` is refused (503) rather than run late.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import numpy as np
import prometheus_client

from serving.errors import Overloaded

# Served on /metrics with BentoML's own (bentoml.metrics is deprecated for prometheus_client).
BATCH_SIZE = prometheus_client.Histogram(
    "classifier_batch_size", "Images per onnxruntime call of /predict (micro-batching)",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128),
)


class Batcher:
    """``await batcher(chw)`` → that image's row of ``run(np.stack(images))``.

    Args:
        run: the model call on a batch (N×C×H×W → N×classes); runs in a thread.
        max_batch_size: images per call.
        max_latency_ms: the longest an image may wait in the queue before it is refused.
    """

    def __init__(self, run: Callable[[np.ndarray], np.ndarray], max_batch_size: int, max_latency_ms: int) -> None:
        self.run, self.max_batch_size, self.max_wait_s = run, max_batch_size, max_latency_ms / 1000
        self.queue: list[tuple[np.ndarray, asyncio.Future, float]] = []
        self.draining: asyncio.Task | None = None
        self.sizes: list[int] = []  # every batch size run, newest last (bounded), for tests and logs

    async def __call__(self, image: np.ndarray) -> np.ndarray:
        answer = asyncio.get_running_loop().create_future()
        self.queue.append((image, answer, time.monotonic()))
        if self.draining is None or self.draining.done():
            self.draining = asyncio.create_task(self._drain())
        return await answer

    async def _drain(self) -> None:
        while self.queue:
            taken, self.queue = self.queue[: self.max_batch_size], self.queue[self.max_batch_size:]
            now = time.monotonic()
            batch, late = [], []
            for item in taken:
                (late if now - item[2] > self.max_wait_s else batch).append(item)
            for _, answer, _ in late:
                if not answer.done():
                    answer.set_exception(Overloaded(f"overloaded: queued longer than {self.max_wait_s * 1000:.0f} ms "
                                                    "(SERVING_MAX_LATENCY_MS); retry after 1 s"))
            batch = [item for item in batch if not item[1].done()]  # a cancelled request needs no answer
            if not batch:
                continue
            self.sizes = [*self.sizes[-999:], len(batch)]
            BATCH_SIZE.observe(len(batch))
            try:
                rows = await asyncio.to_thread(self.run, np.stack([image for image, _, _ in batch]))
            except Exception as err:  # noqa: BLE001 - every waiter of the failed call gets the error
                for _, answer, _ in batch:
                    if not answer.done():
                        answer.set_exception(err)
                continue
            for (_, answer, _), row in zip(batch, rows, strict=True):
                if not answer.done():
                    answer.set_result(row)
