"""The daemon config file (or defaults), with secrets from the environment or files, never argv."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError
from .requests import requests_section
from .rules import _device_check, _in, _range, _size_check, _text_check
from .values import (API_TOKEN_ENV, DECODERS, DEFAULT_MODEL, DTYPES, GENERATE, WEIGHTS, PASSWORD_ENV, ApiConfig,
                     CODEC, COMPILE, KERNELS, KV_FORMATS, DaemonConfig,
                     EngineConfig, IcecastConfig, RequestsConfig)
from .yamlfile import _compose, _line, _Mapping, _Problems, _section

DAEMON_KEYS = ("stations", "model", "device", "dtype", "memory_budget", "seed", "icecast", "engine", "api", "log_level",
               "requests")
ICECAST_KEYS = ("host", "port", "user", "password", "password_file", "local", "admin_password", "public_url")
API_KEYS = ("enabled", "host", "port", "token_file")
ENGINE_KEYS = tuple(f for f in EngineConfig.__dataclass_fields__)


def _read_secret_file(m: _Mapping, key: str, base: Path) -> str:
    path_text = m.get(key, "str", None)
    if not path_text:
        return ""
    p = Path(path_text).expanduser()
    if not p.is_absolute():
        p = base / p
    try:
        return p.read_text(encoding="utf-8").strip()
    except OSError as exc:
        m.err(key, f"cannot read {p}: {exc.strerror}")
        return ""


def load_daemon_config(path: str | Path | None) -> DaemonConfig:
    """Read the daemon config file (or defaults when ``path`` is None). The source password comes from
    $RADIO_SOURCE_PASSWORD, else the file's ``icecast.password_file``, else ``icecast.password``."""
    env_password = os.environ.get(PASSWORD_ENV, "")
    env_token = os.environ.get(API_TOKEN_ENV, "")
    if path is None:
        return DaemonConfig(icecast=IcecastConfig(password=env_password), api=ApiConfig(token=env_token))
    problems = _Problems(str(path))
    root = _compose(Path(path), problems)
    if root is not None and not isinstance(root, yaml.MappingNode):
        problems.add(_line(root), "config", "the file must be a mapping of keys (stations:, model:, icecast: ...)")
        root = None
    if root is None:
        raise ConfigError(problems.items)
    base = Path(path).resolve().parent
    m = _Mapping(root, problems, "", DAEMON_KEYS)
    stations = m.get("stations", "str", "stations")
    if stations and not Path(stations).is_absolute():
        stations = str(base / stations)
    icecast = IcecastConfig(password=env_password)
    ic = _section(m, "icecast", ICECAST_KEYS, "{host: 127.0.0.1, port: 8000}")
    if ic is not None:
        password = env_password or _read_secret_file(ic, "password_file", base) or ic.get("password", "str", "")
        icecast = IcecastConfig(
            host=ic.get("host", "str", "127.0.0.1", check=_text_check(255)),
            port=ic.get("port", "int", 8000, check=_range(1, 65535)),
            user=ic.get("user", "str", "source", check=_text_check(100)),
            password=password,
            local=ic.get("local", "bool", False),
            admin_password=ic.get("admin_password", "str", ""),
            public_url=ic.get("public_url", "str", "", check=_text_check(500, allow_empty=True)),
        )
    api = ApiConfig(token=env_token)
    ap = _section(m, "api", API_KEYS, "{host: 127.0.0.1, port: 8765}")
    if ap is not None:
        api = ApiConfig(enabled=ap.get("enabled", "bool", True),
                        host=ap.get("host", "str", "127.0.0.1", check=_text_check(255)),
                        port=ap.get("port", "int", 8765, check=_range(0, 65535)),
                        token=env_token or _read_secret_file(ap, "token_file", base))
        problem = api.token_problem()
        if problem:
            ap.err("host", problem)
    engine = EngineConfig()
    en = _section(m, "engine", ENGINE_KEYS, "{chunk_seconds: 4}")
    if en is not None:
        values: dict[str, Any] = {}
        for name, f in EngineConfig.__dataclass_fields__.items():
            if name in ("decoder", "generate", "weights", "kv", "compile", "codec", "kernels"):
                choices = {"decoder": DECODERS, "generate": GENERATE, "weights": WEIGHTS, "kv": KV_FORMATS,
                           "compile": COMPILE, "codec": CODEC, "kernels": KERNELS}[name]
                v = en.get(name, "str", None, check=_in(choices))
                if v is not None:
                    values[name] = v
                continue
            if name == "linger":
                v = en.get(name, "duration", None, check=_range(0, 24 * 3600.0))
                if v is not None:
                    values[name] = v
                continue
            kind = "int" if f.type in ("int", int) else "float"
            v = en.get(name, kind, None, check=_range(0, 10_000, lo_open=(name not in ("overlap_frames", "max_batch"))))
            if v is not None:
                values[name] = v
        engine = EngineConfig(**values)
        if engine.window_seconds < engine.context_seconds + 2 * engine.chunk_seconds:
            en.err("window_seconds", f"{engine.window_seconds:g} is too short: it must be at least "
                                     "context_seconds + 2 x chunk_seconds "
                                     f"({engine.context_seconds + 2 * engine.chunk_seconds:g})")
    cfg = DaemonConfig(
        stations_dir=stations,
        model=m.get("model", "str", DEFAULT_MODEL),
        device=m.get("device", "str", "auto", check=_device_check),
        dtype=m.get("dtype", "str", "auto", check=_in(DTYPES)),
        memory_budget=m.get("memory_budget", "str", "auto", check=_size_check),
        seed=m.get("seed", "int", None),
        icecast=icecast,
        engine=engine,
        api=api,
        log_level=m.get("log_level", "str", "INFO", check=_in(("DEBUG", "INFO", "WARNING", "ERROR"))),
        path=str(path),
        requests=RequestsConfig(**(requests_section(m, base) or {})),
    )
    if problems.items:
        raise ConfigError(problems.items)
    return cfg


def looks_like_daemon_config(path: Path) -> bool:
    """A YAML file without a top-level ``playlist`` / ``mount`` is taken as a daemon config by ``radio check``."""
    try:
        node = yaml.compose(path.read_text(encoding="utf-8"), Loader=yaml.SafeLoader)
    except Exception:  # noqa: BLE001 - a broken file is checked as a station, which reports it properly
        return False
    if not isinstance(node, yaml.MappingNode):
        return False
    keys = {k.value for k, _ in node.value if isinstance(k, yaml.ScalarNode)}
    return not ({"playlist", "mount"} & keys) and bool(keys & set(DAEMON_KEYS))
