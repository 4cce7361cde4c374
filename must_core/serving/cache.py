"""LRU cache of loaded classifiers bounded by a memory budget, with single-flight loading.

Concurrent first requests for the same key load it once: the first caller loads, the others wait on
the same future. Entries larger than the whole budget are still served (and evicted next).
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Generic, TypeVar

_logger = logging.getLogger(__name__)
V = TypeVar("V")


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    loads: int = 0
    load_failures: int = 0


class ModelCache(Generic[V]):
    """``get(key, loader)``: loader() -> (value, size_bytes), called at most once per miss."""

    def __init__(
        self, budget_bytes: int, on_evict: Callable[[Hashable, V], None] | None = None
    ) -> None:
        self.budget_bytes = budget_bytes
        self._entries: OrderedDict[Hashable, tuple[V, int]] = OrderedDict()
        self._loading: dict[Hashable, Future[V]] = {}
        self._lock = threading.Lock()
        self._on_evict = on_evict
        self.stats = CacheStats()

    @property
    def used_bytes(self) -> int:
        with self._lock:
            return sum(size for _, size in self._entries.values())

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._entries

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def get(self, key: Hashable, loader: Callable[[], tuple[V, int]]) -> V:
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                self.stats.hits += 1
                return self._entries[key][0]
            fut = self._loading.get(key)
            owner = fut is None
            if fut is None:
                fut = Future()
                self._loading[key] = fut
                self.stats.misses += 1
            else:
                self.stats.hits += 1  # served by the in-flight load
        if not owner:
            return fut.result()
        try:
            value, size = loader()
        except BaseException as exc:
            with self._lock:
                self._loading.pop(key, None)
                self.stats.load_failures += 1
            fut.set_exception(exc)
            raise
        evicted: list[tuple[Hashable, V]] = []
        with self._lock:
            self._loading.pop(key, None)
            self._entries[key] = (value, size)
            self.stats.loads += 1
            used = sum(s for _, s in self._entries.values())
            while used > self.budget_bytes and len(self._entries) > 1:
                old_key, (old_val, old_size) = self._entries.popitem(last=False)
                used -= old_size
                self.stats.evictions += 1
                evicted.append((old_key, old_val))
        fut.set_result(value)
        for k, v in evicted:
            self._notify(k, v)
        return value

    def evict(self, key: Hashable) -> bool:
        with self._lock:
            entry = self._entries.pop(key, None)
            if entry is not None:
                self.stats.evictions += 1
        if entry is None:
            return False
        self._notify(key, entry[0])
        return True

    def clear(self) -> None:
        with self._lock:
            items = list(self._entries.items())
            self._entries.clear()
        for k, (v, _) in items:
            self._notify(k, v)

    def _notify(self, key: Hashable, value: V) -> None:
        _logger.info("model cache evicted %s", key)
        if self._on_evict is not None:
            self._on_evict(key, value)
