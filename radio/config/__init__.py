"""Configuration: YAML -> frozen dataclasses, with every check in one pass.

Every problem is reported as ``path:line: key: message`` and ALL problems of a run are collected before a
:class:`~radio.errors.ConfigError` is raised, so an operator fixes a file in one go. This layer imports nothing
above it: ``values`` (the dataclasses and shared value types), ``rules`` (the checks every user-typed value
obeys, also used by the control API), ``yamlfile`` (YAML nodes with lines), ``stations`` and ``daemon`` (the two
kinds of file).
"""

from .daemon import DAEMON_KEYS, load_daemon_config, looks_like_daemon_config
from .rules import duration_value, parse_duration, parse_size, text_problem
from .stations import load_station, load_stations, station_files
from .values import (API_TOKEN_ENV, BITRATES, DECODERS, DEFAULT_MODEL, DTYPES, FORMATS, GENERATE, WEIGHTS,
                     CODEC, COMPILE, KERNELS, KV_FORMATS, MAX_BLEND_S, MAX_DURATION_S,
                     MAX_PROMPT_CHARS, MAX_STATIONS, MAX_TITLE_CHARS, PASSWORD_ENV, ApiConfig, DaemonConfig,
                     EngineConfig, IcecastConfig, PlaylistItem, RequestsConfig, Sampling, StationConfig,
                     MAX_REQUEST_CHARS, MAX_REQUEST_NAME_CHARS)

__all__ = [
    "API_TOKEN_ENV", "BITRATES", "DAEMON_KEYS", "DECODERS", "DEFAULT_MODEL", "DTYPES", "FORMATS", "GENERATE", "WEIGHTS",
    "CODEC", "COMPILE", "KERNELS", "KV_FORMATS", "MAX_BLEND_S",
    "MAX_DURATION_S", "MAX_PROMPT_CHARS", "MAX_STATIONS", "MAX_TITLE_CHARS", "PASSWORD_ENV", "ApiConfig",
    "DaemonConfig", "EngineConfig", "IcecastConfig", "MAX_REQUEST_CHARS",
    "MAX_REQUEST_NAME_CHARS", "PlaylistItem", "RequestsConfig", "Sampling", "StationConfig", "duration_value",
    "load_daemon_config", "load_station", "load_stations", "looks_like_daemon_config", "parse_duration",
    "parse_size", "station_files", "text_problem",
]
