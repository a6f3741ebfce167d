"""The project's own exceptions: each carries a message a user can act on."""

from __future__ import annotations


class RadioError(Exception):
    """Base class for errors shown to users."""


class ConfigError(RadioError):
    """Invalid configuration. ``problems`` holds every ``path:line: key: message`` found."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class ModelError(RadioError):
    """A model could not be loaded or used."""


class IcecastError(RadioError):
    """The embedded or remote Icecast server could not be used."""


class EncoderError(RadioError):
    """The ffmpeg encoder could not be started."""


class ConditioningError(ModelError):
    """One request's text conditioning could not be computed (e.g. its prompt is refused by the tokenizer).
    Raised by ``MusicModel.continue_batch`` before anything is generated; ``key`` names the request's station,
    so the engine can set that station aside and continue the others."""

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        super().__init__(message)


class SlotsFull(ModelError):
    """More stations than the model's decode slots fit in memory: ``keys`` could not be given a slot this step
    (they wait, on filler, until one is free)."""

    def __init__(self, keys: list[str], capacity: int) -> None:
        self.keys = keys
        super().__init__(f"no decode slot free for {len(keys)} station(s): {capacity} slots fit in memory")


class RequestRefused(RadioError):
    """A listener's request a station does not take: ``reason`` (invalid, blocked, cooldown, queue_full), a
    message for the listener and, for the cooldown or a full queue, about how many seconds until asking again
    makes sense."""

    def __init__(self, reason: str, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.retry_after = retry_after
