"""Dynamic micro-batching: concurrent requests for one model share a forward pass.

Callers (request threads) ``submit`` a preprocessed batch [n, 3, H, W] and block on the returned
future. One worker thread per model takes the first waiting request plus everything queued behind it
(up to ``max_batch`` images); while traffic is concurrent it also waits up to ``max_wait_ms`` for more.
It runs one forward pass and hands each caller its rows. With batching disabled, callers run their own forward one at a time (a lock), which is the
baseline the benchmark compares against; running them concurrently would oversubscribe the cores.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

_logger = logging.getLogger(__name__)
ForwardFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class _Request:
    images: torch.Tensor
    future: Future[torch.Tensor] = field(default_factory=Future)


class MicroBatcher:
    def __init__(
        self,
        forward: ForwardFn,
        *,
        max_batch: int = 32,
        max_wait_ms: float = 5.0,
        enabled: bool = True,
        on_batch: Callable[[int], None] | None = None,
        name: str = "model",
    ) -> None:
        self.forward = forward
        self.max_batch = max(1, max_batch)
        self.max_wait = max(0.0, max_wait_ms) / 1000.0
        self.enabled = enabled
        self.on_batch = on_batch
        self._queue: queue.Queue[_Request | None] = queue.Queue()
        self._lock = threading.Lock()
        self._closed = False
        self._thread: threading.Thread | None = None
        if enabled:
            self._thread = threading.Thread(target=self._run, name=f"batcher-{name}", daemon=True)
            self._thread.start()

    def submit(self, images: torch.Tensor) -> Future[torch.Tensor]:
        if self._closed:
            raise RuntimeError("batcher is closed")
        req = _Request(images)
        if not self.enabled:
            try:
                with self._lock:
                    req.future.set_result(self._forward_chunks(images))
            except Exception as exc:
                req.future.set_exception(exc)
            return req.future
        self._queue.put(req)
        return req.future

    def __call__(self, images: torch.Tensor, timeout: float | None = None) -> torch.Tensor:
        return self.submit(images).result(timeout=timeout)

    def close(self) -> None:
        self._closed = True
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=5)

    def _forward_chunks(self, images: torch.Tensor) -> torch.Tensor:
        outs = []
        for i in range(0, images.shape[0], self.max_batch):
            chunk = images[i : i + self.max_batch]
            if self.on_batch is not None:
                self.on_batch(int(chunk.shape[0]))
            outs.append(self.forward(chunk))
        return torch.cat(outs) if len(outs) > 1 else outs[0]

    def _run(self) -> None:
        # Greedy batching: take everything already queued; wait up to max_wait for more only while
        # the recent traffic was concurrent (the last batch merged several requests). A lone
        # client therefore never pays the wait, and a busy model still fills its batches.
        concurrent = False
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            count = first.images.shape[0]
            deadline = time.monotonic() + (self.max_wait if concurrent else 0.0)
            stop = False
            while count < self.max_batch:
                try:
                    remaining = deadline - time.monotonic()
                    nxt = (
                        self._queue.get(timeout=remaining)
                        if remaining > 0
                        else self._queue.get_nowait()
                    )
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                batch.append(nxt)
                count += nxt.images.shape[0]
            concurrent = len(batch) > 1
            self._process(batch)
            if stop:
                return

    def _process(self, batch: list[_Request]) -> None:
        try:
            logits = self._forward_chunks(torch.cat([r.images for r in batch]))
        except Exception as exc:  # every waiting caller gets the error, the thread lives on
            _logger.exception("batched forward failed")
            for r in batch:
                r.future.set_exception(exc)
            return
        start = 0
        for r in batch:
            n = r.images.shape[0]
            r.future.set_result(logits[start : start + n])
            start += n
