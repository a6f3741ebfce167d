"""Listener requests of one station: the queue, each listener's cooldown, the blocklist, and the counters.

The control API's threads submit (answered at once: a place in the queue, or a refusal saying why); the engine
thread takes the next request at an item boundary (:meth:`Station.next_item`). One lock guards it all; every
structure has a bound, whatever arrives: the queue its ``queue`` setting, the cooldown table
:data:`MAX_CLIENTS` listeners (the oldest go first).
"""

from __future__ import annotations

import ipaddress
import logging
import re
import secrets
import threading
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import Callable

from ..config import MAX_REQUEST_CHARS, MAX_REQUEST_NAME_CHARS, MAX_TITLE_CHARS, RequestsConfig, text_problem
from ..config.requests import normalize
from ..errors import RequestRefused
from ..status import Record, exported

logger = logging.getLogger(__name__)

MAX_CLIENTS = 10_000  # listeners remembered for their cooldown
REASONS = ("invalid", "blocked", "cooldown", "queue_full")


@dataclass(frozen=True)
class Request:
    id: str
    prompt: str
    name: str | None
    client: str = ""  # who asked (for the cooldown); never shown to others

    @property
    def title(self) -> str:
        """The title listeners see while it plays (the title rules: one line, at most MAX_TITLE_CHARS)."""
        head = f"Requested by {self.name}: " if self.name else "Requested: "
        text = head + self.prompt
        return text if len(text) <= MAX_TITLE_CHARS else text[:MAX_TITLE_CHARS - 1] + "\u2026"

    def public(self) -> dict[str, object]:
        return {"id": self.id, "prompt": self.prompt, "name": self.name}


def listener_id(address: str) -> str:
    """Who a request counts against: the address, or for IPv6 its /64 (a household's one network: the
    addresses within it are free to change)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


class RequestQueue:
    def __init__(self, config: RequestsConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self._lock = threading.Lock()
        self._clock = clock
        self._queue: list[Request] = []
        self._last: OrderedDict[str, float] = OrderedDict()  # listener -> when they last asked
        self.played = 0
        self.refused: Counter[str] = Counter()
        self.config = config
        self._blocked = self._compile(config)

    @staticmethod
    def _compile(config: RequestsConfig) -> re.Pattern[str] | None:
        return re.compile("|".join(f"(?:{p})" for p in config.blocklist), re.IGNORECASE) if config.blocklist else None

    def configure(self, config: RequestsConfig) -> None:
        """A validated edit. Requests waiting stay (a smaller queue takes no new ones until it drains); turning
        requests off drops them."""
        with self._lock:
            self.config = config
            self._blocked = self._compile(config)
            if not config.enabled and self._queue:
                logger.info("requests turned off: %d waiting dropped", len(self._queue))
                self._queue.clear()

    @property
    def enabled(self) -> bool:
        return self.config.enabled

    def __len__(self) -> int:
        return len(self._queue)

    def _refuse(self, reason: str, message: str, retry_after: float | None = None) -> RequestRefused:
        self.refused[reason] += 1
        return RequestRefused(reason, message, retry_after)

    def submit(self, prompt: object, name: object, client: str) -> tuple[Request, int]:
        """Queue a listener's request; returns it and its place (1: plays next). Raises
        :class:`~radio.errors.RequestRefused`."""
        with self._lock:
            if not isinstance(prompt, str):
                raise self._refuse("invalid", "prompt: required: text describing the music you want to hear")
            problem = text_problem(prompt, MAX_REQUEST_CHARS)
            if problem:
                raise self._refuse("invalid", f"prompt: {problem}")
            if name is not None:
                if not isinstance(name, str):
                    raise self._refuse("invalid", f"name: must be text of at most {MAX_REQUEST_NAME_CHARS} characters")
                problem = text_problem(name, MAX_REQUEST_NAME_CHARS, allow_empty=True)
                if problem:
                    raise self._refuse("invalid", f"name: {problem}")
                name = name.strip() or None
            prompt = prompt.strip()
            if self._blocked is not None:
                for field, text in (("prompt", prompt), ("name", name)):
                    if text and self._blocked.search(normalize(text)):
                        raise self._refuse("blocked", f"{field}: this station does not take that; try other words")
            who = listener_id(client)
            now = self._clock()
            cfg = self.config
            last = self._last.get(who)
            if last is not None and now - last < cfg.every:
                wait = cfg.every - (now - last)
                raise self._refuse("cooldown", f"one request every {_human(cfg.every)} per listener; try again in "
                                               f"{_human(wait)}", wait)
            if len(self._queue) >= cfg.queue:
                wait = cfg.duration / cfg.share
                raise self._refuse("queue_full", f"the queue is full ({cfg.queue} waiting); try again in "
                                                 f"{_human(wait)}", wait)
            request = Request(secrets.token_urlsafe(6), prompt, name, who)
            self._queue.append(request)
            self._last[who] = now
            self._last.move_to_end(who)
            self._forget_old(now)
            return request, len(self._queue)

    def _forget_old(self, now: float) -> None:
        while self._last:
            who, when = next(iter(self._last.items()))
            if now - when < self.config.every and len(self._last) <= MAX_CLIENTS:
                break
            del self._last[who]

    def take(self) -> Request | None:
        """The next request to play (the engine thread, at an item boundary), or None."""
        with self._lock:
            if not self._queue or not self.config.enabled:
                return None
            self.played += 1
            return self._queue.pop(0)

    def remove(self, request_id: str) -> Request | None:
        with self._lock:
            for i, r in enumerate(self._queue):
                if r.id == request_id:
                    return self._queue.pop(i)
        return None

    def waiting(self) -> list[Request]:
        with self._lock:
            return list(self._queue)

    def status(self) -> dict[str, object]:
        """The queue's :class:`RequestsStatus`, as JSON."""
        with self._lock:
            return RequestsStatus(enabled=self.config.enabled, queued=len(self._queue), played=self.played,
                                  refused={r: self.refused[r] for r in REASONS}).to_dict()


@dataclass
class RequestsStatus(Record):
    """A station's listener requests in ``/status`` (its ``requests``); exported while requests are enabled."""

    enabled: bool
    queued: int = exported("radio_station_requests_queued", "Listener requests waiting")
    played: int = exported("radio_station_requests_played", "Listener requests played", counter=True)
    refused: dict[str, int] = exported("radio_station_requests_refused", "Listener requests refused, by reason "
                                       "(invalid, blocked, cooldown, queue_full)", counter=True, label="reason")


def _human(seconds: float) -> str:
    s = max(1, int(seconds + 0.999))
    if s < 120:
        return f"{s} s"
    if s < 7200:
        return f"{(s + 59) // 60} min"
    return f"{s / 3600:.1f} h"
