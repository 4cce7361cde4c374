"""Failed-authentication limiter: per client address and per presented key, a sliding window of
failures; over the limit, calls are refused (429 + Retry-After) before the database is asked.

In-process state: each API process counts on its own, so N processes allow up to N times the limit.
The number of tracked clients is capped, oldest first, so a flood of addresses cannot grow memory.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict, deque

from must_core.errors import MustError

_MAX_TRACKED = 100_000


class RateLimitedError(MustError):
    """Too many failed authentications from this address or with this key (HTTP 429)."""

    code = "too_many_requests"

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class FailureLimiter:
    def __init__(self, limit: int, window_s: float) -> None:
        self.limit, self.window = limit, window_s
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()
        self._lock = threading.Lock()

    def check(self, *subjects: str) -> None:
        """Raise RateLimitedError if any subject had ``limit`` failures within the window."""
        now = time.monotonic()
        with self._lock:
            for subject in subjects:
                times = self._recent(subject, now)
                if len(times) >= self.limit:
                    wait = max(1, math.ceil(times[0] + self.window - now))
                    raise RateLimitedError(
                        f"too many failed authentications; retry in {wait} s", wait
                    )

    def failed(self, *subjects: str) -> None:
        now = time.monotonic()
        with self._lock:
            for subject in subjects:
                self._recent(subject, now).append(now)
                self._failures.move_to_end(subject)
            while len(self._failures) > _MAX_TRACKED:
                self._failures.popitem(last=False)

    def _recent(self, subject: str, now: float) -> deque[float]:
        times = self._failures.setdefault(subject, deque())
        while times and times[0] <= now - self.window:
            times.popleft()
        return times
