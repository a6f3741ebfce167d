"""The stations directory as the daemon last read it: which station files, their modification times and sizes,
and whether the directory has changed since (a file edited, added or removed)."""

from __future__ import annotations

from ..config import station_files


class StationFiles:
    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.seen: dict[str, tuple[int, int]] = {}  # path -> (mtime_ns, size) when last marked

    def snapshot(self) -> dict[str, tuple[int, int]]:
        """The directory now; empty when it cannot be read (the running stations keep playing)."""
        try:
            return {str(p): (p.stat().st_mtime_ns, p.stat().st_size) for p in station_files(self.directory)}
        except OSError:
            return {}

    def mark(self) -> None:
        """Remember the directory as it is now (the daemon is about to read it)."""
        self.seen = self.snapshot()

    def changed(self) -> bool:
        return self.snapshot() != self.seen

    def __contains__(self, path: object) -> bool:
        return path in self.seen
