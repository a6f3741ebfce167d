"""Station files: one YAML file a station, every problem of a file reported at once."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable

import yaml

from ..errors import ConfigError
from .requests import requests_section
from .rules import _check_mount, _in, _range, _text_check
from .values import (BITRATES, DEFAULT_MODEL, DTYPES, FORMATS, MAX_BLEND_S, MAX_DURATION_S, MAX_PLAYLIST_ITEMS, MAX_PROMPT_CHARS,
                     MAX_STATIONS, MAX_STRING_CHARS, MAX_TITLE_CHARS, ORDERS, WEIGHTS, PlaylistItem, Sampling,
                     StationConfig)
from .yamlfile import _compose, _line, _Mapping, _Problems, _scalar, _section

STATION_KEYS = ("name", "mount", "format", "bitrate", "description", "genre", "url", "order", "generation",
                "playlist", "apply", "loudness", "idents", "model", "dtype", "weights", "always",
                "requests")
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
    always = m.get("always", "bool", False)
    requests = requests_section(m, path.parent) or {}
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
    weights = m.get("weights", "str", None, check=_in(WEIGHTS))

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
                         ident_every=ident_every, model=model, dtype=dtype, weights=weights, always=always,
                         requests=tuple(sorted(requests.items())))


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
