"""YAML read as a node graph, so every value keeps its line: problems are collected as ``path:line: key:
message``, unknown keys get a did-you-mean, and alias bombs or absurd nesting are refused before anything is
expanded."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Callable, Iterable

import yaml

from .rules import _BAD, _KIND_TEXT, _convert, _text_check
from .values import MAX_DEPTH, MAX_FILE_BYTES, MAX_NODES, MAX_STRING_CHARS

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
        problems.add(mark.line + 1 if mark else None, "yaml",
                     f"syntax error: {exc.problem or exc.context}; check indentation and quoting")
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


def _section(m: _Mapping, key: str, keys: Iterable[str], example: str) -> _Mapping | None:
    """A nested mapping such as ``icecast:``; None (with an error if it is not a mapping) when unusable."""
    node = m.node(key)
    if node is None:
        return None
    if not isinstance(node, yaml.MappingNode):
        m.err(key, f"must be a mapping like {example}")
        return None
    return _Mapping(node, m.problems, m.name(key), keys)
