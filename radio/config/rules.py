"""The rules for values a user types, shared by station files, the daemon config and the control API: text,
durations, ranges, choices, sizes, devices. Each check returns an error message or None."""

from __future__ import annotations

import difflib
import math
import re
from typing import Any, Callable, Iterable

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
