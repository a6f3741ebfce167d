"""A station's playlist cursor: cycle or shuffle, a one-off override from the control API."""

from __future__ import annotations

import random

from ..config import PlaylistItem


class Playlist:
    """Cycles or shuffles items; shuffle never plays the same item twice in a row."""

    def __init__(self, items: tuple[PlaylistItem, ...], order: str, rng: random.Random) -> None:
        self.items = items
        self.order = order
        self.rng = rng
        self.index = 0 if order == "cycle" else rng.randrange(len(items))
        self.upcoming = self._pick_next()

    def _pick_next(self) -> int:
        n = len(self.items)
        if n == 1:
            return 0
        if self.order == "cycle":
            return (self.index + 1) % n
        choice = self.rng.randrange(n - 1)
        return choice if choice < self.index else choice + 1

    override: PlaylistItem | None = None  # a one-off item set through the control API

    @property
    def current(self) -> PlaylistItem:
        return self.override or self.items[self.index]

    @property
    def next(self) -> PlaylistItem:
        return self.items[self.upcoming]

    def advance(self) -> PlaylistItem:
        self.override = None  # a one-off item ends like any other: the upcoming item follows
        self.index = self.upcoming
        self.upcoming = self._pick_next()
        return self.current
