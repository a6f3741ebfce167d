"""Logging for repeated conditions: said once, then at most once per interval with a count.

A slow machine, a station that keeps failing or a flood of bad requests would otherwise write the same line
many times a second, hiding everything else in the log.
"""

from __future__ import annotations

import logging
import threading
import time


class Throttle:
    """Logs a condition (by key) the first time, then at most once per ``interval`` seconds, saying how many
    times it happened since it was last logged. Thread-safe; the number of keys is bounded."""

    MAX_KEYS = 1024

    def __init__(self, logger: logging.Logger, interval: float = 60.0) -> None:
        self.logger = logger
        self.interval = interval
        self._last: dict[str, tuple[float, int]] = {}  # key -> (when last logged, times suppressed since)
        self._lock = threading.Lock()

    def log(self, level: int, key: str, message: str, *args: object) -> bool:
        """Log ``message % args`` unless ``key`` was logged less than ``interval`` ago; returns whether it did."""
        now = time.monotonic()
        with self._lock:
            last, suppressed = self._last.get(key, (None, 0))
            if last is not None and now - last < self.interval:
                self._last[key] = (last, suppressed + 1)
                return False
            self._last[key] = (now, 0)
            if len(self._last) > self.MAX_KEYS:
                self._last.pop(next(iter(self._last)))
        if suppressed:
            message += " (%d more times in the last %.0f s)"
            args = (*args, suppressed, now - (last or now))
        self.logger.log(level, message, *args)
        return True

    def clear(self, key: str) -> None:
        """The condition is over: the next occurrence is logged at once."""
        with self._lock:
            self._last.pop(key, None)
