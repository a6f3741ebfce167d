"""The ``requests:`` section (station files and the daemon config) and its blocklist file."""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path
from typing import Any

from .rules import _range
from .values import MAX_BLOCKLIST_LINES, MAX_FILE_BYTES, REQUESTS_KEYS
from .yamlfile import _Mapping, _section

EXAMPLE = "{enabled: true, every: 10m, queue: 5, duration: 2m, share: 0.5, blocklist: blocked.txt}"


def normalize(text: str) -> str:
    """What the blocklist is matched against: NFKC (full-width and ligature forms fold to plain letters),
    case-folded."""
    return unicodedata.normalize("NFKC", text).casefold()


def blocklist_patterns(text: str) -> tuple[tuple[str, ...], list[tuple[int, str]]]:
    """A blocklist file's patterns and its problems (line, message). One entry a line: a word or phrase, matched
    whole and in any case; ``re:`` then a regular expression; blank lines and ``#`` comments are skipped."""
    patterns: list[str] = []
    problems: list[tuple[int, str]] = []
    lines = text.splitlines()
    if len(lines) > MAX_BLOCKLIST_LINES:
        return (), [(MAX_BLOCKLIST_LINES + 1, f"has {len(lines)} lines; the limit is {MAX_BLOCKLIST_LINES}")]
    for number, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("re:"):
            pattern = line[3:].strip()
            try:
                re.compile(pattern)
            except re.error as exc:
                problems.append((number, f"{pattern!r} is not a valid regular expression: {exc}"))
                continue
        else:
            words = normalize(line).split()
            pattern = r"(?<!\w)" + r"\s+".join(re.escape(w) for w in words) + r"(?!\w)"
        patterns.append(pattern)
    return tuple(patterns), problems


def requests_section(m: _Mapping, base: Path) -> dict[str, Any] | None:
    """The keys a ``requests:`` section sets (None when it is absent or unusable; problems are reported into
    ``m``'s file). ``blocklist`` is read here: a file relative to ``base``, turned into patterns."""
    r = _section(m, "requests", REQUESTS_KEYS, EXAMPLE)
    if r is None:
        return None
    values: dict[str, Any] = {}
    checks: dict[str, tuple[str, Any]] = {
        "enabled": ("bool", None),
        "every": ("duration", _range(0.0, 7 * 24 * 3600.0)),
        "queue": ("int", _range(1, 1000)),
        "duration": ("duration", _range(0.0, 3600.0, lo_open=True)),
        "share": ("float", _range(0.0, 1.0, lo_open=True)),
    }
    for key, (kind, check) in checks.items():
        v = r.get(key, kind, None, check=check)
        if v is not None:
            values[key] = v
    name = r.get("blocklist", "str", None)
    if name:
        path = Path(name).expanduser()
        path = path if path.is_absolute() else base / path
        try:
            data = path.read_bytes()[:MAX_FILE_BYTES + 1]
            if len(data) > MAX_FILE_BYTES:
                raise ValueError(f"is larger than {MAX_FILE_BYTES // 1024} KB")
            text = data.decode("utf-8")
        except OSError as exc:
            r.err("blocklist", f"cannot read {path}: {exc.strerror}; give a file of words, one a line "
                               "(relative to this file)")
            return None
        except UnicodeDecodeError:
            r.err("blocklist", f"{path} is not UTF-8 text; save it as UTF-8")
            return None
        except ValueError as exc:
            r.err("blocklist", f"{path} {exc}; keep it to words and patterns")
            return None
        patterns, problems = blocklist_patterns(text)
        for line, message in problems:
            r.err("blocklist", f"{path}:{line}: {message}")
        if problems:
            return None
        values["blocklist"] = patterns
        values["blocklist_file"] = str(path)
    return values
