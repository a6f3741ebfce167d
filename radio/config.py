"""YAML -> frozen dataclasses, with every check in one pass.

Every problem is reported as ``path:line: key: message`` and ALL problems of a run are collected before a
:class:`~radio.errors.ConfigError` is raised, so an operator fixes a file in one go. Unknown keys get a
did-you-mean. YAML is read through ``yaml.compose`` (node graph, not objects), so each value keeps its line,
and alias bombs or absurd nesting are refused before anything is expanded.
"""

from __future__ import annotations

import difflib
import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import yaml

from .errors import ConfigError

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "facebook/musicgen-small"
DTYPES = ("auto", "float32", "bfloat16", "float16")
DECODERS = ("auto", "static", "dynamic")


@dataclass(frozen=True)
class Sampling:
    """Per-station sampling settings; applied per batch row."""

    temperature: float = 1.0
    top_k: int = 250
    guidance: float = 3.0


FORMATS = ("mp3", "vorbis", "opus")
ORDERS = ("cycle", "shuffle")
BITRATES = {"mp3": (32, 320), "vorbis": (48, 500), "opus": (16, 256)}
PASSWORD_ENV = "RADIO_SOURCE_PASSWORD"
API_TOKEN_ENV = "RADIO_API_TOKEN"

# Limits that keep a hostile or broken file from hurting the process.
MAX_FILE_BYTES = 256 * 1024
MAX_NODES = 20_000
MAX_DEPTH = 20
MAX_PROMPT_CHARS = 1000
MAX_STRING_CHARS = 2000
MAX_PLAYLIST_ITEMS = 1000
MAX_STATIONS = 512  # one GPU carries about a hundred small-model mounts; a CPU far fewer (see README)
MAX_DURATION_S = 24 * 3600.0
MAX_TITLE_CHARS = 200
MAX_BLEND_S = 600.0


@dataclass(frozen=True)
class PlaylistItem:
    title: str
    prompt: str
    duration: float  # seconds
    blend: float = 0.0  # seconds over which the text conditioning moves from the previous item's prompt


@dataclass(frozen=True)
class StationConfig:
    """One station, as validated from one YAML file."""

    name: str
    mount: str
    format: str
    bitrate: int
    description: str
    genre: str
    url: str
    order: str
    sampling: Sampling
    playlist: tuple[PlaylistItem, ...]
    path: str = ""
    apply: str = "next"  # live edits of the playlist: "next" (at the end of the current item) or "now"
    loudness: float | None = -16.0  # LUFS target of the mount's encoder; None: no normalisation
    idents: tuple[str, ...] = ()  # audio files (absolute paths) played between playlist items
    ident_every: int = 1  # ...every this many items
    model: str | None = None  # hub id or checkpoint directory; None: the daemon's model
    dtype: str | None = None  # decoder dtype for this station's model; None: the daemon's dtype

    @property
    def key(self) -> str:
        """Stations are identified by their file."""
        return self.path or self.mount


@dataclass(frozen=True)
class IcecastConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    user: str = "source"
    password: str = field(default="", repr=False)
    local: bool = False  # start our own icecast2 from icecast.xml
    admin_password: str = field(default="", repr=False)
    public_url: str = ""  # where listeners reach Icecast (web player links); default http://host:port

    @property
    def listen_base(self) -> str:
        return (self.public_url or f"http://{self.host}:{self.port}").rstrip("/")


@dataclass(frozen=True)
class ApiConfig:
    """The control API and web player."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = 8765
    token: str = field(default="", repr=False)  # required for writes when set; required to bind non-loopback

    @property
    def loopback(self) -> bool:
        return self.host in ("localhost", "::1") or self.host.startswith("127.")

    def token_problem(self) -> str | None:
        """Why this API setting is refused (a non-loopback bind without a token), or None."""
        if self.enabled and not self.loopback and not self.token:
            return (f"{self.host} is not loopback: set ${API_TOKEN_ENV} or api.token_file, so that writes "
                    "need a token")
        return None


@dataclass(frozen=True)
class EngineConfig:
    """Engine timing. Seconds unless named otherwise."""

    chunk_seconds: float = 4.0  # new audio per batched step in steady state
    first_chunk_seconds: float = 1.0  # a new station's first step: short, so it is on air quickly
    context_seconds: float = 10.0  # codes kept per station; what a window reset re-prefills
    window_seconds: float = 30.0  # longest context a station's KV cache grows to before a reset
    buffer_seconds: float = 12.0  # PCM a station tries to keep ahead of real time
    max_batch: int = 0  # stations per step at most; 0: the model's own limit (16 on CPU, every slot that fits on CUDA)
    overlap_frames: int = 10  # context frames decoded again in front of a chunk, to warm EnCodec up
    crossfade_ms: float = 40.0  # equal-power crossfade at chunk joins (taken from the overlap)
    filler_seconds: float = 4.0  # recent audio looped when a station's buffer runs dry
    silence_seconds: float = 10.0  # generated near-silence (< -60 dBFS) longer than this is skipped
    decoder: str = "auto"  # decode path: auto (static slots + CUDA graphs on CUDA, dynamic on CPU), static, dynamic


@dataclass(frozen=True)
class DaemonConfig:
    stations_dir: str = "stations"
    model: str = DEFAULT_MODEL
    device: str = "auto"
    dtype: str = "auto"
    memory_budget: str = "auto"  # for all models together: a size (6GiB), auto, or off
    seed: int | None = None
    icecast: IcecastConfig = field(default_factory=IcecastConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    api: ApiConfig = field(default_factory=ApiConfig)
    log_level: str = "INFO"
    path: str = ""


# ---------------------------------------------------------------------------------------------------------------
# YAML nodes with lines


class _Problems:
    def __init__(self, path: str) -> None:
        self.path = path
        self.items: list[str] = []

    def add(self, line: int | None, key: str, message: str) -> None:
        where = f"{self.path}:{line}" if line else self.path
        self.items.append(f"{where}: {key}: {message}")


def _line(node: yaml.Node) -> int:
    return node.start_mark.line + 1


def _check_graph(root: yaml.Node, problems: _Problems) -> bool:
    """Refuse alias bombs and deep nesting before converting anything (the graph itself stays small)."""
    count = 0
    stack: list[tuple[yaml.Node, int]] = [(root, 1)]
    while stack:
        node, depth = stack.pop()
        count += 1
        if count > MAX_NODES:
            problems.add(_line(root), "yaml", f"document expands to more than {MAX_NODES} values "
                                              "(anchors/aliases?); write it out plainly")
            return False
        if depth > MAX_DEPTH:
            problems.add(_line(node), "yaml", f"nested deeper than {MAX_DEPTH} levels; flatten it")
            return False
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                stack.append((k, depth + 1))
                stack.append((v, depth + 1))
        elif isinstance(node, yaml.SequenceNode):
            stack.extend((v, depth + 1) for v in node.value)
    return True


def _scalar(node: yaml.ScalarNode) -> Any:
    """Resolve a scalar with the safe loader's rules (int, float, bool, null, str)."""
    loader = yaml.SafeLoader("")
    try:
        return loader.construct_object(node, deep=True)
    except yaml.YAMLError:
        return node.value
    finally:
        loader.dispose()


def _compose(path: Path, problems: _Problems) -> yaml.Node | None:
    try:
        size = path.stat().st_size
    except OSError as exc:
        problems.add(1, "file", f"cannot read: {exc.strerror}")
        return None
    if size > MAX_FILE_BYTES:
        problems.add(1, "file", f"is {size} bytes; the limit is {MAX_FILE_BYTES} bytes")
        return None
    try:
        raw = path.read_bytes()
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        problems.add(line, "file", "is not UTF-8 text; save it as UTF-8")
        return None
    except OSError as exc:
        problems.add(1, "file", f"cannot read: {exc.strerror}")
        return None
    if "\x00" in text:
        problems.add(text[: text.index("\x00")].count("\n") + 1, "file", "contains NUL bytes; it is not YAML text")
        return None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else None
        problems.add(line, "yaml", f"syntax error: {exc.problem or exc.context}; check indentation and quoting")
        return None
    except yaml.YAMLError as exc:
        problems.add(1, "yaml", f"syntax error: {exc}")
        return None
    except RecursionError:
        problems.add(1, "yaml", f"nested deeper than {MAX_DEPTH} levels; flatten it")
        return None
    if node is None:
        problems.add(1, "file", "is empty; see stations/*.yaml for examples")
        return None
    if not _check_graph(node, problems):
        return None
    return node


class _Mapping:
    """A YAML mapping node read key by key, reporting into ``problems`` with the right line."""

    def __init__(self, node: yaml.Node, problems: _Problems, prefix: str, allowed: Iterable[str]) -> None:
        self.problems = problems
        self.prefix = prefix
        self.line = _line(node)
        self.values: dict[str, yaml.Node] = {}
        self.key_lines: dict[str, int] = {}
        allowed = list(allowed)
        for k, v in node.value:
            key = _scalar(k) if isinstance(k, yaml.ScalarNode) else None
            if not isinstance(key, str):
                problems.add(_line(k), self.name("?"), "keys must be plain names")
                continue
            if key in self.values:
                problems.add(_line(k), self.name(key), f"appears twice (first on line {self.key_lines[key]})")
                continue
            if key not in allowed:
                close = difflib.get_close_matches(key, allowed, n=1)
                hint = f"did you mean '{close[0]}'?" if close else f"known keys: {', '.join(allowed)}"
                problems.add(_line(k), self.name(key), f"unknown key; {hint}")
                continue
            self.values[key] = v
            self.key_lines[key] = _line(k)

    def name(self, key: str) -> str:
        return f"{self.prefix}.{key}" if self.prefix else key

    def node(self, key: str) -> yaml.Node | None:
        return self.values.get(key)

    def err(self, key: str, message: str) -> None:
        node = self.values.get(key)
        self.problems.add(_line(node) if node is not None else self.line, self.name(key), message)

    def get(self, key: str, kind: str, default: Any = None, required: bool = False,
            check: Callable[[Any], str | None] | None = None) -> Any:
        node = self.values.get(key)
        if node is None:
            if required:
                self.problems.add(self.line, self.name(key), "is required")
            return default
        if not isinstance(node, yaml.ScalarNode):
            self.err(key, f"must be {_KIND_TEXT[kind]}, not a {'list' if isinstance(node, yaml.SequenceNode) else 'mapping'}")
            return default
        value = _scalar(node)
        converted = _convert(value, kind)
        if converted is _BAD:
            self.err(key, f"must be {_KIND_TEXT[kind]}, got {value!r}"[:200])
            return default
        if kind == "str" and check is None:
            check = _text_check(MAX_STRING_CHARS, allow_empty=True)  # every text obeys the one text rule
        if check is not None:
            message = check(converted)
            if message:
                self.err(key, message)
                return default
        return converted


_BAD = object()
_KIND_TEXT = {"str": "text", "int": "a whole number", "float": "a number", "bool": "true or false",
              "duration": "a duration such as 90, 90s, 3m or 1h"}
_DURATION = re.compile(r"^\s*(?:(\d+(?:\.\d+)?)\s*h)?\s*(?:(\d+(?:\.\d+)?)\s*m)?\s*(?:(\d+(?:\.\d+)?)\s*s?)?\s*$")


def parse_duration(value: Any) -> float | None:
    """90, 90.5, '90', '90s', '3m', '1m30s', '1h' -> seconds; None when it is not a duration."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if not isinstance(value, str):
        return None
    text = value.strip()
    if text.startswith("-"):
        rest = parse_duration(text[1:])
        return -rest if rest is not None else None
    m = _DURATION.match(text)
    if not m or not any(m.groups()):
        return None
    h, mi, s = (float(g) if g else 0.0 for g in m.groups())
    return h * 3600 + mi * 60 + s


def _convert(value: Any, kind: str) -> Any:
    if kind == "str":
        if isinstance(value, bool) or value is None or isinstance(value, (list, dict)):
            return _BAD
        return str(value)
    if kind == "int":
        return value if isinstance(value, int) and not isinstance(value, bool) else _BAD
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return _BAD
        return float(value)
    if kind == "bool":
        return value if isinstance(value, bool) else _BAD
    if kind == "duration":
        d = parse_duration(value)
        return _BAD if d is None or not math.isfinite(d) else d
    raise ValueError(kind)


def text_problem(value: str, limit: int, allow_empty: bool = False) -> str | None:
    """The one rule for text a user types (station files, the daemon config, the control API), or None if fine.

    Text must be valid Unicode (no lone UTF-16 surrogates, which no encoder, tokenizer or HTTP client can
    carry), one line, and free of control characters: C0 and C1 controls, DEL and the Unicode line and
    paragraph separators are refused; a tab is allowed. Nothing is silently stripped, so what is validated is
    exactly what plays.
    """
    if not allow_empty and not value.strip():
        return "must not be empty"
    if len(value) > limit:
        return f"is {len(value)} characters; the limit is {limit}"
    for c in value:
        o = ord(c)
        if 0xD800 <= o <= 0xDFFF:
            return f"is not valid Unicode: it holds a lone surrogate (U+{o:04X}); remove that character"
        if (o < 32 and c != "\t") or 0x7F <= o <= 0x9F or o in (0x2028, 0x2029):
            return f"must be one line without control characters (found U+{o:04X}); remove it"
    return None


def _text_check(limit: int, allow_empty: bool = False) -> Callable[[str], str | None]:
    def check(value: str) -> str | None:
        return text_problem(value, limit, allow_empty)
    return check


def duration_value(value: Any, lo: float, hi: float, lo_open: bool = False) -> tuple[float | None, str | None]:
    """A user's duration (90, '90s', '3m', '1h') as finite seconds within [lo, hi] (or (lo, hi]), or an error.
    The one rule for durations in station files and the control API: NaN, infinities and overflows are refused."""
    seconds = parse_duration(value)
    if seconds is None or not math.isfinite(seconds):
        return None, f"must be a duration such as 90, 90s, 3m or 1h, got {str(value)[:40]!r}"
    problem = _range(lo, hi, lo_open)(seconds)
    return (None, problem) if problem else (seconds, None)


def _check_mount(value: str) -> str | None:
    if not value.startswith("/"):
        return f"must start with '/', e.g. '/{value.lstrip('/') or 'radio.mp3'}'"
    if not re.fullmatch(r"/[A-Za-z0-9._~\-/]+", value) or "//" in value or "/../" in value + "/":
        return "may only contain letters, digits and . _ ~ - /, e.g. '/lofi.mp3'"
    if len(value) > 100:
        return "is longer than 100 characters"
    return None


def _in(choices: Iterable[str]) -> Callable[[str], str | None]:
    choices = tuple(choices)

    def check(value: str) -> str | None:
        if value not in choices:
            close = difflib.get_close_matches(value, choices, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            return f"{value!r} is not one of {', '.join(choices)}{hint}"
        return None
    return check


def _range(lo: float, hi: float, lo_open: bool = False) -> Callable[[float], str | None]:
    def check(value: float) -> str | None:
        if (value <= lo if lo_open else value < lo) or value > hi:
            low = f"greater than {lo:g}" if lo_open else f"at least {lo:g}"
            return f"{value:g} is out of range: must be {low} and at most {hi:g}"
        return None
    return check


# ---------------------------------------------------------------------------------------------------------------
# Stations

STATION_KEYS = ("name", "mount", "format", "bitrate", "description", "genre", "url", "order", "generation",
                "playlist", "apply", "loudness", "idents", "model", "dtype")
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?")


def _model_value(m: _Mapping, base: Path) -> str | None:
    """``model:`` is a hub id (org/name) or a checkpoint directory; a directory is taken relative to the file
    that names it, and must exist and hold config.json."""
    value = m.get("model", "str", None, check=_text_check(500))
    if value is None:
        return None
    p = Path(value).expanduser()
    p = p if p.is_absolute() else base / p
    if p.is_dir():
        if not (p / "config.json").is_file():
            m.err("model", f"{p} has no config.json; point it at a MusicGen checkpoint directory")
            return None
        return str(p)
    if value.startswith(("/", "./", "../", "~")) or not _HUB_ID.fullmatch(value):
        m.err("model", f"{p} is not a directory; use a checkpoint directory or a hub id such as "
                       f"{DEFAULT_MODEL}")
        return None
    return value
IDENT_KEYS = ("files", "every")
MAX_IDENTS = 50
MAX_IDENT_BYTES = 20 * 1024 * 1024
APPLY = ("next", "now")
GENERATION_KEYS = ("temperature", "top_k", "guidance")
ITEM_KEYS = ("title", "prompt", "duration", "transition")
TRANSITION_KEYS = ("blend",)


def _parse_station(path: Path, problems: _Problems) -> StationConfig | None:
    before = len(problems.items)
    root = _compose(path, problems)
    if root is None:
        return None
    if not isinstance(root, yaml.MappingNode):
        problems.add(_line(root), "station", "the file must be a mapping of keys (name:, mount:, playlist: ...)")
        return None
    m = _Mapping(root, problems, "", STATION_KEYS)
    name = m.get("name", "str", required=True, check=_text_check(200))
    mount = m.get("mount", "str", required=True, check=_check_mount)
    fmt = m.get("format", "str", "mp3", check=_in(FORMATS))
    bitrate = m.get("bitrate", "int", None)
    if bitrate is not None and fmt in BITRATES:
        lo, hi = BITRATES[fmt]
        if not lo <= bitrate <= hi:
            m.err("bitrate", f"{bitrate} kbit/s is out of range for {fmt}: use {lo}..{hi}")
            bitrate = None
    if bitrate is None:
        bitrate = 96 if fmt == "opus" else 128
    description = m.get("description", "str", "", check=_text_check(MAX_STRING_CHARS, allow_empty=True))
    genre = m.get("genre", "str", "", check=_text_check(200, allow_empty=True))
    url = m.get("url", "str", "", check=_text_check(500, allow_empty=True))
    order = m.get("order", "str", "cycle", check=_in(ORDERS))
    apply = m.get("apply", "str", "next", check=_in(APPLY))
    loudness: float | None = -16.0
    if isinstance(m.node("loudness"), yaml.ScalarNode) and _scalar(m.node("loudness")) in ("off", False):
        loudness = None
    else:
        loudness = m.get("loudness", "float", -16.0, check=_range(-40.0, -5.0))

    idents: list[str] = []
    ident_every = 1
    idn = _section(m, "idents", IDENT_KEYS, "{files: [ids/station-id.mp3], every: 3}")
    if idn is not None:
        ident_every = idn.get("every", "int", 1, check=_range(1, 1000))
        files_node = idn.node("files")
        if not isinstance(files_node, yaml.SequenceNode) or not files_node.value:
            idn.err("files", "must be a list of audio files, e.g. [ids/station-id.mp3]")
        elif len(files_node.value) > MAX_IDENTS:
            idn.err("files", f"has {len(files_node.value)} files; the limit is {MAX_IDENTS}")
        else:
            for i, fnode in enumerate(files_node.value):
                value = _scalar(fnode) if isinstance(fnode, yaml.ScalarNode) else None
                where = f"idents.files[{i}]"
                if not isinstance(value, str) or not value.strip():
                    problems.add(_line(fnode), where, "must be the path of an audio file")
                    continue
                f = Path(value).expanduser()
                f = f if f.is_absolute() else path.parent / f
                if not f.is_file():
                    problems.add(_line(fnode), where, f"{f} does not exist (paths are relative to this file)")
                elif f.stat().st_size > MAX_IDENT_BYTES:
                    problems.add(_line(fnode), where, f"{f} is larger than {MAX_IDENT_BYTES // 2**20} MB")
                else:
                    idents.append(str(f))

    model = _model_value(m, path.parent)
    dtype = m.get("dtype", "str", None, check=_in(DTYPES))

    sampling = Sampling()
    g = _section(m, "generation", GENERATION_KEYS, "{temperature: 1.0, top_k: 250, guidance: 3.0}")
    if g is not None:
        sampling = Sampling(
            temperature=g.get("temperature", "float", 1.0, check=_range(0.0, 5.0)),
            top_k=g.get("top_k", "int", 250, check=_range(1, 100_000)),
            guidance=g.get("guidance", "float", 3.0, check=_range(0.0, 20.0)),
        )

    items: list[PlaylistItem] = []
    pl_node = m.node("playlist")
    if pl_node is None:
        problems.add(m.line, "playlist", "is required: a list of {title, prompt, duration} items")
    elif not isinstance(pl_node, yaml.SequenceNode):
        m.err("playlist", "must be a list of {title, prompt, duration} items")
    elif not pl_node.value:
        m.err("playlist", "is empty; add at least one item with a prompt")
    elif len(pl_node.value) > MAX_PLAYLIST_ITEMS:
        m.err("playlist", f"has {len(pl_node.value)} items; the limit is {MAX_PLAYLIST_ITEMS}")
    else:
        for i, item_node in enumerate(pl_node.value):
            prefix = f"playlist[{i}]"
            if isinstance(item_node, yaml.ScalarNode) and isinstance(_scalar(item_node), str):
                problems.add(_line(item_node), prefix, "must be a mapping with prompt: and duration:, "
                                                       "e.g. {prompt: 'mellow jazz', duration: 3m}")
                continue
            if not isinstance(item_node, yaml.MappingNode):
                problems.add(_line(item_node), prefix, "must be a mapping with prompt: and duration:")
                continue
            it = _Mapping(item_node, problems, prefix, ITEM_KEYS)
            prompt = it.get("prompt", "str", required=True, check=_text_check(MAX_PROMPT_CHARS))
            title = it.get("title", "str", None, check=_text_check(MAX_TITLE_CHARS))
            duration = it.get("duration", "duration", required=True,
                              check=_range(0.0, MAX_DURATION_S, lo_open=True))
            blend = 0.0
            tr = _section(it, "transition", TRANSITION_KEYS, "{blend: 8s}")
            if tr is not None:
                blend = tr.get("blend", "duration", 0.0, check=_range(0.0, MAX_BLEND_S)) or 0.0
                if duration is not None and blend > duration:
                    tr.err("blend", f"{blend:g}s is longer than the item ({duration:g}s)")
            if prompt is not None and duration is not None:
                items.append(PlaylistItem(title=title or prompt[:80], prompt=prompt, duration=duration, blend=blend))

    if len(problems.items) > before:
        return None
    return StationConfig(name=name, mount=mount, format=fmt, bitrate=bitrate, description=description,
                         genre=genre, url=url, order=order, sampling=sampling, playlist=tuple(items),
                         path=str(path), apply=apply, loudness=loudness, idents=tuple(idents),
                         ident_every=ident_every, model=model, dtype=dtype)


def load_station(path: str | Path) -> StationConfig:
    """Load and validate one station file; raises ConfigError with every problem found."""
    problems = _Problems(str(path))
    station = _parse_station(Path(path), problems)
    if station is None:
        raise ConfigError(sorted(problems.items, key=_line_of))
    return station


def _line_of(problem: str) -> int:
    m = re.match(r"^[^:]*:(\d+):", problem)
    return int(m.group(1)) if m else 0


def station_files(directory: str | Path) -> list[Path]:
    d = Path(directory)
    return sorted(p for p in d.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file()
                  and not p.name.startswith("."))


def load_stations(paths: Iterable[str | Path]) -> tuple[list[StationConfig], list[str]]:
    """Load station files and directories. Returns (good stations, problems).

    A bad file does not stop the others from loading: the caller decides whether problems are fatal
    (``radio check``) or logged (``radio run``). Duplicate mounts: the first file (by name) keeps the mount.
    """
    files: list[Path] = []
    problems: list[str] = []
    for p in paths:
        path = Path(p)
        if path.is_dir():
            files.extend(station_files(path))
            problems.extend(f"{link}: file: is a symbolic link that loops or points nowhere; fix or remove it"
                            for link in sorted(path.iterdir())
                            if link.suffix in (".yaml", ".yml") and link.is_symlink() and not link.exists())
        elif path.exists():
            files.append(path)
        else:
            problems.append(f"{path}: file: does not exist")
    stations: list[StationConfig] = []
    mounts: dict[str, StationConfig] = {}
    for f in files:
        try:
            st = load_station(f)
        except ConfigError as exc:
            problems.extend(exc.problems)
            continue
        if st.mount in mounts:
            problems.append(f"{f}:{_mount_line(f)}: mount: {st.mount} is already used by {mounts[st.mount].path}; "
                            "every station needs its own mount")
            continue
        if len(stations) >= MAX_STATIONS:
            problems.append(f"{f}: file: more than {MAX_STATIONS} stations; split them over several daemons")
            continue
        mounts[st.mount] = st
        stations.append(st)
    return stations, problems


def _mount_line(path: Path) -> int:
    for i, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if line.lstrip().startswith("mount:"):
            return i
    return 1


# ---------------------------------------------------------------------------------------------------------------
# Daemon config

DAEMON_KEYS = ("stations", "model", "device", "dtype", "memory_budget", "seed", "icecast", "engine", "api", "log_level")
ICECAST_KEYS = ("host", "port", "user", "password", "password_file", "local", "admin_password", "public_url")
API_KEYS = ("enabled", "host", "port", "token_file")
ENGINE_KEYS = tuple(f for f in EngineConfig.__dataclass_fields__)


def _section(m: _Mapping, key: str, keys: Iterable[str], example: str) -> _Mapping | None:
    """A nested mapping such as ``icecast:``; None (with an error if it is not a mapping) when unusable."""
    node = m.node(key)
    if node is None:
        return None
    if not isinstance(node, yaml.MappingNode):
        m.err(key, f"must be a mapping like {example}")
        return None
    return _Mapping(node, m.problems, m.name(key), keys)


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
            if name == "decoder":
                v = en.get(name, "str", None, check=_in(DECODERS))
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
    )
    if problems.items:
        raise ConfigError(problems.items)
    return cfg


_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000**2, "mb": 1000**2, "mib": 1024**2,
          "g": 1000**3, "gb": 1000**3, "gib": 1024**3, "t": 1000**4, "tb": 1000**4, "tib": 1024**4}
SIZE_HELP = "a size such as 6GiB, 6000MB or 512MiB, or auto, or off"


def parse_size(text: str) -> int | None | str:
    """'6GiB' -> bytes; 'off' -> None (no budget); 'auto' -> 'auto'. Raises ValueError when unreadable."""
    value = str(text).strip().lower()
    if value in ("off", "none", "unlimited"):
        return None
    if value == "auto":
        return "auto"
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value)
    if not m or m.group(2) not in _UNITS:
        raise ValueError(f"{text!r} is not {SIZE_HELP}")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def _size_check(value: str) -> str | None:
    try:
        parse_size(value)
    except ValueError as exc:
        return str(exc)
    return None


def _device_check(value: str) -> str | None:
    if re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
        return None
    return f"{value!r} is not a device: use auto, cpu, cuda or cuda:N"


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
