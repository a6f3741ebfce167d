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
