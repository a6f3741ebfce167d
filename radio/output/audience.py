"""The audience: listeners per mount, read from Icecast itself, so the engine generates only what is heard.

A thread polls Icecast's statistics every ``interval`` seconds (0.5 s: a change is known within a second):
``/admin/stats`` (XML, with the admin password; every mount, relays counted as listeners) when an admin
password is configured, else the public ``/status-json.xsl``. Polling fails open: when the counts cannot be
read (Icecast away, a wrong admin password, garbage) for ``grace`` seconds, the engine is told "unknown" and
generates every station; that is said once, retried quietly, and the recovery is said once too. Nothing outside
this process can change what the daemon believes about its audience.
"""

from __future__ import annotations

import base64
import json
import logging
import threading
import time
import urllib.error
import urllib.request
import xml.etree.ElementTree as ET
from typing import Callable

from ..config import IcecastConfig
from ..errors import IcecastError
from .local import mounts

logger = logging.getLogger(__name__)

MAX_STATS_BYTES = 16 * 1024 * 1024  # the stats of a few thousand mounts; anything larger is refused as garbage


def parse_admin_stats(body: bytes) -> dict[str, int]:
    """Listeners per mount from Icecast's ``/admin/stats`` XML."""
    try:
        root = ET.fromstring(body)
    except ET.ParseError as exc:
        raise IcecastError(f"/admin/stats is not XML: {exc}") from None
    if root.tag != "icestats":
        raise IcecastError(f"/admin/stats answered <{root.tag}>, not <icestats>")
    counts = {}
    for source in root.findall("source"):
        mount = source.get("mount") or ""
        text = (source.findtext("listeners") or "0").strip()
        if not mount.startswith("/") or not text.isdigit():
            raise IcecastError(f"/admin/stats: unreadable source entry {mount[:80]!r}")
        counts[mount] = int(text)
    return counts


def parse_status_json(body: bytes) -> dict[str, int]:
    """Listeners per mount from Icecast's ``/status-json.xsl``."""
    try:
        doc = json.loads(body.decode("utf-8", "replace"))
        if not isinstance(doc, dict) or not isinstance(doc.get("icestats"), dict):
            raise ValueError("no icestats object")
        return {m: int(src.get("listeners", 0) or 0) for m, src in mounts(doc).items()}
    except (ValueError, TypeError, AttributeError, RecursionError) as exc:
        raise IcecastError(f"/status-json.xsl is not Icecast's status: {exc}") from None


class Audience:
    """Polls one Icecast for listener counts and hands them to ``on_counts`` (None while unreadable)."""

    def __init__(self, server: IcecastConfig, on_counts: Callable[[dict[str, int] | None], None],
                 interval: float = 0.5, admin_user: str = "admin", grace: float = 2.0) -> None:
        self.server = server
        self.on_counts = on_counts
        self.interval = interval
        # A reading that fails less than this long after a good one keeps the good one: one slow answer from a
        # busy Icecast must not wake every idle station at once.
        self.grace = grace
        self._good_at = float("-inf")
        self.admin_user = admin_user
        self.counts: dict[str, int] | None = None
        self.reads = 0
        self.failures = 0
        self.last_error: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def source(self) -> str:
        """Where the counts come from (for logs and status)."""
        path = "/admin/stats" if self.server.admin_password else "/status-json.xsl"
        return f"http://{self.server.host}:{self.server.port}{path}"

    def read(self) -> dict[str, int]:
        """One reading: listeners per mount. Raises IcecastError when it cannot be had."""
        headers = {}
        if self.server.admin_password:
            token = base64.b64encode(f"{self.admin_user}:{self.server.admin_password}".encode()).decode()
            headers["Authorization"] = f"Basic {token}"
        try:
            with urllib.request.urlopen(urllib.request.Request(self.source, headers=headers), timeout=2) as resp:
                body = resp.read(MAX_STATS_BYTES + 1)
        except urllib.error.HTTPError as exc:
            hint = " (wrong icecast.admin_password?)" if exc.code in (401, 403) else ""
            raise IcecastError(f"{self.source} answered {exc.code}{hint}") from None
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise IcecastError(f"cannot reach {self.source}: {getattr(exc, 'reason', exc)}") from None
        if len(body) > MAX_STATS_BYTES:
            raise IcecastError(f"{self.source} sent more than {MAX_STATS_BYTES} bytes")
        return parse_admin_stats(body) if self.server.admin_password else parse_status_json(body)

    def poll(self) -> None:
        """Read once and tell ``on_counts``; a failure is said once (until a reading works again)."""
        try:
            counts: dict[str, int] | None = self.read()
        except IcecastError as exc:
            self.failures += 1
            if self.counts is not None and time.monotonic() - self._good_at < self.grace:
                return  # the last good reading stands for a moment
            counts = None
            if self.last_error is None:
                logger.warning("listener counts unavailable: %s; generating every station until they can be read "
                               "(retrying every %.1f s)", exc, self.interval)
            self.last_error = str(exc)
        else:
            self.reads += 1
            self._good_at = time.monotonic()
            if self.last_error is not None:
                logger.info("listener counts readable again from %s", self.source)
            self.last_error = None
        self.counts = counts
        self.on_counts(counts)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="audience", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(3.0)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.poll()
            except Exception as exc:  # noqa: BLE001 - the audience must never end; fail open meanwhile
                logger.debug("audience poll failed: %s", exc, exc_info=True)
                self.on_counts(None)
            self._stop.wait(self.interval)
